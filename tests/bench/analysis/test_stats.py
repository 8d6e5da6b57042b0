"""Aggregates of one evaluation and Wilson intervals, checked against closed forms and hand-counted cases."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy.stats import norm

from bench.analysis.stats import SampleOutcome, aggregate, fmn_robust_at, wilson_interval

STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")
EPS = 0.3


def _wilson_closed_form(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    z = norm.ppf(1 - (1 - confidence) / 2)
    p = k / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


@pytest.mark.parametrize(
    ("k", "n"), [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (7, 12), (50, 100), (1, 360), (355, 360), (9000, 10000)]
)
def test_wilson_interval_equals_the_closed_form(k, n):
    low, high = wilson_interval(k, n)
    ref_low, ref_high = _wilson_closed_form(k, n)
    assert low == pytest.approx(ref_low, rel=1e-9, abs=1e-12)
    assert high == pytest.approx(ref_high, rel=1e-9, abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


@pytest.mark.parametrize("confidence", [0.9, 0.99])
def test_wilson_interval_other_confidence_levels(confidence):
    low, high = wilson_interval(17, 40, confidence=confidence)
    ref_low, ref_high = _wilson_closed_form(17, 40, confidence)
    assert (low, high) == (pytest.approx(ref_low, rel=1e-9), pytest.approx(ref_high, rel=1e-9))


def test_wilson_interval_ends_at_zero_and_one():
    assert wilson_interval(0, 25)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(25, 25)[1] == pytest.approx(1.0, abs=1e-12)
    # Not degenerate at the ends, unlike the Wald interval.
    assert wilson_interval(0, 25)[1] > 0.1
    assert wilson_interval(25, 25)[0] < 0.9


def test_wilson_interval_of_nothing_is_nan():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)


def _o(correct, aa_robust, broken_by, fmn_success, distance, best_robust) -> SampleOutcome:
    return SampleOutcome(correct, aa_robust, broken_by, fmn_success, distance, best_robust)


# Hand-counted case at eps = 0.3:
OUTCOMES = [
    _o(True, True, None, True, 0.5, True),  # robust everywhere; FMN needs more than eps
    _o(True, True, None, True, EPS, False),  # FMN at exactly eps breaks what AutoAttack missed
    _o(True, True, None, False, None, True),  # FMN failed: robust, no distance
    _o(True, False, "apgd-ce", True, 0.1, False),
    _o(True, False, "apgd-ce", True, 0.2, False),
    _o(True, False, "square", True, 0.4, False),  # FMN robust at eps, AutoAttack broke it
    _o(False, False, None, True, 0.05, False),  # misclassified: never robust, not in the median
    _o(True, True, None, False, 0.01, True),  # a failed FMN leaves it robust whatever the distance
]


def test_aggregate_counts_a_hand_made_case():
    agg = aggregate(OUTCOMES, EPS, STAGES)
    assert agg.n == 8
    assert agg.n_clean == 7
    assert agg.n_aa_robust == 4
    assert agg.n_fmn_robust == 4  # samples 0, 2, 5, 7
    assert agg.n_best_robust == 3
    assert agg.n_fmn_beat_aa == 1  # sample 1
    assert agg.broken_by == {"apgd-ce": 2, "apgd-t": 0, "fab-t": 0, "square": 1}
    assert agg.stage_robust_accuracy == pytest.approx(
        {"clean": 7 / 8, "apgd-ce": 5 / 8, "apgd-t": 5 / 8, "fab-t": 5 / 8, "square": 4 / 8}
    )
    assert list(agg.stage_robust_accuracy) == ["clean", *STAGES]
    assert agg.clean_accuracy == 7 / 8
    assert agg.aa_robust_accuracy == 4 / 8
    assert agg.fmn_robust_accuracy == 4 / 8
    assert agg.best_robust_accuracy == 3 / 8
    # Correct samples FMN broke: 0.5, 0.3, 0.1, 0.2, 0.4.
    assert agg.fmn_median_distance == pytest.approx(statistics.median([0.5, EPS, 0.1, 0.2, 0.4]))
    assert agg.fmn_median_distance == pytest.approx(0.3)


def test_last_stage_equals_autoattack_robust_accuracy():
    agg = aggregate(OUTCOMES, EPS, STAGES)
    assert agg.stage_robust_accuracy[STAGES[-1]] == agg.aa_robust_accuracy


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    outcomes = [_o(True, False, "apgd-ce", True, d, False) for d in (0.4, 0.1, 0.3, 0.2)]
    agg = aggregate(outcomes, EPS, STAGES)
    assert agg.fmn_median_distance == pytest.approx(0.25)
    assert agg.fmn_median_distance == pytest.approx(statistics.median([0.4, 0.1, 0.3, 0.2]))


def test_median_is_none_when_fmn_broke_no_correct_sample():
    outcomes = [_o(True, True, None, False, None, True), _o(False, False, None, True, 0.1, False)]
    agg = aggregate(outcomes, EPS, STAGES)
    assert agg.fmn_median_distance is None
    assert agg.n_fmn_robust == 1


@pytest.mark.parametrize(
    ("outcome", "robust"),
    [
        (_o(True, True, None, True, EPS, False), False),  # exactly eps counts as broken
        (_o(True, True, None, True, math.nextafter(EPS, 1.0), True), True),
        (_o(True, True, None, True, math.nextafter(EPS, 0.0), False), False),
        (_o(True, True, None, False, None, True), True),
        (_o(True, True, None, False, 0.0, True), True),  # a failure is never distance 0
        (_o(True, True, None, True, None, True), True),
        (_o(False, False, None, False, None, False), False),
        (_o(False, False, None, True, 0.9, False), False),
    ],
)
def test_fmn_robust_at_eps(outcome, robust):
    assert fmn_robust_at(outcome, EPS) is robust


def test_stages_not_in_the_list_are_ignored_in_the_per_stage_counts():
    outcomes = [_o(True, False, "apgd-dlr", True, 0.1, False), _o(True, True, None, True, 0.9, True)]
    agg = aggregate(outcomes, EPS, ("apgd-ce",))
    assert agg.broken_by == {"apgd-ce": 0}
    assert agg.n_aa_robust == 1


def test_aggregate_of_nothing_raises():
    with pytest.raises(ValueError, match="no per-sample records"):
        aggregate([], EPS, STAGES)


def test_stage_counts_leave_out_samples_our_clean_pass_got_wrong():
    # AutoAttack's own clean pass (a randomised model) called sample 1 correct and broke it; ours got it wrong,
    # so it is a clean error and must not be subtracted a second time after apgd-ce.
    outcomes = [
        _o(True, False, "apgd-ce", True, 0.1, False),
        _o(False, False, "apgd-ce", True, 0.1, False),
        _o(True, True, None, True, 0.9, True),
    ]
    agg = aggregate(outcomes, EPS, ("apgd-ce",))
    assert agg.broken_by == {"apgd-ce": 1}
    assert agg.stage_robust_accuracy == pytest.approx({"clean": 2 / 3, "apgd-ce": 1 / 3})
