"""Class-conditional sampling with classifier-free guidance (DDIM or DDPM), seeded per image.

Guidance is the core's guided prediction (`Denoiser.guided_prediction`, as in the saliency loss):
ε̂ = (1+w)·ε(x_t|c) − w·ε(x_t|∅); w = 0 is the plain conditional model (one forward, no empty
branch). Image i of class c starts from noise drawn from (seed, c, i): the same image comes out
whatever the batch size or the other classes drawn (for DDIM with eta 0), so models before and
after erasing can be compared image by image.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils import make_image_grid
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from salun_sd.config import check_settings
from salun_sd.ddpm.config import SampleConfig
from salun_sd.ddpm.adapter import ClassConditionedDenoiser
from salun_sd.ddpm.data import to_uint8
from salun_sd.core.draws import generator
from salun_sd.errors import UserError
from salun_sd.run.files import atomic, save_image


def inference_scheduler(den: ClassConditionedDenoiser, cfg: SampleConfig):
    """Sampling scheduler from the training schedule, without x0 clipping (it breaks guided samples)."""
    check_settings(cfg, "sample.")
    scheduler = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[cfg.scheduler].from_config(den.noise_scheduler.config, clip_sample=False)
    scheduler.set_timesteps(cfg.num_inference_steps)
    return scheduler


@torch.no_grad()
def sample(den: ClassConditionedDenoiser, labels: torch.Tensor, cfg: SampleConfig, device: torch.device | str = "cpu", show_progress: bool = True) -> torch.Tensor:
    """Images in [-1, 1] for the class ids `labels` (image i's noise keyed by its label and rank among that label)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= den.num_classes):
        raise UserError(f"classes must be in 0..{den.num_classes - 1}, got {labels.tolist()}")
    model = den.model.to(device).eval()
    cfgm = model.config
    shape = (cfgm.in_channels, cfgm.sample_size, cfgm.sample_size)
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        sel = labels == c
        rank[sel] = torch.arange(int(sel.sum()))
    out = []
    starts = range(0, len(labels), cfg.batch_size)
    for start in tqdm(starts, desc="sample", disable=not show_progress or len(starts) < 2):
        y = labels[start : start + cfg.batch_size].to(device)
        x = torch.stack([torch.randn(shape, generator=generator(cfg.seed, "sample", int(c), int(r))) for c, r in zip(labels[start : start + cfg.batch_size], rank[start : start + cfg.batch_size])]).to(device)
        scheduler = inference_scheduler(den, cfg)
        step_gen = generator(cfg.seed, "sample-steps", start)
        extra = {"eta": cfg.eta} if cfg.scheduler == "ddim" else {}
        for t in scheduler.timesteps:
            tt = torch.full_like(y, int(t))
            eps = den.guided_prediction(model, x, tt, y, cfg.guidance) if cfg.guidance else den.predict(model, x, tt, y)
            x = scheduler.step(eps, t, x, generator=step_gen, **extra).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


def class_labels(cfg: SampleConfig, num_classes: int) -> torch.Tensor:
    """cfg.per_class ids of each requested class, class by class."""
    classes = cfg.classes or list(range(num_classes))
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.per_class)


def save_samples(images: torch.Tensor, labels: torch.Tensor, folder: Path, info: dict[str, str] | None = None) -> None:
    """`samples.safetensors` (uint8 images, labels) and `grid.png` (one row per class)."""
    with atomic(folder / "samples.safetensors") as tmp:
        save_file({"images": to_uint8(images).contiguous(), "labels": labels.contiguous()}, str(tmp), metadata=info)
    save_image(grid(to_uint8(images), labels), folder / "grid.png")


def load_samples(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) written by save_samples."""
    path = folder / "samples.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist; draw samples with `salun-sd ddpm sample`")
    data = load_file(str(path))
    return data["images"], data["labels"]


def grid(images: torch.Tensor, labels: torch.Tensor, columns: int = 10, cell: int = 32) -> Image.Image:
    """uint8 images in rows by class (at most `columns` per class, black where a class has fewer), each upscaled to about `cell` pixels."""
    classes = labels.unique().tolist()
    size = images.shape[-1] * max(1, math.ceil(cell / images.shape[-1]))
    blank = Image.new("RGB", (size, size))
    tiles = []
    for c in classes:
        mine = [Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()).resize((size, size), Image.Resampling.NEAREST) for img in images[labels == c][:columns]]
        tiles += mine + [blank] * (columns - len(mine))
    return make_image_grid(tiles, rows=len(classes), cols=columns)
