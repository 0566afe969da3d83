"""`salun-sd demo`: erase "circle" from the shipped toy Stable Diffusion with SalUn, on CPU.

The whole main job on a model that really draws its concepts: generate D_f and D_r with the base
model, saliency mask, masked unlearning, export. The shipped classifier scores the model's own
samples before and after (UA on the circle prompts, accuracy on the other shapes), the export is
reloaded with `StableDiffusionPipeline.from_pretrained` in a fresh process and scored again there,
and a before/after grid is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from salun_sd.run.files import write_json
from salun_sd.toyworld.compare import Case, CompareConfig, evaluate, grid, run_case

CASE = Case("shape", "circle")
# Optimiser steps of the demo's erase: half of compare's 200, since UA reaches 1.00 here within 40 (2026-12-02); compare keeps
# 200 for its tables.
STEPS = 100


def score(pipeline_dir: str | Path, per_prompt: int) -> dict[str, float]:
    """UA and remaining accuracy of the pipeline in a folder, as a user would load it."""
    from salun_sd.toyworld.classifier import load_classifier
    from salun_sd.toyworld.pipeline import load_toy_pipeline
    from salun_sd.toyworld.world import WorldSpec

    r = evaluate(load_toy_pipeline(pipeline_dir), load_classifier(), WorldSpec(), CASE, CompareConfig(eval_per_prompt=per_prompt))
    return {"UA": r["UA"], "remaining_acc": r["remaining_acc"]}


def demo(output_dir: str | Path = "outputs/demo", per_prompt: int = 16, log=print) -> dict[str, object]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows = run_case(CompareConfig(methods=["salun"], steps=STEPS, eval_per_prompt=per_prompt, attack=False), CASE, out / "runs", log)
    grid(rows, per_prompt, out / "demo_grid.png")
    pipeline = out / "runs" / f"{CASE.kind}-{CASE.value}" / "salun" / "pipeline"
    fresh = subprocess.run([sys.executable, "-m", "salun_sd.toyworld.demo", "--score", str(pipeline), str(per_prompt)],
                           check=True, capture_output=True, text=True)
    reloaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    base, erased = rows
    summary = {
        "concept": "circle",
        "before": {"UA": base["UA"], "remaining_acc": base["remaining_acc"]},
        "after": {"UA": erased["UA"], "remaining_acc": erased["remaining_acc"], "FD_vs_base": erased["FD"]},
        "after_reloaded_in_fresh_process": reloaded,
        "seconds": round(time.time() - start, 1),
        "pipeline": str(pipeline),
        "grid": str(out / "demo_grid.png"),
    }
    write_json(out / "demo_summary.json", summary)
    log(
        f"\nErased 'circle' from the toy Stable Diffusion with SalUn in {summary['seconds']} s.\n"
        f"  UA on circle prompts (share not drawn as a circle):   {base['UA']:.3f} -> {erased['UA']:.3f}\n"
        f"  accuracy on the other shapes' prompts:              {base['remaining_acc']:.3f} -> {erased['remaining_acc']:.3f}\n"
        f"  reloaded with from_pretrained in a fresh process:     UA {reloaded['UA']:.3f}, remaining {reloaded['remaining_acc']:.3f}\n"
        f"  erased pipeline: {pipeline}\n  before/after grid: {out / 'demo_grid.png'}"
    )
    return summary


if __name__ == "__main__" and sys.argv[1:2] == ["--score"]:
    print(json.dumps(score(sys.argv[2], int(sys.argv[3]))))
