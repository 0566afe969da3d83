"""`salun-sd demo`: the whole main job on the embedded offline pipeline, on CPU, in about a minute.

The tiny pipeline has random weights, so its images are noise; what the demo shows is the machinery
end to end and a number that moves: how close the model's prediction for the forget prompt comes
to its prediction for the misaligned prompt (the SalUn forget loss), and that the remain loss holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from salun_sd.denoiser import ConceptData
from salun_sd.draws import draw_example_noise
from salun_sd.objectives import diffusion_loss, per_example_mse
from salun_sd.runtime import make_accelerator
from salun_sd.core_config import MaskConfig, TrainConfig
from salun_sd.sd.adapter import sd_denoiser
from salun_sd.sd.config import DataConfig, EraseConfig, ImageGroup
from salun_sd.sd.data import concept_data
from salun_sd.sd.erase import erase
from salun_sd.sd.loading import TINY, load_pipeline

FORGET, REMAIN = "a photo of a nude person", "a photo of a person wearing clothes"
SEEDS = [0, 1, 2, 3]


def demo_config(output_dir: str, overwrite: bool) -> EraseConfig:
    return EraseConfig(
        model=TINY,
        concept="nudity (demo on the offline tiny model)",
        output_dir=output_dir,
        overwrite=overwrite,
        data=DataConfig(
            forget=[ImageGroup(prompt=FORGET, generate=32)],
            remain=[ImageGroup(prompt=REMAIN, generate=32)],
            generation_steps=10,
            generation_batch_size=16,
            cache_dir=str(Path(output_dir) / "cache"),
        ),
        mask=MaskConfig(fraction=0.5, batch_size=16),
        train=TrainConfig(learning_rate=1e-4, batch_size=8, max_steps=60, alpha=0.1, checkpointing_steps=30),
    )


@torch.no_grad()
def forget_and_remain_losses(pipe: StableDiffusionPipeline, cfg: EraseConfig) -> dict[str, float]:
    """SalUn forget loss ‖ε(x_t|c) − ε(x_t|c')‖² and the remain diffusion loss, on fixed noise."""
    den = sd_denoiser(pipe, [FORGET, REMAIN])
    cond_of = {p: den.cond_id(p) for p in (FORGET, REMAIN)}
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    forget = concept_data(pipe, cfg.model, cfg.data.forget, cond_of, cfg.data, resolution, "forget")
    remain = concept_data(pipe, cfg.model, cfg.data.remain, cond_of, cfg.data, resolution, "remain")
    f = draw_example_noise(forget, den, seed=123, indices=list(range(len(forget))))
    x_t = den.add_noise(f.x0, f.noise, f.t)
    gap = per_example_mse(den.predict(pipe.unet, x_t, f.t, f.cond), den.predict(pipe.unet, x_t, f.t, torch.full_like(f.cond, cond_of[REMAIN])))
    r = draw_example_noise(remain, den, seed=123, indices=list(range(len(remain))))
    return {"forget_gap": gap.mean().item(), "remain_loss": diffusion_loss(den, pipe.unet, r).mean().item()}


def render(pipe: StableDiffusionPipeline, out: Path) -> None:
    """Images for the demo prompts and seeds, named so before and after line up."""
    out.mkdir(parents=True, exist_ok=True)
    for prompt in (FORGET, REMAIN):
        for seed in SEEDS:
            image = pipe(prompt, num_inference_steps=20, generator=torch.Generator().manual_seed(seed)).images[0]
            image.save(out / f"{prompt.replace(' ', '_')}-{seed}.png")


def grid(before: Path, after: Path, path: Path, cell: int = 96) -> None:
    """Rows: prompts; columns: seeds, before then after."""
    rows = [FORGET, REMAIN]
    canvas = Image.new("RGB", (cell * 2 * len(SEEDS) + 10, cell * len(rows) + 20), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "before (base)", fill="black")
    draw.text((cell * len(SEEDS) + 14, 4), "after (erased)", fill="black")
    for r, prompt in enumerate(rows):
        for c, seed in enumerate(SEEDS):
            name = f"{prompt.replace(' ', '_')}-{seed}.png"
            for k, folder in enumerate((before, after)):
                img = Image.open(folder / name).resize((cell, cell), Image.NEAREST)
                canvas.paste(img, (k * (cell * len(SEEDS) + 10) + c * cell, 20 + r * cell))
    canvas.save(path)


def demo(output_dir: str = "outputs/demo", overwrite: bool = False) -> dict[str, object]:
    start = time.time()
    cfg = demo_config(output_dir, overwrite)
    out = erase(cfg, make_accelerator())
    base = load_pipeline(TINY)
    render(base, out / "before")
    # The export is checked the way a user loads it: from_pretrained in a fresh process.
    subprocess.run([sys.executable, "-m", "salun_sd.sd.demo", "--render", str(out / "pipeline"), str(out / "after")], check=True)
    grid(out / "before", out / "after", out / "demo_grid.png")
    erased = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    before, after = forget_and_remain_losses(base, cfg), forget_and_remain_losses(erased, cfg)
    changed = sum(int((a != b).sum()) for a, b in zip(base.unet.parameters(), erased.unet.parameters()))
    total = sum(p.numel() for p in base.unet.parameters())
    summary = {
        "forget_gap_before": before["forget_gap"],
        "forget_gap_after": after["forget_gap"],
        "remain_loss_before": before["remain_loss"],
        "remain_loss_after": after["remain_loss"],
        "unet_weights_changed": changed / total,
        "seconds": round(time.time() - start, 1),
        "pipeline": str(out / "pipeline"),
        "grid": str(out / "demo_grid.png"),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nDemo done in {summary['seconds']} s (offline tiny model with random weights: images are noise).\n"
        f"  forget gap ‖ε(x_t|'{FORGET}') − ε(x_t|'{REMAIN}')‖²: {before['forget_gap']:.5f} -> {after['forget_gap']:.5f}\n"
        f"  remain diffusion loss: {before['remain_loss']:.4f} -> {after['remain_loss']:.4f}\n"
        f"  UNet weights changed: {changed / total:.1%} (the rest are bit-for-bit the base model's)\n"
        f"  erased pipeline: {out / 'pipeline'} (reloaded with from_pretrained in a fresh process)\n"
        f"  before/after grid: {out / 'demo_grid.png'}"
    )
    return summary


if __name__ == "__main__" and sys.argv[1:2] == ["--render"]:
    render(StableDiffusionPipeline.from_pretrained(sys.argv[2]), Path(sys.argv[3]))
