"""The validation grid at the end of an erase (OUTPUT_DIR/validation.png), as diffusers' training examples write theirs.

Top row the base model, bottom row the erased one; a column per prompt (the forget prompts, then one remain
prompt), each drawn from the same seed in both rows, so the only difference down a column is the erase.
The UNet trains in place, so the base row is drawn before training and the erased row after it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image
from torch import nn

from salun_sd.families.config import DataConfig

GRID_NAME = "validation.png"
MAX_FORGET_PROMPTS = 4  # keeps the grid small for sets of many prompts (I2P)


def validation_prompts(data: DataConfig) -> list[str]:
    forget = list(dict.fromkeys(g.prompt for g in data.forget))[:MAX_FORGET_PROMPTS]
    return forget + [g.prompt for g in data.remain[:1]]


@torch.no_grad()
def draw_validation(pipe: DiffusionPipeline, network: str, data: DataConfig, resolution: int) -> list[Image.Image]:
    """Each validation prompt drawn by the pipeline's network as it is now (one prompt per call: little memory
    next to a trained model's optimizer state), with data's sampler settings and seed, on the network's device."""
    device = getattr(pipe, network).device
    others = [c for name, c in pipe.components.items() if isinstance(c, nn.Module) and name != network]
    for component in others:
        component.to(device)
    images = [
        pipe(prompt, num_inference_steps=data.generation_steps, guidance_scale=data.generation_guidance, height=resolution, width=resolution,
             generator=torch.Generator(device).manual_seed(data.seed)).images[0]
        for prompt in validation_prompts(data)
    ]
    for component in others:  # training needs the network alone on the device
        component.to("cpu")
    return images


def write_validation_grid(base: list[Image.Image], erased: list[Image.Image], out: Path) -> Path:
    make_image_grid(base + erased, rows=2, cols=len(base)).save(out / GRID_NAME)
    return out / GRID_NAME
