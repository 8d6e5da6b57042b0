"""Aggregate figures of one evaluation, computed from its per-sample records only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (no continuity correction).

    Returns ``(nan, nan)`` for n = 0.
    """
    if n == 0:
        return (math.nan, math.nan)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


@dataclass(frozen=True)
class SampleOutcome:
    """The fields of a per-sample record the aggregates need."""

    clean_correct: bool
    aa_robust: bool
    aa_broken_by: str | None
    fmn_success: bool
    fmn_distance: float | None
    best_robust: bool


@dataclass(frozen=True)
class Aggregates:
    n: int
    n_clean: int
    n_aa_robust: int
    n_fmn_robust: int
    n_best_robust: int
    n_fmn_beat_aa: int
    fmn_median_distance: float | None
    broken_by: dict[str, int]
    stage_robust_accuracy: dict[str, float]

    @property
    def clean_accuracy(self) -> float:
        return self.n_clean / self.n

    @property
    def aa_robust_accuracy(self) -> float:
        return self.n_aa_robust / self.n

    @property
    def fmn_robust_accuracy(self) -> float:
        return self.n_fmn_robust / self.n

    @property
    def best_robust_accuracy(self) -> float:
        return self.n_best_robust / self.n


def fmn_robust_at(outcome: SampleOutcome, eps: float) -> bool:
    """Correct and not broken by FMN within eps (a failed FMN run leaves the sample robust)."""
    broken = outcome.fmn_success and outcome.fmn_distance is not None and outcome.fmn_distance <= eps
    return outcome.clean_correct and not broken


def aggregate(outcomes: Sequence[SampleOutcome], eps: float, stages: Sequence[str]) -> Aggregates:
    """Robust accuracies (AutoAttack, FMN at eps, best known), stage counts and the FMN median distance.

    Args:
        outcomes: per-sample records of one evaluation.
        eps: the nominal budget.
        stages: the AutoAttack stages in run order (for the cumulative per-stage robust accuracy).
    """
    n = len(outcomes)
    if n == 0:
        raise ValueError("no per-sample records to aggregate")
    # Only samples our clean pass got right: where AutoAttack's own clean pass disagrees (a randomised model) it
    # may attack, and record as broken, a sample we count as a clean error (bench.evaluate, clean_pass_disagreement).
    broken_by = {
        stage: sum(o.clean_correct and not o.aa_robust and o.aa_broken_by == stage for o in outcomes)
        for stage in stages
    }
    n_clean = sum(o.clean_correct for o in outcomes)
    stage_acc = {"clean": n_clean / n}
    remaining = n_clean
    for stage in stages:
        remaining -= broken_by[stage]
        stage_acc[stage] = remaining / n
    # Median over correctly classified samples FMN broke (the distance to the nearest adversarial).
    distances = sorted(
        o.fmn_distance for o in outcomes if o.clean_correct and o.fmn_success and o.fmn_distance is not None
    )
    median = None
    if distances:
        mid = len(distances) // 2
        median = distances[mid] if len(distances) % 2 else (distances[mid - 1] + distances[mid]) / 2
    return Aggregates(
        n=n,
        n_clean=n_clean,
        n_aa_robust=sum(o.aa_robust for o in outcomes),
        n_fmn_robust=sum(fmn_robust_at(o, eps) for o in outcomes),
        n_best_robust=sum(o.best_robust for o in outcomes),
        n_fmn_beat_aa=sum(o.aa_robust and not fmn_robust_at(o, eps) for o in outcomes),
        fmn_median_distance=median,
        broken_by=broken_by,
        stage_robust_accuracy=stage_acc,
    )
