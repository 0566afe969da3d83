"""The DDPM's part of an erase (salun_sd.core.erase_flow runs it): one class of the training split, and the model folder.

D_f is the forgotten class's training images, D_r every other class's, and the misaligned condition
c' of a forget example is the next class, (k + 1) mod num_classes, as in the official SalUn DDPM code
(or, as our option, any other class drawn per example).
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch import nn

from salun_sd.core import erase_flow
from salun_sd.config import check_settings
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.ddpm.data import load_split, split_by_class
from salun_sd.ddpm.model import load_denoiser, save_model
from salun_sd.core.denoiser import ConceptData
from salun_sd.core.erase_flow import EraseJob, Loaded
from salun_sd.errors import UserError
from salun_sd.core.objectives import Method
from salun_sd.core.saliency import Mask


# c' of the forget examples, from (forget class, number of classes): the official code's next class, or ours.
MISALIGNED = {"next": lambda k, n: [(k + 1) % n], "random": lambda k, n: [c for c in range(n) if c != k]}


def forget_data(cfg: DDPMConfig) -> tuple[ConceptData, ConceptData, list[list[int]]]:
    """(D_f, D_r, the misaligned class ids c' of the one forgotten class) from the training split."""
    forget, remain = split_by_class(load_split(cfg.data, "train"), cfg.forget_class)
    return forget, remain, [MISALIGNED[cfg.misaligned](cfg.forget_class, cfg.model.num_classes)]


class DDPMErase(EraseJob):
    product = "unet"
    also_writes = ("scheduler",)
    command = "salun-sd ddpm"

    def __init__(self, cfg: DDPMConfig, model_dir: Path, out: Path) -> None:
        self.config, self.train, self.mask = cfg, cfg.unlearn, cfg.mask
        self.out, self.overwrite, self.model_name = out, cfg.overwrite, str(model_dir)
        self.scheduler = None  # the base model's schedule, saved next to the erased UNet

    def check(self, method: Method) -> None:
        check_settings(self.config)
        if self.config.forget_class >= self.config.model.num_classes:
            raise UserError(f"forget_class must be in 0..{self.config.model.num_classes - 1}, got {self.config.forget_class}")

    def load(self, accelerator: Accelerator, method: Method) -> Loaded:
        den = load_denoiser(self.model_name, self.config.weights)
        self.scheduler = den.noise_scheduler
        accelerator.print(f"forget class {self.config.forget_class}")
        return Loaded(den, *forget_data(self.config))

    def export(self, model: nn.Module, mask: Mask | None, num_processes: int) -> Path:
        save_model(model, self.scheduler, self.out)
        return self.out


def erase(cfg: DDPMConfig, accelerator: Accelerator, model_dir: Path, out: Path, steps: tuple[str, ...]) -> Path:
    """`ddpm mask` (steps=("mask",)) or `ddpm erase` (("erase",): trains under out/mask.safetensors or mask.path)."""
    return erase_flow.erase(DDPMErase(cfg, model_dir, out), accelerator, steps)
