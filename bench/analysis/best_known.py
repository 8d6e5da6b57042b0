"""Best-known minimal distances, and how far one attack's distances are from them.

A sample's *best-known* distance is the smallest perturbation norm any attack of the protocol found for it: plain
FMN, FMN started from AutoAttack's adversarial example, and AutoAttack's own perturbation (protocol section 4). It
is an upper bound on the true minimal distance that no attack we ran can undercut, so no stored distance exceeds a
perturbation we already hold.

How far an attack is from the best known follows AttackBench (Cinà et al., "AttackBench: Evaluating Gradient-based
Attacks for Adversarial Examples", https://arxiv.org/abs/2404.19460; code https://github.com/attackbench/AttackBench,
``analysis/utils.py``, ``eval_optimality``): the *local optimality* of attack a on model M compares the area under
a's security curve with the area under the best-known one, both up to the largest best-known distance D:

    LO = (A_max - A_a) / (A_max - A*),

where A_a and A* are the areas of a's and the best-known curve on [0, D] and A_max = clean accuracy × D is the
area of an attack that breaks nothing within D. LO = 1 when a matches the best known on every sample, 0 when it
breaks nothing within D. The curves are step functions (robust accuracy at e = fraction of samples correct with a
distance > e), so the areas are exact: the area of one sample's step on [0, D] is min(d, D). AttackBench's code
approximates the same areas with the trapezoidal rule over the curve's points.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

FMN = "fmn"
FMN_FROM_AUTOATTACK = "fmn_from_autoattack"
AUTOATTACK_PREFIX = "autoattack:"
# Plain FMN is "above the best known" on a sample when its distance exceeds the best known by more than this
# fraction (or it found none): a 1 % slack keeps the count about search quality, not float rounding.
GAP_REL_TOL = 0.01


def eps_float32(eps: float) -> float:
    """The budget as the attacks hold it. AutoAttack projects onto the ε-ball in float32, so a perturbation it
    found "within ε" can measure float32(ε) — 0.2 is 0.20000000298… in float32 — which is above the float64 ε
    though it is on the ball's surface. A best-known distance is "above ε" only when it exceeds this."""
    return float(np.float32(eps))


def autoattack_source(stage: str) -> str:
    """The ``best_attack`` name of an AutoAttack stage (``"autoattack:apgd-ce"``)."""
    return f"{AUTOATTACK_PREFIX}{stage}"


def best_known(candidates: Iterable[tuple[str, float | None]]) -> tuple[float | None, str | None]:
    """The smallest distance among ``(attack, distance)`` candidates, and the attack that found it.

    A candidate without a distance (None, NaN or +inf: the attack found no adversarial) is skipped. On a tie the
    candidate listed first wins, so list the attack that produced a point before one that only refined it.

    Returns:
        ``(distance, attack)``, or ``(None, None)`` when no candidate has a distance.
    """
    best: tuple[float | None, str | None] = (None, None)
    for attack, distance in candidates:
        if distance is None or not math.isfinite(distance):
            continue
        if distance < 0:
            raise ValueError(f"a distance is a norm and cannot be negative; {attack} gave {distance!r}")
        if best[0] is None or distance < best[0]:
            best = (float(distance), attack)
    return best


def _unsigned(distance: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Distance to misclassification as a security curve reads it: 0 for a misclassified sample, +inf for a correct
    one without a distance (never broken), else the distance."""
    d = np.asarray(distance, dtype=np.float64)
    return np.where(correct, np.where(np.isnan(d), math.inf, d), 0.0)


def local_optimality(distance: np.ndarray, best: np.ndarray, correct: np.ndarray) -> float | None:
    """AttackBench's local optimality of one attack on one model (module docstring), in [0, 1].

    Args:
        distance: the attack's per-sample distances (NaN where it found none); only correct samples count.
        best: the best-known distances of the same samples (NaN where none is known).
        correct: whether the model classifies each sample correctly (misclassified samples are at distance 0
            for both curves, as in AttackBench, where the best-known curve starts at the clean accuracy).

    Returns:
        LO, or None when it is undefined: no correctly classified sample has a best-known distance above 0 (the
        best-known curve is flat, A_max = A*).

    Raises:
        ValueError: shapes differ, or a best-known distance exceeds the attack's own (the best known is the
            minimum over attacks that include this one, so the inputs are not what they claim).
    """
    correct = np.asarray(correct, dtype=bool)
    if not (np.shape(distance) == np.shape(best) == correct.shape) or correct.ndim != 1:
        raise ValueError("distance, best and correct must be 1-D arrays of one length (one entry per sample)")
    d, b = _unsigned(distance, correct), _unsigned(best, correct)
    if np.any(b > d):
        raise ValueError(
            f"{int(np.sum(b > d))} sample(s) have a best-known distance above the attack's own; the best known "
            "must be the minimum over attacks that include it"
        )
    finite = b[np.isfinite(b)]
    if finite.size == 0 or finite.max() <= 0:
        return None
    horizon = float(finite.max())
    area_max = float(correct.mean()) * horizon
    area_best = float(np.minimum(b, horizon).mean())
    area = float(np.minimum(d, horizon).mean())
    if area_max <= area_best:
        return None
    return (area_max - area) / (area_max - area_best)


@dataclass(frozen=True)
class DistanceGap:
    """How far one attack's distances are from the best-known ones on one evaluation.

    Attributes:
        n: correctly classified samples with a best-known distance (above 0).
        n_above: of those, samples where the attack found no distance or one more than ``rel_tol`` above the
            best known.
        median_ratio: median of attack distance / best-known distance over the ``n`` samples where the attack
            found a distance (1 = the attack found the best known on at least half of them); None if none.
        local_optimality: :func:`local_optimality`.
        best_median_distance: median best-known distance over the ``n`` samples; None if ``n`` is 0.
        rel_tol: the slack behind ``n_above``.
    """

    n: int
    n_above: int
    median_ratio: float | None
    local_optimality: float | None
    best_median_distance: float | None
    rel_tol: float = GAP_REL_TOL


def distance_gap(
    distance: np.ndarray, best: np.ndarray, correct: np.ndarray, rel_tol: float = GAP_REL_TOL
) -> DistanceGap:
    """Per-model figures of how far ``distance`` (say, plain FMN's) is from the best-known distances.

    Args:
        distance, best, correct: as for :func:`local_optimality`.
        rel_tol: relative slack for ``n_above`` (0.01: more than 1 % above the best known).
    """
    correct = np.asarray(correct, dtype=bool)
    lo = local_optimality(distance, best, correct)
    d, b = _unsigned(distance, correct), _unsigned(best, correct)
    known = correct & np.isfinite(b) & (b > 0)
    found = known & np.isfinite(d)
    ratios = d[found] / b[found]
    return DistanceGap(
        n=int(known.sum()),
        n_above=int(np.sum(known & ~(d <= b * (1 + rel_tol)))),
        median_ratio=float(np.median(ratios)) if ratios.size else None,
        local_optimality=lo,
        best_median_distance=float(np.median(b[known])) if known.any() else None,
        rel_tol=rel_tol,
    )
