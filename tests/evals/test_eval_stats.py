"""Estimators against hand-derived values: pass@k (Chen et al. 2021 closed form), Wilson,
McNemar, ECE, distinct-n, the paired bootstrap."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from posttrain.evals.stats import (
    distinct_n,
    expected_calibration_error,
    mcnemar_exact,
    paired_bootstrap,
    pass_at_k,
    wilson_interval,
)


def _closed_form(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) in exact arithmetic (math.comb(a, k) is 0 when a < k)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 1, 1, 0.2),  # one of five correct: a single draw finds it 1/5 of the time
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (4, 3, 2, 1.0),  # only one wrong sample: any pair holds a correct one
    (10, 0, 5, 0.0),
    (10, 10, 1, 1.0),
    (3, 1, 3, 1.0),
])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(20, 3, 1), (20, 3, 5), (200, 10, 100), (200, 1, 10), (1000, 37, 50)])
def test_pass_at_k_equals_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_closed_form(n, c, k), rel=1e-9, abs=1e-12)


def test_pass_at_1_is_the_share_correct():
    for n in (1, 7, 50):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, 2, 6), (5, 2, 0), (5, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_wilson_hand_case():
    # 8 of 10 at 95% (z = 1.959964): centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71688,
    # half-width z * sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.22643.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94331, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_hand_cases():
    # 3 discordant pairs, all one way: 2 * P(Binom(3, 1/2) <= 0) = 2/8.
    assert mcnemar_exact([1, 1, 1, 0, 1], [0, 0, 0, 0, 1]) == pytest.approx(0.25)
    # 5 vs 1: 2 * (C(6,0) + C(6,1)) / 64 = 14/64.
    a = [1] * 5 + [0] + [1] * 4
    b = [0] * 5 + [1] + [1] * 4
    assert mcnemar_exact(a, b) == pytest.approx(14 / 64)
    assert mcnemar_exact([1, 0], [1, 0]) == 1.0


def test_ece_hand_case():
    # Bin (0.8, 0.9]: confidences 0.9, 0.9, accuracy 1/2 -> |0.5 - 0.9| * 2/4;
    # bin (0.5, 0.6]: 0.6, 0.6, accuracy 1 -> |1 - 0.6| * 2/4. ECE = 0.2 + 0.2.
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True]) == pytest.approx(0.4)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)


def test_distinct_n_hand_case():
    texts = [["the", "cat", "sat"], ["the", "cat", "ran"]]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n([["a"]], 2) == 0.0


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    a = [0.2, 0.4, 0.3, 0.5, 0.1] * 20
    better = [x + 0.3 for x in a]
    result = paired_bootstrap(a, better, resamples=500)
    assert result.delta == pytest.approx(0.3) and result.low == pytest.approx(0.3) and result.p_value == 0.0
    same = paired_bootstrap(a, list(a), resamples=500)
    assert same.delta == 0.0 and same.p_value == 1.0


def test_paired_bootstrap_weights_pool_like_a_ratio():
    # Two prompts with 1 and 3 instructions: pooled share = followed / instructions.
    result = paired_bootstrap([1.0, 0.0], [0.0, 1.0], [1.0, 3.0], resamples=50)
    assert result.delta == pytest.approx(3 / 4 - 1 / 4)
