"""The model-agnostic SalUn core: the denoiser interface, deterministic draws, the losses, the saliency mask, the masked Accelerate loop, and the one erase flow every family runs."""
