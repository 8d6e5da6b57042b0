"""Paired comparison of two models on the same samples: McNemar's exact test (protocol section 6).

Two robust accuracies measured on the same N samples are not independent, so comparing their Wilson
intervals is too conservative. McNemar's test uses only the discordant samples: under H0 (neither model is
more robust) a sample robust for exactly one model is equally likely to be A's or B's, so the count of
A-only samples is Binomial(a_only + b_only, ½); the exact two-sided p-value is ``scipy.stats.binomtest``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import binomtest

from bench.analysis.records import EvaluationRecords, shared_samples

# The robust flag compared by default: AutoAttack's, the figure the leaderboard ranks by. ``best_robust``
# (AutoAttack or FMN within eps) and ``clean_correct`` can be asked for.
FLAGS = ("aa_robust", "best_robust", "clean_correct")


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on one per-sample flag of two models over their shared samples.

    Attributes:
        n_shared: samples both evaluations hold.
        a_only, b_only: discordant samples (flag true for A only / for B only).
        both, neither: concordant samples.
        pvalue: exact two-sided p-value (1.0 when there is no discordant sample).
        statistic_note: the test in words.
        flag: the per-sample flag compared (``aa_robust`` by default).
    """

    n_shared: int
    a_only: int
    b_only: int
    both: int
    neither: int
    pvalue: float
    statistic_note: str
    flag: str = "aa_robust"

    @property
    def difference(self) -> float:
        """A's accuracy minus B's on the shared samples, as a fraction: (a_only − b_only) / n_shared."""
        return (self.a_only - self.b_only) / self.n_shared


def mcnemar(a: EvaluationRecords, b: EvaluationRecords, flag: str = "aa_robust") -> McNemar:
    """McNemar's exact test of "A and B are equally robust" on their shared samples.

    Args:
        a, b: the two evaluations (same protocol; see :func:`~bench.analysis.records.shared_samples`).
        flag: ``aa_robust`` (default: robust after every AutoAttack stage), ``best_robust`` (broken by neither
            AutoAttack nor FMN within eps) or ``clean_correct``.

    Raises:
        IncomparableError: different protocol or threat model, or no shared sample.
        ValueError: unknown flag.
    """
    if flag not in FLAGS:
        raise ValueError(f"unknown flag {flag!r}; use one of {', '.join(FLAGS)}")
    ia, ib = shared_samples(a, b, "paired comparison")
    fa, fb = getattr(a, flag)[ia], getattr(b, flag)[ib]
    a_only = int((fa & ~fb).sum())
    b_only = int((~fa & fb).sum())
    discordant = a_only + b_only
    if discordant == 0:
        pvalue = 1.0
        note = f"no discordant sample: the two models agree on {flag} for all {len(ia)} shared samples"
    else:
        pvalue = float(binomtest(a_only, discordant, 0.5, alternative="two-sided").pvalue)
        note = (
            f"exact McNemar test on {flag}: two-sided binomial test of {a_only} A-only against {b_only} B-only "
            f"discordant samples (of {len(ia)} shared), p = {pvalue:.3g}"
        )
    return McNemar(
        n_shared=len(ia),
        a_only=a_only,
        b_only=b_only,
        both=int((fa & fb).sum()),
        neither=int((~fa & ~fb).sum()),
        pvalue=pvalue,
        statistic_note=note,
        flag=flag,
    )
