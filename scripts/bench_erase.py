#!/usr/bin/env python
"""Speed and memory of a SalUn erase step and of the saliency-mask threshold, at real size.

Builds the full-size SD-1.4 UNet from its config with random weights (a step costs the same
whatever the weights), with 64x64 latents (512 px) and 77x768 text states already cached, as
the toolkit's trainer sees them: the VAE and the text encoder are not in the step. In one process
it runs the toolkit's own `unlearn` loop under several configurations (an official-style one, the
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
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import torch
except ImportError as err:
    sys.exit(f"bench_erase: the Python package {err.name!r} is not installed in this environment, so nothing was measured. Install the toolkit first: pip install -e . (from the repository root)")
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accelerate import Accelerator
from accelerate.state import AcceleratorState

from salun_sd.config import from_dict
from salun_sd.denoiser import ConceptData
from salun_sd.objectives import METHODS, Batch
from salun_sd.saliency import _kth_largest, saliency_masks
from salun_sd.sd.adapter import TextConditionedDenoiser
from salun_sd.sd.config import EraseConfig
from reference_models import SD14_UNET_CONFIG, sd14_noise_scheduler, sd14_unet
from salun_sd.core_config import TrainConfig
from salun_sd.trainer import unlearn

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
    "fast": {"mixed_precision": "bf16", "optimizer": "adam_fused", "channels_last": True, "compile_unet": True},
    "fit24": {"mixed_precision": "bf16", "gradient_checkpointing": True, "optimizer": "adam8bit"},
}
FULL_RUN = ["official", "default", "bf16", "fast", "fit24"]
SMOKE_RUN = ["official", "default", "smoke-levers:mixed_precision=bf16,optimizer=adam_fused,channels_last=true,gradient_checkpointing=true"]

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
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    return f"{model} ({torch.get_num_threads()} threads)"


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


def make_denoiser(unet: torch.nn.Module, cross_dim: int, device: torch.device | str) -> TextConditionedDenoiser:
    """Three cached prompts plus the empty one, as random 77-token text states."""
    torch.manual_seed(1)
    return TextConditionedDenoiser(unet, sd14_noise_scheduler(), ["", "forget", "remain", "misaligned"], torch.randn(4, 77, cross_dim, device=device))


def flops_per_sample(unet_config: dict[str, object], latent: int) -> float:
    """FLOPs of one SalUn step per forget example, counted by FlopCounterMode on the meta device.

    The step is salun_loss (one forward over forget+remain with grad, one without) and its backward;
    the optimizer has no matmuls. Gradient checkpointing recomputes forwards on top of this, so
    the TFLOP/s reported are model FLOPs (useful work), not hardware FLOPs.
    """
    unet = sd14_unet("meta", config=unet_config)
    den = make_denoiser(unet, int(unet_config["cross_attention_dim"]), "meta")

    def batch(cond: int) -> Batch:
        x = torch.randn(1, 4, latent, latent, device="meta")
        return Batch(x0=x, cond=torch.tensor([cond], device="meta"), noise=torch.randn_like(x), t=torch.tensor([500], device="meta"), misaligned=torch.tensor([3], device="meta"))

    with FlopCounterMode(display=False) as counter:
        loss, _ = METHODS["salun"].loss(den, unet, batch(1), batch(2), TrainConfig(alpha=0.1), None)
        loss.backward()
    return float(counter.get_total_flops())


def random_mask(unet: torch.nn.Module, fraction: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {n: torch.rand(p.shape, generator=gen) < fraction for n, p in unet.named_parameters()}


def run_step(name: str, settings: dict[str, object], args: argparse.Namespace, device: torch.device, unet_config: dict[str, object]) -> dict[str, object]:
    """`args.steps` timed steps of the toolkit's unlearn loop after `args.warmup` untimed ones."""
    mixed_precision, cfg = split_settings(settings)
    cfg.max_steps = args.warmup + args.steps
    result: dict[str, object] = {"name": name, "mixed_precision": mixed_precision, **{k: getattr(cfg, k) for k in settings if k != "mixed_precision"}}
    result["batch_size"], result["gradient_accumulation_steps"] = cfg.batch_size, cfg.gradient_accumulation_steps
    try:
        times, losses, peak, frozen = train_once(cfg, mixed_precision, device, unet_config)
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory" + (f" (capped at {args.memory_cap_gib:g} GiB)" if args.memory_cap_gib else "")
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


def train_once(cfg: TrainConfig, mixed_precision: str, device: torch.device, unet_config: dict[str, object]) -> tuple[list[float], list[float], int, bool]:
    """Step end times, losses, peak memory (model, optimizer, activations) and whether masked-out weights stayed bitwise equal."""
    AcceleratorState._reset_state(True)  # one process, several mixed-precision settings
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    latent = int(unet_config["sample_size"])
    gen = torch.Generator().manual_seed(3)
    n = 64
    forget = ConceptData(torch.randn(n, 4, latent, latent, generator=gen), torch.full((n,), 1))
    remain = ConceptData(torch.randn(n, 4, latent, latent, generator=gen), torch.full((n,), 2))
    times: list[float] = []
    losses: list[float] = []

    def on_step(step: int, values: dict[str, float]) -> None:
        synchronize(device)
        times.append(time.perf_counter())
        losses.append(values["loss"])

    with PeakMemory(device) as mem:
        unet = sd14_unet(device, config=unet_config)
        mask = random_mask(unet)
        den = make_denoiser(unet, int(unet_config["cross_attention_dim"]), device)
        with tempfile.TemporaryDirectory() as run_dir:
            trained = unlearn(den, forget, remain, [3], cfg, accelerator, Path(run_dir), mask=mask, on_step=on_step).cpu()
    del unet, den
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    original = dict(sd14_unet(device, config=unet_config).cpu().named_parameters())  # same seed, same device: the same weights
    frozen = all(torch.equal(w.detach()[~mask[n]], original[n].detach()[~mask[n]]) for n, w in trained.named_parameters())
    return times, losses, mem.extra, frozen


def mask_pass(unet_config: dict[str, object], device: torch.device, naive: bool) -> dict[str, object]:
    """Global 50 % threshold over one fake |gradient| per UNet weight: time and extra memory.

    Scores are |N(0,1)| times a per-tensor scale spread over four decades, like real saliency.
    Extra memory includes the masks themselves (1 byte per weight), which the pass must return.
    """
    shapes = {n: p.shape for n, p in sd14_unet("meta", config=unet_config).named_parameters()}
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


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help=f"NAME or NAME:key=value,... (repeatable); presets: {', '.join(PRESETS)}; default: {' '.join(FULL_RUN)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles here)")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--memory-cap-gib", type=float, default=0.0, help="limit the CUDA allocator to this much memory, to check a fit on a smaller card")
    parser.add_argument("--mask-only", action="store_true", help="only the mask pass")
    parser.add_argument("--no-mask", action="store_true", help="skip the mask pass")
    parser.add_argument("--naive", action="store_true", help="also time torch.kthvalue over all values concatenated")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy-width UNet at 8x8 latents on CPU: checks the benchmark runs, measures nothing of interest")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device, unet_config = torch.device("cpu"), SMOKE_UNET_CONFIG
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    else:
        device, unet_config = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), SD14_UNET_CONFIG
    specs = args.config or (SMOKE_RUN if args.cpu_smoke else FULL_RUN)
    if device.type == "cpu" and not (args.cpu_smoke or args.mask_only or args.device):
        print("No CUDA device: the full-size erase step is a GPU measurement; running the mask pass only. Use --cpu-smoke for small shapes, or --device cpu to insist.")
        args.mask_only = True
    if args.memory_cap_gib and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / torch.cuda.get_device_properties(device).total_memory), device)

    name = device_name(device)
    peak = peak_tflops(name) if device.type == "cuda" else None
    report: dict[str, object] = {"device": name, "torch": torch.__version__, "unet_parameters": sum(p.numel() for p in sd14_unet("meta", config=unet_config).parameters())}
    print(f"device: {name}  torch {torch.__version__}  UNet {report['unet_parameters']:,} parameters  latents {unet_config['sample_size']}x{unet_config['sample_size']}")

    if not args.mask_only:
        fps = flops_per_sample(unet_config, int(unet_config["sample_size"]))
        report["tflop_per_sample"] = fps / 1e12
        print(f"one SalUn step: {fps / 1e12:.4g} TFLOP per sample (FlopCounterMode)" + (f"; device peak {peak:g} TFLOP/s bf16 dense" if peak else ""))
        rows = []
        for spec in specs:
            row = run_step(*parse_config(spec), args, device, unet_config)
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
        report["mask"] = m = mask_pass(unet_config, device, args.naive)
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
