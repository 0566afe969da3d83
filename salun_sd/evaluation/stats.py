"""Intervals and paired tests for rates over a few hundred judged instances (scipy's exact binomial machinery).

Wilson's interval stays inside [0, 1] and keeps its coverage for counts near 0 or n, where the normal
approximation does not; McNemar's exact test compares two methods on the same instances from the instances
where they disagree. `concept_groups` is the one split of a prompt set's results by the erased concept each prompt
names, shared by `evaluate` and `attack`.
"""

from __future__ import annotations

from collections.abc import Sequence

from scipy.stats import binomtest

NO_CONCEPT = "none"  # the group of prompts that name no erased concept: what the erase should have left as it was


def wilson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (first succeeds alone, second succeeds alone)."""
    discordant = only_first + only_second
    return 1.0 if discordant == 0 else float(binomtest(only_first, discordant, 0.5).pvalue)


def concept_groups(concepts: Sequence[str | None]) -> dict[str, list[int]]:
    """Positions of the items of each concept, in first-seen order, those naming none (empty, None or "none") last
    under NO_CONCEPT; {} when no item names a concept (a prompt set without a concept column is reported whole)."""
    groups: dict[str, list[int]] = {}
    for i, concept in enumerate(concepts):
        groups.setdefault(concept or NO_CONCEPT, []).append(i)
    if list(groups) == [NO_CONCEPT]:
        return {}
    if NO_CONCEPT in groups:
        groups[NO_CONCEPT] = groups.pop(NO_CONCEPT)
    return groups
