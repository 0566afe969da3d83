"""Part-way DDIM sampling on the denoiser interface, for every family with a DDPM noise schedule.

ESD draws each training x_t by sampling the model being trained from the concept's condition and
stopping at a random step; this is that sampler, written once for every adapter.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from torch import nn

from salun_sd.core.denoiser import Denoiser, FlowMatchDenoiser
from salun_sd.errors import UserError


def ddim_steps_before(t: torch.Tensor, num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """How many DDIM steps the ESD code runs before it trains at timestep t.

    The ESD code (rohitgandikota/erasing, train-scripts/train-esd.py) draws a DDIM index k in [0, num_steps) and t uniformly in k's bin of training timesteps
    (so t is uniform over all of them), then samples until its loop breaks after index k − 1: all
    num_steps steps for k = 0, else num_steps + 1 − k. The sample is thus two DDIM steps less noisy than
    t for k ≥ 2; kept as the ESD code has it, since its published models were trained that way.
    """
    k = t * num_steps // num_train_timesteps
    return torch.where(k == 0, num_steps, num_steps + 1 - k)


@torch.no_grad()
def ddim_partway(den: Denoiser, model: nn.Module, x_T: torch.Tensor, cond: torch.Tensor, steps: torch.Tensor, num_steps: int, guidance: float) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from noise x_T under guidance w; example i stops after steps[i] of num_steps steps.

    Examples still running share each step's batched forward, and each one's trajectory depends only on
    its own noise, condition and stop, so the result does not depend on how examples are batched.
    """
    if isinstance(den, FlowMatchDenoiser):
        raise UserError(f"unlearn.esd_x_t=sampled runs the ESD code's DDIM sampler, made for DDPM-schedule models; {den.family} is a rectified flow: use unlearn.esd_x_t=noised")
    scheduler = DDIMScheduler.from_config(den.noise_scheduler.config, clip_sample=False)  # the guided x0 estimate leaves [-1, 1] on its way: clipping it breaks guided samples
    scheduler.set_timesteps(num_steps)
    x = x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        running = (steps > i).nonzero().flatten()
        if len(running) == 0:
            break
        ts = torch.full((len(running),), int(t), device=x.device)
        eps = den.guided_prediction(model, x[running], ts, cond[running], guidance)
        x[running] = scheduler.step(eps, t, x[running]).prev_sample.to(x.dtype)
    return x
