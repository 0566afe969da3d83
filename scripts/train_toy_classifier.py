"""Train the toy world's shape/colour classifier and write it to salun_sd/assets/toyworld/.

Usage: python scripts/train_toy_classifier.py [--out DIR] [--steps N]
It records, in classifier.json, its accuracy on freshly drawn images (clean, and noisy + blurred).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from salun_sd.toyworld import ASSETS
from salun_sd.toyworld.classifier import ToyClassifierConfig, accuracy_on_drawn, gaussian_blur, save_classifier, train_classifier
from salun_sd.toyworld.world import sample, to_tensor


def noisy_accuracy(model, n: int, seed: int, noise: float, blur: float) -> dict[str, float]:
    """Accuracy on drawn images with fixed added noise and blur: a proxy for generated images' defects."""
    batch = sample(n, seed, model.cfg.spec())
    gen = torch.Generator().manual_seed(seed)
    x = gaussian_blur(to_tensor(batch.images), blur) + noise * torch.randn(batch.images.shape[0], 3, model.cfg.size, model.cfg.size, generator=gen)
    s, c = model.predict(x)
    return {"shape": float((s.numpy() == batch.shape_ids).mean()), "colour": float((c.numpy() == batch.colour_ids).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--steps", type=int, default=ToyClassifierConfig.steps)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = ToyClassifierConfig(steps=args.steps, seed=args.seed)
    start = time.time()
    model = train_classifier(cfg)
    cfg.measured = {
        "train_seconds": round(time.time() - start, 1),
        "fresh_clean_8192": accuracy_on_drawn(model, 8192, seed=424242),
        "fresh_noise0.2_blur0.7_8192": noisy_accuracy(model, 8192, seed=434343, noise=0.2, blur=0.7),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(cfg.measured)
    save_classifier(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
