"""Draw images with any family's pipeline, each from its own keyed starting noise, in batched pipeline calls.

An image's starting noise is draw `draw` of a CPU generator seeded with `seed`, in fp32 (of shape
[draw + 1, C, H/f, W/f], the row `draw`): so in fp32 image (seed, 0) is the image of a plain one-image pipeline
call with `generator=torch.Generator().manual_seed(seed)`, and (seed, k) is image k of a plain call of one prompt
with num_images_per_prompt = k + 1. The same generator, past that draw, gives a stochastic sampler's step noise
(DDPM, ancestral Euler), so with any scheduler an image depends on its request alone: not on the batch it was
drawn in nor on the process, and on the device only through float rounding (the noise is the same everywhere). The noise is drawn in the VAE's latent layout ([C, H/f, W/f]) and put
into the pipeline's (FLUX: packed 2x2 patches) by the family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
from diffusers import DiffusionPipeline

from salun_sd.errors import UserError
from salun_sd.families.loading import family_of, scheduler_class


@dataclass(frozen=True)
class ImageRequest:
    """One image: its prompt, the key of its starting noise (seed, draw), and the settings of its pipeline call."""

    prompt: str
    seed: int
    height: int
    width: int
    guidance: float  # the pipeline's guidance_scale (FLUX.1-dev: the value of its guidance embedding)
    draw: int = 0  # which draw of the generator seeded with `seed` starts this image


def starting_noise(request: ImageRequest, channels: int, scale_factor: int) -> tuple[torch.Tensor, torch.Generator]:
    """The request's starting noise [C, H/f, W/f] (fp32, CPU) and its generator, advanced past that draw."""
    generator = torch.Generator("cpu").manual_seed(request.seed)
    shape = (request.draw + 1, channels, request.height // scale_factor, request.width // scale_factor)
    return torch.randn(shape, generator=generator)[request.draw], generator


def use_scheduler(pipe: DiffusionPipeline, name: str) -> DiffusionPipeline:
    """Sample with the diffusers scheduler class `name` (from the pipeline's scheduler config); "" keeps the pipeline's own."""
    scheduler = scheduler_class(name)
    if scheduler is not None and not isinstance(pipe.scheduler, scheduler):
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return pipe


def batches(requests: Sequence[ImageRequest], batch_size: int) -> Iterator[list[int]]:
    """Positions of up to `batch_size` requests that can share one pipeline call (same guidance and size), in order."""
    call = lambda i: (requests[i].guidance, requests[i].height, requests[i].width)  # noqa: E731
    for _, group in groupby(sorted(range(len(requests)), key=call), key=call):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


@torch.no_grad()
def draw_batches(
    pipe: DiffusionPipeline,
    requests: Sequence[ImageRequest],
    steps: int,
    batch_size: int = 4,
    output_type: str = "pil",
    prompt_inputs: Callable[[list[ImageRequest]], dict[str, Any]] | None = None,
) -> Iterator[tuple[list[int], Any]]:
    """Yield (positions in `requests`, images) per pipeline call of up to `batch_size` requests sharing guidance and size.

    `prompt_inputs(batch)` gives the pipeline's prompt arguments in place of `prompt=[r.prompt, ...]` (e.g. the
    prompt_embeds of an attacked prompt). `images` is what the pipeline returns for `output_type` (PIL images,
    or a [B, 3, H, W] tensor in [0, 1] for "pt").
    """
    family = family_of(pipe)
    dtype = family.network_of(pipe).dtype
    channels, factor, multiple = pipe.vae.config.latent_channels, pipe.vae_scale_factor, family.size_multiple(pipe)
    for positions in batches(requests, batch_size):
        batch = [requests[i] for i in positions]
        first = batch[0]
        if first.height % multiple or first.width % multiple:
            raise UserError(f"{family.name} draws images whose sides are multiples of {multiple}; {first.width}x{first.height} is not")
        noise, generators = zip(*(starting_noise(r, channels, factor) for r in batch))
        latents = family.pipeline_latents(torch.stack(noise)).to(dtype)  # the pipeline moves them to its device
        prompt = prompt_inputs(batch) if prompt_inputs else {"prompt": [r.prompt for r in batch]}
        images = pipe(**prompt, num_inference_steps=steps, guidance_scale=first.guidance, height=first.height, width=first.width,
                      latents=latents, generator=list(generators), output_type=output_type).images
        yield positions, images


def draw_images(pipe: DiffusionPipeline, requests: Sequence[ImageRequest], steps: int, batch_size: int = 4, output_type: str = "pil",
                prompt_inputs: Callable[[list[ImageRequest]], dict[str, Any]] | None = None) -> list:
    """Every request's image, in the order of `requests` (see draw_batches)."""
    drawn: list[Any] = [None] * len(requests)
    for positions, images in draw_batches(pipe, requests, steps, batch_size, output_type, prompt_inputs):
        for i, image in zip(positions, images):
            drawn[i] = image
    return drawn
