"""Best-known distances and AttackBench's local optimality: closed forms, an independent integration of the security
curves, AttackBench's own trapezoid formula, and the analyses' choice between best-known and plain FMN distances."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.analysis.best_known import (
    FMN,
    FMN_FROM_AUTOATTACK,
    autoattack_source,
    best_known,
    distance_gap,
    local_optimality,
)
from bench.analysis.curves import robust_at, security_curve
from bench.analysis.records import EvaluationRecords, load_records
from tests.analysis_store import add_evaluation, add_model, digits_spec

NAN = math.nan


def test_best_known_takes_the_smallest_distance_and_names_its_attack():
    aa = autoattack_source("apgd-ce")
    assert aa == "autoattack:apgd-ce"
    assert best_known([(aa, 0.2), (FMN, 0.25), (FMN_FROM_AUTOATTACK, 0.15)]) == (0.15, FMN_FROM_AUTOATTACK)
    assert best_known([(aa, 0.2), (FMN, 0.1), (FMN_FROM_AUTOATTACK, 0.15)]) == (0.1, FMN)
    # A tie goes to the attack listed first (the one that produced the point the others refined).
    assert best_known([(aa, 0.2), (FMN, None), (FMN_FROM_AUTOATTACK, 0.2)]) == (0.2, aa)
    # No distance (None, NaN, +inf: the attack found nothing) is skipped; none at all is (None, None).
    assert best_known([(FMN, None), (FMN_FROM_AUTOATTACK, math.inf), (aa, NAN)]) == (None, None)
    assert best_known([]) == (None, None)
    with pytest.raises(ValueError, match="cannot be negative"):
        best_known([(FMN, -0.1)])


def test_local_optimality_closed_form():
    correct = np.array([True, True, True, False])
    best = np.array([0.1, 0.2, 0.4, NAN])
    fmn = np.array([0.1, 0.3, NAN, NAN])  # the third: FMN found nothing (+inf, clipped at D = 0.4)
    # Areas on [0, D = 0.4] over N = 4: A* = (0.1 + 0.2 + 0.4) / 4, A = (0.1 + 0.3 + 0.4) / 4, A_max = 3/4 · 0.4.
    assert local_optimality(fmn, best, correct) == pytest.approx((0.3 - 0.2) / (0.3 - 0.175))
    assert local_optimality(best, best, correct) == pytest.approx(1.0)
    # An attack that breaks nothing within D scores 0.
    assert local_optimality(np.full(4, NAN), best, correct) == pytest.approx(0.0)
    # Undefined without a best-known distance above 0 among the correct samples.
    assert local_optimality(np.full(4, NAN), np.full(4, NAN), correct) is None
    assert local_optimality(np.zeros(2), np.zeros(2), np.array([True, True])) is None


def test_local_optimality_refuses_inputs_that_are_not_a_best_known():
    with pytest.raises(ValueError, match="best-known distance above the attack's own"):
        local_optimality(np.array([0.1, 0.2]), np.array([0.1, 0.3]), np.array([True, True]))
    with pytest.raises(ValueError, match="one length"):
        local_optimality(np.array([0.1]), np.array([0.1, 0.3]), np.array([True, True]))


def _random_distances(seed: int, n: int = 2000):
    rng = np.random.default_rng(seed)
    correct = rng.random(n) > 0.1
    best = np.where(correct, rng.gamma(4.0, 0.05, n), NAN)
    # The attack: sometimes the best known, sometimes up to 60 % above it, sometimes nothing.
    fmn = best * np.where(rng.random(n) < 0.6, 1.0, rng.uniform(1.0, 1.6, n))
    fmn[rng.random(n) < 0.03] = NAN
    return correct, best, fmn


def _records(correct, fmn, best, spec=None) -> EvaluationRecords:
    n = len(correct)
    signed = lambda d: np.where(correct, d, -d)  # noqa: E731
    return EvaluationRecords(
        evaluation_id=1,
        model_id=1,
        protocol_hash="p",
        spec=spec if spec is not None else {"eps": "0.2", "version": "standard", "fmn_init": "autoattack"},
        eps=0.2,
        norm="Linf",
        sample_id=np.arange(n),
        label=np.zeros(n, dtype=int),
        clean_correct=np.asarray(correct),
        logit_margin=np.zeros(n),
        aa_robust=np.zeros(n, dtype=bool),
        aa_broken_by=np.array([None] * n, dtype=object),
        fmn_success=~np.isnan(fmn),
        fmn_distance=fmn,
        signed_eps=signed(fmn),
        best_robust=np.zeros(n, dtype=bool),
        best_distance=best,
        signed_best_eps=signed(best),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_optimality_equals_the_area_between_the_security_curves(seed):
    """Independent of the min(d, D) shortcut: integrate the two security curves numerically on a fine grid."""
    correct, best, fmn = _random_distances(seed)
    records = _records(correct, fmn, best)
    horizon = np.nanmax(best)
    grid = np.linspace(0, horizon, 200_001)
    area_fmn = np.trapezoid(security_curve(records, grid, distance="fmn")[1], grid)
    area_best = np.trapezoid(security_curve(records, grid, distance="best")[1], grid)
    area_max = correct.mean() * horizon
    expected = (area_max - area_fmn) / (area_max - area_best)
    assert local_optimality(fmn, best, correct) == pytest.approx(expected, abs=1e-4)


def _attackbench_optimality(adv: np.ndarray, best: np.ndarray) -> float:
    """AttackBench's eval_optimality (analysis/utils.py), rewritten here as the reference: per-sample distances with
    0 for misclassified samples and +inf where the attack failed; trapezoid rule over the curves' points."""
    distances, counts = np.unique(best, return_counts=True)
    robust = 1 - counts.cumsum() / len(best)
    clean = np.count_nonzero(best) / len(best)
    horizon = distances.max()
    best_area = np.trapezoid(robust, distances)
    clipped, counts = np.unique(adv.clip(max=horizon), return_counts=True)
    area = np.trapezoid(1 - counts.cumsum() / len(adv), clipped)
    return 1 - (area - best_area) / (clean * horizon - best_area)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_optimality_agrees_with_attackbench_formula(seed):
    correct, best, fmn = _random_distances(seed)
    as_attackbench = lambda d: np.where(correct, np.nan_to_num(d, nan=math.inf), 0.0)  # noqa: E731
    reference = _attackbench_optimality(as_attackbench(fmn), as_attackbench(best))
    # The trapezoid rule differs from the exact step-function areas by at most half a step per sample.
    assert local_optimality(fmn, best, correct) == pytest.approx(reference, abs=0.01)
    assert 0.5 < reference < 0.99  # the comparison is not between two trivial values


def test_distance_gap_counts_and_ratios():
    correct = np.array([True, True, True, True, True, False])
    best = np.array([0.10, 0.20, 0.30, 0.40, NAN, 0.05])
    fmn = np.array([0.10, 0.201, 0.36, NAN, NAN, 0.05])
    gap = distance_gap(fmn, best, correct)
    assert gap.n == 4  # correct with a best-known distance
    # 0.36 is 20 % above 0.30; FMN found nothing on the fourth; 0.201 is within 1 %.
    assert gap.n_above == 2
    assert gap.median_ratio == pytest.approx(np.median([1.0, 1.005, 1.2]))
    assert gap.best_median_distance == pytest.approx(0.25)
    assert gap.local_optimality == pytest.approx(local_optimality(fmn, best, correct))
    assert distance_gap(fmn, best, correct, rel_tol=0.5).n_above == 1


def test_security_curve_reads_the_best_known_distance_by_default():
    correct = np.array([True, True, True, False])
    fmn = np.array([0.25, 0.1, NAN, 0.3])
    best = np.array([0.15, 0.1, 0.3, 0.3])
    records = _records(correct, fmn, best)
    assert records.distance_used() == "best"
    grid = np.array([0.0, 0.1, 0.2, 0.3])
    assert security_curve(records, grid)[1].tolist() == [0.75, 0.5, 0.25, 0.0]
    assert security_curve(records, grid, distance="fmn")[1].tolist() == [0.75, 0.5, 0.5, 0.25]
    assert robust_at(records, 0.2) == 0.25 and robust_at(records, 0.2, "fmn") == 0.5
    with pytest.raises(ValueError, match="unknown distance 'aa'; use one of best, fmn"):
        security_curve(records, grid, distance="aa")


def test_an_evaluation_stored_before_the_warm_start_reads_plain_fmn(store):
    model = add_model(store, "legacy")
    spec = digits_spec(n_samples=4, fmn_init="none")
    ev = add_evaluation(
        store, model, clean_correct=[True, True, True, False], signed_eps=[0.1, 0.3, None, -0.2], spec=spec
    )
    with store.session() as s:
        records = load_records(s, ev)
    assert not records.has_best_known and records.distance_used("best") == "fmn"
    assert np.isnan(records.best_distance).all()
    np.testing.assert_array_equal(records.signed("best"), records.signed_eps)
    grid = np.array([0.0, 0.2])
    assert security_curve(records, grid)[1].tolist() == security_curve(records, grid, distance="fmn")[1].tolist()
