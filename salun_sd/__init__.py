"""SalUn saliency unlearning for diffusion models (Stable Diffusion and class-conditional DDPMs)."""

__version__ = "0.1.0"
