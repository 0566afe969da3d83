"""The class-conditional UNet as a core Denoiser: condition ids are class labels, the last one is "null"."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from salun_sd.core.denoiser import Denoiser


class ClassConditionedDenoiser(Denoiser):
    family = "the class-conditional DDPM UNet"  # only scope "all" (no cross-attention) and its own attention kernel

    def __init__(self, unet: UNet2DModel, noise_scheduler: DDPMScheduler) -> None:
        super().__init__(unet, noise_scheduler, null_cond=unet.config.num_class_embeds - 1)

    @property
    def num_classes(self) -> int:
        return self.null_cond

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return model(x_t, t, class_labels=cond).sample
