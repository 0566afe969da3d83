"""The one view of a diffusion model that the SalUn core needs.

Saliency, the objectives and the masked trainer see a network that predicts from (x_t, t, condition
ids), a noise schedule, and the id of the empty condition. Stable Diffusion (latents, text
embeddings) and the class-conditional DDPM (pixels, class labels) are thin subclasses. What depends
on the network's architecture is declared by the subclass, so the core names no model: which
parameter names form each trainable scope, how to choose the attention kernel, and how to read the
attention paid to concept tokens (Forget-Me-Not).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from salun_sd.errors import UserError


@dataclass
class ConceptData:
    """Training examples already in the denoiser's space: clean inputs x0 and their condition ids.

    Kept as plain tensors (cached latents or pixels) so a step indexes memory instead of running a
    data pipeline; a 800-image SD set at 64x64x4 latents is 52 MB.
    """

    x0: torch.Tensor
    cond: torch.Tensor  # int64, one condition id per example

    def __post_init__(self) -> None:
        if len(self.x0) != len(self.cond):
            raise ValueError(f"x0 has {len(self.x0)} examples but cond has {len(self.cond)}")

    def __len__(self) -> int:
        return len(self.x0)

    def to(self, device: torch.device | str) -> "ConceptData":
        return ConceptData(self.x0.to(device), self.cond.to(device))


Scope = Callable[[str], bool]  # parameter name -> whether the weight belongs to the scope


class Denoiser(ABC):
    """A conditional noise-prediction network with its training noise schedule."""

    # Trainable scopes by parameter name; core_config.SCOPES lists every name a config may use.
    scopes: ClassVar[dict[str, Scope]] = {"all": lambda name: True}
    family: ClassVar[str] = "model"  # how error messages name the network

    def __init__(self, model: nn.Module, noise_scheduler, null_cond: int) -> None:
        self.model = model
        self.noise_scheduler = noise_scheduler  # a diffusers scheduler with add_noise (DDPMScheduler)
        self.null_cond = null_cond

    @abstractmethod
    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Run `model` (the plain or the DDP-wrapped network) on condition ids `cond`."""

    def concept_attention(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per example, how strongly `model`'s cross-attention attends to the concept's tokens (for FMN)."""
        raise UserError(f"this method needs a text-conditioned model with concept tokens; {type(self).__name__} has none")

    def scope(self, name: str) -> Scope:
        """The parameters that scope `name` trains on this network."""
        if name not in self.scopes:
            raise UserError(f"train.trainable={name!r} has no meaning for {self.family}; its scopes are {', '.join(self.scopes)}")
        return self.scopes[name]

    def set_attention(self, kind: str) -> None:
        """Choose the attention kernel (core_config.ATTENTION); a network without a choice runs its own ("sdpa")."""
        if kind != "sdpa":
            raise UserError(f"train.attention={kind} needs a network with a choice of attention kernels; {self.family} has none")

    def to(self, device: torch.device | str) -> "Denoiser":
        """Move what the denoiser holds besides the network (e.g. a table of text embeddings)."""
        return self

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict under the scheduler's parameterisation."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        if kind == "sample":
            return x0
        raise ValueError(f"unsupported prediction_type {kind!r}")
