"""How well a toy pipeline draws what it is asked: the shipped classifier reads shape and colour of its own samples.

Used by the comparison, the demo's checks and the tests, and by scripts/train_toy_world.py to pick and
describe the weights it ships.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from salun_sd.families.loading import family_of
from salun_sd.generation import ImageRequest, draw_images
from salun_sd.toyworld.classifier import ToyClassifier
from salun_sd.toyworld.pipeline import SAMPLE_STEPS
from salun_sd.toyworld.world import WorldSpec, prompts


def generate(pipe: StableDiffusionPipeline, texts: list[str], seed: int, steps: int = SAMPLE_STEPS, guidance: float = 3.0, batch_size: int = 128) -> torch.Tensor:
    """Images in [-1, 1] for `texts`, drawn by the pipeline itself (DDIM, classifier-free guidance); image j from
    seed + j (salun_sd.generation), so an image does not depend on the batch it is drawn in."""
    pipe.set_progress_bar_config(disable=True)
    size = family_of(pipe).default_size(pipe)
    requests = [ImageRequest(text, seed + j, size, size, guidance) for j, text in enumerate(texts)]
    return torch.stack(draw_images(pipe, requests, steps, batch_size, output_type="pt")) * 2 - 1


def score(classifier: ToyClassifier, pipe: StableDiffusionPipeline, spec: WorldSpec, per_prompt: int, seed: int, steps: int = SAMPLE_STEPS, guidance: float = 3.0) -> dict:
    """Classifier accuracy (shape, colour, both) on the pipeline's own samples, overall and per class."""
    concepts = spec.concepts
    texts = [t for t in prompts(spec) for _ in range(per_prompt)]
    images = generate(pipe, texts, seed, steps, guidance)
    s, c = (v.numpy() for v in classifier.predict(images))
    want_s = np.array([spec.shapes.index(sh) for _, sh in concepts]).repeat(per_prompt)
    want_c = np.array([spec.colours.index(co) for co, _ in concepts]).repeat(per_prompt)
    ok_s, ok_c = s == want_s, c == want_c
    return {
        "shape": float(ok_s.mean()),
        "colour": float(ok_c.mean()),
        "both": float((ok_s & ok_c).mean()),
        "per_shape": {sh: float(ok_s[want_s == i].mean()) for i, sh in enumerate(spec.shapes)},
        "per_colour": {co: float(ok_c[want_c == i].mean()) for i, co in enumerate(spec.colours)},
        "images": images,
    }
