#!/usr/bin/env python
"""Every GPU figure docs/BENCHMARKS.md lists as open, in one command, printed as table rows to paste there.

On one H100 or H200 it takes about five minutes (each part has a time limit; eight minutes in all at most):
  1. erase: the erase step under each preset (official, default, bf16, fast, fit24) and the mask pass
     on the GPU (scripts/bench_erase.py);
  2. fit: the 24 GiB fit, with the CUDA allocator capped at 24 GiB: fit24 and the two alternatives of
     BENCHMARKS.md (bf16 + checkpointing with plain Adam; 8-bit Adam at batch 4 x 2 accumulation);
  3. generate: images/s of the full-size SD-1.4 pipeline, fp16, 512 px, 50 steps, batch 8
     (scripts/bench_generate.py);
  4. attack: seconds per prompt of `salun-sd attack`, when the command exists (a row says so otherwise).
Each part runs in its own process, so a memory cap or a compiled graph does not leak into the next; a part
that fails or runs out of time gives a row saying so, and the others still run.

    python scripts/gpu_report.py                  # on a GPU: the rows for docs/BENCHMARKS.md
    python scripts/gpu_report.py --cpu-smoke      # toy shapes on CPU in about a minute (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ERASE, GENERATE = HERE / "bench_erase.py", HERE / "bench_generate.py"
FIT_CONFIGS = ["fit24", "bf16_ckpt_adam:mixed_precision=bf16,gradient_checkpointing=true",
               "adam8bit_b4x2:mixed_precision=bf16,optimizer=adam8bit,batch_size=4,gradient_accumulation_steps=2"]
# (name, arguments on a GPU, arguments for --cpu-smoke, time limit in seconds on a GPU)
PARTS = [
    ("erase", [str(ERASE), "--steps", "10", "--warmup", "3"], [str(ERASE), "--cpu-smoke", "--naive"], 270),
    ("fit", [str(ERASE), "--memory-cap-gib", "24", "--no-mask", *(a for c in FIT_CONFIGS for a in ("--config", c))],
     [str(ERASE), "--cpu-smoke", "--memory-cap-gib", "24", "--no-mask", "--config", FIT_CONFIGS[1]], 120),
    ("generate", [str(GENERATE), "--batch-size", "8", "--steps", "50", "--repeats", "3"],
     [str(GENERATE), "--tiny", "--steps", "2", "--batch-size", "2", "--repeats", "1"], 90),
]


def run_part(name: str, argv: list[str], limit: float, workdir: Path) -> dict:
    """One benchmark in a fresh process: its JSON figures, or what went wrong."""
    out = workdir / f"{name}.json"
    if argv[0] == str(ERASE):
        argv = [*argv, "--json", str(out)]
    start = time.perf_counter()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after its {limit:.0f} s limit"}
    sys.stderr.write(proc.stdout + proc.stderr)  # the benchmark's own log, for the record
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return {"error": f"exit {proc.returncode}: {last}"}
    figures = json.loads(out.read_text()) if out.is_file() else json.loads(proc.stdout.strip().splitlines()[-1])
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    return figures


def settings(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.items() if k in ("mixed_precision", "batch_size", "gradient_accumulation_steps", "optimizer", "attention",
                                                                  "gradient_checkpointing", "channels_last", "compile_unet"))


def step_row(device: str, what: str, row: dict) -> str:
    if "error" in row:
        return f"| {device} | {what} ({settings(row)}) | {row['error']} |"
    share = f" ({row['peak_share']:.0%} of peak)" if row.get("peak_share") else ""
    vs = f"; {row['speedup_vs_official']:.2f}x official speed, {row['memory_vs_official']:.2f}x its memory" if "speedup_vs_official" in row else ""
    return (f"| {device} | {what} ({settings(row)}) | {row['samples_per_s']:.3g} samples/s, {row['tflops']:.3g} TFLOP/s{share}, "
            f"peak {row['peak_memory_gib']:.2f} GiB{vs}; masked-out weights bitwise equal: {row['frozen_bitwise']} |")


def rows(report: dict) -> list[str]:
    """The Markdown rows `| device | what | result |` of BENCHMARKS.md's measured tables."""
    erase, fit, gen = (report[name] for name, *_ in PARTS)
    device = next((part["device"] for part in (erase, fit, gen) if "device" in part), "unknown device")
    lines = []
    if "error" in erase:
        lines.append(f"| {device} | erase step, all presets; mask pass | {erase['error']} |")
    else:
        lines += [step_row(device, f"erase step, preset {row['name']}", row) for row in erase["step"]]
        m = erase["mask"]
        lines.append(f"| {device} | mask pass, global 50 % of {m['weights'] / 1e6:.1f} M fake gradients (radix select) | "
                     f"{m['seconds']:.2f} s, extra memory {m['extra_gib']:.2f} GiB (the mask itself {m['masks_gib']:.2f} GiB) |")
    if "error" in fit:
        lines.append(f"| {device} | 24 GiB fit (`--memory-cap-gib 24`) | {fit['error']} |")
    else:
        lines += [step_row(device, f"24 GiB fit, {row['name']}", row) for row in fit["step"]]
    if "error" in gen:
        lines.append(f"| {device} | generation images/s | {gen['error']} |")
    else:
        lines.append(f"| {device} | generation, {gen['pipeline']}, {gen['dtype']}, {gen['size']}, {gen['steps']} steps, guidance {gen['guidance']}, "
                     f"batch {gen['batch_size']} | {gen['images_per_s']:.3g} images/s ({gen['images_timed']} images timed) |")
    lines.append(f"| {device} | attack, seconds per prompt | {report['attack']} |")
    return lines


def attack_status() -> str:
    from salun_sd.cli import COMMANDS

    if "attack" not in COMMANDS:
        return "open: `salun-sd attack` is not in this checkout"
    return "open: run `salun-sd attack` on the 142 nudity prompts and divide its wall time by the prompts (not automated yet)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy shapes on CPU: checks that every part runs, measures nothing of interest")
    parser.add_argument("--json", default="", help="also write every part's figures here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))  # salun_sd from this checkout when it is not installed
    report: dict = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, gpu_argv, smoke_argv, limit in PARTS:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            report[name] = run_part(name, smoke_argv if args.cpu_smoke else gpu_argv, 600 if args.cpu_smoke else limit, Path(workdir))
    report["attack"] = attack_status()
    report["rows"] = rows(report)
    print("\n| device | what | result |\n| --- | --- | --- |")
    print("\n".join(report["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
