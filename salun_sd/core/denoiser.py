"""The one view of a diffusion model that the SalUn core needs.

Saliency, the objectives and the masked trainer see a network that predicts from (x_t, t, condition
ids), a noise schedule, and the id of the empty condition. Stable Diffusion (latents, text
embeddings) and the class-conditional DDPM (pixels, class labels) are thin subclasses of the
DDPM-schedule Denoiser; SD3 and FLUX subclass FlowMatchDenoiser (rectified flow). What depends
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

FLOW_TIMESTEP_SCHEMES = ("logit_normal", "mode", "none")  # the draws of diffusers.training_utils.compute_density_for_timestep_sampling


@dataclass
class ConceptData:
    """Training examples already in the denoiser's space: clean inputs x0 and their condition ids.

    Kept as plain tensors (cached latents or pixels) so a step indexes memory instead of running a
    data pipeline; a 800-image SD set at 64x64x4 latents is 52 MB.
    """

    x0: torch.Tensor
    cond: torch.Tensor  # int64, one condition id per example
    concept: torch.Tensor | None = None  # int64 per example: which erased concept it shows (indexes its c' list); None: one concept
    weight: torch.Tensor | None = None  # float per example: its concept's weight in the forget term; None: all 1

    def __post_init__(self) -> None:
        for name in ("cond", "concept", "weight"):
            if getattr(self, name) is not None and len(getattr(self, name)) != len(self.x0):
                raise ValueError(f"x0 has {len(self.x0)} examples but {name} has {len(getattr(self, name))}")

    def __len__(self) -> int:
        return len(self.x0)

    def to(self, device: torch.device | str) -> "ConceptData":
        return ConceptData(*(None if t is None else t.to(device) for t in (self.x0, self.cond, self.concept, self.weight)))

    def select(self, keep: torch.Tensor) -> "ConceptData":
        """The examples where `keep` (a bool per example) is true, in order."""
        return ConceptData(*(None if t is None else t[keep] for t in (self.x0, self.cond, self.concept, self.weight)))


Scope = Callable[[str], bool]  # parameter name -> whether the weight belongs to the scope


class Denoiser(ABC):
    """A conditional noise-prediction network with its training noise schedule."""

    # Trainable scopes by parameter name; core/config.SCOPES lists every name a config may use.
    scopes: ClassVar[dict[str, Scope]] = {"all": lambda name: True}
    family: ClassVar[str] = "model"  # how error messages name the network

    def __init__(self, model: nn.Module, noise_scheduler, null_cond: int) -> None:
        self.model = model
        self.noise_scheduler = noise_scheduler  # a diffusers scheduler with add_noise (DDPMScheduler)
        self.null_cond = null_cond

    @abstractmethod
    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Run `model` (the plain or the DDP-wrapped network) on condition ids `cond`."""

    def guided_prediction(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        """Classifier-free guidance (1+w)·ε(x_t|c) − w·ε(x_t|∅), the conditional and empty branches in one batched forward."""
        null = torch.full_like(cond, self.null_cond)
        pred_c, pred_u = self.predict(model, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
        return (1 + guidance) * pred_c - guidance * pred_u

    def concept_attention(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per example, how strongly `model`'s cross-attention attends to the concept's tokens (for FMN)."""
        raise UserError(f"this method needs a text-conditioned model with concept tokens; {type(self).__name__} has none")

    def scope(self, name: str) -> Scope:
        """The parameters that scope `name` trains on this network."""
        if name not in self.scopes:
            raise UserError(f"unlearn.trainable={name!r} has no meaning for {self.family}; its scopes are {', '.join(self.scopes)}")
        return self.scopes[name]

    def set_attention(self, kind: str) -> None:
        """Choose the attention kernel (core/config.ATTENTION); a network without a choice runs its own ("sdpa")."""
        if kind != "sdpa":
            raise UserError(f"unlearn.attention={kind} needs a network with a choice of attention kernels; {self.family} has none")

    def to(self, device: torch.device | str) -> "Denoiser":
        """Move what the denoiser holds besides the network (e.g. a table of text embeddings)."""
        return self

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def draw_timestep(self, generator: torch.Generator) -> int:
        """A training timestep, uniform over the schedule as in DDPM training."""
        return int(torch.randint(self.num_train_timesteps, (1,), generator=generator))

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


class FlowMatchDenoiser(Denoiser):
    """A rectified-flow network (SD3, FLUX): x_t = (1−σ)·x0 + σ·ε, trained to predict the velocity ε − x0.

    A timestep t is an index into the training schedule of a FlowMatchEulerDiscreteScheduler built
    from the model's config (its σ and model timestep), drawn as diffusers' train_dreambooth_sd3.py /
    train_dreambooth_flux.py draw it: u from compute_density_for_timestep_sampling, index ⌊u·N⌋.
    Those scripts' optional loss weightings (sigma_sqrt, cosmap) and SD3's EDM preconditioning
    (loss on x_t − σ·v against x0, i.e. a σ²-weighted velocity loss) are not applied: every loss
    here is the unweighted velocity loss, which the default logit-normal and uniform draws use.
    """

    def __init__(self, model: nn.Module, noise_scheduler, null_cond: int, timestep_scheme: str,
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> None:
        super().__init__(model, noise_scheduler, null_cond)  # noise_scheduler: a FlowMatchEulerDiscreteScheduler
        if timestep_scheme not in FLOW_TIMESTEP_SCHEMES:
            raise UserError(f"timestep scheme must be one of {', '.join(FLOW_TIMESTEP_SCHEMES)}, got {timestep_scheme!r}")
        self.timestep_scheme, self.logit_mean, self.logit_std, self.mode_scale = timestep_scheme, logit_mean, logit_std, mode_scale

    def draw_timestep(self, generator: torch.Generator) -> int:
        from diffusers.training_utils import compute_density_for_timestep_sampling  # here: that module imports every diffusers pipeline

        u = compute_density_for_timestep_sampling(self.timestep_scheme, 1, self.logit_mean, self.logit_std, self.mode_scale, generator=generator)
        return min(int(u * self.num_train_timesteps), self.num_train_timesteps - 1)  # sigmoid can round to 1.0 in float32

    def sigma(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return self.noise_scheduler.sigmas.to(t.device)[t].view(-1, *[1] * (ndim - 1))

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep value the transformer is given (σ·1000 on the schedule), as in the training scripts."""
        return self.noise_scheduler.timesteps.to(t.device)[t]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t, x0.ndim).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0
