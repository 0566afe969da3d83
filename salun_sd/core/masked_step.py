"""The masked update, for any network and optimizer: weights outside the mask stay bitwise equal to the original.

Gradients are multiplied by the 0/1 mask before the optimizer step, and weight decay acts only where the
mask is 1: decoupled (θ ← θ·(1 − lr·λ), for Adam, as a step pre-hook) or coupled (g ← g + λ·θ before
the mask, as torch's SGD adds it, for SGD with momentum). An optimizer whose state starts at zero and
only ever sees zero gradients there (Adam's moments, SGD's momentum buffer) then never moves those
weights, so no copy of the original weights is needed. The official classification code reached the
same end in PR #33 (February 2026) by restoring masked weights to θ0 after each step and multiplying the
momentum by the mask; before it, masked weights still decayed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from salun_sd.core.sharding import local


def mask_gradients_(grads: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """g ← g·m in place. The +0.0 turns the −0 of a masked negative gradient into +0, so SGD's
    θ − lr·buf leaves a weight of −0 at −0 too (Adam's zero moments are +0 either way)."""
    torch._foreach_mul_(grads, masks)
    torch._foreach_add_(grads, 0.0)


def masked_weight_decay(params: list[nn.Parameter], masks: list[torch.Tensor] | None, decay: float) -> Callable[..., None]:
    """Decoupled weight decay θ ← θ·(1 − lr·λ) where the mask is 1 (a factor of exactly 1.0 elsewhere), as a
    step pre-hook of the optimizer: it runs only when the step does, so a step that fp16 loss scaling skips
    (its gradients overflowed) leaves the weights as they were, decay included."""

    def decay_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        factors = [1 - decay * m for m in masks] if masks is not None else [1 - decay] * len(params)
        with torch.no_grad():
            torch._foreach_mul_([local(p) for p in params], factors)

    return decay_step


def masked_sgd(params: list[nn.Parameter], masks: list[torch.Tensor] | None, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """torch's SGD with momentum and coupled weight decay, both only inside the mask (masks None: everywhere).

    A step pre-hook adds λ·θ to each gradient and then multiplies by the mask, so the momentum buffer is
    exactly 0 outside the mask; inside it the update is bitwise torch's SGD(weight_decay=λ). Every
    parameter must have a gradient at each step (set requires_grad only on the ones that train).
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)

    def decay_and_mask(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads = [p.grad for p in params]
        if weight_decay:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        if masks is not None:
            mask_gradients_(grads, masks)

    optimizer.register_step_pre_hook(decay_and_mask)
    return optimizer
