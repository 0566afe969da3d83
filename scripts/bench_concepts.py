"""Cost of the mask pass and of an erase as the number of concepts grows, on the toy world (CPU is fine).

Concepts are the toy world's shapes and colours in the order circle, red, square, green, triangle, blue,
cross, yellow; concept k forgets its 4 prompts with `--per-prompt` images each (prompts shared by a shape and a
colour are drawn once: the data cache). c' is "a photo" and D_r "a photo" too: this measures cost, not quality.
Each count runs in a fresh process (so its peak RSS is its own) after one warm-up run that draws every image:

    python scripts/bench_concepts.py --counts 1 2 4 8 --steps 20 --out outputs/bench_concepts

Prints one JSON line per count: forget examples, mask-pass seconds, erase seconds (--steps SalUn steps, batch 8)
and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ORDER = ["circle", "red", "square", "green", "triangle", "blue", "cross", "yellow"]


def config(count: int, per_prompt: int, steps: int, out: Path):
    from salun_sd.core.config import MaskConfig, TrainConfig
    from salun_sd.families.config import ConceptConfig, DataConfig, EraseConfig, ImageGroup
    from salun_sd.toyworld.compare import Case
    from salun_sd.toyworld.pipeline import PIPELINE_DIR
    from salun_sd.toyworld.world import WorldSpec

    spec = WorldSpec()
    concepts = [ConceptConfig(v, [ImageGroup(prompt=p, generate=per_prompt) for p in Case.named(v, spec).split(spec)[0]], ["a photo"]) for v in ORDER[:count]]
    data = DataConfig(concepts=concepts, remain=[ImageGroup(prompt="a photo", generate=per_prompt)], generation_steps=25, generation_guidance=3.0,
                      generation_batch_size=64, cache_dir=str(out / "cache"))
    return EraseConfig(model=str(PIPELINE_DIR), output_dir=str(out / f"n{count}"), overwrite=True, validation_grid=False, data=data,
                       mask=MaskConfig(fraction=0.5, guidance=3.0, batch_size=32), unlearn=TrainConfig(learning_rate=5e-4, batch_size=8, max_steps=steps))


def one(count: int, per_prompt: int, steps: int, out: Path) -> dict:
    from accelerate import Accelerator

    from salun_sd.families.erase import SDErase, erase
    from salun_sd.core.objectives import get_method

    cfg = config(count, per_prompt, steps, out)
    accelerator = Accelerator(cpu=True)
    job, method = SDErase(cfg), get_method("salun")
    job.check(method)
    examples = len(job.load(accelerator, method).forget)
    start = time.time()
    erase(cfg, accelerator, ("mask",))
    mask_s = time.time() - start
    start = time.time()
    erase(cfg, accelerator, ("erase",))
    erase_s = time.time() - start
    return {"concepts": count, "forget_examples": examples, "mask_pass_s": round(mask_s, 2), f"erase_{steps}_steps_s": round(erase_s, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_concepts"))
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # the child process's count
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(one(args.one, args.per_prompt, args.steps, args.out)))
        return
    warm = [sys.executable, __file__, "--one", str(max(args.counts)), "--per-prompt", str(args.per_prompt), "--steps", "1", "--out", str(args.out)]
    subprocess.run(warm, check=True, capture_output=True)  # draws every image once, so no count pays for generation
    for count in args.counts:
        cmd = [sys.executable, __file__, "--one", str(count), "--per-prompt", str(args.per_prompt), "--steps", str(args.steps), "--out", str(args.out)]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
