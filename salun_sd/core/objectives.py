"""Losses on the denoiser interface: the SalUn objective, its saliency loss, and the baselines.

Every training loss takes (denoiser, network, forget batch, remain batch or None, TrainConfig, frozen
original network or None) and returns (loss, logged terms); METHODS says what each one needs.

Every loss is a mean over per-example losses, so it does not depend on how a batch is split
across processes or accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from salun_sd.core.config import TrainConfig
from salun_sd.core.denoiser import Denoiser
from salun_sd.errors import UserError
from salun_sd.core.sampling import ddim_partway, ddim_steps_before


@dataclass
class Batch:
    """Clean inputs, their condition ids, and the noise and timesteps drawn for them."""

    x0: torch.Tensor
    cond: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    misaligned: torch.Tensor | None = None  # c' per example, for objectives that need one
    weight: torch.Tensor | None = None  # per example, its concept's weight in the forget term (None: all 1)


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def weighted(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-example forget losses times their concept's weight (unchanged when the batch has no weights)."""
    return losses if batch.weight is None else losses * batch.weight


def diffusion_loss(den: Denoiser, model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example denoising loss ‖ε(x_t|c) − ε‖² (or its v/x0 form): the loss a diffusion model is trained with."""
    x_t = den.add_noise(batch.x0, batch.noise, batch.t)
    return per_example_mse(den.predict(model, x_t, batch.t, batch.cond), den.target(batch.x0, batch.noise, batch.t))


def guided_forget_loss(den: Denoiser, model: nn.Module, batch: Batch, guidance: float) -> torch.Tensor:
    """Per-example diffusion loss of the guided prediction, e.g. (1+w)·ε(x_t|c) − w·ε(x_t|∅) (den.guided_prediction),
    times the example's concept weight.

    Its gradient at the original weights is SalUn's saliency (official SD code: w = 7.5; DDPM: 2.0).
    """
    x_t = den.add_noise(batch.x0, batch.noise, batch.t)
    guided = den.guided_prediction(model, x_t, batch.t, batch.cond, guidance)
    return weighted(per_example_mse(guided, den.target(batch.x0, batch.noise, batch.t)), batch)


def _forget_and_remain(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over forget and remain examples together (one DDP forward per backward)."""
    x_f = den.add_noise(forget.x0, forget.noise, forget.t)
    x_r = den.add_noise(remain.x0, remain.noise, remain.t)
    pred = den.predict(model, torch.cat([x_f, x_r]), torch.cat([forget.t, remain.t]), torch.cat([forget.cond, remain.cond]))
    pred_f, pred_r = pred.split([len(x_f), len(x_r)])
    return x_f, pred_f, per_example_mse(pred_r, den.target(remain.x0, remain.noise, remain.t)).mean()


def salun_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch | None, cfg: TrainConfig, frozen: nn.Module | None):
    """‖ε(x_t|c) − sg[ε(x_t|c')]‖² on D_f + α·diffusion loss on D_r (c' a misaligned concept)."""
    x_f, pred_f, remain_loss = _forget_and_remain(den, model, forget, remain)
    with torch.no_grad():
        target = den.predict(model, x_f, forget.t, forget.misaligned)
    forget_loss = weighted(per_example_mse(pred_f, target), forget).mean()
    return forget_loss + cfg.alpha * remain_loss, {"forget": forget_loss, "remain": remain_loss}


def gradient_ascent_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch | None, cfg: TrainConfig, frozen: nn.Module | None):
    """GA baseline: maximise the diffusion loss on D_f (α·D_r term kept so α=0 gives the plain baseline)."""
    x_f, pred_f, remain_loss = _forget_and_remain(den, model, forget, remain)
    forget_loss = weighted(per_example_mse(pred_f, den.target(forget.x0, forget.noise, forget.t)), forget).mean()
    return -forget_loss + cfg.alpha * remain_loss, {"forget": forget_loss, "remain": remain_loss}


def finetune_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch | None, cfg: TrainConfig, frozen: nn.Module | None):
    """FT baseline: fine-tune on D_r alone, relying on forgetting by interference."""
    remain_loss = diffusion_loss(den, model, remain).mean()
    return remain_loss, {"remain": remain_loss}


def noised_x_t(den: Denoiser, forget: Batch, cfg: TrainConfig) -> torch.Tensor:
    """A D_f image (drawn by the base model from c) noised to t: fast, one forward pass."""
    return den.add_noise(forget.x0, forget.noise, forget.t)


def sampled_x_t(den: Denoiser, forget: Batch, cfg: TrainConfig) -> torch.Tensor:
    """As the ESD code: DDIM from c under guidance with the weights being trained, from the example's noise, stopped part-way."""
    steps = ddim_steps_before(forget.t, cfg.esd_sample_steps, den.num_train_timesteps)
    # den.model: the plain network (not a DDP or compiled wrapper), whose forward count may differ across processes
    return ddim_partway(den, den.model, forget.noise, forget.cond, steps, cfg.esd_sample_steps, cfg.esd_sample_guidance - 1)


ESD_X_T: dict[str, Callable] = {"noised": noised_x_t, "sampled": sampled_x_t}  # unlearn.esd_x_t (TrainConfig.esd_x_t)


def esd_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch | None, cfg: TrainConfig, frozen: nn.Module | None):
    """ESD (Gandikota et al., 2023): pull ε_θ(x_t|c) to ε*(x_t|∅) − η·(ε*(x_t|c) − ε*(x_t|∅)), ε* the frozen original.

    The target is the original model guided *away* from the concept with negative guidance η. x_t comes
    from unlearn.esd_x_t: a noised D_f image, or (as the ESD code) a part-way sample of the model being trained.
    """
    x_t = ESD_X_T[cfg.esd_x_t](den, forget, cfg)
    null = torch.full_like(forget.cond, den.null_cond)
    with torch.no_grad():
        e_c, e_u = den.predict(frozen, torch.cat([x_t, x_t]), torch.cat([forget.t, forget.t]), torch.cat([forget.cond, null])).chunk(2)
        target = e_u - cfg.negative_guidance * (e_c - e_u)
    forget_loss = weighted(per_example_mse(den.predict(model, x_t, forget.t, forget.cond), target), forget).mean()
    return forget_loss, {"forget": forget_loss}


def attention_resteering_loss(den: Denoiser, model: nn.Module, forget: Batch, remain: Batch | None, cfg: TrainConfig, frozen: nn.Module | None):
    """FMN (Zhang et al., 2023): shrink the cross-attention that noised D_f images pay to the concept's tokens.

    Per example, the Frobenius norm of the attention probabilities on the concept tokens over every
    cross-attention layer, head and query position (the FMN code takes one norm over the batch).
    """
    x_t = den.add_noise(forget.x0, forget.noise, forget.t)
    attention = weighted(den.concept_attention(model, x_t, forget.t, forget.cond), forget).mean()
    return attention, {"attention": attention}


@dataclass(frozen=True)
class Method:
    loss: Callable | None  # None for a closed-form method
    doc: str
    uses_mask: bool = False  # trains only the saliency-masked weights
    uses_remain: bool = True  # draws D_r batches
    uses_misaligned: bool = False  # draws a misaligned condition c' per forget example
    needs_frozen: bool = False  # the loss reads a frozen copy of the original network
    uses_concept_tokens: bool = False  # reads the concept's prompt tokens (FMN: the attention paid to them; UCE: their text states)
    scope: str = ""  # trainable scope the method itself fixes ("": unlearn.trainable decides)
    closed_form: bool = False  # no data, mask or training loop: the family edits the weights in one step (EraseJob.edit)


METHODS: dict[str, Method] = {
    "salun": Method(salun_loss, "SalUn: misaligned-concept loss + α·remain loss, saliency-masked", uses_mask=True, uses_misaligned=True),
    "rl": Method(salun_loss, "Random label: the SalUn objective on all weights, no mask", uses_misaligned=True),
    "ga": Method(gradient_ascent_loss, "Gradient ascent on the forget set"),
    "ft": Method(finetune_loss, "Fine-tune on the remain set only"),
    "esd_x": Method(esd_loss, "ESD-x: negative-guidance distillation into the cross-attention weights", uses_remain=False, needs_frozen=True, scope="xattn"),
    "esd_u": Method(esd_loss, "ESD-u: negative-guidance distillation into every weight but cross-attention", uses_remain=False, needs_frozen=True, scope="noxattn"),
    "fmn": Method(attention_resteering_loss, "Forget-Me-Not: attention re-steering away from the concept tokens", uses_remain=False, uses_concept_tokens=True),
    "uce": Method(None, "UCE: closed-form edit of the cross-attention key/value projections, concept tokens to a target, preserved ones kept (no mask, no training)",
                  uses_remain=False, uses_concept_tokens=True, closed_form=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unlearn.method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]
