"""Security curves from per-sample minimal distances and the per-stage AutoAttack breakdown (protocol section 6).

A curve reads the best-known distances (:mod:`~bench.analysis.best_known`) by default, where the evaluation has
them, or plain FMN's (``distance="fmn"``, the thin-ice paper's figures).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench.analysis.records import EvaluationRecords

# The default grid spans [0, 3·eps] in steps of eps/80, so the nominal eps is a grid point (index 80) and
# every model evaluated under the same protocol shares one x-axis (curves can be overlaid).
GRID_SPAN = 3
GRID_STEPS_PER_EPS = 80


def default_eps_grid(eps: float) -> np.ndarray:
    """``0, eps/80, …, 3·eps``: 241 points, the nominal eps exactly at index 80."""
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"a security curve needs a finite positive nominal eps, got {eps!r}")
    return np.arange(GRID_SPAN * GRID_STEPS_PER_EPS + 1) * (eps / GRID_STEPS_PER_EPS)


def security_curve(
    records: EvaluationRecords, eps_grid: np.ndarray | None = None, distance: str = "best"
) -> tuple[np.ndarray, np.ndarray]:
    """Robust accuracy as a function of the budget, from per-sample minimal distances.

    At budget e a sample counts as robust when the model classifies it correctly and its distance is
    greater than e. The fraction is over all N samples: misclassified samples count 0 at every e (so the
    curve starts at the clean accuracy), and a correctly classified sample without a distance (no attack
    found an adversarial) counts as robust at every e — a failure is not a distance. The curve is therefore an
    upper bound, like every attack-based robust accuracy; the AutoAttack point at the nominal eps is the
    other estimate to show next to it. On the best-known distances the curve at the nominal eps is at most the
    AutoAttack point, as every sample AutoAttack broke has a best-known distance within eps (the evaluation's flag
    ``best_known_above_eps`` marks the float32-rounding exception).

    Args:
        records: one evaluation.
        eps_grid: budgets to evaluate at (non-negative, 1-D) [default: :func:`default_eps_grid` of the
            evaluation's nominal eps].
        distance: ``"best"`` (best-known distances; plain FMN's for an evaluation stored without them, see
            ``records.distance_used``) or ``"fmn"`` (plain FMN's).

    Returns:
        ``(eps_grid, robust_accuracy)``, accuracies as fractions in [0, 1], non-increasing in eps.
    """
    grid = default_eps_grid(records.eps) if eps_grid is None else np.asarray(eps_grid, dtype=np.float64)
    if grid.ndim != 1 or (grid < 0).any() or np.isnan(grid).any():
        raise ValueError("eps_grid must be a 1-D array of non-negative budgets")
    n = records.n
    if n == 0:
        raise ValueError(f"evaluation #{records.evaluation_id} has no per-sample records")
    correct = records.clean_correct
    found = records.distance(distance)
    broken = correct & ~np.isnan(found)
    never_broken = int((correct & ~broken).sum())
    distances = np.sort(found[broken])
    # #{d > e} = len − #{d ≤ e}
    above = len(distances) - np.searchsorted(distances, grid, side="right")
    return grid, (never_broken + above) / n


def robust_at(records: EvaluationRecords, eps: float, distance: str = "best") -> float:
    """The security curve's value at one budget (robust accuracy at ``eps`` from ``distance``), as a fraction."""
    return float(security_curve(records, np.array([eps]), distance)[1][0])


# A sample our clean pass classified correctly that AutoAttack neither broke nor left robust: AutoAttack's own clean
# pass misclassified it, so no stage attacked it (a randomised or input-dependent model; the evaluation then
# carries the flag clean_pass_disagreement). It is not robust: robustness needs both passes right.
CLEAN_PASS_DISAGREED = "AutoAttack's clean pass disagreed"
CLEAN_ERRORS = "clean errors"
ROBUST = "robust"


def attack_breakdown(records: EvaluationRecords, stages: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """Where each sample ended: ``("clean errors", n)``, each AutoAttack stage in run order with the number
    of samples it broke first, ``(CLEAN_PASS_DISAGREED, n)`` when there are any, then ``("robust", n)``.

    The buckets partition the N samples by our clean pass first: a sample we misclassified is a clean error
    whatever AutoAttack recorded for it; a correctly classified one is robust, broken by a stage, or (neither)
    left unattacked because AutoAttack's own clean pass got it wrong. The counts always add up to N.

    Args:
        records: one evaluation.
        stages: the AutoAttack stages in run order [default: those of the evaluation's version].

    Raises:
        ValueError: a sample was broken by a stage not in ``stages`` (or the version is unknown).
    """
    stages = tuple(records.stages if stages is None else stages)
    correct = records.clean_correct
    robust = correct & records.aa_robust
    attacked = correct & ~robust
    broken_by = records.aa_broken_by[attacked]
    unknown = sorted({s for s in broken_by.tolist() if s is not None and s not in stages})
    if unknown:
        raise ValueError(
            f"evaluation #{records.evaluation_id} has samples broken by {', '.join(unknown)}, not among the "
            f"stages {', '.join(stages)}; pass the evaluation's own stages (records.stages)"
        )
    out = [(CLEAN_ERRORS, int((~correct).sum()))]
    out += [(stage, int((broken_by == stage).sum())) for stage in stages]
    disagreed = int(sum(s is None for s in broken_by.tolist()))
    if disagreed:
        out.append((CLEAN_PASS_DISAGREED, disagreed))
    out.append((ROBUST, int(robust.sum())))
    return out
