"""Measure Stable Diffusion generation speed (images/s) on whatever device this machine has.

Evaluation time goes into generation (I2P alone is 4,703 prompts), so this measures the pipeline
call that `salun-sd generate` makes (through salun_sd.generation): a full-size SD-1.x UNet, VAE and CLIP text encoder built from
their configs with random weights (the cost of a step does not depend on the weight values; no
download), classifier-free guidance, fp16 on GPU. `--tiny` uses the offline tiny pipeline instead,
a CPU smoke test of the same code path.

    python scripts/bench_generate.py                          # 512 px, 50 steps, batch 8
    python scripts/bench_generate.py --tiny                   # seconds on a CPU
    python scripts/bench_generate.py --height 64 --width 64 --steps 2 --batch-size 1   # full size, small shapes

Prints one JSON line with the device, the settings and images/s (PNG writing not included).
Run it with salun-sd installed (`pip install -e .`) or from the repository root with `PYTHONPATH=.`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts, also when run through runpy (tests)

from bench_erase import device_name, synchronize
from reference_models import SD14_TEXT_CONFIG, SD14_UNET_CONFIG, SD14_VAE_CONFIG
from salun_sd.evaluation.generate import resolve_dtype
from salun_sd.generation import ImageRequest, draw_images
from salun_sd.run.runtime import device as pick_device
from salun_sd.families.tiny import tiny_pipeline


def full_size_pipeline(dtype: torch.dtype, device: torch.device) -> StableDiffusionPipeline:
    """SD-1.4-shaped models with random weights, built on `device` in `dtype`; the tokenizer and the
    scheduler (SD-1.x betas) are the tiny pipeline's, which are the real ones."""
    with torch.device(device):
        models = {
            "unet": UNet2DConditionModel(**SD14_UNET_CONFIG),
            "vae": AutoencoderKL(**SD14_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SD14_TEXT_CONFIG)),
        }
    if dtype != torch.float32:
        models = {name: model.to(dtype) for name, model in models.items()}
    return StableDiffusionPipeline(**{**tiny_pipeline().components, **models}, requires_safety_checker=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the offline tiny pipeline (32 px) instead of the full-size one")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale; > 1 doubles the UNet batch (default: %(default)s)")
    parser.add_argument("--height", type=int, help="image height (default: 512, or 32 with --tiny)")
    parser.add_argument("--width", type=int, help="image width (default: 512, or 32 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pipeline calls after one warm-up call (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    args = parser.parse_args(argv)

    device = torch.device(pick_device())
    dtype = resolve_dtype(args.dtype, device)
    size = 32 if args.tiny else 512
    height, width = args.height or size, args.width or size

    start = time.perf_counter()
    pipe = tiny_pipeline().to(device) if args.tiny else full_size_pipeline(dtype, device)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - start

    def call(repeat: int) -> None:  # one batched pipeline call, as `salun-sd generate` makes it
        requests = [ImageRequest("a photograph of an astronaut riding a horse", repeat * args.batch_size + i, height, width, args.guidance) for i in range(args.batch_size)]
        draw_images(pipe, requests, args.steps, args.batch_size)

    with torch.inference_mode():
        call(0)  # warm-up: kernels, allocator, lazy init
        synchronize(device)
        start = time.perf_counter()
        for repeat in range(args.repeats):
            call(repeat + 1)
        synchronize(device)
        elapsed = time.perf_counter() - start
    images = args.batch_size * args.repeats
    figures = {
        "device": device_name(device),
        "pipeline": "tiny" if args.tiny else "SD-1.4 shapes, random weights",
        "unet_parameters_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
        "dtype": str(dtype).removeprefix("torch."),
        "size": f"{width}x{height}",
        "steps": args.steps,
        "guidance": args.guidance,
        "batch_size": args.batch_size,
        "images_timed": images,
        "seconds": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 3),
        "build_s": round(build_s, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
