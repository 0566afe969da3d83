"""Train the toy world's shape/colour classifier and write it to salun_sd/assets/toyworld/.

Usage: python scripts/train_toy_classifier.py [--out DIR] [--steps N]
It records, in classifier.json, its accuracy on freshly drawn images (clean, and noisy + blurred).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.transforms.functional import gaussian_blur

from salun_sd.toyworld import ASSETS
from salun_sd.toyworld.classifier import CONFIG, WEIGHTS, ToyClassifier, ToyClassifierConfig, accuracy_on_drawn
from salun_sd.toyworld.world import sample, to_tensor


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel of radius 2.5 sigma (reflect padding); sigma 0 returns x unchanged."""
    return gaussian_blur(x, 2 * max(1, round(2.5 * sigma)) + 1, sigma) if sigma > 0 else x


def augment(x: torch.Tensor, cfg: ToyClassifierConfig, gen: torch.Generator) -> torch.Tensor:
    """Blur, per-image contrast/brightness jitter and Gaussian noise: the defects of generated images."""
    x = blur(x, float(torch.rand((), generator=gen)) * cfg.max_blur)
    n = len(x)
    contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    shift = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    noise = cfg.max_noise * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return (x * contrast + shift + noise).clamp(-1.5, 1.5)


def save_classifier(model: ToyClassifier, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")


def train_classifier(cfg: ToyClassifierConfig, log_every: int = 100) -> ToyClassifier:
    """Adam with cosine decay on a fresh drawn batch every step (the world is infinite, so no epochs)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ToyClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=cfg.steps, pct_start=0.1)
    spec = cfg.spec()
    chunk = 32 * cfg.batch_size  # draw many batches at once: drawing is cheap in bulk
    for step in range(cfg.steps):
        if step % 32 == 0:
            data = sample(chunk, 10_000 + cfg.seed * 1_000_003 + step, spec)
            xs, ys, yc = to_tensor(data.images), torch.from_numpy(data.shape_ids), torch.from_numpy(data.colour_ids)
        sl = slice((step % 32) * cfg.batch_size, (step % 32 + 1) * cfg.batch_size)
        model.train()
        ls, lc = model(augment(xs[sl], cfg, gen))
        loss = F.cross_entropy(ls, ys[sl]) + F.cross_entropy(lc, yc[sl])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{cfg.steps} loss {loss.item():.4f}", flush=True)
    return model.eval()


def noisy_accuracy(model, n: int, seed: int, noise: float, blur_sigma: float) -> dict[str, float]:
    """Accuracy on drawn images with fixed added noise and blur: a proxy for generated images' defects."""
    batch = sample(n, seed, model.cfg.spec())
    gen = torch.Generator().manual_seed(seed)
    x = blur(to_tensor(batch.images), blur_sigma) + noise * torch.randn(batch.images.shape[0], 3, model.cfg.size, model.cfg.size, generator=gen)
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
        "fresh_noise0.2_blur0.7_8192": noisy_accuracy(model, 8192, seed=434343, noise=0.2, blur_sigma=0.7),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    print(cfg.measured)
    save_classifier(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
