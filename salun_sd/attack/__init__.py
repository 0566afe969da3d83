"""Attacks on an erased model: does an adversarial prompt bring the erased concept back?

`discrete` is UnlearnDiffAtk (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack): real prefix tokens
found by optimising relaxed one-hot vectors. `embedding` optimises the prefix embeddings themselves (Pham et
al., ICLR 2024), a per-prompt, per-seed soft-prompt search whose space holds every real k-token prefix. Both
use the erased model as its own classifier: the family's training loss of its network on a base-model image of
the concept (`target.py`). `baseline` draws random prefixes without optimisation (the official random_.py), the
chance floor of both.
"""
