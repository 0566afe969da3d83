"""The random baseline, the chance floor beside each attack's ASR (src/attackers/random_.py).

k prefix tokens drawn uniformly from the whole vocabulary, no optimisation: each draw's prompt is decoded,
typed (re-tokenised) and judged as the discrete attack's prompts are, stopping at the first success. It is
given as many judged images as the discrete attack gets at most (one per timestep), so a discrete ASR near
the random one says the search found nothing a perturbation of the prompt would not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from salun_sd.attack.judges import Verdict
from salun_sd.attack.search import judge_round
from salun_sd.attack.target import Case, Victim


@dataclass
class RandomOutcome:
    success: bool
    image: Image.Image  # the last judged image
    ids: torch.Tensor  # (k,) the last prefix drawn
    text: str  # its prompt as typed
    judged: int  # images judged


def random_prefixes(victim: Victim, cases: Sequence[Case], count: int, verdicts: Sequence[Verdict], generators: Sequence[torch.Generator]) -> list[RandomOutcome]:
    """Per case, up to `count` random k-token prefixes, drawn at once from its generator as random_.py does; a case
    stops at the first its judge accepts. The cases' images of one round are drawn together."""
    vocab = victim.clip_tables[0].shape[0]
    draws = [torch.randint(0, vocab, (count, victim.k), generator=g, device=g.device).cpu() for g in generators]
    outcomes: list[RandomOutcome | None] = [None] * len(cases)
    active = list(range(len(cases)))
    for judged in range(1, count + 1):
        typed = [victim.typed(cases[i], draws[i][judged - 1]) for i in active]
        images = victim.images(typed, None)
        done, active = judge_round(active, images, verdicts, last=judged == count)
        for n, i, success in done:
            outcomes[i] = RandomOutcome(success, images[n], draws[i][judged - 1], typed[n].prompt, judged)
        if not active:
            break
    return outcomes  # type: ignore[return-value]
