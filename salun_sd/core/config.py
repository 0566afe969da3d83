"""The knobs of the core: the saliency mask and the unlearning loop.

Plain dataclasses without torch, so configs are validated and `--help` is printed instantly.
Each field's metadata is its documentation (the `--help` text of its flag; salun_sd/config.py says how to write one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from salun_sd.config import Bounds, check_settings, setting

# Names a config may use; each denoiser says what they mean on its network (Denoiser.scopes, set_attention).
Scope = Literal["all", "xattn", "noxattn"]
Attention = Literal["sdpa", "eager", "xformers"]
MethodName = Literal["salun", "rl", "ga", "ft", "esd_x", "esd_u", "fmn", "uce"]  # objectives.METHODS implements each (tested)
MixedPrecision = Literal["no", "fp16", "bf16"]  # Accelerate autocast; weights stay fp32
SCOPES, ATTENTION = get_args(Scope), get_args(Attention)


FRACTION = Bounds(above=0, at_most=1)


def check_fraction(fraction: float, where: str) -> None:
    FRACTION.check(fraction, where)


@dataclass
class MaskConfig:
    """Saliency mask. Defaults are the official SalUn SD settings (top 50 % globally, guidance 7.5)."""

    fraction: float = setting(0.5, "share of weights kept trainable", above=0, at_most=1)
    extra_fractions: list[float] = setting(factory=list, doc="more masks from the same gradient pass", above=0, at_most=1)
    guidance: float = setting(7.5, "w in the guided forget loss (official DDPM: 2.0; FLUX-dev: its guidance embedding is set to 1 + w)", at_least=0)
    scope: Literal["global", "per_layer"] = setting("global", "global | per_layer")
    rank_over: Literal["model", "trainable"] = setting("model", "with unlearn.trainable restricted: model (top fraction over every weight, then only the trainable ones kept: official SalUn; needs all weights' gradients) | trainable (top fraction among the trainable weights)")
    batch_size: int = setting(8, "forget examples per backward pass (the mask does not depend on it unless max_grad_norm is set)", at_least=1)
    max_grad_norm: float = setting(0.0, "clip each batch's gradient to this norm before adding it up (official DDPM; 0: no clipping)", at_least=0)
    path: str = setting("", "use this mask file instead of computing one")
    per_concept: bool = setting(False, "several concepts: the union of each concept's own top `fraction` (one gradient pass per concept), not the top `fraction` of the gradient over all of them")

    def check(self, section: str = "mask") -> None:
        """The values a gradient pass would otherwise reach only after minutes; `section` names them in errors."""
        check_settings(self, f"{section}.")


@dataclass
class TrainConfig:
    """Masked unlearning. Defaults are the official SalUn SD nudity run (Adam 1e-5, batch 8, α 0.1, 1 epoch of 800 images)."""

    RENAMED: ClassVar[dict[str, str]] = {"compile_unet": "compile"}  # true for every family (the network may be a transformer)

    method: MethodName = setting("salun", "salun | rl | ga | ft | esd_x | esd_u | fmn | uce (closed form: no mask, no training loop; its settings are uce.*) (salun_sd.core.objectives.METHODS; configs/methods/ has each one's usual settings)")
    alpha: float = setting(0.1, "weight of the remain-set loss (salun, rl, ga)", at_least=0)
    negative_guidance: float = setting(1.0, "η of esd_x / esd_u: how far the target is guided away from the concept", at_least=0)
    esd_x_t: Literal["noised", "sampled"] = setting("noised", "x_t of esd_x / esd_u: noised (a D_f image noised to t: fast) | sampled (DDIM from the model being trained, stopped at a random step, as the ESD code)")
    esd_sample_steps: int = setting(50, "esd_x_t=sampled: DDIM steps of a whole trajectory (ESD: 50)", at_least=1)
    esd_sample_guidance: float = setting(3.0, "esd_x_t=sampled: guidance scale s of ε(∅) + s·(ε(c) − ε(∅)) while sampling (ESD: 3)", at_least=0)
    learning_rate: float = setting(1e-5, "Adam's step size", above=0)
    adam_beta1: float = setting(0.9, "Adam's β1", at_least=0, below=1)
    adam_beta2: float = setting(0.999, "Adam's β2", at_least=0, below=1)
    adam_epsilon: float = setting(1e-8, "Adam's ε", at_least=0)
    weight_decay: float = setting(0.0, "decoupled, applied only to masked-in weights", at_least=0)
    batch_size: int = setting(8, "forget examples per process per micro-step (and as many remain examples)", at_least=1)
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step", at_least=1)
    epochs: float = setting(1.0, "passes over the forget set; used when max_steps is 0", above=0)
    max_steps: int = setting(0, "optimizer steps; 0: as many as `epochs` take", at_least=0)
    max_grad_norm: float = setting(0.0, "0 disables clipping", at_least=0)
    clip_before_mask: bool = setting(False, "clip the whole gradient before the mask zeroes frozen weights (official DDPM), not after")
    cond_drop_prob: float = setting(0.0, "share of conditions replaced by the null one, per example and term (official DDPM: 0.1)", at_least=0, below=1)
    trainable: Scope = setting("all", "all | xattn (cross-attention) | noxattn (all but cross-attention); esd_x and esd_u fix their own")
    gradient_checkpointing: bool = False
    # Speed and memory levers (docs/BENCHMARKS.md); each gives the plain path's loss and update.
    optimizer: Literal["adam", "adam_fused", "adam8bit"] = setting("adam", "adam | adam_fused (one kernel per step) | adam8bit (bitsandbytes: 8-bit moments, for 24 GB cards)")
    attention: Attention = setting("sdpa", "sdpa (flash/memory-efficient kernels) | eager (materialised, as the official code) | xformers (CUDA)")
    channels_last: bool = setting(False, "NHWC weights and activations for the convolutions")
    compile: bool = setting(False, "torch.compile the network (the UNet or the transformer)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = setting("default", "torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune")
    checkpointing_steps: int = setting(0, "save a resumable checkpoint every N steps; 0: no intermediate checkpoints", at_least=0)
    checkpoints_total_limit: int = setting(2, "checkpoints kept, the newest; 0: all", at_least=0)
    resume_from_checkpoint: str = setting("", "\"\" | latest | path to a checkpoint folder")
    seed: int = setting(0, "the mask's and the loop's noise, timesteps and batch order", at_least=0)
    report_to: Literal["", "tensorboard", "wandb"] = setting("", "also hand every step's losses to Accelerate's tracker: tensorboard | wandb (OUTPUT_DIR/log.jsonl is always written)")

    def check(self, section: str = "unlearn") -> None:
        """The values torch or the loop would otherwise reject with a raw traceback; `section` names them in errors."""
        check_settings(self, f"{section}.")

    def total_steps(self, num_forget: int, num_processes: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.batch_size * num_processes * self.gradient_accumulation_steps
        return max(1, math.ceil(self.epochs * num_forget / per_step))
