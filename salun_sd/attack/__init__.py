"""Attacks on an erased model: does an adversarial prompt bring the erased concept back?

`discrete` is UnlearnDiffAtk (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack): real prefix tokens
found by optimising relaxed one-hot vectors. `embedding` optimises the prefix embeddings themselves (Pham et
al., ICLR 2024), an upper bound on what any prompt can do. Both use the erased model as its own classifier:
the diffusion loss of its UNet on a base-model image of the concept.
"""
