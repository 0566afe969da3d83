"""The validation grid at the end of an erase (OUTPUT_DIR/validation.png), as diffusers' training examples write theirs.

Top row the base model, bottom row the erased one; a column per prompt (the forget prompts, then one remain
prompt), each drawn from the same seed in both rows (by salun_sd.generation), so the only difference down a column is the erase.
The UNet trains in place, so the base row is drawn before training and the erased row after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image
from torch import nn

from salun_sd.families.config import DataConfig
from salun_sd.families.loading import family_of
from salun_sd.generation import ImageRequest, draw_images
from salun_sd.run.files import save_image

GRID_NAME = "validation.png"
MAX_FORGET_PROMPTS = 4  # keeps the grid small for sets of many prompts (I2P)


def validation_prompts(data: DataConfig) -> list[str]:
    forget = list(dict.fromkeys(g.prompt for c in data.concept_list() for g in c.forget))[:MAX_FORGET_PROMPTS]  # every concept's
    return forget + [g.prompt for g in data.remain[:1]]


@contextmanager
def drawing_mid_training(pipe: DiffusionPipeline) -> Iterator[None]:
    """While active, the pipeline's other components sit on its network's device and the network is in eval mode;
    after, they go back to the CPU (training needs the network alone on the device) and the network to its mode."""
    network = family_of(pipe).network_of(pipe)
    others = [c for c in pipe.components.values() if isinstance(c, nn.Module) and c is not network]
    training = network.training
    for component in others:
        component.to(network.device)
    network.eval()
    try:
        yield
    finally:
        network.train(training)
        for component in others:
            component.to("cpu")


def draw_validation(pipe: DiffusionPipeline, data: DataConfig, resolution: int) -> list[Image.Image]:
    """Each validation prompt drawn by the pipeline's network as it is now (one prompt per call: little memory
    next to a trained model's optimizer state), with data's sampler settings and seed, on the network's device."""
    requests = [ImageRequest(prompt, data.seed, resolution, resolution, data.generation_guidance) for prompt in validation_prompts(data)]
    with drawing_mid_training(pipe):
        return draw_images(pipe, requests, data.generation_steps, batch_size=1)


def write_validation_grid(base: list[Image.Image], erased: list[Image.Image], out: Path) -> Path:
    return save_image(make_image_grid(base + erased, rows=2, cols=len(base)), out / GRID_NAME)
