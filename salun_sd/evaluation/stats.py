"""Intervals and paired tests for rates over a few hundred judged instances (scipy's exact binomial machinery).

Wilson's interval stays inside [0, 1] and keeps its coverage for counts near 0 or n, where the normal
approximation does not; McNemar's exact test compares two methods on the same instances from the instances
where they disagree.
"""

from __future__ import annotations

from scipy.stats import binomtest


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
