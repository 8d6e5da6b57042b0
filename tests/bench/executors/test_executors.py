"""bench evaluate --executor slurm|local and bench status.

The SLURM tests submit real job arrays to the single-node SLURM that ``slurm_cluster`` starts (scripts/
slurm-test-cluster), against a real PostgreSQL server (``pg_url``); their per-sample rows must equal those of an
in-process run of the same spec, chunk by chunk, whatever task attacked which chunk. One task is killed by
``scancel`` in the middle of a chunk (the test hook APBENCH_TEST_STALL holds it inside a forward pass) and the
same command is submitted again: only the missing chunk runs, and the evaluation ends equal to the in-process run.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from bench.cli import main
from bench.executors import (
    STALL_ENV,
    ExecutorError,
    ExecutorOptions,
    executor_options,
    load_executor_config,
    shard_chunks,
)
from bench.store import Evaluation, SampleResult, Store
from bench.store.schema import EvaluationChunk
from tests.cli import one_line_error

N, BATCH = 60, 10
N_CHUNKS = N // BATCH
# A cheap protocol: AutoAttack-standard and a short FMN on 60 digits, six chunks of ten.
SPEC_ARGS = ["--n-samples", str(N), "--batch-size", str(BATCH), "--version", "standard", "--fmn-steps", "10"]
AGGREGATES = (
    "clean_accuracy",
    "aa_robust_accuracy",
    "fmn_robust_accuracy",
    "best_robust_accuracy",
    "fmn_median_distance",
    "n_fmn_beat_aa",
    "best_median_distance",
    "fmn_local_optimality",
    "status",
    "n_samples",
)


def _evaluate(checkpoint, db: str, *extra: str):
    args = ["evaluate", "--checkpoint", str(checkpoint), "--arch", "small_cnn", "--dataset", "digits", *SPEC_ARGS]
    return CliRunner().invoke(main, [*args, "--db", db, "--no-progress", *extra])


def _rows(url: str) -> list[dict]:
    """Every per-sample row of the store's only evaluation, without the row and evaluation ids."""
    columns = [c.key for c in SampleResult.__table__.columns if c.key not in ("id", "evaluation_id")]
    store = Store(url, read_only=True)
    try:
        with store.session() as s:
            records = s.scalars(select(SampleResult).order_by(SampleResult.sample_id)).all()
            return [{k: getattr(r, k) for k in columns} for r in records]
    finally:
        store.dispose()


def _aggregates(url: str) -> dict:
    store = Store(url, read_only=True)
    try:
        with store.session() as s:
            (ev,) = s.scalars(select(Evaluation)).all()
            return {k: getattr(ev, k) for k in AGGREGATES}
    finally:
        store.dispose()


def _chunks(url: str) -> dict[int, tuple[str, str]]:
    """chunk index -> (worker, host) of the committed chunks."""
    store = Store(url, read_only=True)
    try:
        with store.session() as s:
            return {c.chunk_index: (c.worker, c.host) for c in s.scalars(select(EvaluationChunk))}
    finally:
        store.dispose()


@pytest.fixture(scope="module")
def reference(digits_cnn_checkpoint, tmp_path_factory):
    """The same evaluation run in this process (one worker) on SQLite: the rows every executor must reproduce."""
    url = f"sqlite:///{tmp_path_factory.mktemp('reference') / 'results.db'}"
    result = _evaluate(digits_cnn_checkpoint, url, "--workers", "1")
    assert result.exit_code == 0, result.output
    rows = _rows(url)
    assert [r["sample_id"] for r in rows] == list(range(N))
    return {"rows": rows, "aggregates": _aggregates(url)}


def _config(tmp_path: Path, **extra) -> Path:
    settings = {"tasks": 3, "executor_folder": str(tmp_path / "jobs"), "poll_seconds": 1, "time_limit": 10, **extra}
    path = tmp_path / "executor.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    return path


def _array_id(output: str, tasks: int) -> str:
    match = re.search(rf"submitted SLURM job array (\d+): {tasks} task\(s\)", output)
    assert match, output
    return match.group(1)


def _queued(array: str) -> set[str]:
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--format=%i", f"--jobs={array}"], capture_output=True, text=True
    )
    return set(out.stdout.split()) if out.returncode == 0 else set()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


# --- sharding and options (no cluster needed) ---------------------------------------------------------------------


def test_shards_take_every_nth_missing_chunk():
    assert shard_chunks([0, 1, 2, 3, 4, 5, 6], 3) == [(0, 3, 6), (1, 4), (2, 5)]
    # Only what is missing, and never an empty shard.
    assert shard_chunks([4, 1], 3) == [(1,), (4,)]
    assert shard_chunks([], 3) == []
    assert shard_chunks([7], 1) == [(7,)]


def test_executor_config_file_and_command_line(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "partition: gpu\ngpus-per-task: 1\ntime_limit: 90\narray_parallelism: 8\ntasks: 16\n"
        "executor_folder: /shared/jobs\nsetup:\n  - module load cuda\n  - source /shared/venv/bin/activate\n"
    )
    assert load_executor_config(path) == {
        "partition": "gpu",
        "gpus_per_task": 1,
        "time_limit": 90,
        "array_parallelism": 8,
        "tasks": 16,
        "folder": "/shared/jobs",
        "setup": ("module load cuda", "source /shared/venv/bin/activate"),
    }
    # The command line wins over the file; what it leaves unset comes from the file.
    options = executor_options("slurm", path, partition="debug", tasks=None, setup=())
    assert (options.partition, options.tasks, options.gpus_per_task) == ("debug", 16, 1)
    assert options.setup == ("module load cuda", "source /shared/venv/bin/activate")

    path.write_text("partiton: gpu\n")
    with pytest.raises(ExecutorError, match=r"unknown key 'partiton'.*known: .*partition"):
        load_executor_config(path)
    path.write_text("tasks: many\n")
    with pytest.raises(ExecutorError, match="tasks .* must be a whole number"):
        load_executor_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ExecutorError, match="must be a mapping"):
        load_executor_config(path)
    with pytest.raises(ExecutorError, match="cannot read --executor-config"):
        load_executor_config(tmp_path / "missing.yaml")
    with pytest.raises(ExecutorError, match="--setup, --partition set the SLURM job array|--partition.*SLURM"):
        ExecutorOptions(kind="local", partition="gpu", setup=("x",))


def test_slurm_refuses_sqlite_before_any_work(digits_cnn_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "results.db"
    line = one_line_error(_evaluate(digits_cnn_checkpoint, f"sqlite:///{db}", "--executor", "slurm"))
    assert "PostgreSQL" in line and "--db postgresql://" in line and "pip install 'apbench[postgres]'" in line
    assert not db.exists()
    # The default store ($BENCH_DB unset: ./results.db) is SQLite too.
    args = ["evaluate", "--checkpoint", str(digits_cnn_checkpoint), "--arch", "small_cnn", "--dataset", "digits"]
    line = one_line_error(CliRunner().invoke(main, [*args, "--executor", "slurm"]))
    assert "PostgreSQL" in line
    assert not db.exists()


def test_slurm_refuses_a_password_in_the_url_before_any_work(digits_cnn_checkpoint, tmp_path, monkeypatch):
    # The URL travels inside every task's pickle in the executor folder; the password belongs in ~/.pgpass.
    monkeypatch.chdir(tmp_path)
    url = "postgresql://bench:s3cret@127.0.0.1:1/results"
    line = one_line_error(_evaluate(digits_cnn_checkpoint, url, "--executor", "slurm"))
    assert "holds a password" in line and "~/.pgpass" in line and "s3cret" not in line
    assert not (tmp_path / "apbench-jobs").exists()
    # psycopg also takes it as a query parameter.
    line = one_line_error(_evaluate(digits_cnn_checkpoint, "postgresql://bench@127.0.0.1:1/r?password=s3cret",
                                    "--executor", "slurm"))  # fmt: skip
    assert "holds a password" in line and "s3cret" not in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--partition", "gpu"], "--partition need --executor slurm"),
        (["--tasks", "3"], "--tasks need --executor slurm (or --executor local"),
        (["--executor", "local", "--partition", "gpu"], "--partition set the SLURM job array"),
        (["--executor", "local", "--no-wait"], "--no-wait set the SLURM job array"),
        (["--executor", "slurm", "--workers", "2"], "--workers is for this machine"),
    ],
)
def test_executor_options_refused_in_one_line(digits_cnn_checkpoint, extra, message):
    # An unreachable server: every refusal comes before the store is opened.
    line = one_line_error(_evaluate(digits_cnn_checkpoint, "postgresql://nobody@127.0.0.1:1/none", *extra))
    assert message in line


def test_slurm_executor_config_refused_in_one_line(digits_cnn_checkpoint, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: 1\n")
    line = one_line_error(
        _evaluate(
            digits_cnn_checkpoint, "postgresql://nobody@127.0.0.1:1/none", "--executor", "slurm",
            "--executor-config", str(bad),
        )
    )  # fmt: skip
    assert "unknown key 'gpus'" in line and "gpus_per_task" in line


# --- the local executor -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_executor_equals_in_process(digits_cnn_checkpoint, reference, tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    result = _evaluate(digits_cnn_checkpoint, url, "--executor", "local", "--workers", "2", "--tasks", "3")
    assert result.exit_code == 0, result.output
    assert "running 3 shard(s) on this machine: 2 CPU process(es)" in result.output
    assert _rows(url) == reference["rows"]
    assert _aggregates(url) == reference["aggregates"]
    chunks = _chunks(url)
    assert sorted(chunks) == list(range(N_CHUNKS))
    assert all(worker.startswith("local:") and host == socket.gethostname() for worker, host in chunks.values())
    # Shard i of 3 took chunks i, i+3: chunks of one shard share a worker.
    assert all(chunks[i][0] == chunks[i + 3][0] for i in range(3))
    # Run again: every chunk is stored, nothing is submitted, the stored run is reused.
    again = _evaluate(digits_cnn_checkpoint, url, "--executor", "local", "--workers", "2")
    assert again.exit_code == 0, again.output
    assert "has every chunk stored: nothing to submit" in again.output and "stored run reused" in again.output


def _zoo_of_two(root: Path, server, digits_cnn, folder: Path) -> None:
    """A zoo of a dense small_cnn (plain state dict) and its HYDRA child (HYDRA's own subnet format, k = 0.1)."""
    import io

    import torch

    from bench.formats import load_converted_model
    from bench.sparsity import measure_sparsity
    from tests.zoo_helpers import dense_submission, new_submission, write_manifest

    def as_bytes(obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    dense_sd = {k: v.clone() for k, v in digits_cnn.net.state_dict().items()}
    subnet_sd = dict(dense_sd)
    for key, value in dense_sd.items():
        if key.endswith("weight") and value.dim() > 1:
            subnet_sd[key.removesuffix("weight") + "popup_scores"] = value.abs()
    dense, child = as_bytes(dense_sd), as_bytes({"arch": "small_cnn", "state_dict": subnet_sd})
    (folder / "model_best.pth.tar").write_bytes(child)
    pruned = load_converted_model(folder / "model_best.pth.tar", "hydra-subnet", "small_cnn", "digits", k=0.1)
    server.files["/dense.pt"], server.files["/hydra/model_best.pth.tar"] = dense, child
    write_manifest(root, dense_submission(server.url("/dense.pt"), dense))
    sparsity = round(measure_sparsity(pruned).sparsity, 4)
    write_manifest(
        root, new_submission(server.url("/hydra/model_best.pth.tar"), child, {"model.claimed_sparsity": sparsity})
    )


def _all_rows(url: str) -> dict[str, list[dict]]:
    """model name -> its evaluation's per-sample rows (without ids)."""
    from bench.store import Model

    columns = [c.key for c in SampleResult.__table__.columns if c.key not in ("id", "evaluation_id")]
    store = Store(url, read_only=True)
    try:
        with store.session() as s:
            out: dict[str, list[dict]] = {}
            for name, r in s.execute(
                select(Model.name, SampleResult)
                .join(Evaluation, Evaluation.model_id == Model.id)
                .join(SampleResult, SampleResult.evaluation_id == Evaluation.id)
                .order_by(Model.name, SampleResult.sample_id)
            ):
                out.setdefault(name, []).append({k: getattr(r, k) for k in columns})
            return out
    finally:
        store.dispose()


@pytest.mark.slow
def test_zoo_with_the_local_executor_is_one_submission_equal_to_in_process(digits_cnn, tmp_path, monkeypatch):
    from tests.zoo_helpers import CHILD_ID, PARENT_ID, CheckpointServer, allow_loopback

    allow_loopback(monkeypatch)
    root = tmp_path / "submissions"
    args = ["evaluate", "--zoo", "--dataset", "digits", "--submissions", str(root), "--no-progress"]
    args += ["--n-samples", "20", "--batch-size", "10", "--version", "standard", "--fmn-steps", "3"]
    with CheckpointServer() as server:
        _zoo_of_two(root, server, digits_cnn, tmp_path)
        in_process = f"sqlite:///{tmp_path / 'in_process.db'}"
        plain = CliRunner().invoke(main, [*args, "--db", in_process, "--workers", "1"])
        assert plain.exit_code == 0, plain.output
        sharded = f"sqlite:///{tmp_path / 'sharded.db'}"
        result = CliRunner().invoke(main, [*args, "--db", sharded, "--executor", "local", "--workers", "2"])
    assert result.exit_code == 0, result.output
    # Both entries' evaluations in one submission: two shards each (one per process), four in all.
    assert result.output.count("running 4 shard(s) on this machine: 2 CPU process(es)") == 1, result.output
    assert "shard(s) on this machine" not in result.output.split("running 4 shard(s)")[0]
    rows = _all_rows(sharded)
    assert set(rows) == {PARENT_ID, CHILD_ID} and all(len(r) == 20 for r in rows.values())
    # The tasks rebuilt each model from the store (the child from HYDRA's own format) and matched this process.
    assert rows == _all_rows(in_process)


# --- bench status -------------------------------------------------------------------------------------------------


def _half_done(url: str, checkpoint, chunk_ids, workers):
    """A store with one evaluation (the reference's spec) of which only ``chunk_ids`` are committed."""
    from bench.checkpoints import load_checkpoint_model
    from bench.data import load_split
    from bench.evaluate import evaluate_chunks, open_evaluation
    from bench.spec import RunSpec
    from bench.store.registration import register_model

    store = Store(url)
    model = load_checkpoint_model(checkpoint, "small_cnn", "digits")
    row = register_model(store, checkpoint, model, arch="small_cnn", dataset="digits", name="cnn-half")
    spec = RunSpec(
        dataset="digits", n_samples=N, norm="Linf", eps="0.3", eps_value=0.3, version="standard", fmn_steps=10,
        batch_size=BATCH,
    )  # fmt: skip
    evaluation_id = open_evaluation(store, row.id, spec)
    x, y = load_split("digits", "test")
    for chunk, worker in zip(chunk_ids, workers, strict=True):
        evaluate_chunks(store, evaluation_id, model, x, y, spec, [chunk], worker=worker)
    return store, evaluation_id, spec, (model, x, y)


def test_status_of_a_half_done_evaluation(digits_cnn_checkpoint, tmp_path):
    from bench.evaluate import evaluate_chunks, finalize_evaluation
    from bench.executors.status import evaluation_status
    from bench.provenance import utcnow

    url = f"sqlite:///{tmp_path / 'results.db'}"
    store, evaluation_id, spec, (model, x, y) = _half_done(
        url, digits_cnn_checkpoint, [0, 3], ["slurm:7_0", "slurm:7_1"]
    )
    before = Path(tmp_path / "results.db").read_bytes()
    result = CliRunner().invoke(main, ["status", "--db", url])
    assert result.exit_code == 0, result.output
    header, line = result.output.splitlines()[:2]
    assert header.split()[:4] == ["evaluation", "model", "protocol", "chunks"]
    assert f"#{evaluation_id}" in line and "cnn-half" in line
    assert re.search(r"\b2/6\b", line) and re.search(r"\b20/60\b", line)
    assert "2 recent / 2" in line and line.rstrip().endswith("running")
    assert "recent workers slurm:7_0, slurm:7_1" in result.output
    # Read-only: the store file is byte for byte as it was.
    assert Path(tmp_path / "results.db").read_bytes() == before

    (st,) = evaluation_status(store)
    assert (st.chunks_done, st.chunks_total, st.samples_stored, st.n_samples) == (2, 6, 20, 60)
    assert st.attack_seconds > 0 and st.seconds_per_chunk > 0
    # Two workers, four chunks left: mean seconds per chunk x 4 / 2.
    assert st.remaining_s == pytest.approx(st.seconds_per_chunk * 4 / 2)
    # Nobody committed for a day: stalled, and no estimate (nothing runs).
    (late,) = evaluation_status(store, now=utcnow() + timedelta(days=1))
    assert (late.status, late.workers_recent, late.remaining_s) == ("stalled", [], None)
    picked = CliRunner().invoke(main, ["status", "--db", url, "cnn-*"])
    assert picked.exit_code == 0 and "cnn-half" in picked.output

    evaluate_chunks(store, evaluation_id, model, x, y, spec, [1, 2, 4, 5], worker="local:1")
    (st,) = evaluation_status(store)
    assert (st.status, st.chunks_done) == ("unfinalised", 6)
    assert finalize_evaluation(store, evaluation_id, spec) is not None
    out = CliRunner().invoke(main, ["status", "--db", url, "--format", "json"])
    (st,) = json.loads(out.output)
    assert (st["status"], st["chunks_done"], st["samples_stored"], st["workers_total"]) == ("complete", 6, 60, 3)
    assert st["remaining_s"] is None
    store.dispose()

    line = one_line_error(CliRunner().invoke(main, ["status", "--db", url, "resnet*"]))
    assert "no stored model matches 'resnet*'" in line
    missing = tmp_path / "none.db"
    one_line_error(CliRunner().invoke(main, ["status", "--db", f"sqlite:///{missing}"]))
    assert not missing.exists()


# --- SLURM --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_slurm_job_array_equals_in_process(slurm_cluster, pg_url, reference, digits_cnn_checkpoint, tmp_path, capsys):
    config = _config(tmp_path)
    result = _evaluate(digits_cnn_checkpoint, pg_url, "--executor", "slurm", "--executor-config", str(config))
    print(result.output)
    assert result.exit_code == 0, result.output
    array = _array_id(result.output, 3)
    with capsys.disabled():  # in the test log even when the test passes
        print(f"\nSLURM job array {array}: 3 tasks, 6 chunks")
    assert _rows(pg_url) == reference["rows"]
    assert _aggregates(pg_url) == reference["aggregates"]
    # Task i attacked the missing chunks i, i+3 (all six were missing), each on this node.
    assert _chunks(pg_url) == {i: (f"slurm:{array}_{i % 3}", socket.gethostname()) for i in range(N_CHUNKS)}
    for i in range(3):
        log = tmp_path / "jobs" / f"{array}_{i}_0_log.out"
        assert f"slurm:{array}_{i}" in log.read_text()


@pytest.mark.slow
def test_slurm_task_killed_mid_chunk_then_resubmitted(
    slurm_cluster, pg_url, reference, digits_cnn_checkpoint, tmp_path, monkeypatch, capsys
):
    config = _config(tmp_path)
    marker = tmp_path / "stalled"
    # Task 1's shard is chunks 1 and 4: it commits chunk 1 and stalls inside chunk 4's first forward pass.
    monkeypatch.setenv(STALL_ENV, f"1:1:{marker}")
    command = ["--executor", "slurm", "--executor-config", str(config)]
    first = _evaluate(digits_cnn_checkpoint, pg_url, *command, "--no-wait")
    print(first.output)
    assert first.exit_code == 0, first.output
    array = _array_id(first.output, 3)
    print(f"first SLURM job array {array}; its task {array}_1 will be killed mid-chunk")
    arrays = [array]
    try:
        _wait_for(marker.exists, 240, f"task {array}_1 to stall in its second chunk")
        _wait_for(lambda: _queued(array) == {f"{array}_1"}, 240, f"tasks {array}_0 and {array}_2 to finish")
        # SIGKILL at once: submitit's tasks ignore SIGTERM, and scancel's default would wait out KillWait.
        subprocess.run(["scancel", "--signal=KILL", "--full", f"{array}_1"], check=True, timeout=60)
        _wait_for(lambda: not _queued(array), 120, f"task {array}_1 to leave the queue")
        print(f"scancel {array}_1 done")

        # Half done: five chunks, their fifty rows, nothing of the chunk the task was attacking.
        assert sorted(_chunks(pg_url)) == [0, 1, 2, 3, 5]
        assert [r["sample_id"] for r in _rows(pg_url)] == [i for i in range(N) if not 40 <= i < 50]
        status = CliRunner().invoke(main, ["status", "--db", pg_url])
        print(status.output)
        assert status.exit_code == 0, status.output
        assert re.search(r"\b5/6\b.*\b50/60\b", status.output)

        monkeypatch.delenv(STALL_ENV)
        second = _evaluate(digits_cnn_checkpoint, pg_url, *command)
        print(second.output)
        assert second.exit_code == 0, second.output
        assert "1 of 6 chunks missing" in second.output
        arrays.append(_array_id(second.output, 1))
        print(f"second SLURM job array {arrays[1]}: only the missing chunk")
    finally:
        subprocess.run(["scancel", "--signal=KILL", "--full", *arrays], capture_output=True, timeout=60)
    assert _rows(pg_url) == reference["rows"]
    assert _aggregates(pg_url) == reference["aggregates"]
    chunks = _chunks(pg_url)
    # submitit submits a single shard as a plain job (no array task id).
    assert chunks[4][0] in (f"slurm:{arrays[1]}", f"slurm:{arrays[1]}_0")
    assert {i: w for i, (w, _) in chunks.items() if i != 4} == {i: f"slurm:{array}_{i % 3}" for i in (0, 1, 2, 3, 5)}
    with capsys.disabled():  # in the test log even when the test passes
        print(f"\nSLURM job {array} (task {array}_1 killed mid-chunk by scancel), then {arrays[1]} (the missing chunk)")


@pytest.mark.slow
def test_slurm_array_resources(slurm_cluster, tmp_path):
    from bench.executors.slurm import make_executor

    options = executor_options(
        "slurm",
        None,
        partition="gpu",
        gpus_per_task=2,
        time_limit=45,
        array_parallelism=3,
        cpus_per_task=4,
        setup=["source /shared/venv/bin/activate"],
        folder=str(tmp_path / "jobs"),
    )
    text = make_executor(options)._executor._make_submission_file_text("python -m x", "uid")
    for flag in ("--partition=gpu", "--gpus-per-node=2", "--time=45", "--cpus-per-task=4", "--ntasks-per-node=1"):
        assert f"#SBATCH {flag}" in text, text
    assert "source /shared/venv/bin/activate" in text
