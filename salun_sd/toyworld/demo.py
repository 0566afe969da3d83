"""The toy-world demo: erase "circle" from the shipped toy Stable Diffusion with SalUn, on CPU.

Prints UA and remaining-concept accuracy before and after (judged by the shipped classifier on the
model's own samples) and writes a before/after grid; about a minute on a shared 2-core CPU (54 s measured).
"""

from __future__ import annotations

import time
from pathlib import Path

from salun_sd.toyworld.compare import Case, CompareConfig, grid, run_case


def demo(output_dir: str | Path, per_prompt: int = 16, log=print) -> list[dict]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cfg = CompareConfig(methods=["salun"], eval_per_prompt=per_prompt)
    rows = run_case(cfg, Case("shape", "circle"), out / "runs", log)
    grid(rows, per_prompt, out / "grid.png")
    for r in rows:
        log(f"{'before' if r['method'] == 'base' else 'after '} ({r['method']}): UA {r['UA']:.3f}  remaining accuracy {r['remaining_acc']:.3f}")
    log(f"grid: {out / 'grid.png'}; erased pipeline: {out / 'runs' / 'shape-circle' / 'salun' / 'pipeline'}; {time.time() - start:.0f} s")
    return rows
