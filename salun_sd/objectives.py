"""Losses on the denoiser interface: the SalUn objective, its saliency loss, and the baselines.

Every loss is a mean over per-example losses, so it does not depend on how a batch is split
across processes or accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from salun_sd.denoiser import Denoiser


@dataclass
class Batch:
    """Clean inputs, their condition ids, and the noise and timesteps drawn for them."""

    x0: torch.Tensor
    cond: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    misaligned: torch.Tensor | None = None  # c' per example, for objectives that need one


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_loss(den: Denoiser, model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example denoising loss ‖ε(x_t|c) − ε‖² (or its v/x0 form): the loss a diffusion model is trained with."""
    x_t = den.add_noise(batch.x0, batch.noise, batch.t)
    return per_example_mse(den.predict(model, x_t, batch.t, batch.cond), den.target(batch.x0, batch.noise, batch.t))


def guided_forget_loss(den: Denoiser, model: nn.Module, batch: Batch, guidance: float) -> torch.Tensor:
    """Per-example diffusion loss of the classifier-free-guided prediction (1+w)·ε(x_t|c) − w·ε(x_t|∅).

    Its gradient at the original weights is SalUn's saliency (official SD code: w = 7.5; DDPM: 2.0).
    The conditional and unconditional predictions share one batched forward pass.
    """
    x_t = den.add_noise(batch.x0, batch.noise, batch.t)
    null = torch.full_like(batch.cond, den.null_cond)
    eps_c, eps_u = den.predict(model, torch.cat([x_t, x_t]), torch.cat([batch.t, batch.t]), torch.cat([batch.cond, null])).chunk(2)
    guided = (1 + guidance) * eps_c - guidance * eps_u
    return per_example_mse(guided, den.target(batch.x0, batch.noise, batch.t))


def _forget_and_remain(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over forget and remain examples together (one DDP forward per backward)."""
    x_f = den.add_noise(forget.x0, forget.noise, forget.t)
    x_r = den.add_noise(remain.x0, remain.noise, remain.t)
    pred = den.predict(model, torch.cat([x_f, x_r]), torch.cat([forget.t, remain.t]), torch.cat([forget.cond, remain.cond]))
    pred_f, pred_r = pred.split([len(x_f), len(x_r)])
    return x_f, pred_f, per_example_mse(pred_r, den.target(remain.x0, remain.noise, remain.t)).mean()


def salun_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch, alpha: float):
    """‖ε(x_t|c) − sg[ε(x_t|c')]‖² on D_f + α·diffusion loss on D_r (c' a misaligned concept)."""
    x_f, pred_f, remain_loss = _forget_and_remain(den, model, forget, remain)
    with torch.no_grad():
        target = den.predict(model, x_f, forget.t, forget.misaligned)
    forget_loss = per_example_mse(pred_f, target).mean()
    return forget_loss + alpha * remain_loss, {"forget": forget_loss, "remain": remain_loss}


def gradient_ascent_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch, alpha: float):
    """GA baseline: maximise the diffusion loss on D_f (α·D_r term kept so α=0 gives the plain baseline)."""
    x_f, pred_f, remain_loss = _forget_and_remain(den, model, forget, remain)
    forget_loss = per_example_mse(pred_f, den.target(forget.x0, forget.noise, forget.t)).mean()
    return -forget_loss + alpha * remain_loss, {"forget": forget_loss, "remain": remain_loss}


def finetune_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch, alpha: float):
    """FT baseline: fine-tune on D_r alone, relying on forgetting by interference."""
    remain_loss = diffusion_loss(den, model, remain).mean()
    return remain_loss, {"remain": remain_loss}


@dataclass(frozen=True)
class Method:
    loss: Callable
    uses_mask: bool
    doc: str


METHODS: dict[str, Method] = {
    "salun": Method(salun_loss, True, "SalUn: misaligned-concept loss + α·remain loss, saliency-masked"),
    "rl": Method(salun_loss, False, "Random label: the SalUn objective on all weights, no mask"),
    "ga": Method(gradient_ascent_loss, False, "Gradient ascent on the forget set"),
    "ft": Method(finetune_loss, False, "Fine-tune on the remain set only"),
}
