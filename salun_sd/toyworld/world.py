"""Deterministic procedural captioned images: one coloured shape on a varied background.

The set is kept small on purpose (4 shapes x 4 colours, large shapes, 16x16 pixels) so that a
diffusion model learns it in CPU-minutes; sizes, positions and backgrounds still vary so that the
model must learn the concept, not memorise a picture. Shapes are drawn supersampled and box-filtered
down, so edges are anti-aliased and the same seed always gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 90, 240),
    "yellow": (240, 220, 40),
}
CAPTION = "a photo of a {colour} {shape}"


@dataclass(frozen=True)
class WorldSpec:
    """What the world draws. Scales are the shape's half-extent as a fraction of the image side."""

    size: int = 16
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    min_scale: float = 0.28
    max_scale: float = 0.42
    supersample: int = 4

    @property
    def concepts(self) -> list[tuple[str, str]]:
        """Every (colour, shape) pair, colour-major, the order used for balanced sampling."""
        return [(c, s) for c in self.colours for s in self.shapes]


@dataclass
class ToyBatch:
    """Images as uint8 (N, H, W, 3), their shape and colour indices into the spec, and captions."""

    images: np.ndarray
    shape_ids: np.ndarray
    colour_ids: np.ndarray
    captions: list[str]


def caption(colour: str, shape: str) -> str:
    return CAPTION.format(colour=colour, shape=shape)


def prompts(spec: WorldSpec = WorldSpec()) -> list[str]:
    """All captions of the world, in `spec.concepts` order."""
    return [caption(c, s) for c, s in spec.concepts]


def parse_caption(text: str, spec: WorldSpec = WorldSpec()) -> tuple[str | None, str | None]:
    """(colour, shape) named in a prompt, None where it names none; used to score generated images."""
    words = text.lower().replace(",", " ").split()
    colour = next((c for c in spec.colours if c in words), None)
    shape = next((s for s in spec.shapes if s in words), None)
    return colour, shape


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of the polygonal shapes (None for the circle), centred on (cx, cy) with half-extent r."""
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "cross":
        a, b = r, r * 0.36
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def draw(shape: str, colour: str, rng: np.random.Generator, spec: WorldSpec = WorldSpec()) -> np.ndarray:
    """One image (H, W, 3) uint8: a background (near-neutral tone with a gentle gradient) and the shape."""
    big = spec.size * spec.supersample
    base = rng.uniform(20, 120) + rng.uniform(-18, 18, size=3)
    slope = rng.uniform(-25, 25, size=3)
    ramp = np.linspace(-0.5, 0.5, big)[:, None, None] if rng.random() < 0.5 else np.linspace(-0.5, 0.5, big)[None, :, None]
    bg = np.clip(base + slope * ramp, 0, 255) * np.ones((big, big, 3))
    img = Image.fromarray(bg.astype(np.uint8))
    r = rng.uniform(spec.min_scale, spec.max_scale) * big
    margin = r + big * 0.04
    cx, cy = rng.uniform(margin, big - margin, size=2)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.uniform(-15, 15, size=3), 0, 255))
    pen = ImageDraw.Draw(img)
    poly = _polygon(shape, cx, cy, r)
    if poly is None:
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon(poly, fill=fill)
    return np.asarray(img.resize((spec.size, spec.size), Image.Resampling.BOX))


def sample(n: int, seed: int, spec: WorldSpec = WorldSpec(), concepts: list[tuple[str, str]] | None = None) -> ToyBatch:
    """`n` images, balanced over `concepts` (default: all of the world) in a seeded random order."""
    rng = np.random.default_rng(seed)
    pool = concepts if concepts is not None else spec.concepts
    order = rng.permutation(np.arange(n) % len(pool))
    images = np.stack([draw(pool[k][1], pool[k][0], rng, spec) for k in order]) if n else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    colour_ids = np.array([spec.colours.index(pool[k][0]) for k in order], dtype=np.int64)
    shape_ids = np.array([spec.shapes.index(pool[k][1]) for k in order], dtype=np.int64)
    return ToyBatch(images, shape_ids, colour_ids, [caption(*pool[k]) for k in order])


def to_tensor(images: np.ndarray) -> "torch.Tensor":  # noqa: F821
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range SD's VAE works in."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
