"""Security curves from FMN distances, the per-stage AutoAttack breakdown, and the per-sample records."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from bench.analysis.curves import (
    CLEAN_PASS_DISAGREED,
    attack_breakdown,
    default_eps_grid,
    robust_at,
    security_curve,
)
from bench.analysis.records import EvaluationRecords, latest_evaluation, load_records
from tests.analysis_store import add_evaluation, add_model, digits_spec


def _records(**arrays) -> EvaluationRecords:
    """Records built directly (the curve is a pure function of them)."""
    n = len(arrays["clean_correct"])
    base = dict(
        evaluation_id=1,
        model_id=1,
        protocol_hash="p",
        spec={"eps": "0.2", "version": "standard"},
        eps=0.2,
        norm="Linf",
        sample_id=np.arange(n),
        label=np.zeros(n, dtype=int),
        logit_margin=np.zeros(n),
        aa_robust=np.zeros(n, dtype=bool),
        aa_broken_by=np.array([None] * n, dtype=object),
        fmn_success=np.ones(n, dtype=bool),
        fmn_distance=np.full(n, 0.1),
        signed_eps=np.full(n, 0.1),
        best_robust=np.zeros(n, dtype=bool),
    )
    base.update({k: np.asarray(v, dtype=object if k == "aa_broken_by" else None) for k, v in arrays.items()})
    return EvaluationRecords(**base)


def test_security_curve_closed_form():
    # 10 samples: 2 misclassified, 1 correct with a failed FMN run, 7 correct with distances 0.1 … 0.7.
    # At budget e the curve is (1 + #{d > e}) / 10: a failure is robust everywhere, an error nowhere.
    distances = [np.nan, np.nan, np.nan] + [0.1 * k for k in range(1, 8)]
    rec = _records(
        clean_correct=[False, False] + [True] * 8,
        fmn_success=[True, True, False] + [True] * 7,
        fmn_distance=distances,
    )
    grid = np.array([0.0, 0.05, 0.1, 0.25, 0.7, 1.0])
    eps, acc = security_curve(rec, grid)
    expected = [(1 + sum(d > e for d in distances[3:])) / 10 for e in grid]
    assert eps is not None and list(eps) == list(grid)
    assert acc == pytest.approx(expected)
    assert acc[0] == pytest.approx(0.8)  # the clean accuracy
    assert acc[-1] == pytest.approx(0.1)  # only the FMN failure survives
    assert robust_at(rec, 0.25) == pytest.approx(0.6)


def test_default_grid_reaches_three_eps_with_the_nominal_eps_on_it():
    grid = default_eps_grid(0.2)
    assert grid[0] == 0 and grid[-1] == pytest.approx(0.6) and len(grid) == 241
    assert grid[80] == pytest.approx(0.2)
    rec = _records(clean_correct=[True, True], fmn_distance=[0.1, 0.3])
    eps, acc = security_curve(rec)
    assert np.array_equal(eps, grid)
    assert np.all(np.diff(acc) <= 0)
    with pytest.raises(ValueError, match="non-negative"):
        security_curve(rec, np.array([-0.1, 0.2]))


def test_attack_breakdown_counts_each_stage_in_run_order():
    rec = _records(
        clean_correct=[False, True, True, True, True, True],
        aa_broken_by=[None, "apgd-t", "apgd-ce", "apgd-ce", None, "square"],
        aa_robust=[False, False, False, False, True, False],
    )
    assert attack_breakdown(rec, ["apgd-ce", "apgd-t", "fab-t", "square"]) == [
        ("clean errors", 1),
        ("apgd-ce", 2),
        ("apgd-t", 1),
        ("fab-t", 0),
        ("square", 1),
        ("robust", 1),
    ]
    assert attack_breakdown(rec) == attack_breakdown(rec, rec.stages)  # the version's stages by default
    with pytest.raises(ValueError, match="broken by square, not among the stages apgd-ce"):
        attack_breakdown(rec, ["apgd-ce", "apgd-t"])


def test_attack_breakdown_has_a_bucket_for_autoattack_clean_pass_disagreement():
    # bench.evaluate: a sample counts AutoAttack-robust only if our clean pass got it right too. Where AutoAttack's
    # own clean pass disagreed, a sample we classify correctly is neither robust nor broken by a stage (sample 2),
    # and one we misclassify may still carry a stage AutoAttack broke it with (sample 3) or, in rows stored before
    # the evaluator's fix, the robust flag (sample 4): both are clean errors. Every sample is counted once.
    rec = _records(
        clean_correct=[True, True, True, False, False, True],
        aa_broken_by=["apgd-ce", None, None, "apgd-ce", None, None],
        aa_robust=[False, True, False, False, True, False],
    )
    out = attack_breakdown(rec, ["apgd-ce", "square"])
    assert out == [
        ("clean errors", 2),
        ("apgd-ce", 1),
        ("square", 0),
        (CLEAN_PASS_DISAGREED, 2),
        ("robust", 1),
    ]
    assert sum(count for _, count in out) == rec.n
    assert CLEAN_PASS_DISAGREED == "AutoAttack's clean pass disagreed"


def test_records_load_sorted_and_csv_round_trips(store):
    model = add_model(store, "m")
    ev = add_evaluation(
        store,
        model,
        clean_correct=[True, False, True],
        signed_eps=[0.3, -0.05, None],
        aa_broken_by=["apgd-ce", None, None],
        sample_ids=[7, 3, 5],
    )
    with store.session() as s:
        rec = load_records(s, ev)
    assert list(rec.sample_id) == [3, 5, 7]
    assert list(rec.clean_correct) == [False, True, True]
    assert np.isnan(rec.fmn_distance[1]) and rec.fmn_distance[2] == 0.3
    assert list(rec.aa_broken_by) == [None, None, "apgd-ce"]
    assert rec.eps == 0.2 and rec.norm == "Linf"

    text = rec.to_csv()
    assert text == rec.to_csv()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["sample_id"] for r in rows] == ["3", "5", "7"]
    assert rows[0]["clean_correct"] == "0" and rows[0]["signed_eps"] == "-0.05"
    assert rows[1]["fmn_distance"] == "" and rows[1]["fmn_success"] == "0"
    assert rows[2]["aa_broken_by"] == "apgd-ce" and rows[1]["aa_broken_by"] == ""


def test_latest_evaluation_is_the_newest_complete_one(store):
    model = add_model(store, "m")
    old = add_evaluation(store, model, clean_correct=[True], spec=digits_spec(n_samples=1, seed=1))
    new = add_evaluation(
        store, model, clean_correct=[True], spec=digits_spec(n_samples=1, seed=2), finished_offset_s=60
    )
    running = add_evaluation(
        store, model, clean_correct=[True], spec=digits_spec(n_samples=1, seed=3), status="running"
    )
    with store.session() as s:
        assert latest_evaluation(s, model).id == new
        assert latest_evaluation(s, model, digits_spec(n_samples=1, seed=1).protocol_hash).id == old
        assert latest_evaluation(s, model, "0" * 64) is None
        with pytest.raises(ValueError, match=rf"evaluation #{running} is not complete .*bench evaluate"):
            load_records(s, running)
        with pytest.raises(ValueError, match="no evaluation #999"):
            load_records(s, 999)
