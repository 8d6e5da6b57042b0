"""The evaluator end to end: per-sample rows, the protocol's conventions, reuse, overwrite and resumption, the
interface executors build on. Many processes on one evaluation: tests/bench/evaluation/test_concurrency.py."""

from __future__ import annotations

import copy
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from pyautoattack import AutoAttack
from sqlalchemy import func, select

import bench.evaluation.chunk as chunk_module
from bench.analysis.best_known import distance_gap, eps_float32
from bench.analysis.stats import wilson_interval
from bench.attacks.fmn import NotAdversarialError
from bench.evaluate import (
    CHANNELS_LAST_ENV,
    attack_chunk,
    evaluate,
    evaluate_chunks,
    finalize_evaluation,
    missing_chunks,
    open_evaluation,
)
from bench.performance import execution_settings
from bench.provenance import utcnow
from bench.records import RECORD_COLUMNS
from bench.spec import RunSpec
from bench.store import Evaluation, Model, SampleResult
from bench.store.schema import EvaluationChunk

SAMPLE_COLUMNS = list(RECORD_COLUMNS)


def _model_row(store, name="mlp"):
    with store.session() as s:
        row = Model(name=name, checkpoint_sha256=name.ljust(64, "0"), arch="mlp", dataset="digits", created_at=utcnow())
        s.add(row)
        s.flush()
        return row.id


def _spec(**kw):
    base = dict(
        dataset="digits",
        n_samples=30,
        norm="Linf",
        eps="0.1",
        eps_value=0.1,
        version="standard",
        fmn_steps=30,
        batch_size=10,
        seed=0,
    )
    return RunSpec(**{**base, **kw})


def _rows(store, evaluation_id):
    with store.session() as s:
        rows = s.scalars(
            select(SampleResult).where(SampleResult.evaluation_id == evaluation_id).order_by(SampleResult.sample_id)
        ).all()
        return [{c: getattr(r, c) for c in SAMPLE_COLUMNS} for r in rows]


def test_per_sample_rows_follow_the_protocol(store, digits, digits_mlp):
    _, _, xte, yte = digits
    # Include misclassified samples: the first 30 test samples plus the model's errors further on.
    spec = _spec()
    summary = evaluate(store, _model_row(store), digits_mlp, xte, yte, spec, progress=False)
    rows = _rows(store, summary.evaluation_id)
    assert [r["sample_id"] for r in rows] == list(range(30))
    for r in rows:
        assert r["clean_correct"] == (r["clean_pred"] == r["label"])
        assert (r["logit_margin"] > 0) == r["clean_correct"]
        if r["clean_correct"]:
            assert r["fmn_label"] == r["label"]
            assert r["signed_eps"] is None or r["signed_eps"] == pytest.approx(r["fmn_distance"])
        else:
            # Misclassified: FMN leaves the *predicted* class; the thin-ice epsilon is negative.
            assert r["fmn_label"] == r["clean_pred"]
            assert not r["aa_robust"] and r["aa_broken_by"] is None
            assert r["signed_eps"] is None or r["signed_eps"] == pytest.approx(-r["fmn_distance"])
        if r["fmn_success"]:
            assert r["fmn_distance"] > 0 and r["fmn_adv_pred"] != r["fmn_label"]
        else:
            assert r["fmn_distance"] is None and r["signed_eps"] is None
        fmn_broke = r["clean_correct"] and r["fmn_success"] and r["fmn_distance"] <= spec.eps_value
        assert r["best_robust"] == (r["aa_robust"] and not fmn_broke)
        _check_best_known(r, spec)
    # The comparison means something only if the warm start ran somewhere.
    assert any(r["fmn_warm_distance"] is not None for r in rows)
    n = len(rows)
    assert summary.clean_accuracy == sum(r["clean_correct"] for r in rows) / n
    assert summary.aa_robust_accuracy == sum(r["aa_robust"] for r in rows) / n
    assert summary.best_robust_accuracy == sum(r["best_robust"] for r in rows) / n
    assert summary.best_robust_accuracy <= summary.aa_robust_accuracy
    gap = distance_gap(
        np.array([math.nan if r["fmn_distance"] is None else r["fmn_distance"] for r in rows]),
        np.array([math.nan if r["best_distance"] is None else r["best_distance"] for r in rows]),
        np.array([r["clean_correct"] for r in rows]),
    )
    assert (summary.fmn_local_optimality, summary.n_fmn_above_best) == (gap.local_optimality, gap.n_above)
    assert (summary.fmn_best_median_ratio, summary.best_median_distance) == (gap.median_ratio, gap.best_median_distance)
    assert 0 < summary.fmn_local_optimality <= 1 and summary.fmn_best_median_ratio >= 1
    k = sum(r["aa_robust"] for r in rows)
    assert summary.intervals["autoattack"] == pytest.approx(wilson_interval(k, n))
    distances = sorted(r["fmn_distance"] for r in rows if r["clean_correct"] and r["fmn_success"])
    assert summary.fmn_median_distance == pytest.approx(
        float(torch.tensor(distances).median())
        if len(distances) % 2
        else (distances[len(distances) // 2 - 1] + distances[len(distances) // 2]) / 2
    )
    with store.session() as s:
        ev = s.get(Evaluation, summary.evaluation_id)
        assert ev.status == "complete"
        prov = ev.provenance
        for key in (
            "protocol",
            "protocol_hash",
            "n_samples",
            "seed",
            "threat_model",
            "autoattack_version",
            "torch",
            "pyautoattack",
            "apbench",
            "device",
            "dtype",
            "git_commit",
            "started_at",
            "finished_at",
            "attack_seconds",
            "checkpoint_sha256",
        ):
            assert key in prov, key
        assert set(ev.attack_seconds) == {"clean", "fmn", "fmn_from_autoattack", *spec.attacks}


def _check_best_known(r: dict, spec: RunSpec) -> None:
    """One stored row's best-known distance: the minimum over the attacks that ran, named, signed, within eps where
    AutoAttack broke the sample."""
    aa_broke = r["clean_correct"] and r["aa_broken_by"] is not None
    fmn = r["fmn_distance"]
    if aa_broke:
        # AutoAttack's perturbation is within eps up to float32 rounding (it clips to x ± eps in float32; inputs in
        # [0, 1] round by at most 2^-25), and FMN started from it.
        assert r["aa_distance"] is not None and r["aa_distance"] <= spec.eps_value + 2**-23
        assert r["fmn_warm_distance"] is not None and r["fmn_warm_distance"] <= r["aa_distance"]
        candidates = {
            f"autoattack:{r['aa_broken_by']}": r["aa_distance"],
            "fmn_from_autoattack": r["fmn_warm_distance"],
        }
    else:
        assert r["aa_distance"] is None and r["fmn_warm_distance"] is None
        candidates = {}
    if fmn is not None:
        candidates["fmn"] = fmn
    if not candidates:
        assert r["best_distance"] is None and r["best_attack"] is None and r["signed_best_eps"] is None
        return
    assert r["best_distance"] == min(candidates.values())
    assert candidates[r["best_attack"]] == r["best_distance"]
    assert r["signed_best_eps"] == (r["best_distance"] if r["clean_correct"] else -r["best_distance"])
    if aa_broke:
        # The acceptance criterion: no sample AutoAttack broke at eps has a best-known distance above eps.
        assert r["best_distance"] <= spec.eps_value


def test_the_protocol_before_the_warm_start_stores_no_best_known(store, digits, digits_mlp):
    _, _, xte, yte = digits
    spec = _spec(n_samples=10, fmn_init="none")
    summary = evaluate(store, _model_row(store), digits_mlp, xte, yte, spec, progress=False)
    rows = _rows(store, summary.evaluation_id)
    new = ("aa_distance", "fmn_warm_distance", "best_distance", "best_attack", "signed_best_eps")
    assert all(r[c] is None for r in rows for c in new)
    assert any(r["aa_broken_by"] is not None for r in rows)
    assert summary.fmn_local_optimality is None and summary.n_fmn_above_best is None
    with store.session() as s:
        ev = s.get(Evaluation, summary.evaluation_id)
        assert "fmn_from_autoattack" not in ev.attack_seconds
        assert ev.spec_hash == spec.hash and "fmn_init" not in ev.spec


def test_aa_flags_match_bare_run_through_the_store(store, digits, digits_mlp):
    _, _, xte, yte = digits
    spec = _spec(n_samples=20, batch_size=20, version="standard")
    summary = evaluate(store, _model_row(store), digits_mlp, xte, yte, spec, progress=False)
    _, y_adv = AutoAttack(digits_mlp, norm="Linf", eps=0.1, version="standard", seed=0).run_standard_evaluation(
        xte[:20], yte[:20], batch_size=20
    )
    assert [r["aa_robust"] for r in _rows(store, summary.evaluation_id)] == (y_adv == yte[:20]).tolist()


def test_finished_run_is_reused_and_overwrite_recomputes(store, digits, digits_mlp, monkeypatch):
    _, _, xte, yte = digits
    model_id = _model_row(store)
    spec = _spec(n_samples=10)
    first = evaluate(store, model_id, digits_mlp, xte, yte, spec, progress=False)
    calls = []
    original = chunk_module.attack_chunk
    monkeypatch.setattr(chunk_module, "attack_chunk", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = evaluate(store, model_id, digits_mlp, xte, yte, spec, progress=False)
    assert again.reused and not calls and again.evaluation_id == first.evaluation_id
    redone = evaluate(store, model_id, digits_mlp, xte, yte, spec, overwrite=True, progress=False)
    assert calls and not redone.reused
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Evaluation)) == 1
        assert s.scalar(select(func.count()).select_from(SampleResult)) == 10


def test_a_different_spec_is_a_different_evaluation(store, digits, digits_mlp):
    _, _, xte, yte = digits
    model_id = _model_row(store)
    a = evaluate(store, model_id, digits_mlp, xte, yte, _spec(n_samples=10), progress=False)
    b = evaluate(store, model_id, digits_mlp, xte, yte, _spec(n_samples=10, eps="0.05", eps_value=0.05), progress=False)
    assert a.evaluation_id != b.evaluation_id
    assert b.aa_robust_accuracy >= a.aa_robust_accuracy


def test_crash_mid_run_resumes_without_loss_or_duplicates(store, digits, digits_mlp, monkeypatch):
    _, _, xte, yte = digits
    spec = _spec()
    model_id = _model_row(store, "resumed")
    original = chunk_module.attack_chunk
    seen = []

    def crash_on_third_chunk(*args, **kwargs):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(chunk_module, "attack_chunk", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        evaluate(store, model_id, digits_mlp, xte, yte, spec, progress=False)
    with store.session() as s:
        ev = s.scalars(select(Evaluation)).one()
        assert ev.status == "running"
        assert s.scalar(select(func.count()).select_from(SampleResult)) == 20  # two chunks of 10 committed
    monkeypatch.setattr(chunk_module, "attack_chunk", original)
    resumed = evaluate(store, model_id, digits_mlp, xte, yte, spec, progress=False)
    reference = evaluate(store, _model_row(store, "uninterrupted"), digits_mlp, xte, yte, spec, progress=False)
    reference_store_rows = _rows(store, reference.evaluation_id)
    assert _rows(store, resumed.evaluation_id) == reference_store_rows
    assert resumed.aa_robust_accuracy == reference.aa_robust_accuracy
    assert resumed.best_robust_accuracy == reference.best_robust_accuracy


def test_n_samples_beyond_the_split_is_refused(store, digits, digits_mlp):
    _, _, xte, yte = digits
    with pytest.raises(ValueError, match="exceeds the 360 samples"):
        evaluate(store, _model_row(store), digits_mlp, xte, yte, _spec(n_samples=361), progress=False)


def _count_rows(db_path):
    if not db_path.exists():
        return 0
    con = sqlite3.connect(db_path, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM sample_results").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        con.close()


def _cli(checkpoint, db_path):
    return [
        sys.executable,
        "-m",
        "bench.cli",
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--arch",
        "small_cnn",
        "--dataset",
        "digits",
        "--n-samples",
        "120",
        "--batch-size",
        "4",
        "--version",
        "standard",
        "--fmn-steps",
        "20",
        "--eps",
        "0.3",
        "--db",
        f"sqlite:///{db_path}",
        "--no-progress",
    ]


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_equals_uninterrupted(tmp_path, digits_cnn_checkpoint):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed_db = tmp_path / "killed.db"
    proc = subprocess.Popen(
        _cli(digits_cnn_checkpoint, killed_db), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while _count_rows(killed_db) < 12 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _count_rows(killed_db)
    assert 12 <= partial < 120 and partial % 4 == 0  # whole chunks only

    restarted = subprocess.run(
        _cli(digits_cnn_checkpoint, killed_db), env=env, capture_output=True, text=True, timeout=600
    )
    assert restarted.returncode == 0, restarted.stderr
    assert f"resuming evaluation #1: {partial}/120 samples already stored" in restarted.stdout
    clean_db = tmp_path / "clean.db"
    uninterrupted = subprocess.run(
        _cli(digits_cnn_checkpoint, clean_db), env=env, capture_output=True, text=True, timeout=600
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    def dump(db):
        con = sqlite3.connect(db)
        rows = con.execute(f"SELECT {', '.join(SAMPLE_COLUMNS)} FROM sample_results ORDER BY sample_id").fetchall()
        agg = con.execute(
            "SELECT status, clean_accuracy, aa_robust_accuracy, fmn_robust_accuracy, "
            "best_robust_accuracy, n_fmn_beat_aa FROM evaluations"
        ).fetchall()
        con.close()
        return rows, agg

    rows_killed, agg_killed = dump(killed_db)
    rows_clean, agg_clean = dump(clean_db)
    assert len(rows_killed) == 120
    assert len({r[0] for r in rows_killed}) == 120
    assert rows_killed == rows_clean
    assert agg_killed == agg_clean and agg_killed[0][0] == "complete"
    assert not math.isnan(agg_killed[0][2])


def test_worker_processes_give_the_same_rows(store, digits, digits_mlp):
    _, _, xte, yte = digits
    spec = _spec(n_samples=20)
    one = evaluate(store, _model_row(store, "one"), digits_mlp, xte, yte, spec, progress=False, workers=1)
    two = evaluate(store, _model_row(store, "two"), digits_mlp, xte, yte, spec, progress=False, workers=2)
    assert _rows(store, one.evaluation_id) == _rows(store, two.evaluation_id)
    assert two.aa_robust_accuracy == one.aa_robust_accuracy


def test_workers_are_refused_on_a_gpu_spec(store, digits, digits_mlp):
    _, _, xte, yte = digits
    with pytest.raises(ValueError, match="--workers > 1 is for CPU"):
        evaluate(store, _model_row(store), digits_mlp, xte, yte, _spec(device="cuda"), progress=False, workers=2)


def test_autoattack_clean_pass_disagreement_is_flagged_and_never_counted_robust(store, digits, digits_mlp, monkeypatch):
    # A randomised model can be right in our clean pass and wrong in AutoAttack's own (or the reverse). Such a
    # sample must not count as AutoAttack-robust unless both passes got it right, and the run is flagged.
    _, _, xte, yte = digits
    real = chunk_module.run_autoattack

    def disagreeing(model, x, y, **kw):
        out = real(model, x, y, **kw)
        wrong = (y[:2] + 1) % 10  # AutoAttack's pass "misclassifies" the first two samples of each chunk...
        out.clean_pred[:2] = wrong
        out.robust[:2] = False
        out.broken_by[0] = out.broken_by[1] = None
        mis = (out.clean_pred != y).nonzero().flatten()
        out.robust[mis[mis >= 2][:1]] = True  # ...and calls a sample our pass got wrong robust
        return out

    monkeypatch.setattr(chunk_module, "run_autoattack", disagreeing)
    summary = evaluate(store, _model_row(store), digits_mlp, xte, yte, _spec(), progress=False)
    rows = _rows(store, summary.evaluation_id)
    assert not any(r["aa_robust"] and not r["clean_correct"] for r in rows)
    assert all(r["best_robust"] <= r["aa_robust"] for r in rows)
    with store.session() as s:
        ev = s.get(Evaluation, summary.evaluation_id)
        assert "clean_pass_disagreement" in ev.flags and ev.unreliable
        assert ev.aa_robust_accuracy == pytest.approx(sum(r["aa_robust"] for r in rows) / len(rows))


@pytest.mark.slow
def test_digits_track_dense_model_has_no_best_known_distance_above_eps_where_autoattack_broke(tmp_path_factory, store):
    """The dense model of the built-in digits track, first 60 test digits, the track's protocol (AutoAttack-plus,
    L∞ eps 0.2, FMN 100 steps): plain FMN's distance exceeds eps on several samples AutoAttack broke at eps; the
    best-known distance never does."""
    from bench.checkpoints import load_checkpoint_model
    from bench.data import get_dataset_info, load_split, parse_eps
    from bench.track import TRACKS, dense_checkpoint

    track = TRACKS["digits"]
    path, _ = dense_checkpoint(track, root=tmp_path_factory.mktemp("track"))
    model = load_checkpoint_model(path, track.arch, track.dataset)
    x, y = load_split("digits", "test")
    spec = RunSpec(
        dataset="digits",
        n_samples=60,
        norm="Linf",
        eps=track.eps,
        eps_value=parse_eps(track.eps),
        version="plus",
        fmn_steps=100,
        batch_size=get_dataset_info("digits").default_batch_size,
        seed=0,
    )
    summary = evaluate(store, _model_row(store, "digits-dense"), model, x, y, spec, progress=False)
    rows = _rows(store, summary.evaluation_id)
    broken = [r for r in rows if r["clean_correct"] and r["aa_broken_by"] is not None]
    assert len(broken) >= 8
    # What the warm start is for: plain FMN overstates the distance of samples AutoAttack broke within eps.
    assert sum(r["fmn_distance"] is None or r["fmn_distance"] > spec.eps_value for r in broken) >= 2
    assert [r["sample_id"] for r in broken if r["best_distance"] > eps_float32(spec.eps_value)] == []
    for r in rows:
        _check_best_known(r, spec)
    assert "best_known_above_eps" not in summary.flags
    assert summary.n_fmn_above_best >= 2 and summary.fmn_local_optimality < 1


def test_an_autoattack_example_our_pass_does_not_find_adversarial_is_not_used(store, digits, digits_mlp, monkeypatch):
    # A randomised or input-dependent model can misclassify AutoAttack's example in AutoAttack's pass and not in ours.
    _, _, xte, yte = digits
    real = chunk_module.run_autoattack
    replaced = []

    def unreproducible(model, x, y, **kw):
        out = real(model, x, y, **kw)
        first = next(i for i, stage in enumerate(out.broken_by) if stage is not None)
        out.x_adv[first] = x[first]  # our pass classifies the clean input correctly
        replaced.append(first)
        return out

    monkeypatch.setattr(chunk_module, "run_autoattack", unreproducible)
    spec = _spec(n_samples=10)
    summary = evaluate(store, _model_row(store), digits_mlp, xte, yte, spec, progress=False)
    rows = _rows(store, summary.evaluation_id)
    odd = rows[replaced[0]]
    assert odd["aa_broken_by"] is not None and odd["aa_distance"] is None and odd["fmn_warm_distance"] is None
    assert odd["best_distance"] == odd["fmn_distance"] and odd["best_attack"] == "fmn"
    others = [r for r in rows if r["aa_broken_by"] is not None and r is not odd]
    assert others and all(r["aa_distance"] is not None for r in others)
    assert "autoattack_adversarial_not_reproduced" in summary.flags and summary.unreliable


def test_fmn_refusing_a_starting_point_leaves_the_chunk_without_autoattack_candidates(
    store, digits, digits_mlp, monkeypatch
):
    # The model's output changed between our check and FMN's own: nothing from AutoAttack is used for the chunk.
    _, _, xte, yte = digits
    real = chunk_module.minimum_norm

    def refusing(*args, **kw):
        if kw.get("starting_points") is not None:
            raise NotAdversarialError("every starting point must be adversarial")
        return real(*args, **kw)

    monkeypatch.setattr(chunk_module, "minimum_norm", refusing)
    summary = evaluate(store, _model_row(store), digits_mlp, xte, yte, _spec(n_samples=10), progress=False)
    rows = _rows(store, summary.evaluation_id)
    assert any(r["aa_broken_by"] is not None for r in rows)
    assert all(r["aa_distance"] is None and r["fmn_warm_distance"] is None for r in rows)
    assert all(r["best_distance"] == r["fmn_distance"] for r in rows)
    assert "autoattack_adversarial_not_reproduced" in summary.flags and summary.unreliable


def test_the_attacks_run_on_a_prepared_copy_and_the_callers_model_is_left_alone(store, digits, digits_cnn):
    # bench.performance.fast_model prepares the model (frozen parameters, the standard memory layout); the caller's
    # module keeps its parameters trainable, its layout and its hooks.
    _, _, xte, yte = digits
    before = {k: v.clone() for k, v in digits_cnn.state_dict().items()}
    summary = evaluate(store, _model_row(store, "cnn"), digits_cnn, xte, yte, _spec(n_samples=10), progress=False)
    assert all(p.requires_grad for p in digits_cnn.parameters())
    assert not digits_cnn._forward_pre_hooks and execution_settings(digits_cnn) is None
    assert all(p.is_contiguous() for p in digits_cnn.parameters())
    assert all(torch.equal(v, before[k]) for k, v in digits_cnn.state_dict().items())
    chunks, ev = _chunks_and_evaluation(store, summary.evaluation_id)
    assert [c.execution["channels_last"] for c in chunks] == [False]
    assert ev.provenance["execution"] == {**chunks[0].execution, "frozen_parameters": True, "tf32": False}


def _chunks_and_evaluation(store, evaluation_id):
    with store.session() as s:
        chunks = s.scalars(select(EvaluationChunk).where(EvaluationChunk.evaluation_id == evaluation_id)).all()
        return chunks, s.get(Evaluation, evaluation_id)


def _bits(rows: list[dict]) -> list[dict]:
    # Floats by their bits: == would take -0.0 for 0.0.
    return [{k: v.hex() if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def test_default_evaluation_rows_equal_the_plain_models_bit_for_bit(store, digits, digits_cnn, monkeypatch):
    """The protocol promises the same per-sample results whatever the execution settings: by default the evaluator
    prepares the model without channels_last (which changed FMN distances in the last place), and its rows are those
    of the plain model, attacked with no preparation at all, in every bit."""
    monkeypatch.delenv(CHANNELS_LAST_ENV, raising=False)
    _, _, xte, yte = digits
    spec = _spec(n_samples=20)
    summary = evaluate(store, _model_row(store, "cnn"), digits_cnn, xte, yte, spec, progress=False)
    plain_model = copy.deepcopy(digits_cnn)  # trainable parameters, standard layout, no hooks: as the caller holds it
    plain = []
    for index, chunk in enumerate(spec.chunks()):
        rows, _, _, _ = attack_chunk(
            plain_model, xte[chunk.start : chunk.stop], yte[chunk.start : chunk.stop], list(chunk), spec,
            run_checks=index == 0,
        )  # fmt: skip
        plain += rows
    stored = _rows(store, summary.evaluation_id)
    assert any(r["aa_robust"] for r in stored) and any(r["fmn_warm_distance"] is not None for r in stored)
    assert _bits(stored) == _bits(plain)
    chunks, _ = _chunks_and_evaluation(store, summary.evaluation_id)
    assert {c.execution["channels_last"] for c in chunks} == {False}


def test_channels_last_is_opted_in_by_the_environment_and_recorded(store, digits, digits_cnn, digits_mlp, monkeypatch):
    _, _, xte, yte = digits
    monkeypatch.setenv(CHANNELS_LAST_ENV, "1")
    cnn = evaluate(store, _model_row(store, "cnn"), digits_cnn, xte, yte, _spec(n_samples=10), progress=False)
    assert [c.execution["channels_last"] for c in _chunks_and_evaluation(store, cnn.evaluation_id)[0]] == [True]
    # Only where it can speed the network up: a network without convolutions keeps the standard layout.
    mlp = evaluate(store, _model_row(store, "mlp"), digits_mlp, xte, yte, _spec(n_samples=10), progress=False)
    assert [c.execution["channels_last"] for c in _chunks_and_evaluation(store, mlp.evaluation_id)[0]] == [False]
    monkeypatch.setenv(CHANNELS_LAST_ENV, "yes")
    with pytest.raises(ValueError, match=f"{CHANNELS_LAST_ENV}='yes' is neither 1 \\(channels_last\\) nor 0"):
        evaluate(store, _model_row(store, "other"), digits_cnn, xte, yte, _spec(n_samples=10), progress=False)


def test_only_result_relevant_settings_count_as_mixed():
    from bench.evaluation.flags import result_settings

    base = {"device": "cuda:0", "channels_last": False, "frozen_parameters": True, "tf32": False,
            "cudnn_deterministic": True}  # fmt: skip
    assert result_settings({**base, "device": "cuda:1", "frozen_parameters": False}) == result_settings(base)
    for key, value in (("channels_last", True), ("tf32", True), ("cudnn_deterministic", False)):
        assert result_settings({**base, key: value}) != result_settings(base), key
    assert result_settings(None) is None


def test_an_evaluation_resumed_under_another_layout_says_so_and_is_flagged(store, digits, digits_cnn, monkeypatch):
    # Begun with APBENCH_CHANNELS_LAST=1 (one chunk of two), finished without it: the rows of the two chunks come
    # from two orders of float additions, so the evaluation carries mixed_execution_settings (not unreliable) and
    # the resuming run says why in one line.
    _, _, xte, yte = digits
    spec = _spec(n_samples=20)
    model_id = _model_row(store, "cnn")
    evaluation_id = open_evaluation(store, model_id, spec)
    monkeypatch.setenv(CHANNELS_LAST_ENV, "1")
    assert evaluate_chunks(store, evaluation_id, digits_cnn, xte, yte, spec, [0]) == 1
    monkeypatch.delenv(CHANNELS_LAST_ENV)
    lines = []
    summary = evaluate(store, model_id, digits_cnn, xte, yte, spec, progress=False, log=lines.append)
    chunks, ev = _chunks_and_evaluation(store, summary.evaluation_id)
    assert sorted((c.chunk_index, c.execution["channels_last"]) for c in chunks) == [(0, True), (1, False)]
    assert "mixed_execution_settings" in summary.flags and not summary.unreliable
    assert [e["channels_last"] for e in ev.provenance["execution"]] == [True, False]
    (note,) = [line for line in lines if line.startswith("note:")]
    assert "channels_last=True" in note and "channels_last=False" in note and "mixed_execution_settings" in note
    # Resumed under the settings it began with: no note, no flag.
    other = _model_row(store, "cnn-same")
    evaluation_id = open_evaluation(store, other, spec)
    assert evaluate_chunks(store, evaluation_id, digits_cnn, xte, yte, spec, [0]) == 1
    lines.clear()
    summary = evaluate(store, other, digits_cnn, xte, yte, spec, progress=False, log=lines.append)
    assert "mixed_execution_settings" not in summary.flags
    assert not [line for line in lines if line.startswith("note:")]


def test_the_executor_interface_gives_the_rows_of_one_evaluate_call(store, digits, digits_mlp):
    """open_evaluation, missing_chunks, evaluate_chunks on subsets in any order, finalize_evaluation: the rows and
    figures of one evaluate() call."""
    _, _, xte, yte = digits
    spec = _spec()
    reference = evaluate(store, _model_row(store, "whole"), digits_mlp, xte, yte, spec, progress=False)
    model_id = _model_row(store, "in-parts")
    evaluation_id = open_evaluation(store, model_id, spec)
    assert open_evaluation(store, model_id, spec) == evaluation_id
    assert missing_chunks(store, evaluation_id, spec) == [0, 1, 2]
    lines = []
    assert evaluate_chunks(store, evaluation_id, digits_mlp, xte, yte, spec, [2], worker="w1", log=lines.append) == 1
    assert lines == [lines[0]] and lines[0].startswith("chunk 2 (samples 20-29) committed after")
    assert finalize_evaluation(store, evaluation_id, spec) is None
    assert missing_chunks(store, evaluation_id, spec) == [0, 1]
    assert evaluate_chunks(store, evaluation_id, digits_mlp, xte, yte, spec, [1, 2, 0], worker="w2") == 2
    assert missing_chunks(store, evaluation_id, spec) == []
    summary = finalize_evaluation(store, evaluation_id, spec)
    assert _rows(store, evaluation_id) == _rows(store, reference.evaluation_id)
    same = ("clean_accuracy", "aa_robust_accuracy", "best_robust_accuracy", "fmn_median_distance", "flags", "intervals")
    assert [getattr(summary, k) for k in same] == [getattr(reference, k) for k in same]
    with store.session() as s:
        workers = s.scalars(
            select(EvaluationChunk.worker)
            .where(EvaluationChunk.evaluation_id == evaluation_id)
            .order_by(EvaluationChunk.chunk_index)
        ).all()
    assert workers == ["w2", "w2", "w1"]
    # evaluate() on it now reuses it.
    again = evaluate(store, model_id, digits_mlp, xte, yte, spec, progress=False)
    assert again.reused and again.evaluation_id == evaluation_id
