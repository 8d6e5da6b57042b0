"""Samples on thin ice: which samples pruning flips, and how close they sat to the dense model's boundary.

Piras, Pintor, Demontis, Biggio, "Samples on Thin Ice: Re-Evaluating Adversarial Pruning of Neural Networks",
ICMLC 2023 (arXiv 2310.08073), section 3.2, Table 2 and Figure 2; protocol section 6.

For a pruned model P and its dense parent D evaluated on the same samples:

- populations by *clean* correctness, S_{d,p} with d = D correct and p = P correct: S11, S10 (broken by
  pruning), S01 (fixed by pruning), S00;
- ε is D's signed minimal distance (+distance when D is right, −distance to leave D's predicted class when
  it is wrong: the caption of Figure 2): by default the best-known distance (:mod:`~bench.analysis.best_known`:
  FMN, FMN started from AutoAttack's adversarial example, AutoAttack), where D's evaluation has it, else plain
  FMN's as in the paper (``distance="fmn"`` asks for plain FMN's: the paper-comparable figures);
- AUC(ε10 < ε11) = P(ε of a random S10 sample < ε of a random S11 sample) = U / (n10·n11), ties counted
  one half, with the two-sided Mann–Whitney U p-value (``scipy.stats.mannwhitneyu``); AUC(|ε01| < |ε00|)
  likewise on |ε|. An AUC near 1 with a small p says the samples pruning flips lay on thin ice. The p-value
  is scipy's default: exact for small samples without ties, else the normal approximation with tie and
  continuity corrections.

A sample without a distance on D (no attack found an adversarial) was not broken within the attacks' budget,
so it is farther from the boundary than any distance found, and it enters the rank statistics as |ε| = +∞ (its
scatter point is NaN and is left out of the plot). ``notes`` says how many there were. When every sample of a
group lacks a distance, or all the ε compared are equal, there is nothing to rank and no AUC is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu

from bench.analysis.format import MISSING, p_value
from bench.analysis.records import EvaluationRecords, IncomparableError, shared_samples

POPULATIONS = ("S00", "S01", "S10", "S11")


class ThinIceError(IncomparableError):
    """The two evaluations cannot be analysed together (no shared samples, different protocol or eps)."""


@dataclass(frozen=True, eq=False)
class ThinIce:
    """The thin-ice statistics of one (dense, pruned) pair over their shared samples.

    Attributes:
        n: number of shared samples.
        counts: samples per population (keys ``S00``, ``S01``, ``S10``, ``S11``).
        percent: the same in percent of ``n`` (the paper's Table 2 columns iv–vii).
        auc_10_11, p_10_11: AUC(ε10 < ε11) and its two-sided Mann–Whitney p-value; None when S10 or S11 is
            empty, when FMN found no distance for any sample of one of them, or when all their ε are equal
            (``notes`` says which).
        auc_01_00, p_01_00: AUC(|ε01| < |ε00|) and its p-value; None likewise for S01 and S00.
        notes: caveats in words (small groups, samples without a distance, the distance used).
        sample_id, eps, margin, population: one entry per shared sample for the scatter (Figure 2): the dense
            model's signed ε (NaN where it has no distance) and clean logit margin, and the sample's population.
        dense_evaluation_id, pruned_evaluation_id: where the records came from.
        distance: the distance ε is: ``"best"`` (best-known) or ``"fmn"`` (plain FMN, the paper's).
    """

    n: int
    counts: dict[str, int]
    percent: dict[str, float]
    auc_10_11: float | None
    p_10_11: float | None
    auc_01_00: float | None
    p_01_00: float | None
    notes: list[str]
    sample_id: np.ndarray
    eps: np.ndarray
    margin: np.ndarray
    population: np.ndarray
    dense_evaluation_id: int | None = None
    pruned_evaluation_id: int | None = None
    distance: str = "fmn"

    def as_table_row(self) -> dict[str, str]:
        """The paper's Table 2 columns iv–ix as display strings (percentages with two decimals).

        The method, sparsity and network columns (i–iii) describe the models, not the statistics: the
        caller puts them in front.
        """
        row = {f"{pop} %": f"{self.percent[pop]:.2f}" for pop in POPULATIONS}
        row["AUC ε10<ε11 (p)"] = _auc_cell(self.auc_10_11, self.p_10_11)
        row["AUC |ε01|<|ε00| (p)"] = _auc_cell(self.auc_01_00, self.p_01_00)
        row["n"] = str(self.n)
        return row


def _auc_cell(auc: float | None, p: float | None) -> str:
    if auc is None:
        return MISSING
    return f"{auc:.3f} ({p_value(p)})"


def auc_less(smaller: np.ndarray, larger: np.ndarray) -> tuple[float, float]:
    """AUC = P(a draw from ``smaller`` < a draw from ``larger``), ties one half, and the two-sided MWU p-value.

    ``mannwhitneyu(x, y)`` returns U of ``x`` = #{x > y} + ½#{x = y}, so U(larger, smaller) / (n·m) is the AUC.
    """
    res = mannwhitneyu(larger, smaller, alternative="two-sided")
    return float(res.statistic) / (len(larger) * len(smaller)), float(res.pvalue)


def thin_ice(
    dense: EvaluationRecords, pruned: EvaluationRecords, min_group: int = 5, distance: str = "best"
) -> ThinIce:
    """Populations, AUCs and Mann–Whitney p-values of a pruned model against its dense parent.

    Args:
        dense: the dense parent's records (its signed ε and logit margin are the ones analysed).
        pruned: the pruned model's records (only its clean correctness is used).
        min_group: a population smaller than this gets a note that its statistic means little.
        distance: ``"best"`` (the best-known distance where the dense evaluation has it, else plain FMN's, with a
            note) or ``"fmn"`` (plain FMN's: the figures comparable with the paper).

    Raises:
        ThinIceError: the two evaluations use different threat models or protocols, or share no sample.
        ValueError: an unknown ``distance``.
    """
    used = dense.distance_used(distance)
    try:
        i_d, i_p = shared_samples(dense, pruned, "thin-ice analysis")
    except IncomparableError as err:
        raise ThinIceError(str(err)) from None
    d = dense.clean_correct[i_d]
    p = pruned.clean_correct[i_p]
    eps = dense.signed(used)[i_d]
    # With best-known distances a sample lacks one only where plain FMN failed and no other attack found one either.
    also = "" if used == "fmn" else ", and no other attack found one"
    n = len(i_d)
    population = np.where(d, np.where(p, "S11", "S10"), np.where(p, "S01", "S00")).astype(object)
    counts = {pop: int((population == pop).sum()) for pop in POPULATIONS}
    percent = {pop: 100.0 * counts[pop] / n for pop in POPULATIONS}
    # No distance: farther than anything the attacks found (module docstring), so +inf in the ranks.
    abs_eps = np.where(np.isnan(eps), math.inf, np.abs(eps))

    notes: list[str] = []
    if used != distance:
        notes.append(
            f"the dense evaluation #{dense.evaluation_id} has no best-known distances (stored before FMN started "
            "from AutoAttack's adversarial examples): ε is plain FMN's distance"
        )
    n_failed = int(np.isnan(eps).sum())
    if n_failed:
        notes.append(
            f"{n_failed} sample{'s' if n_failed != 1 else ''} without an FMN distance on the dense model (FMN "
            f"failed{also}): ranked as farther than every distance found, left out of the scatter"
        )
    if dense.model_id == pruned.model_id:
        notes.append("the dense and pruned evaluations are of the same model")

    def compare(low: str, high: str, values: np.ndarray) -> tuple[float | None, float | None]:
        a, b = values[population == low], values[population == high]
        for pop, group in ((low, a), (high, b)):
            if len(group) == 0:
                notes.append(f"{pop} is empty: no AUC({low} < {high})")
            elif len(group) < min_group:
                notes.append(
                    f"{pop} has {len(group)} sample{'s' if len(group) != 1 else ''}: too few for "
                    f"AUC({low} < {high}) to mean anything"
                )
        if len(a) == 0 or len(b) == 0:
            return None, None
        # An AUC of ½ (p = 1) from a group with no distance at all, or from values all equal, would read as "no
        # separation" when nothing was measured.
        for pop, group in ((low, a), (high, b)):
            if not np.isfinite(group).any():
                notes.append(
                    f"no AUC({low} < {high}): FMN found no distance on the dense model for any {pop} sample "
                    f"({len(group)} sample{'s' if len(group) != 1 else ''}){also}"
                )
                return None, None
        if np.unique(np.concatenate([a, b])).size == 1:
            notes.append(f"no AUC({low} < {high}): every {low} and {high} sample has the same ε")
            return None, None
        return auc_less(a, b)

    # ε10 vs ε11: both groups are dense-correct, so ε = |ε| there and the signed values are used as is.
    signed_for_ranks = np.where(np.isnan(eps), math.inf, eps)
    auc_10_11, p_10_11 = compare("S10", "S11", signed_for_ranks)
    auc_01_00, p_01_00 = compare("S01", "S00", abs_eps)
    return ThinIce(
        n=n,
        counts=counts,
        percent=percent,
        auc_10_11=auc_10_11,
        p_10_11=p_10_11,
        auc_01_00=auc_01_00,
        p_01_00=p_01_00,
        notes=notes,
        sample_id=dense.sample_id[i_d],
        eps=eps,
        margin=dense.logit_margin[i_d],
        population=population,
        dense_evaluation_id=dense.evaluation_id,
        pruned_evaluation_id=pruned.evaluation_id,
        distance=used,
    )
