#!/usr/bin/env python
"""Speed and memory of a SalUn erase step and of the saliency-mask threshold, at real size.

Builds a full-size denoiser from its published config with random weights (a step costs the same
whatever the weights): SD-1.4's UNet by default with 64x64 latents (512 px), or with --family the
SDXL UNet or the SD3.5-medium, SD3.5-large or FLUX.1-dev transformer at 1024 px; text conditions of
the real shapes are already cached, as the toolkit's trainer sees them: the VAE and the text
encoders are not in the step. In one process it runs the toolkit's own `unlearn` loop under several configurations (an official-style one, the
toolkit's defaults, and the speed/memory levers) and prints, per configuration: samples/s (forget
examples per second, each paired with a remain example), achieved TFLOP/s and share of the
device's peak, peak memory, and ratios to the official-style run; then the mask pass (global 50 %
threshold over all UNet gradients: seconds and extra memory). Batch generation is measured by
scripts/bench_generate.py.

    python scripts/bench_erase.py                        # on a GPU: the full table
    python scripts/bench_erase.py --memory-cap-gib 24    # the same, as if on a 24 GiB card
    python scripts/bench_erase.py --config b16:mixed_precision=bf16,batch_size=16
    python scripts/bench_erase.py --mask-only --naive    # full-size mask pass (CPU is fine), with kthvalue for comparison
    python scripts/bench_erase.py --cpu-smoke            # small shapes on CPU, under a minute (CI)
    python scripts/bench_erase.py --family flux-dev      # FLUX.1-dev at 1024 px (default, bf16, fit presets)
    python scripts/bench_erase.py --family sd3.5-large --memory   # static memory per lever, from the config (no device needed)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import torch
except ImportError as err:
    sys.exit(f"bench_erase: the Python package {err.name!r} is not installed in this environment, so nothing was measured. Install the toolkit first: pip install -e . (from the repository root)")
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the toy-width transformer layouts the tests build (tiny_families.py)

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from salun_sd.config import from_dict
from salun_sd.core.denoiser import ConceptData, Denoiser
from salun_sd.core.objectives import METHODS, Batch
from salun_sd.core.saliency import _kth_largest, saliency_masks
from salun_sd.families.sd_unet import SDXLDenoiser, TextConditionedDenoiser
from salun_sd.families.config import EraseConfig
from salun_sd.families.sd3_flux import FLOW_SCOPES, FluxDenoiser, SD3Denoiser
from tiny_families import TINY_FLUX_TRANSFORMER, TINY_SD3_TRANSFORMER
from reference_models import (
    FLUX_DEV_CONFIG, FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG, SD14_UNET_CONFIG, SD35_LARGE_CONFIG, SD35_MEDIUM_CONFIG, SDXL_UNET_CONFIG, sd14_noise_scheduler,
)
from salun_sd.core.config import TrainConfig
from salun_sd.errors import UserError
from salun_sd.run.runtime import device as pick_device
from salun_sd.core.trainer import unlearn

GIB = 2**30

# Dense bf16 tensor-core peak, TFLOP/s (vendor spec sheets); the first name found in the device name wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM; ~790 is what large bf16 matmuls reach in practice
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
]

# Named configurations: TrainConfig fields plus mixed_precision. "default" is what `salun-sd erase` runs with.
PRESETS: dict[str, dict[str, object]] = {
    "official": {"mixed_precision": "no", "batch_size": 1, "attention": "eager"},  # fp32, batch 1, materialised attention
    "default": {},
    "bf16": {"mixed_precision": "bf16"},
    "fast": {"mixed_precision": "bf16", "optimizer": "adam_fused", "channels_last": True, "compile": True},
    "fit24": {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "adam8bit"},
    # The large transformers at 1024 px: batch 1, every memory lever, all weights or the text stream of joint attention only.
    "fit-all": {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "adam8bit", "batch_size": 1},
    "fit-xattn": {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "adam8bit", "batch_size": 1, "trainable": "xattn"},
}
SD_RUN = ["official", "default", "bf16", "fast", "fit24"]
SMOKE_RUN = ["official", "default", "smoke-levers:mixed_precision=bf16,optimizer=adam_fused,channels_last=true,gradient_checkpointing=true"]
# The transformers run SDPA only (their joint-attention processors have no eager/xformers choice here), so no "official" row.
FLOW_RUN = ["bf16:mixed_precision=bf16,batch_size=1", "fit-all", "fit-xattn"]
FLOW_SMOKE_RUN = ["default", "smoke-xattn:mixed_precision=bf16,gradient_checkpointing=true,batch_size=1,trainable=xattn"]
PROMPTS = ["", "forget", "remain", "misaligned"]  # condition ids 0..3, as make_denoiser's cached states

# A UNet of the same block layout at toy width, for --cpu-smoke.
SMOKE_UNET_CONFIG: dict[str, object] = {
    **SD14_UNET_CONFIG,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 8,
}


# SDXL's layout (no attention at the highest resolution, added text/time conditions) at toy width.
SMOKE_SDXL_UNET_CONFIG: dict[str, object] = {
    **SMOKE_UNET_CONFIG,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}


def parse_config(spec: str) -> tuple[str, dict[str, object]]:
    """`NAME` (a preset) or `NAME:key=value,...` (a preset, or the defaults, with fields changed)."""
    name, _, rest = spec.partition(":")
    settings = dict(PRESETS.get(name, {}))
    if not rest and name not in PRESETS:
        raise SystemExit(f"unknown configuration {name!r}: presets are {', '.join(PRESETS)}; or give NAME:key=value,...")
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"configuration {spec!r}: expected key=value, got {item!r}")
        settings[key.strip()] = value.strip()
    return name, settings


def split_settings(settings: dict[str, object]) -> tuple[str, TrainConfig]:
    """Mixed precision (an Accelerator setting) and the TrainConfig, checked as the CLI checks them."""
    train = dict(settings)
    mixed_precision = str(train.pop("mixed_precision", EraseConfig().mixed_precision))
    return mixed_precision, from_dict(TrainConfig, train, "config")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def proc_bytes(path: str, field: str) -> int:
    """A `Field:  N kB` line of a /proc file, in bytes."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.M).group(1)) * 1024


def available_memory() -> int:
    return proc_bytes("/proc/meminfo", "MemAvailable")


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or peak RSS on CPU.

    On CPU the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs;
    where that is not allowed, a thread samples VmRSS every millisecond instead.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        return proc_bytes("/proc/self/status", field)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self._status("VmRSS")
        self.sampled, self._stop = self.start, threading.Event()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._thread = None
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.sampled = max(self.sampled, self._status("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            self.peak = self._status("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.sampled, self._status("VmRSS"))
        self.extra = self.peak - self.start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sd_conditions(unet: nn.Module, device: torch.device | str) -> Denoiser:
    """SD-1.x: 77 CLIP states per prompt."""
    states = torch.randn(len(PROMPTS), 77, unet.config.cross_attention_dim, device=device)
    return TextConditionedDenoiser(unet, sd14_noise_scheduler(), PROMPTS, states)


def sdxl_conditions(unet: nn.Module, device: torch.device | str) -> Denoiser:
    """SDXL: 77 states of both CLIP encoders concatenated, CLIP-G's pooled projection, and the 6 size/crop ids of a square image."""
    c = unet.config
    states = torch.randn(len(PROMPTS), 77, c.cross_attention_dim, device=device)
    pooled = torch.randn(len(PROMPTS), c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, device=device)
    side = float(c.sample_size * 8)
    time_ids = torch.tensor([side, side, 0.0, 0.0, side, side], device=device)
    return SDXLDenoiser(unet, sd14_noise_scheduler(), PROMPTS, states, pooled, time_ids)  # SDXL keeps SD-1.x's noise schedule


def sd3_conditions(model: nn.Module, device: torch.device | str) -> Denoiser:
    """SD3: 77 CLIP-L+G states then T5's 256, and the pooled CLIP projections."""
    c = model.config
    states, pooled = torch.randn(len(PROMPTS), 77 + 256, c.joint_attention_dim, device=device), torch.randn(len(PROMPTS), c.pooled_projection_dim, device=device)
    return SD3Denoiser(model, FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG).config, PROMPTS, states, pooled)


def flux_conditions(model: nn.Module, device: torch.device | str) -> Denoiser:
    """FLUX: 512 T5 states (FluxPipeline's max_sequence_length), CLIP's pooled output and the text position ids."""
    c = model.config
    states, pooled = torch.randn(len(PROMPTS), 512, c.joint_attention_dim, device=device), torch.randn(len(PROMPTS), c.pooled_projection_dim, device=device)
    return FluxDenoiser(model, FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).config, PROMPTS, states, pooled, torch.zeros(512, 3, device=device))


@dataclass(frozen=True)
class Family:
    """A denoiser class with its full-size and toy-width configs, latent shapes, and random cached conditions of the real shapes."""

    model_class: type
    config: dict[str, object]
    smoke_config: dict[str, object]
    latent: tuple[int, int, int]  # channels, height, width at the family's native resolution
    smoke_latent: tuple[int, int, int]
    conditions: Callable[[nn.Module, torch.device | str], Denoiser]
    run: list[str]
    xattn: Callable[[str], bool]  # the "xattn" scope, for the memory arithmetic

    def build(self, device: torch.device | str, smoke: bool, seed: int = 0) -> nn.Module:
        """A randomly initialised denoiser built directly on `device` ("meta": shapes only, for FLOPs and parameter lists)."""
        torch.manual_seed(seed)
        with torch.device(device):
            return self.model_class(**(self.smoke_config if smoke else self.config))

    def denoiser(self, model: nn.Module, device: torch.device | str) -> Denoiser:
        torch.manual_seed(1)
        return self.conditions(model, device)


FAMILIES: dict[str, Family] = {
    "sd1.4": Family(UNet2DConditionModel, SD14_UNET_CONFIG, SMOKE_UNET_CONFIG, (4, 64, 64), (4, 8, 8), sd_conditions, SD_RUN, lambda n: ".attn2." in n),
    "sdxl": Family(UNet2DConditionModel, SDXL_UNET_CONFIG, SMOKE_SDXL_UNET_CONFIG, (4, 128, 128), (4, 8, 8), sdxl_conditions, SD_RUN, lambda n: ".attn2." in n),
    "sd3.5-medium": Family(SD3Transformer2DModel, SD35_MEDIUM_CONFIG, TINY_SD3_TRANSFORMER, (16, 128, 128), (4, 8, 8), sd3_conditions, FLOW_RUN, FLOW_SCOPES["xattn"]),
    "sd3.5-large": Family(SD3Transformer2DModel, SD35_LARGE_CONFIG, TINY_SD3_TRANSFORMER, (16, 128, 128), (4, 8, 8), sd3_conditions, FLOW_RUN, FLOW_SCOPES["xattn"]),
    "flux-dev": Family(FluxTransformer2DModel, FLUX_DEV_CONFIG, TINY_FLUX_TRANSFORMER, (16, 128, 128), (4, 8, 8), flux_conditions, FLOW_RUN, FLOW_SCOPES["xattn"]),
}


def flops_per_sample(family: Family, smoke: bool) -> float:
    """FLOPs of one SalUn step per forget example, counted by FlopCounterMode on the meta device.

    The step is salun_loss (one forward over forget+remain with grad, one without) and its backward;
    the optimizer has no matmuls. Gradient checkpointing recomputes forwards on top of this, so
    the TFLOP/s reported are model FLOPs (useful work), not hardware FLOPs.
    """
    model = family.build("meta", smoke)
    den = family.denoiser(model, "meta")
    shape = family.smoke_latent if smoke else family.latent

    def batch(cond: int) -> Batch:
        x = torch.randn(1, *shape, device="meta")
        return Batch(x0=x, cond=torch.tensor([cond], device="meta"), noise=torch.randn_like(x), t=torch.tensor([500], device="meta"), misaligned=torch.tensor([3], device="meta"))

    with FlopCounterMode(display=False) as counter:
        loss, _ = METHODS["salun"].loss(den, model, batch(1), batch(2), TrainConfig(alpha=0.1), None)
        loss.backward()
    return float(counter.get_total_flops())


def random_mask(model: nn.Module, fraction: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {n: torch.rand(p.shape, generator=gen) < fraction for n, p in model.named_parameters()}


def run_step(name: str, settings: dict[str, object], args: argparse.Namespace, device: torch.device, family: Family) -> dict[str, object]:
    """`args.steps` timed steps of the toolkit's unlearn loop after `args.warmup` untimed ones."""
    mixed_precision, cfg = split_settings(settings)
    cfg.max_steps = args.warmup + args.steps
    result: dict[str, object] = {"name": name, "mixed_precision": mixed_precision, **{k: getattr(cfg, k) for k in settings if k != "mixed_precision"}}
    result["batch_size"], result["gradient_accumulation_steps"] = cfg.batch_size, cfg.gradient_accumulation_steps
    try:
        times, losses, peak, frozen = train_once(cfg, mixed_precision, device, family, args.cpu_smoke)
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory" + (f" (capped at {args.memory_cap_gib:g} GiB)" if args.memory_cap_gib else "")
        return result
    except UserError as err:  # e.g. adam8bit without bitsandbytes: this row fails, the others still run
        result["error"] = str(err)
        return result
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = times[-1] - times[args.warmup - 1] if args.warmup else times[-1] - times[0]
    timed = args.steps if args.warmup else args.steps - 1
    result.update(
        samples_per_s=cfg.batch_size * cfg.gradient_accumulation_steps * timed / seconds,
        peak_memory_gib=peak / GIB,
        frozen_bitwise=frozen,
        loss_first=losses[0],
        loss_last=losses[-1],
    )
    return result


def train_once(cfg: TrainConfig, mixed_precision: str, device: torch.device, family: Family, smoke: bool) -> tuple[list[float], list[float], int, bool]:
    """Step end times, losses, peak memory (model, optimizer, activations) and whether masked-out weights stayed bitwise equal."""
    AcceleratorState._reset_state(True)  # one process, several mixed-precision settings
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    shape = family.smoke_latent if smoke else family.latent
    gen = torch.Generator().manual_seed(3)
    n = 64
    forget = ConceptData(torch.randn(n, *shape, generator=gen), torch.full((n,), 1))
    remain = ConceptData(torch.randn(n, *shape, generator=gen), torch.full((n,), 2))
    times: list[float] = []
    losses: list[float] = []

    def on_step(step: int, values: dict[str, float]) -> None:
        synchronize(device)
        times.append(time.perf_counter())
        losses.append(values["loss"])

    with PeakMemory(device) as mem:
        model = family.build(device, smoke)
        mask = random_mask(model)
        den = family.denoiser(model, device)
        with tempfile.TemporaryDirectory() as run_dir:
            trained = unlearn(den, forget, remain, [[3]], cfg, accelerator, Path(run_dir), mask=mask, on_step=on_step).cpu()
    del model, den
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    original = dict(family.build(device, smoke).cpu().named_parameters())  # same seed, same device: the same weights
    frozen = all(torch.equal(w.detach()[~mask[n]], original[n].detach()[~mask[n]]) for n, w in trained.named_parameters())
    return times, losses, mem.extra, frozen


def mask_pass(family: Family, smoke: bool, device: torch.device, naive: bool) -> dict[str, object]:
    """Global 50 % threshold over one fake |gradient| per weight of the denoiser: time and extra memory.

    Scores are |N(0,1)| times a per-tensor scale spread over four decades, like real saliency.
    Extra memory includes the masks themselves (1 byte per weight), which the pass must return.
    """
    shapes = {n: p.shape for n, p in family.build("meta", smoke).named_parameters()}
    gen = torch.Generator(device).manual_seed(4)
    scales = 10 ** (-6 + 4 * torch.rand(len(shapes), generator=torch.Generator().manual_seed(5)))
    scores = {n: torch.randn(shape, generator=gen, device=device).abs_().mul_(float(s)) for (n, shape), s in zip(shapes.items(), scales)}
    total = sum(s.numel() for s in scores.values())
    out: dict[str, object] = {"weights": total, "scores_gib": total * 4 / GIB, "masks_gib": total / GIB}
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        masks = saliency_masks(scores, [0.5])[0.5]
        synchronize(device)
        out["seconds"] = time.perf_counter() - start
    out["extra_gib"] = mem.extra / GIB
    out["kept"] = sum(int(m.sum()) for m in masks.values()) / total
    del masks
    need = total * 16  # torch.cat copy, kthvalue's own copy, and its int64 index buffer (CPU kernel)
    if naive and device.type == "cpu" and need > available_memory() - 2 * GIB:
        print(f"  naive kthvalue skipped: it needs about {need / GIB:.0f} GiB and {available_memory() / GIB:.0f} GiB is available")
        naive = False
    if naive:  # what a straightforward implementation does: concatenate, then select
        k = round(0.5 * total)
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            flat = torch.cat([s.flatten() for s in scores.values()])
            value = float(flat.kthvalue(total - k + 1).values)
            del flat
            synchronize(device)
            out["kthvalue_seconds"] = time.perf_counter() - start
        out["kthvalue_extra_gib"] = mem.extra / GIB
        out["same_threshold"] = value == _kth_largest(scores.values(), k)
    return out


def static_memory(family: Family) -> dict[tuple[str, str], dict[str, float]]:
    """What must be resident before any activation, per (trainable scope, optimizer), in the trainer's own layout.

    Every weight is held in fp32 (mixed_precision=bf16 is autocast: it shrinks activations, not
    weights); each trained weight adds an fp32 gradient, Adam's two moments (8 bytes; 8-bit Adam: 2)
    and its mask bit as a bool byte. The mask step holds weights, gradients of the scope and the masks.
    """
    params = dict(family.build("meta", smoke=False).named_parameters())
    total = sum(p.numel() for p in params.values())
    out = {}
    for scope, in_scope in (("all", lambda name: True), ("xattn", family.xattn)):
        trained = sum(p.numel() for n, p in params.items() if in_scope(n))
        for optimizer, moments in (("adam", 8), ("adam8bit", 2)):
            out[scope, optimizer] = {"weights": total, "trained": trained, "step_gib": (4 * total + (4 + moments + 1) * trained) / GIB, "mask_step_gib": (4 * total + 5 * trained) / GIB}
    return out


class FusedAttentionCost(torch.autograd.Function):
    """What a fused CUDA attention kernel (flash / memory-efficient SDPA) keeps for backward: q, k, v, the output and
    one float per head and query. On the meta device SDPA falls back to the decomposed math, which would keep the
    whole softmax(QKᵀ) that the GPU kernels never materialise."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class SavedBytes:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward: the activations."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {id(p) for p in model.parameters()}
        self.kept: dict[int, torch.Tensor] = {}  # holding them keeps the ids unique

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in self.params:
            self.kept[id(base)] = base
        return t

    @property
    def total(self) -> int:
        return sum(t.nbytes for t in self.kept.values())


def activation_memory(family: Family, dtype: torch.dtype, checkpointing: bool) -> int:
    """Activations of one SalUn step at batch 1 (forget + remain example, native resolution), counted on the meta device.

    With gradient checkpointing diffusers keeps only each checkpointed block's inputs and recomputes
    one block at a time in backward, so the count is: outside the blocks + their inputs + the largest
    block. The model is built in `dtype` (bf16 stands for autocast, which keeps norms and softmax
    statistics in fp32, so that row is a slight underestimate). Backward's own transients are not counted.
    """
    model = family.build("meta", smoke=False).to(dtype)
    den = family.denoiser(model, "meta")
    if hasattr(den, "table"):
        den.table = {k: v.to(dtype) for k, v in den.table.items()}
    else:
        den.embeddings = den.embeddings.to(dtype)
    outside, blocks = SavedBytes(model), []

    def checkpoint(block: nn.Module, *args: object) -> object:
        inside = SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(inside.pack, lambda t: t):
            out = block(*args)
        blocks.append(inside.total)
        for a in args:  # what the checkpoint itself keeps
            if isinstance(a, torch.Tensor):
                outside.pack(a)
        return out

    if checkpointing:
        model.enable_gradient_checkpointing(checkpoint)
    model.train()
    x = torch.randn(2, *family.latent, device="meta", dtype=dtype)
    t, cond = torch.tensor([500, 500], device="meta"), torch.tensor([1, 2], device="meta")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **kw: FusedAttentionCost.apply(*(a[:3] or (kw["query"], kw["key"], kw["value"])))
    try:
        with torch.autograd.graph.saved_tensors_hooks(outside.pack, lambda t: t):
            den.predict(model, den.add_noise(x, x, t), t, cond)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return outside.total + max(blocks, default=0)


def memory_arithmetic(family: Family) -> dict[str, object]:
    """Static memory per scope and optimizer, activations per precision and checkpointing, and what fits 24 / 80 GiB."""
    static = static_memory(family)
    acts = {(p, c): activation_memory(family, dtype, c) / GIB for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)) for c in (False, True)}
    levers = [  # (name, precision, checkpointing, optimizer, scope)
        ("fp32, Adam, all weights", "fp32", False, "adam", "all"),
        ("bf16, Adam, all weights", "bf16", False, "adam", "all"),
        ("bf16 + checkpointing + 8-bit Adam, all weights", "bf16", True, "adam8bit", "all"),
        ("bf16 + checkpointing + Adam, xattn", "bf16", True, "adam", "xattn"),
        ("bf16 + checkpointing + 8-bit Adam, xattn", "bf16", True, "adam8bit", "xattn"),
    ]
    rows = []
    for name, precision, ckpt, optimizer, scope in levers:
        total = static[scope, optimizer]["step_gib"] + acts[precision, ckpt]
        rows.append({"levers": name, "static_gib": static[scope, optimizer]["step_gib"], "activations_gib": acts[precision, ckpt], "total_gib": total, "fits_24": total <= 24, "fits_80": total <= 80})
    return {"static": [{"scope": s, "optimizer": o, **v} for (s, o), v in static.items()], "activations": [{"precision": p, "checkpointing": c, "gib": v} for (p, c), v in acts.items()], "fit": rows}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1.4", choices=list(FAMILIES), help="which denoiser to build at full size (or toy width with --cpu-smoke)")
    parser.add_argument("--config", action="append", default=[], help=f"NAME or NAME:key=value,... (repeatable); presets: {', '.join(PRESETS)}; default: {' '.join(SD_RUN)} (SD), {' '.join(FLOW_RUN)} (SD3.5, FLUX)")
    parser.add_argument("--memory", action="store_true", help="only print the static-memory arithmetic of the family per scope and optimizer (no device needed)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles here)")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0, help="limit the CUDA allocator to this much memory, to check a fit on a smaller card")
    parser.add_argument("--mask-only", action="store_true", help="only the mask pass")
    parser.add_argument("--no-mask", action="store_true", help="skip the mask pass")
    parser.add_argument("--naive", action="store_true", help="also time torch.kthvalue over all values concatenated")
    parser.add_argument("--cpu-smoke", action="store_true", help="the family at toy width and 8x8 latents on CPU: checks the benchmark runs, measures nothing of interest")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    report: dict[str, object] = {"family": args.family}

    if args.memory:
        report["memory"] = m = memory_arithmetic(family)
        latent = "x".join(map(str, family.latent))
        print(f"{args.family}: {m['static'][0]['weights']:,} weights, latents {latent}, batch 1 (one forget + one remain example)")
        print("| scope | trained weights | optimizer | step, static GiB | mask step, static GiB |\n| --- | --- | --- | --- | --- |")
        for r in m["static"]:
            print(f"| {r['scope']} | {r['trained']:,} | {r['optimizer']} | {r['step_gib']:.1f} | {r['mask_step_gib']:.1f} |")
        print("| levers | static GiB | activations GiB | total GiB | fits 24 GiB | fits 80 GiB |\n| --- | --- | --- | --- | --- | --- |")
        for r in m["fit"]:
            print(f"| {r['levers']} | {r['static_gib']:.1f} | {r['activations_gib']:.1f} | {r['total_gib']:.1f} | {'yes' if r['fits_24'] else 'no'} | {'yes' if r['fits_80'] else 'no'} |")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return report

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    else:
        device = torch.device(pick_device(args.device))
    flow = family.run is FLOW_RUN
    specs = args.config or ((FLOW_SMOKE_RUN if flow else SMOKE_RUN) if args.cpu_smoke else family.run)
    if device.type == "cpu" and not (args.cpu_smoke or args.mask_only or args.device):
        print("No CUDA device: the full-size erase step is a GPU measurement; running the mask pass only. Use --cpu-smoke for small shapes, or --device cpu to insist.")
        args.mask_only = True
    if args.memory_cap_gib and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / torch.cuda.get_device_properties(device).total_memory), device)

    name = device_name(device)
    peak = peak_tflops(name) if device.type == "cuda" else None
    report.update(device=name, torch=torch.__version__, parameters=sum(p.numel() for p in family.build("meta", args.cpu_smoke).parameters()))
    latent = "x".join(map(str, family.smoke_latent if args.cpu_smoke else family.latent))
    print(f"device: {name}  torch {torch.__version__}  {args.family}: {report['parameters']:,} parameters  latents {latent}")

    if not args.mask_only:
        fps = flops_per_sample(family, args.cpu_smoke)
        report["tflop_per_sample"] = fps / 1e12
        print(f"one SalUn step: {fps / 1e12:.4g} TFLOP per sample (FlopCounterMode)" + (f"; device peak {peak:g} TFLOP/s bf16 dense" if peak else ""))
        rows = []
        for spec in specs:
            row = run_step(*parse_config(spec), args, device, family)
            if "samples_per_s" in row:
                row["tflops"] = row["samples_per_s"] * fps / 1e12
                row["peak_share"] = row["tflops"] / peak if peak else None
            rows.append(row)
            print(format_row(row))
        base = next((r for r in rows if r["name"] == "official" and "samples_per_s" in r), None)
        for row in rows:
            if base and "samples_per_s" in row:
                row["speedup_vs_official"] = row["samples_per_s"] / base["samples_per_s"]
                row["memory_vs_official"] = row["peak_memory_gib"] / base["peak_memory_gib"]
        report["step"] = rows
        print_table(rows, device)
    if not args.no_mask:
        report["mask"] = m = mask_pass(family, args.cpu_smoke, device, args.naive)
        print(f"mask pass, global 50 % of {m['weights']:,} weights: {m['seconds']:.2f} s, extra memory {m['extra_gib']:.2f} GiB (masks themselves {m['masks_gib']:.2f} GiB; scores {m['scores_gib']:.2f} GiB not counted)")
        if args.naive:
            print(f"  naive torch.cat + kthvalue: {m['kthvalue_seconds']:.2f} s, extra memory {m['kthvalue_extra_gib']:.2f} GiB, same threshold: {m['same_threshold']}")
    print("generation images/s: see scripts/bench_generate.py")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def format_row(row: dict[str, object]) -> str:
    if "error" in row:
        return f"  {row['name']}: {row['error']}"
    share = f" ({row['peak_share']:.0%} of peak)" if row.get("peak_share") else ""
    return f"  {row['name']}: {row['samples_per_s']:.3g} samples/s, {row['tflops']:.3g} TFLOP/s{share}, peak {row['peak_memory_gib']:.2f} GiB, frozen weights bitwise equal: {row['frozen_bitwise']}"


def print_table(rows: list[dict[str, object]], device: torch.device) -> None:
    memory = "peak GiB" if device.type == "cuda" else "peak RSS +GiB"
    print(f"\n| config | settings | samples/s | TFLOP/s | share of peak | {memory} | speed × official | memory × official | frozen bitwise |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r.items() if k in TrainConfig.__dataclass_fields__ or k == "mixed_precision")
        if "error" in r:
            print(f"| {r['name']} | {settings} | {r['error']} | | | | | | |")
            continue
        share = f"{r['peak_share']:.0%}" if r.get("peak_share") else "–"
        speed, memory = (f"{r[key]:.2f}" if key in r else "–" for key in ("speedup_vs_official", "memory_vs_official"))
        print(f"| {r['name']} | {settings} | {r['samples_per_s']:.3g} | {r['tflops']:.3g} | {share} | {r['peak_memory_gib']:.2f} | {speed} | {memory} | {r['frozen_bitwise']} |")


if __name__ == "__main__":
    main()
