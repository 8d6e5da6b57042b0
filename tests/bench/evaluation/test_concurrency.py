"""Many processes on one evaluation, on SQLite and on a real PostgreSQL server: idempotent chunk commits, race-free
get-or-create and finalisation, the same per-sample rows and aggregates as one process; the 0005 migration of a
store written before per-chunk bookkeeping; two identical ``bench evaluate`` runs; workers that die with their
parent, and workers that fail. Every process here is a real one (multiprocessing spawn or a subprocess), never a
thread or a mock."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict

import pytest
import torch
from alembic import command
from sqlalchemy import create_engine, delete, func, inspect, select
from sqlalchemy.orm import Session

from bench.data import load_split
from bench.evaluate import evaluate, evaluate_chunks, finalize_evaluation, missing_chunks, open_evaluation
from bench.evaluation.chunk import attack_one_chunk
from bench.evaluation.commits import commit_chunk
from bench.models import build_model
from bench.provenance import utcnow
from bench.records import RECORD_COLUMNS
from bench.spec import RunSpec
from bench.store import Evaluation, Model, SampleResult, Store
from bench.store.db import alembic_config
from bench.store.lifecycle import remove_models
from bench.store.schema import EvaluationChunk

SAMPLE_COLUMNS = list(RECORD_COLUMNS)
AGGREGATES = (
    "status",
    "n_samples",
    "clean_accuracy",
    "aa_robust_accuracy",
    "fmn_robust_accuracy",
    "best_robust_accuracy",
    "fmn_median_distance",
    "n_fmn_beat_aa",
    "flags",
    "unreliable",
    "best_median_distance",
    "fmn_local_optimality",
    "fmn_best_median_ratio",
    "n_fmn_above_best",
)
# 20 samples in 4 chunks of 5; at eps 0.1 the 4-epoch small_cnn keeps some samples robust (square runs).
SPEC = RunSpec(
    dataset="digits",
    n_samples=20,
    norm="Linf",
    eps="0.1",
    eps_value=0.1,
    version="standard",
    fmn_steps=20,
    batch_size=5,
    seed=0,
)
PROCESS_TIMEOUT_S = 600


def _load_model(checkpoint) -> torch.nn.Module:
    model = build_model("small_cnn", "digits")
    model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return model.eval()


def _model_row(store, name: str) -> int:
    with store.session() as s:
        row = Model(
            name=name, checkpoint_sha256=name.ljust(64, "0"), arch="small_cnn", dataset="digits", created_at=utcnow()
        )
        s.add(row)
        s.flush()
        return row.id


def _rows(store, evaluation_id) -> list[dict]:
    with store.session() as s:
        rows = s.scalars(
            select(SampleResult).where(SampleResult.evaluation_id == evaluation_id).order_by(SampleResult.sample_id)
        ).all()
        return [{c: getattr(r, c) for c in SAMPLE_COLUMNS} for r in rows]


def _evaluation(store, evaluation_id) -> dict:
    with store.session() as s:
        ev = s.get(Evaluation, evaluation_id)
        return {c.name: getattr(ev, c.name) for c in Evaluation.__table__.columns}


def _chunks(store, evaluation_id) -> list[EvaluationChunk]:
    with store.session() as s:
        return s.scalars(
            select(EvaluationChunk)
            .where(EvaluationChunk.evaluation_id == evaluation_id)
            .order_by(EvaluationChunk.chunk_index)
        ).all()


def _count(store, table) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(table))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_cnn_checkpoint):
    """One process, one ``evaluate`` call: the per-sample rows and aggregates every split of the work must give."""
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('reference') / 'results.db'}")
    try:
        x, y = load_split("digits", "test")
        summary = evaluate(
            store, _model_row(store, "single"), _load_model(digits_cnn_checkpoint), x, y, SPEC, progress=False
        )
        ev = _evaluation(store, summary.evaluation_id)
        assert 0 < ev["aa_robust_accuracy"] < ev["clean_accuracy"]  # robust samples and broken ones: a real mix
        yield {
            "rows": _rows(store, summary.evaluation_id),
            "evaluation": ev,
            "chunks": _chunks(store, summary.evaluation_id),
            "url": store.url,
        }
    finally:
        store.dispose()


# ------------------------------------------------------------------------------------------ worker processes


def _in_processes(target, args_list: list[tuple]) -> list:
    """Run ``target(*args, barrier)`` in one spawned process per ``args`` (all released together once started);
    returns their results in order, or fails with every error's traceback."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args_list))
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(i, target, args, barrier, queue), daemon=True)
        for i, args in enumerate(args_list)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in procs:
            i, ok, value = queue.get(timeout=PROCESS_TIMEOUT_S)
            if ok:
                results[i] = value
            else:
                errors.append(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert errors == [], "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return [results[i] for i in range(len(procs))]


def _child(i, target, args, barrier, queue) -> None:
    torch.set_num_threads(1)
    try:
        queue.put((i, True, target(*args, barrier)))
    except BaseException:
        queue.put((i, False, traceback.format_exc()))


def _attack_worker(url, evaluation_id, checkpoint, chunk_ids, worker, barrier):
    store = Store(url)
    try:
        model = _load_model(checkpoint)
        x, y = load_split("digits", "test")
        barrier.wait(timeout=PROCESS_TIMEOUT_S)
        return evaluate_chunks(store, evaluation_id, model, x, y, SPEC, chunk_ids, worker=worker)
    finally:
        store.dispose()


def _finalize_worker(url, evaluation_id, barrier):
    store = Store(url)
    try:
        barrier.wait(timeout=PROCESS_TIMEOUT_S)
        summary = finalize_evaluation(store, evaluation_id, SPEC)
        return None if summary is None else asdict(summary)
    finally:
        store.dispose()


def _open_worker(url, model_id, barrier):
    store = Store(url)
    try:
        barrier.wait(timeout=PROCESS_TIMEOUT_S)
        return open_evaluation(store, model_id, SPEC)
    finally:
        store.dispose()


# ----------------------------------------------------------------------------------------- idempotent writes


def test_a_chunk_committed_twice_leaves_one_row_per_sample_and_no_error(any_store, digits, digits_cnn):
    _, _, x, y = digits
    evaluation_id = open_evaluation(any_store, _model_row(any_store, "twice"), SPEC)
    assert evaluate_chunks(any_store, evaluation_id, digits_cnn, x, y, SPEC, [0]) == 1
    # A requeued task that attacked chunk 0 again, not knowing it was committed: its commit is a no-op.
    again = attack_one_chunk(digits_cnn, x[:5], y[:5], SPEC, 0, worker="requeued")
    assert commit_chunk(any_store, evaluation_id, again) is False
    # A task handed chunks 0 and 1 skips the committed one.
    assert evaluate_chunks(any_store, evaluation_id, digits_cnn, x, y, SPEC, [0, 1]) == 1
    assert missing_chunks(any_store, evaluation_id, SPEC) == [2, 3]
    rows = _rows(any_store, evaluation_id)
    assert [r["sample_id"] for r in rows] == list(range(10))
    chunks = _chunks(any_store, evaluation_id)
    assert [(c.chunk_index, c.first_sample, c.n_samples, c.worker) for c in chunks] == [
        (0, 0, 5, None),
        (1, 5, 5, None),
    ]
    # The per-sample inserts are idempotent too: samples stored without their chunk row (as by a crash between two
    # statements of another writer) are kept, and the chunk commits around them.
    with any_store.session() as s:
        s.execute(delete(EvaluationChunk).where(EvaluationChunk.chunk_index == 0))
    assert commit_chunk(any_store, evaluation_id, again) is True
    assert _rows(any_store, evaluation_id) == rows
    assert [c.worker for c in _chunks(any_store, evaluation_id)] == ["requeued", None]
    assert finalize_evaluation(any_store, evaluation_id, SPEC) is None  # chunks 2 and 3 missing
    # bench db rm takes the chunk rows with the evaluation.
    remove_models(any_store, ["twice"])
    assert (_count(any_store, EvaluationChunk), _count(any_store, SampleResult)) == (0, 0)


@pytest.mark.parametrize("split", ["interleaved", "racing"])
def test_four_worker_processes_on_one_evaluation_equal_one_process(store_url, reference, digits_cnn_checkpoint, split):
    """Four spawned processes call evaluate_chunks on one evaluation, on interleaved chunk subsets or all racing
    for the same full set: no error, each chunk committed once, the reference's rows and aggregates."""
    store = Store(store_url)
    try:
        evaluation_id = open_evaluation(store, _model_row(store, f"four-{split}"), SPEC)
        n_chunks = len(SPEC.chunks())
        if split == "interleaved":
            subsets = [list(range(k, n_chunks, 4)) for k in range(4)]
        else:
            # Every process gets every chunk; processes 0 and 1 in the same order, 2 and 3 from chunk 2 on: each
            # pair races for the same chunk at the same time (four in lockstep would only quadruple the work).
            subsets = [[(i + 2 * (k // 2)) % n_chunks for i in range(n_chunks)] for k in range(4)]
        args = [(store_url, evaluation_id, digits_cnn_checkpoint, ids, f"w{k}") for k, ids in enumerate(subsets)]
        committed = _in_processes(_attack_worker, args)
        assert sum(committed) == n_chunks  # racing processes attack a chunk twice at worst, never commit it twice
        if split == "interleaved":
            assert committed == [1, 1, 1, 1]
        assert missing_chunks(store, evaluation_id, SPEC) == []
        assert _count(store, SampleResult) == SPEC.n_samples
        assert _rows(store, evaluation_id) == reference["rows"]

        summary = finalize_evaluation(store, evaluation_id, SPEC)
        ev = _evaluation(store, evaluation_id)
        assert {k: ev[k] for k in AGGREGATES} == {k: reference["evaluation"][k] for k in AGGREGATES}
        for key in ("broken_by", "stage_robust_accuracy"):
            assert ev["provenance"][key] == reference["evaluation"]["provenance"][key]
        chunks = _chunks(store, evaluation_id)
        if split == "interleaved":
            assert len({(c.host, c.pid) for c in chunks}) == 4
        assert {c.worker for c in chunks} <= {"w0", "w1", "w2", "w3"}
        # Attack seconds: every stage summed over all chunks, whichever process attacked them.
        stages = {stage for c in chunks for stage in c.attack_seconds}
        assert stages == {"clean", "fmn", "fmn_from_autoattack", *SPEC.attacks}
        assert ev["attack_seconds"] == {s: math.fsum(c.attack_seconds.get(s, 0.0) for c in chunks) for s in stages}
        assert summary.attack_seconds == ev["attack_seconds"]
        assert ev["provenance"]["chunks"]["n"] == n_chunks
        assert ev["provenance"]["execution"]["channels_last"] is False  # the default layout (bench.evaluate)
    finally:
        store.dispose()


def test_concurrent_and_repeated_finalisation_give_one_row(store_url, digits, digits_cnn):
    _, _, x, y = digits
    store = Store(store_url)
    try:
        evaluation_id = open_evaluation(store, _model_row(store, "finalised"), SPEC)
        evaluate_chunks(store, evaluation_id, digits_cnn, x, y, SPEC, range(len(SPEC.chunks())))
        summaries = _in_processes(_finalize_worker, [(store_url, evaluation_id)] * 4)
        assert all(s is not None for s in summaries)
        assert all(s == summaries[0] for s in summaries)
        stored = _evaluation(store, evaluation_id)
        assert stored["status"] == "complete"
        assert asdict(finalize_evaluation(store, evaluation_id, SPEC)) == summaries[0]
        assert _evaluation(store, evaluation_id) == stored  # a second finalisation rewrites nothing
        # The evaluation finished when its last chunk was committed, whoever finalised it.
        assert stored["finished_at"] == max(c.finished_at for c in _chunks(store, evaluation_id))
    finally:
        store.dispose()


def test_six_processes_opening_one_evaluation_get_one_row(store_url):
    store = Store(store_url)
    try:
        model_id = _model_row(store, "opened")
        ids = _in_processes(_open_worker, [(store_url, model_id)] * 6)
        assert len(set(ids)) == 1
        assert _count(store, Evaluation) == 1
        assert open_evaluation(store, model_id, SPEC) == ids[0]
        # --overwrite replaces it by a new, empty evaluation (SQLite may reuse the id); still one row.
        opened_at = _evaluation(store, ids[0])["started_at"]
        fresh = open_evaluation(store, model_id, SPEC, overwrite=True)
        assert _count(store, Evaluation) == 1 and _evaluation(store, fresh)["started_at"] > opened_at
    finally:
        store.dispose()


def test_a_spec_other_than_the_evaluations_is_refused(any_store, digits, digits_cnn):
    _, _, x, y = digits
    evaluation_id = open_evaluation(any_store, _model_row(any_store, "other-spec"), SPEC)
    other = RunSpec(**{**asdict(SPEC), "eps": "0.2", "eps_value": 0.2})
    with pytest.raises(ValueError, match=f"evaluation #{evaluation_id} was opened under another run spec"):
        evaluate_chunks(any_store, evaluation_id, digits_cnn, x, y, other, [0])
    with pytest.raises(ValueError, match="chunk indices \\[4\\] out of range: the spec has 4 chunks, 0 to 3"):
        evaluate_chunks(any_store, evaluation_id, digits_cnn, x, y, SPEC, [4])
    with pytest.raises(ValueError, match="no evaluation #999"):
        missing_chunks(any_store, 999, SPEC)


# ---------------------------------------------------------------------------------------------- migration


def _store_at_0004(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004_model_ranked")
    finally:
        engine.dispose()


def _old_aggregates(chunks) -> tuple[dict, list, dict]:
    """attack_seconds, flags and provenance of a running evaluation as the evaluator before 0005 stored them: each
    commit added its chunk's seconds, its flags and its AutoAttack warnings to the evaluation's row."""
    seconds: dict[str, float] = {}
    flags: set[str] = set()
    warnings: list[str] = []
    for c in chunks:
        seconds = {k: seconds.get(k, 0.0) + c.attack_seconds.get(k, 0.0) for k in {*seconds, *c.attack_seconds}}
        flags |= set(c.flags)
        warnings += c.warnings
    return seconds, sorted(flags), ({"autoattack_warnings": warnings} if warnings else {})


def test_a_store_at_0004_upgrades_in_place_and_a_running_evaluation_resumes(
    store_url, reference, digits_cnn_checkpoint
):
    """A store written by the evaluator before 0005 (schema 0004): one finished evaluation and one killed after two of
    its four chunks. After the upgrade the finished one reads unchanged and is not recomputed; the running one
    resumes at its missing chunks and ends with the reference's rows and aggregates, its attack seconds summing the
    old chunks' and the new ones'. A downgrade puts a running evaluation's totals back in its row."""
    _store_at_0004(store_url)
    ref = reference["evaluation"]
    old_seconds, old_flags, old_provenance = _old_aggregates(reference["chunks"][:2])
    engine = create_engine(store_url)
    try:
        assert "evaluation_chunks" not in inspect(engine).get_table_names()
        with Session(engine) as s, s.begin():
            done = Model(
                name="done", checkpoint_sha256="a" * 64, arch="small_cnn", dataset="digits", created_at=utcnow()
            )
            killed = Model(
                name="killed", checkpoint_sha256="b" * 64, arch="small_cnn", dataset="digits", created_at=utcnow()
            )
            s.add_all([done, killed])
            s.flush()
            finished = Evaluation(**{k: v for k, v in ref.items() if k not in ("id", "model_id")}, model_id=done.id)
            running = Evaluation(
                **{k: ref[k] for k in ("spec_hash", "protocol_hash", "spec", "n_samples", "started_at")},
                model_id=killed.id,
                status="running",
                flags=old_flags,
                unreliable=False,
                attack_seconds=old_seconds,
                provenance=old_provenance,
            )
            s.add_all([finished, running])
            s.flush()
            s.add_all(SampleResult(evaluation_id=finished.id, **row) for row in reference["rows"])
            s.add_all(SampleResult(evaluation_id=running.id, **row) for row in reference["rows"][:10])
            ids = {"done": (done.id, finished.id), "killed": (killed.id, running.id)}
        with engine.connect() as conn:
            before_evaluations = conn.execute(select(Evaluation.__table__).order_by(Evaluation.id)).all()
            before_samples = conn.execute(select(SampleResult.__table__).order_by(SampleResult.id)).all()
    finally:
        engine.dispose()

    store = Store(store_url)  # upgrades in place
    try:
        with store.engine.connect() as conn:
            assert conn.execute(select(Evaluation.__table__).order_by(Evaluation.id)).all() == before_evaluations
            assert conn.execute(select(SampleResult.__table__).order_by(SampleResult.id)).all() == before_samples
        finished_id, running_id = ids["done"][1], ids["killed"][1]
        moved = _chunks(store, finished_id)
        assert [(c.chunk_index, c.worker) for c in moved] == [(i, "migrated") for i in range(4)]
        assert moved[0].attack_seconds == ref["attack_seconds"] and all(c.attack_seconds == {} for c in moved[1:])
        assert moved[0].flags == ref["flags"]
        assert missing_chunks(store, finished_id, SPEC) == []
        before = _evaluation(store, finished_id)
        summary = finalize_evaluation(store, finished_id, SPEC)
        assert _evaluation(store, finished_id) == before  # finished: read as stored, never recomputed
        assert (summary.aa_robust_accuracy, summary.attack_seconds) == (
            ref["aa_robust_accuracy"],
            ref["attack_seconds"],
        )
        assert missing_chunks(store, running_id, SPEC) == [2, 3]

        # Down and up again: the running evaluation's totals go back to its row, then to its first chunk.
        command.downgrade(alembic_config(store_url), "0004_model_ranked")
        assert (_evaluation(store, running_id)["attack_seconds"], _evaluation(store, running_id)["flags"]) == (
            pytest.approx(old_seconds),
            old_flags,
        )
        store.upgrade()
        assert missing_chunks(store, running_id, SPEC) == [2, 3]

        logged = []
        x, y = load_split("digits", "test")
        resumed = evaluate(
            store, ids["killed"][0], _load_model(digits_cnn_checkpoint), x, y, SPEC, progress=False, log=logged.append
        )
        assert resumed.evaluation_id == running_id
        assert f"resuming evaluation #{running_id}: 10/20 samples already stored" in logged
        assert _rows(store, running_id) == reference["rows"]
        ev = _evaluation(store, running_id)
        assert {k: ev[k] for k in AGGREGATES} == {k: ref[k] for k in AGGREGATES}
        new_chunks = _chunks(store, running_id)[2:]
        assert [c.worker for c in _chunks(store, running_id)] == ["migrated", "migrated", None, None]
        for stage in ref["attack_seconds"]:
            expected = old_seconds[stage] + sum(c.attack_seconds[stage] for c in new_chunks)
            assert ev["attack_seconds"][stage] == pytest.approx(expected)
    finally:
        store.dispose()


# ------------------------------------------------------------------------------------ bench evaluate, twice


def _bench(checkpoint, url, *extra: str) -> list[str]:
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
        "200",
        "--batch-size",
        "4",
        "--version",
        "standard",
        "--fmn-steps",
        "20",
        "--eps",
        "0.3",
        "--threads",
        "1",
        "--db",
        url,
        "--no-progress",
        *extra,
    ]


def _stored(url, table=Evaluation.__table__) -> int:
    """Rows of ``table`` in the store at ``url`` as another process writes it (0 before the store exists)."""
    if url.startswith("sqlite:///") and not os.path.exists(url.removeprefix("sqlite:///")):
        return 0  # connecting would create the file the run is about to create
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if table.name not in inspect(conn).get_table_names():
                return 0
            return conn.execute(select(func.count()).select_from(table)).scalar()
    finally:
        engine.dispose()


def _wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: " + proc.stdout.read()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_identical_evaluate_waits_for_the_first_and_reuses_its_result(store_url, digits_cnn_checkpoint):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        _bench(digits_cnn_checkpoint, store_url), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # The first run opens its evaluation once it holds the evaluation's lock.
        _wait_for(lambda: _stored(store_url) == 1, first, "the first run opened its evaluation")
        second = subprocess.run(
            _bench(digits_cnn_checkpoint, store_url), env=env, capture_output=True, text=True, timeout=600
        )
        first_out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_out
    assert second.returncode == 0, second.stdout + second.stderr
    for out in (first_out, second.stdout + second.stderr):
        assert "Traceback" not in out and "Error:" not in out, out
    assert "waiting" not in first_out
    waiting = re.findall(
        r"evaluation #1 of (\S+) is running \(pid (\d+) on (\S+), chunks (\d+)/50 done\); waiting…", second.stdout
    )
    assert len(waiting) == 1, second.stdout
    name, pid, host, done = waiting[0]
    assert int(pid) == first.pid and host == os.uname().nodename and int(done) < 50
    assert name in first_out
    assert "reusing the finished evaluation #1" in second.stdout
    # Both print the same figures: the second's are the first's stored evaluation.
    figures = [line for line in first_out.splitlines() if "robust" in line or "clean accuracy" in line]
    assert figures and all(line in second.stdout for line in figures)
    store = Store(store_url)
    try:
        assert _count(store, Evaluation) == 1 and _count(store, SampleResult) == 200
        assert _count(store, EvaluationChunk) == 50
    finally:
        store.dispose()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait() is missing


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent_on_kill_9(tmp_path, digits_cnn_checkpoint):
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _bench(digits_cnn_checkpoint, url, "--workers", "2"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    workers: list[int] = []
    try:
        # A committed chunk: the pool's workers are past their start (which arms the parent-death signal; a worker
        # still starting exits when its start ends, see bench.processes.die_with_parent) and attacking.
        _wait_for(lambda: _stored(url, EvaluationChunk.__table__) >= 1, proc, "the workers committed a chunk")
        workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic()
        while any(_alive(p) for p in workers) and time.monotonic() - killed_at < 5:
            time.sleep(0.05)
        survivors = [p for p in workers if _alive(p)]
        assert survivors == [], f"pool workers {survivors} outlived their parent by 5 s"
        out, _ = proc.communicate(timeout=60)  # EOF: no process holds the pipe any more
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    assert "Traceback" not in out and "BrokenPipe" not in out, out


# ------------------------------------------------------------------------------------ worker processes that fail

# Evaluates, through the public API with two worker processes, a model that works in this process and fails in a
# worker as $FAIL_MODE says: its unpickling raises (a start-up error), ends the process (a start that never
# reports), its forward pass kills the process (the out-of-memory killer) or raises (an error while attacking).
_FAILING_WORKERS = """
import json, multiprocessing, os, signal, sys

import torch
from torch import nn

import apbench

MODE = os.environ["FAIL_MODE"]


def in_worker() -> bool:
    return multiprocessing.parent_process() is not None


class FailingInWorkers(nn.Sequential):
    def __setstate__(self, state):
        super().__setstate__(state)
        if in_worker():
            with open(os.environ["STARTS_LOG"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            if MODE == "raise":
                raise OSError("the weights are on a disk this worker cannot read")
            if MODE == "exit":
                os._exit(3)

    def forward(self, x):
        if in_worker() and MODE == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        if in_worker() and MODE == "job_error":
            raise ArithmeticError("no logits for this chunk")
        return super().forward(x)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = FailingInWorkers(nn.Flatten(), nn.Linear(64, 10))
    try:
        apbench.evaluate(
            model, dataset="digits", db=sys.argv[1], workers=2, n_samples=8, batch_size=4, version="standard",
            fmn_steps=5,
        )
    except Exception as err:
        cause = err.__cause__
        print(json.dumps({"type": type(err).__name__, "message": str(err), "cause": type(cause).__name__,
                          "cause_text": str(cause)}))
        sys.exit(1)
"""


@pytest.mark.parametrize(
    "mode, error, message",
    [
        (
            "raise",
            "WorkerError",
            r"worker process (\d+) could not start: OSError: the weights are on a disk this worker cannot read; "
            r"--workers 1 attacks in this process instead",
        ),
        pytest.param(
            "exit",
            "WorkerError",
            r"worker process (\d+) ended \(exit status 3\) while starting; any error it printed is above",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "killed",
            "WorkerError",
            r"worker process (\d+) ended \(killed by SIGKILL\) while attacking chunk [01]; the chunks committed are "
            r"kept: run the same command again to resume \(with fewer than 2 workers if memory ran out\)",
            marks=pytest.mark.slow,
        ),
        pytest.param("job_error", "ArithmeticError", r"no logits for this chunk", marks=pytest.mark.slow),
    ],
)
def test_a_failing_worker_process_ends_the_evaluation_with_one_line_naming_its_error(tmp_path, mode, error, message):
    """A multiprocessing.Pool restarted a worker whose start-up raised, forever (the evaluation never ended), and
    waited forever for a worker killed in the middle of a chunk. Each worker now starts once; the evaluation ends
    at the first failure with one line naming it, and no worker outlives it."""
    script = tmp_path / "failing_workers.py"
    script.write_text(_FAILING_WORKERS)
    starts = tmp_path / "starts.log"
    env = {**os.environ, "FAIL_MODE": mode, "STARTS_LOG": str(starts), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'results.db'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["type"] == error, outcome
    found = re.fullmatch(message, outcome["message"])
    assert found, outcome["message"]
    started = [int(pid) for pid in starts.read_text().split()]
    assert 1 <= len(started) <= 2, f"workers started {len(started)} times: restarted"
    if found.groups():
        assert int(found[1]) in started
    if mode == "job_error":  # raised again here as the worker raised it, its traceback attached
        assert outcome["cause"] == "WorkerTraceback" and "no logits for this chunk" in outcome["cause_text"]
        assert "Traceback (most recent call last)" in outcome["cause_text"]
    assert [pid for pid in started if _alive(pid)] == []


def test_a_model_the_workers_cannot_receive_is_refused_in_one_line(store, digits, digits_mlp):
    _, _, x, y = digits
    model = copy.deepcopy(digits_mlp)
    model.postprocess = lambda logits: logits  # a lambda does not pickle
    with pytest.raises(ValueError) as err:
        evaluate(store, _model_row(store, "lambda"), model, x, y, SPEC, progress=False, workers=2)
    assert re.fullmatch(
        r"the worker processes cannot receive the model \((PicklingError|AttributeError): Can't pickle .*lambda.*\); "
        r"define its class in an importable module, or use --workers 1",
        str(err.value),
    ), str(err.value)


_UNGUARDED_SCRIPT = """
import sys

import torch
from torch import nn

import apbench

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
apbench.evaluate(
    model, dataset="digits", db=sys.argv[1], workers=2, n_samples=8, batch_size=4, version="standard", fmn_steps=5
)
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_ends_with_the_fix_instead_of_waiting_forever(tmp_path):
    """Each spawned worker runs the calling script again; one that calls evaluate() outside ``if __name__ ==
    "__main__"`` waited for the lock its parent holds, and the parent for the worker, forever."""
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'results.db'}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert re.fullmatch(
        r"bench\.evaluation\.workers\.WorkerError: worker process \d+ ended \(exit status 1\) while starting; any "
        r"error it printed is above",
        run.stderr.strip().splitlines()[-1],
    ), run.stderr
    assert (
        "RuntimeError: evaluate() was called while a worker process was starting: worker processes run the calling "
        'script again; call it under `if __name__ == "__main__":`'
    ) in run.stderr
