"""The DDPM's part of an erase (salun_sd.erase_flow runs it): one class of the training split, and the model folder.

D_f is the forgotten class's training images, D_r every other class's, and the misaligned condition
c' of a forget example is another class drawn uniformly, as in the official SalUn DDPM code.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from torch import nn

from salun_sd import erase_flow
from salun_sd.ddpm.config import DDPMConfig
from salun_sd.ddpm.data import load_split, split_by_class
from salun_sd.ddpm.model import load_denoiser, save_model
from salun_sd.erase_flow import EraseJob, Loaded
from salun_sd.errors import UserError
from salun_sd.objectives import Method
from salun_sd.saliency import Mask


class DDPMErase(EraseJob):
    product = "unet"
    command = "salun-sd ddpm"
    train_flag = "unlearn"

    def __init__(self, cfg: DDPMConfig, model_dir: Path, out: Path) -> None:
        self.config, self.train, self.mask = cfg, cfg.unlearn, cfg.mask
        self.out, self.overwrite, self.model_name = out, cfg.overwrite, str(model_dir)
        self.scheduler = None  # the base model's schedule, saved next to the erased UNet

    def check(self, method: Method) -> None:
        if not 0 <= self.config.forget_class < self.config.model.num_classes:
            raise UserError(f"forget_class must be in 0..{self.config.model.num_classes - 1}, got {self.config.forget_class}")

    def load(self, accelerator: Accelerator, method: Method) -> Loaded:
        den = load_denoiser(self.model_name)
        self.scheduler = den.noise_scheduler
        cfg = self.config
        forget, remain = split_by_class(load_split(cfg.data, "train"), cfg.forget_class)
        accelerator.print(f"forget class {cfg.forget_class}")
        return Loaded(den, forget, remain, [c for c in range(cfg.model.num_classes) if c != cfg.forget_class])

    def export(self, model: nn.Module, mask: Mask | None, num_processes: int) -> Path:
        save_model(model, self.scheduler, self.out)
        return self.out


def erase(cfg: DDPMConfig, accelerator: Accelerator, model_dir: Path, out: Path, steps: tuple[str, ...]) -> Path:
    """`ddpm mask` (steps=("mask",)) or `ddpm erase` (("erase",): trains under out/mask.safetensors or mask.path)."""
    return erase_flow.erase(DDPMErase(cfg, model_dir, out), accelerator, steps)
