"""Can the discrete attack work at all on the toy world? Read the attack reports a `salun-sd compare` run left.

The toy text encoder was trained on the world's captions only, so of CLIP's 49,408 token rows only the world's
words (a, photo, of, 4 colours, 4 shapes) carry meaning; the rest are untrained. For every prompt that was
attacked (the plain prompt did not show the concept) this prints, per attack: successes, the mean ratio of the
reference diffusion loss after / before the attack, and for the discrete attack how many of the chosen prefix
tokens are world words (by chance: about 11 in 49,408). The control: the same number of judged images per
prompt as the attack's budget, each from k prefix tokens drawn uniformly from the vocabulary without any
optimisation (the official repository's `random` attacker plays the same part); if it succeeds about as often
as the discrete attack, the attack's successes come from perturbing the prompt, not from its search.

    python scripts/toyworld_attack_tokens.py outputs/compare
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from salun_sd.attack.config import AttackConfig
from salun_sd.attack.judges import load_judge
from salun_sd.attack.run import references
from salun_sd.attack.discrete import token_slots
from salun_sd.attack.target import Victim, attack_pipeline
from salun_sd.families.loading import family_of
from salun_sd.evaluation.config import GenerateConfig
from salun_sd.evaluation.generate import plan_jobs
from salun_sd.evaluation.prompts import load_prompts
from salun_sd.toyworld.pipeline import load_toy_pipeline
from salun_sd.toyworld.world import prompts


def random_prefix_success(report: dict, pre_failed: list[dict]) -> int:
    """Prompts of one report for which one of `timesteps` uniformly drawn k-token prefixes is judged a success."""
    cfg = AttackConfig(**report["config"])
    base, target = load_toy_pipeline(cfg.base), load_toy_pipeline(cfg.model)
    victim = Victim(attack_pipeline(target, base), cfg.k, cfg.timesteps, cfg.steps)
    verdict = load_judge(cfg).for_prompt(None)
    size = (family_of(target).default_size(target),) * 2
    jobs = {job.record.case_number: job for job in plan_jobs(load_prompts(cfg.prompts).records, GenerateConfig(steps=cfg.steps, seed=cfg.seed, guidance=cfg.guidance), size)}
    hits = 0
    for prompt in pre_failed:
        job = jobs[prompt["case_number"]]
        case = victim.case(job.request, references(base, [job], cfg.steps, Path(cfg.reference_dir))[0])
        generator = torch.Generator().manual_seed(1_000 + cfg.attack_seed * 1_000_003 + job.record.case_number)
        draws = [torch.randint(len(victim.clip_tables[0]), (cfg.k,), generator=generator) for _ in victim.timesteps]
        hits += any(verdict(victim.images([case], [token_slots(victim.clip_tables, ids)]))[0] for ids in draws)
    return hits


def main(out: Path) -> None:
    tokenizer = load_toy_pipeline().tokenizer
    world = {i for text in prompts() for i in tokenizer(text, add_special_tokens=False).input_ids}
    stats = {name: {"attacked": 0, "success": 0, "ratio": 0.0} for name in ("discrete", "embedding")}
    tokens = in_world = random_hits = 0
    for path in sorted(out.glob("runs/seed*/*/*/attack/report.json")):
        report = json.loads(path.read_text())
        pre_failed = [p for p in report["prompts"] if not p.get("skipped") and not p["pre_success"]]
        for prompt in pre_failed:
            for name, entry in prompt["attacks"].items():
                s = stats[name]
                s["attacked"] += 1
                s["success"] += entry["success"]
                s["ratio"] += entry["reference_loss_attacked"] / entry["reference_loss_plain"]
                if "token_ids" in entry:
                    tokens += len(entry["token_ids"])
                    in_world += sum(t in world for t in entry["token_ids"])
        if pre_failed:
            random_hits += random_prefix_success(report, pre_failed)
    for name, s in stats.items():
        n = s["attacked"]
        print(f"{name}: {s['success']}/{n} attacked prompts succeeded; reference loss after/before {s['ratio'] / max(n, 1):.3f} on average")
    print(f"random prefixes (no optimisation, as many judged images as the schedule has timesteps): {random_hits}/{stats['discrete']['attacked']}")
    print(f"discrete prefix tokens that are world words: {in_world}/{tokens} (world words: {len(world)} of {len(tokenizer)} tokens)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/compare"))
