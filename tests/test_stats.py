"""The intervals and paired tests the robustness tables report."""

import pytest

from salun_sd.evaluation.stats import NO_CONCEPT, concept_groups, mcnemar, wilson


def test_wilson_interval_matches_the_closed_form_and_stays_in_range():
    low, high = wilson(1, 6)
    assert low == pytest.approx(0.0301, abs=1e-4) and high == pytest.approx(0.5635, abs=1e-4)  # the 1/6: 0.03-0.56
    z = 1.959964
    p, n = 30 / 300, 300
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert wilson(30, 300) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert wilson(0, 10)[0] == 0 and wilson(10, 10)[1] == 1 and wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    assert mcnemar(0, 0) == 1.0 and mcnemar(3, 3) == 1.0
    assert mcnemar(10, 0) == pytest.approx(2 * 0.5**10) and mcnemar(0, 10) == mcnemar(10, 0)
    assert mcnemar(12, 4) == pytest.approx(0.0768, abs=1e-4)


def test_concept_groups_keep_first_seen_order_and_put_the_prompts_naming_none_last():
    assert concept_groups([None, "b", "a", "", "b", "none"]) == {"b": [1, 4], "a": [2], NO_CONCEPT: [0, 3, 5]}
    assert concept_groups(["a", "a"]) == {"a": [0, 1]} and concept_groups([None, ""]) == {} and concept_groups([]) == {}
