"""Samples on thin ice: populations, AUCs and p-values against an independent computation on the same rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sqlalchemy import select

from bench.analysis.format import MISSING
from bench.analysis.records import load_records
from bench.analysis.thin_ice import ThinIceError, thin_ice
from bench.store import SampleResult
from tests.analysis_store import add_evaluation, add_model, digits_spec


def _pair(store, dense_kw, pruned_kw):
    dense = add_model(store, "dense")
    pruned = add_model(store, "pruned", parent_id=dense)
    return add_evaluation(store, dense, **dense_kw), add_evaluation(store, pruned, **pruned_kw)


def _analyse(store, dense_ev, pruned_ev, **kw):
    with store.session() as s:
        return thin_ice(load_records(s, dense_ev), load_records(s, pruned_ev), **kw)


def _brute_auc(low, high):
    """P(low < high) + ½ P(tie), over every pair."""
    low, high = np.asarray(low)[:, None], np.asarray(high)[None, :]
    return float(((low < high) + 0.5 * (low == high)).mean())


def test_known_populations_give_known_percentages_and_separations(store):
    # 100 samples: dense right on 80; pruning breaks 6 of them (S10) and fixes 5 of the 20 dense errors (S01).
    dense_correct = [True] * 80 + [False] * 20
    pruned_correct = [True] * 74 + [False] * 6 + [True] * 5 + [False] * 15
    # S10 samples sit closest to the boundary, S11 farther; S01 are barely wrong, S00 far on the wrong side.
    eps = [0.2 + 0.01 * i for i in range(74)] + [0.01 * (i + 1) for i in range(6)]
    eps += [-0.01 * (i + 1) for i in range(5)] + [-0.3 - 0.01 * i for i in range(15)]
    dense_ev, pruned_ev = _pair(
        store, dict(clean_correct=dense_correct, signed_eps=eps), dict(clean_correct=pruned_correct)
    )

    result = _analyse(store, dense_ev, pruned_ev)

    assert result.n == 100
    assert result.counts == {"S00": 15, "S01": 5, "S10": 6, "S11": 74}
    assert result.percent == pytest.approx({"S00": 15.0, "S01": 5.0, "S10": 6.0, "S11": 74.0})
    assert result.auc_10_11 == 1.0 and result.auc_01_00 == 1.0
    assert result.p_10_11 == pytest.approx(mannwhitneyu(eps[74:80], eps[:74]).pvalue)
    assert result.p_10_11 < 1e-3 and result.p_01_00 < 1e-3
    assert result.notes == []
    row = result.as_table_row()
    assert [row[k] for k in ("S00 %", "S01 %", "S10 %", "S11 %")] == ["15.00", "5.00", "6.00", "74.00"]
    assert row["AUC ε10<ε11 (p)"].startswith("1.000 (")
    # The scatter: one point per shared sample, the dense model's ε and margin, coloured by population.
    assert list(result.sample_id) == list(range(100))
    assert result.eps == pytest.approx(eps)
    assert list(result.population[:74]) == ["S11"] * 74 and list(result.population[74:80]) == ["S10"] * 6


def test_statistics_equal_an_independent_scipy_computation_on_the_stored_rows(store):
    rng = np.random.default_rng(7)
    n = 400
    dense_correct = rng.random(n) < 0.8
    # Pruning flips mostly samples near the boundary: the probability of a flip falls with the distance.
    dist = np.round(rng.exponential(0.3, n), 3)  # rounding makes ties, which both sides must count as ½
    flip = rng.random(n) < np.exp(-dist / 0.1) * 0.6
    pruned_correct = np.where(flip, ~dense_correct, dense_correct)
    signed = np.where(dense_correct, dist, -dist)
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=dense_correct.tolist(), signed_eps=signed.tolist(), margin=rng.normal(size=n).tolist()),
        dict(clean_correct=pruned_correct.tolist()),
    )

    result = _analyse(store, dense_ev, pruned_ev)

    # Independent: read the stored rows back, split by population, and ask scipy and a pairwise count.
    with store.session() as s:

        def rows(ev):
            q = select(SampleResult).where(SampleResult.evaluation_id == ev).order_by(SampleResult.sample_id)
            return {r.sample_id: r for r in s.scalars(q)}

        d_rows, p_rows = rows(dense_ev), rows(pruned_ev)
        groups = {k: [] for k in ("S00", "S01", "S10", "S11")}
        for sid, d in d_rows.items():
            groups[f"S{int(d.clean_correct)}{int(p_rows[sid].clean_correct)}"].append(d.signed_eps)
    assert result.counts == {k: len(v) for k, v in groups.items()}
    assert result.percent["S10"] == pytest.approx(100 * len(groups["S10"]) / n)
    assert min(len(v) for v in groups.values()) >= 5
    assert result.auc_10_11 == pytest.approx(_brute_auc(groups["S10"], groups["S11"]), abs=1e-12)
    assert result.p_10_11 == pytest.approx(mannwhitneyu(groups["S10"], groups["S11"]).pvalue, rel=1e-9)
    abs01, abs00 = np.abs(groups["S01"]), np.abs(groups["S00"])
    assert result.auc_01_00 == pytest.approx(_brute_auc(abs01, abs00), abs=1e-12)
    assert result.p_01_00 == pytest.approx(mannwhitneyu(abs01, abs00).pvalue, rel=1e-9)
    # The constructed data puts flipped samples near the boundary, and the statistic sees it.
    assert result.auc_10_11 > 0.8


def test_a_failed_fmn_run_ranks_as_farthest_and_is_noted(store):
    dense_correct = [True] * 12
    pruned_correct = [True] * 6 + [False] * 6
    eps = [0.5, 0.6, 0.7, 0.8, 0.9, None] + [0.55, 0.65, 0.75, 0.85, 0.95, 0.1]
    dense_ev, pruned_ev = _pair(
        store, dict(clean_correct=dense_correct, signed_eps=eps), dict(clean_correct=pruned_correct)
    )

    s11 = [0.5, 0.6, 0.7, 0.8, 0.9, math.inf]
    s10 = [0.55, 0.65, 0.75, 0.85, 0.95, 0.1]
    for distance, why in (("fmn", "(FMN failed)"), ("best", "(FMN failed, and no other attack found one)")):
        result = _analyse(store, dense_ev, pruned_ev, distance=distance)
        assert result.distance == distance
        assert result.auc_10_11 == pytest.approx(_brute_auc(s10, s11))
        assert math.isnan(result.eps[5])
        expected = f"1 sample without an FMN distance on the dense model {why}"
        assert any(note.startswith(expected) for note in result.notes)


def test_small_and_empty_groups_are_flagged(store):
    dense_correct = [True] * 20
    pruned_correct = [True] * 18 + [False] * 2
    eps = [0.1 + 0.01 * i for i in range(20)]
    dense_ev, pruned_ev = _pair(
        store, dict(clean_correct=dense_correct, signed_eps=eps), dict(clean_correct=pruned_correct)
    )

    result = _analyse(store, dense_ev, pruned_ev)

    assert result.counts == {"S00": 0, "S01": 0, "S10": 2, "S11": 18}
    assert result.auc_10_11 is not None
    assert result.auc_01_00 is None and result.p_01_00 is None
    assert "S10 has 2 samples: too few for AUC(S10 < S11) to mean anything" in result.notes
    assert any(note.startswith("S01 is empty") for note in result.notes)
    assert result.as_table_row()["AUC |ε01|<|ε00| (p)"] == MISSING


def test_no_auc_when_a_group_has_no_fmn_distance(store):
    # FMN failed on the dense model for every S10 sample: ranking them all as +inf would give AUC 0 (or ½ against
    # another all-failed group, p = 1), which says nothing about the distances; no AUC, and a note.
    dense_correct = [True] * 20 + [False] * 10
    pruned_correct = [True] * 14 + [False] * 6 + [True] * 5 + [False] * 5
    eps = [0.1 + 0.01 * i for i in range(14)] + [None] * 6 + [None] * 10
    dense_ev, pruned_ev = _pair(
        store, dict(clean_correct=dense_correct, signed_eps=eps), dict(clean_correct=pruned_correct)
    )

    for distance, tail in (("fmn", ""), ("best", ", and no other attack found one")):
        result = _analyse(store, dense_ev, pruned_ev, distance=distance)

        assert result.counts == {"S00": 5, "S01": 5, "S10": 6, "S11": 14}
        assert (result.auc_10_11, result.p_10_11, result.auc_01_00, result.p_01_00) == (None, None, None, None)
        note = "no AUC(S10 < S11): FMN found no distance on the dense model for any S10 sample (6 samples)"
        assert note + tail in result.notes
        assert any(note.startswith("no AUC(S01 < S00): FMN found no distance") for note in result.notes)
        assert result.as_table_row()["AUC ε10<ε11 (p)"] == MISSING


def test_no_auc_when_every_eps_is_tied(store):
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=[True] * 20, signed_eps=[0.3] * 20),
        dict(clean_correct=[True] * 12 + [False] * 8),
    )
    result = _analyse(store, dense_ev, pruned_ev)
    assert result.auc_10_11 is None and result.p_10_11 is None
    assert "no AUC(S10 < S11): every S10 and S11 sample has the same ε" in result.notes


def test_different_eps_is_refused_with_the_fix(store):
    correct = [True, False] * 5
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=correct, spec=digits_spec(n_samples=10, eps="0.1", eps_value=0.1)),
        dict(clean_correct=correct, spec=digits_spec(n_samples=10)),
    )
    with pytest.raises(ThinIceError, match=r"different threat models \(Linf eps=0.1 vs Linf eps=0.2\).*--eps"):
        _analyse(store, dense_ev, pruned_ev)


def test_a_different_protocol_is_refused_naming_the_difference(store):
    correct = [True, False] * 5
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=correct, spec=digits_spec(n_samples=10, seed=1)),
        dict(clean_correct=correct, spec=digits_spec(n_samples=10)),
    )
    with pytest.raises(ThinIceError, match=r"different protocols .*differ in seed\).*bench evaluate"):
        _analyse(store, dense_ev, pruned_ev)


def test_no_shared_sample_is_refused(store):
    correct = [True, False] * 5
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=correct, sample_ids=range(10)),
        dict(clean_correct=correct, sample_ids=range(10, 20)),
    )
    with pytest.raises(ThinIceError, match="share no sample_id"):
        _analyse(store, dense_ev, pruned_ev)


def test_only_shared_samples_are_analysed(store):
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=[True] * 10, sample_ids=range(10)),
        dict(clean_correct=[False] * 10, sample_ids=range(5, 15)),
    )
    result = _analyse(store, dense_ev, pruned_ev)
    assert result.n == 5 and list(result.sample_id) == [5, 6, 7, 8, 9]
    assert result.counts["S10"] == 5


def test_different_labels_for_the_same_ids_are_refused(store):
    correct = [True, False] * 5
    dense_ev, pruned_ev = _pair(
        store, dict(clean_correct=correct), dict(clean_correct=correct, labels=[(i + 3) % 10 for i in range(10)])
    )
    with pytest.raises(ThinIceError, match="different labels"):
        _analyse(store, dense_ev, pruned_ev)


def test_best_known_distances_by_default_plain_fmn_on_request(store):
    # Plain FMN overstates the distance of the flipped (S10) samples; the best known puts them back near the boundary.
    dense_correct = [True] * 30
    pruned_correct = [True] * 20 + [False] * 10
    fmn = [0.2 + 0.01 * i for i in range(20)] + [0.25 + 0.01 * i for i in range(10)]
    best = fmn[:20] + [0.02 + 0.01 * i for i in range(10)]
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=dense_correct, signed_eps=fmn, best_eps=best),
        dict(clean_correct=pruned_correct),
    )

    default = _analyse(store, dense_ev, pruned_ev)
    plain = _analyse(store, dense_ev, pruned_ev, distance="fmn")

    assert (default.distance, plain.distance) == ("best", "fmn")
    assert default.eps == pytest.approx(best) and plain.eps == pytest.approx(fmn)
    assert default.auc_10_11 == 1.0
    assert plain.auc_10_11 == pytest.approx(_brute_auc(fmn[20:], fmn[:20]))
    assert default.counts == plain.counts
    # Only the empty S01/S00 groups are noted; nothing about the distance used.
    assert default.notes == plain.notes and all(note.startswith(("S01 ", "S00 ")) for note in default.notes)


def test_a_dense_evaluation_without_best_known_distances_reads_plain_fmn_and_says_so(store):
    legacy = digits_spec(n_samples=12, fmn_init="none")
    eps = [0.5, 0.6, 0.7, 0.8, 0.9, 0.4] + [0.55, 0.65, 0.75, 0.85, 0.95, 0.1]
    dense_ev, pruned_ev = _pair(
        store,
        dict(clean_correct=[True] * 12, signed_eps=eps, spec=legacy),
        dict(clean_correct=[True] * 6 + [False] * 6, spec=legacy),
    )
    result = _analyse(store, dense_ev, pruned_ev)
    assert result.distance == "fmn" and result.eps == pytest.approx(eps)
    assert any("has no best-known distances" in note for note in result.notes)
    assert not any("best-known" in note for note in _analyse(store, dense_ev, pruned_ev, distance="fmn").notes)
    with pytest.raises(ValueError, match="unknown distance"):
        _analyse(store, dense_ev, pruned_ev, distance="aa")
