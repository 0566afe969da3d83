#!/usr/bin/env python
"""Every GPU figure docs/BENCHMARKS.md lists as open, in one command, printed as table rows to paste there.

On one H100 or H200 it should take five to six minutes (each part has a time limit; eight minutes in all at most):
  1. erase: the erase step under each preset (official, default, bf16, fast, fit24) and the mask pass
     on the GPU (scripts/bench_erase.py);
  2. fit: the 24 GiB fit, with the CUDA allocator capped at 24 GiB: fit24 and the two alternatives of
     BENCHMARKS.md (bf16 + checkpointing with plain Adam; 8-bit Adam at batch 4 x 2 accumulation);
  3. generate: images/s of the full-size SD-1.4 pipeline, fp16, 512 px, 50 steps, batch 8
     (scripts/bench_generate.py);
  4. attack: seconds per prompt of `salun-sd attack` (UnlearnDiffAtk tokens, NudeNet judge) on the full-size
     SD-1.4 shapes with random weights. Random weights
     never give a nude image, so every timestep block of the schedule runs; each block costs the same (40
     optimiser steps, then one generation and judgement), so 5 blocks are timed and the published schedule's
     50 give the worst case per prompt.
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
    ("erase", [str(ERASE), "--steps", "10", "--warmup", "3"], [str(ERASE), "--cpu-smoke", "--naive"], 220),
    ("fit", [str(ERASE), "--memory-cap-gib", "24", "--no-mask", *(a for c in FIT_CONFIGS for a in ("--config", c))],
     [str(ERASE), "--cpu-smoke", "--memory-cap-gib", "24", "--no-mask", "--config", FIT_CONFIGS[1]], 100),
    ("generate", [str(GENERATE), "--batch-size", "8", "--steps", "50", "--repeats", "3"],
     [str(GENERATE), "--tiny", "--steps", "2", "--batch-size", "2", "--repeats", "1"], 60),
]
ATTACK_LIMIT = 100  # the four limits add up to eight minutes


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
    if out.is_file():
        figures = json.loads(out.read_text())
    else:  # bench_generate prints its figures as the last line; other commands print none
        last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
        figures = json.loads(last) if last.startswith("{") else {}
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    return figures


ATTACK_BLOCKS, PUBLISHED_BLOCKS = 5, 50


def attack_part(smoke: bool, limit: float, workdir: Path) -> dict:
    """Seconds per attacked prompt: build a full-size random SD-1.4 folder, attack one prompt for a few blocks."""
    model, prompts, out = "tiny", workdir / "prompts.txt", workdir / "attack"
    prompts.write_text("a photo of a nude person\n")
    start = time.perf_counter()
    if not smoke:
        model = str(workdir / "sd14-random")
        build = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from bench_generate import full_size_pipeline; "
                 "full_size_pipeline(torch.float16, torch.device('cuda')).save_pretrained(sys.argv[2])")
        built = run_part("attack-model", ["-c", build, str(HERE), model], limit, workdir)
        if "error" in built:
            return {"error": f"building the model folder: {built['error']}"}
    blocks = 1 if smoke else ATTACK_BLOCKS
    argv = ["-m", "salun_sd", "attack", "--model", model, "--base", model, "--prompts", str(prompts), "--attacks", "discrete",
            "--timesteps", str(blocks), "--output_dir", str(out)]
    argv += ["--iterations", "1", "--steps", "2", "--height", "32", "--width", "32"] if smoke else []
    ran = run_part("attack", argv, limit - (time.perf_counter() - start), workdir)
    if "error" in ran:
        return ran
    (result,) = json.loads((out / "report.json").read_text())["prompts"]
    discrete = result["attacks"]["discrete"]
    if "seconds" not in discrete:
        return {"error": "the plain prompt already succeeded, so nothing was timed"}
    per_block = discrete["seconds"] / discrete["blocks"]
    return {"device": ran.get("device"), "blocks": discrete["blocks"], "seconds": discrete["seconds"], "worst_case_s": per_block * PUBLISHED_BLOCKS}


def settings(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row.items() if k in ("mixed_precision", "batch_size", "gradient_accumulation_steps", "optimizer", "attention",
                                                                  "gradient_checkpointing", "channels_last", "compile"))


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
    attack = report["attack"]
    if "error" in attack:
        lines.append(f"| {device} | attack (UnlearnDiffAtk), seconds per prompt | {attack['error']} |")
    else:
        lines.append(f"| {device} | attack (UnlearnDiffAtk tokens, NudeNet judge), seconds per prompt that never succeeds | "
                     f"{attack['seconds']:.1f} s for {attack['blocks']} timestep blocks; {attack['worst_case_s']:.0f} s for the published {PUBLISHED_BLOCKS} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="toy shapes on CPU: checks that every part runs, measures nothing of interest")
    parser.add_argument("--json", default="", help="also write every part's figures here")
    args = parser.parse_args(argv)
    report: dict = {}
    with tempfile.TemporaryDirectory() as workdir:
        for name, gpu_argv, smoke_argv, limit in PARTS:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            report[name] = run_part(name, smoke_argv if args.cpu_smoke else gpu_argv, 600 if args.cpu_smoke else limit, Path(workdir))
        report["attack"] = attack_part(args.cpu_smoke, 600 if args.cpu_smoke else ATTACK_LIMIT, Path(workdir))
    report["rows"] = rows(report)
    print("\n| device | what | result |\n| --- | --- | --- |")
    print("\n".join(report["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
