"""McNemar's exact test on the robust flags of two models over their shared samples."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from bench.analysis.paired import mcnemar
from bench.analysis.records import IncomparableError, load_records
from tests.analysis_store import add_evaluation, add_model, digits_spec


def _records(store, *evaluations):
    with store.session() as s:
        return [load_records(s, ev) for ev in evaluations]


def _two(store, a_broken, b_broken, **kw):
    a, b = add_model(store, "a"), add_model(store, "b")
    n = len(a_broken)
    return _records(
        store,
        add_evaluation(store, a, clean_correct=[True] * n, aa_broken_by=a_broken, **kw),
        add_evaluation(store, b, clean_correct=[True] * n, aa_broken_by=b_broken, **kw),
    )


def test_discordant_counts_and_exact_p_value_by_hand(store):
    # 20 samples: both robust on 5, A only on 9, B only on 2, neither on 4.
    a = [None] * 5 + [None] * 9 + ["apgd-ce"] * 2 + ["square"] * 4
    b = [None] * 5 + ["apgd-t"] * 9 + [None] * 2 + ["apgd-ce"] * 4
    ra, rb = _two(store, a, b)

    result = mcnemar(ra, rb)

    assert (result.n_shared, result.both, result.a_only, result.b_only, result.neither) == (20, 5, 9, 2, 4)
    # Exact two-sided binomial with p = 1/2 on 11 discordant samples: 2 · P(X ≤ 2) = 2 · (1 + 11 + 55) / 2^11.
    assert result.pvalue == pytest.approx(2 * (1 + 11 + 55) / 2**11)
    assert result.pvalue == pytest.approx(binomtest(9, 11, 0.5).pvalue)
    assert result.difference == pytest.approx(7 / 20)
    assert "9 A-only against 2 B-only" in result.statistic_note
    # Swapping the models swaps the discordant counts and keeps the p-value.
    swapped = mcnemar(rb, ra)
    assert (swapped.a_only, swapped.b_only, swapped.pvalue) == (2, 9, pytest.approx(result.pvalue))


def test_no_discordant_sample_gives_p_one(store):
    flags = [None, "fab", None]
    ra, rb = _two(store, flags, flags)
    result = mcnemar(ra, rb)
    assert result.pvalue == 1.0 and result.a_only == result.b_only == 0
    assert "agree" in result.statistic_note


def test_best_robust_flag_counts_fmn_breaks(store):
    # Both robust to AutoAttack everywhere; FMN breaks A's sample 0 within eps (0.05 <= 0.2).
    a, b = add_model(store, "a"), add_model(store, "b")
    ra, rb = _records(
        store,
        add_evaluation(store, a, clean_correct=[True] * 3, signed_eps=[0.05, 0.5, 0.5]),
        add_evaluation(store, b, clean_correct=[True] * 3, signed_eps=[0.5, 0.5, 0.5]),
    )
    assert mcnemar(ra, rb).b_only == 0
    best = mcnemar(ra, rb, flag="best_robust")
    assert (best.a_only, best.b_only, best.flag) == (0, 1, "best_robust")
    with pytest.raises(ValueError, match="unknown flag"):
        mcnemar(ra, rb, flag="robust")


def test_different_protocols_are_refused(store):
    a, b = add_model(store, "a"), add_model(store, "b")
    ra, rb = _records(
        store,
        add_evaluation(store, a, clean_correct=[True] * 4, spec=digits_spec(n_samples=4, version="standard")),
        add_evaluation(store, b, clean_correct=[True] * 4, spec=digits_spec(n_samples=4)),
    )
    with pytest.raises(IncomparableError, match=r"paired comparison refused: .*differ in version"):
        mcnemar(ra, rb)


def test_mcnemar_is_over_shared_samples_only(store):
    a, b = add_model(store, "a"), add_model(store, "b")
    ra, rb = _records(
        store,
        add_evaluation(store, a, clean_correct=[True] * 6, aa_broken_by=[None] * 6, sample_ids=range(6)),
        add_evaluation(store, b, clean_correct=[True] * 6, aa_broken_by=["fab"] * 6, sample_ids=range(3, 9)),
    )
    result = mcnemar(ra, rb)
    assert (result.n_shared, result.a_only) == (3, 3)
    assert math.isclose(result.pvalue, 0.25)
