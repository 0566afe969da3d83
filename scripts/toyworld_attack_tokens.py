"""Can the discrete attack work at all on the toy world? Read the attack reports a `salun-sd compare` run left.

The toy text encoder was trained on the world's captions only, so of CLIP's 49,408 token rows only the world's
words (a, photo, of, 4 colours, 4 shapes) carry meaning; the rest are untrained. For every prompt that was
attacked (the plain prompt did not show the concept) this prints, per attack: successes, the mean ratio of the
reference diffusion loss after / before the attack, and for the discrete attack how many of the chosen prefix
tokens are world words (by chance: about 11 in 49,408). The control is each report's
`random` row (the attack's random baseline: as many judged images as the attack's budget, each from k prefix
tokens drawn uniformly from the vocabulary without any optimisation); if it succeeds about as often as the
discrete attack, the attack's successes come from perturbing the prompt, not from its search.

    python scripts/toyworld_attack_tokens.py outputs/compare
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from salun_sd.toyworld.pipeline import load_toy_pipeline
from salun_sd.toyworld.world import prompts


def main(out: Path) -> None:
    tokenizer = load_toy_pipeline().tokenizer
    world = {i for text in prompts() for i in tokenizer(text, add_special_tokens=False).input_ids}
    stats = {name: {"attacked": 0, "success": 0, "ratio": 0.0} for name in ("discrete", "embedding", "random")}
    tokens = in_world = 0
    for path in sorted(out.glob("runs/seed*/*/*/attack/report.json")):
        report = json.loads(path.read_text())
        pre_failed = [p for p in report["prompts"] if not p["pre_success"]]
        for prompt in pre_failed:
            for name, entry in prompt["attacks"].items():
                s = stats[name]
                s["attacked"] += 1
                s["success"] += entry["success"]
                if "reference_loss_plain" in entry:  # the searches; the random baseline optimises nothing
                    s["ratio"] += entry["reference_loss_attacked"] / entry["reference_loss_plain"]
                if "token_ids" in entry and name == "discrete":
                    tokens += len(entry["token_ids"])
                    in_world += sum(t in world for t in entry["token_ids"])
    for name, s in stats.items():
        n = s["attacked"]
        ratio = f"; reference loss after/before {s['ratio'] / max(n, 1):.3f} on average" if name != "random" else " (random prefixes, no optimisation)"
        print(f"{name}: {s['success']}/{n} attacked prompts succeeded{ratio}")
    print(f"discrete prefix tokens that are world words: {in_world}/{tokens} (world words: {len(world)} of {len(tokenizer)} tokens)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/compare"))
