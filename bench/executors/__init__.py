"""Evaluate chunks as shards: a SLURM job array through submitit, or processes on this machine.

``bench evaluate --executor slurm|local`` registers the model(s) and opens the evaluation(s) in the store as an
in-process run does, then splits each evaluation's *missing* chunks into shards (task ``i`` of ``n`` takes
``missing[i::n]``). A shard is one call of :func:`run_shard`: it opens the store by URL, rebuilds the stored model
from its checkpoint, loads the test split, attacks its chunks with :func:`bench.evaluate.evaluate_chunks` (a chunk
that another task already committed is skipped), finalises the evaluation when it was the last chunk, and exits.
The submitting command waits for the tasks (unless ``--no-wait``) and finalises too (idempotent).

So a task killed, preempted or out of time loses at most the chunk it was attacking: submitting the same command
again shards only the chunks still missing, and SLURM's own requeue of a task reruns its shard, whose committed
chunks are skipped. The results do not depend on the sharding: every chunk is attacked alone with the spec's seed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

EXECUTORS = ("local", "slurm")
DEFAULT_FOLDER = "apbench-jobs"
DEFAULT_TIME_LIMIT_MIN = 240
# Shards per evaluation when --tasks is not given (SLURM): enough to spread one model over a few GPUs, few enough
# that each task amortises its start (Python, torch, the model, the test split) over several chunks.
DEFAULT_SLURM_TASKS = 4
SLURM_INSTALL = "pip install 'apbench[slurm]'"
POSTGRES_INSTALL = "pip install 'apbench[postgres]'"
# Test hook (never set outside the tests): "TASK:N:MARKER" makes array task TASK, after committing N chunks of its
# shard, write MARKER and stall inside its next chunk's first forward pass, so that a test can kill it mid-chunk.
STALL_ENV = "APBENCH_TEST_STALL"
STALL_MAX_S = 600


class ExecutorError(ValueError):
    """Options or a setting the executors cannot work with; the message names the problem and the fix."""


@dataclass(frozen=True)
class ExecutorOptions:
    """How ``bench evaluate --executor`` shards and submits (the CLI options, or ``--executor-config``'s keys).

    Attributes:
        kind: ``"local"`` (processes on this machine) or ``"slurm"`` (a job array through submitit).
        tasks: shards per evaluation [SLURM: 4; local: one per process].
        partition, gpus_per_task, time_limit (minutes), array_parallelism, setup (shell lines run before each task),
            cpus_per_task, mem_gb: the job array's resources (SLURM only).
        folder: submitit's folder for the tasks' pickles and logs; every node must see it (SLURM only).
        wait: wait for the tasks and finalise; False returns once the array is submitted (SLURM only).
        workers: CPU processes (local, on a CPU device).
        threads: torch threads per task.
        poll_s: seconds between two looks at the queue while waiting (``poll_seconds`` in a config file).
    """

    kind: str = "slurm"
    tasks: int | None = None
    partition: str | None = None
    gpus_per_task: int = 0
    time_limit: int = DEFAULT_TIME_LIMIT_MIN
    array_parallelism: int | None = None
    setup: tuple[str, ...] = ()
    folder: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    wait: bool = True
    workers: int | None = None
    threads: int = 1
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ExecutorError(f"unknown executor {self.kind!r}; use one of {', '.join(EXECUTORS)}")
        for name in ("tasks", "time_limit", "array_parallelism", "cpus_per_task", "workers", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ExecutorError(f"{_option(name)} must be a whole number of at least 1; got {value!r}")
        if not isinstance(self.gpus_per_task, int) or isinstance(self.gpus_per_task, bool) or self.gpus_per_task < 0:
            raise ExecutorError(f"--gpus-per-task must be a whole number of at least 0; got {self.gpus_per_task!r}")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, int | float) and self.mem_gb > 0):
            raise ExecutorError(f"mem_gb must be a positive number of gigabytes; got {self.mem_gb!r}")
        if not (isinstance(self.poll_s, int | float) and self.poll_s > 0):
            raise ExecutorError(f"poll_seconds must be a positive number; got {self.poll_s!r}")
        if any(not isinstance(line, str) or "\n" in line for line in self.setup):
            raise ExecutorError("each --setup is one shell line (a string without line breaks)")
        if self.kind == "local":
            slurm_only = [
                _option(name)
                for name in ("partition", "array_parallelism", "folder", "cpus_per_task", "mem_gb")
                if getattr(self, name) is not None
            ]
            slurm_only += ["--gpus-per-task"] if self.gpus_per_task else []
            slurm_only += ["--setup"] if self.setup else []
            slurm_only += ["--no-wait"] if not self.wait else []
            if slurm_only:
                raise ExecutorError(
                    f"{', '.join(slurm_only)} set the SLURM job array; --executor local runs on this machine "
                    "(use --workers, --tasks and --device there)"
                )


# The keys of an --executor-config file: the long options' names with dashes or underscores.
CONFIG_KEYS = {
    "partition": "partition",
    "gpus_per_task": "gpus_per_task",
    "time_limit": "time_limit",
    "array_parallelism": "array_parallelism",
    "tasks": "tasks",
    "setup": "setup",
    "executor_folder": "folder",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "poll_seconds": "poll_s",
}


def _option(name: str) -> str:
    key = {v: k for k, v in CONFIG_KEYS.items()}.get(name, name)
    return "--" + key.replace("_", "-")


def load_executor_config(path: str | Path) -> dict[str, Any]:
    """The settings of a small YAML file with the keys of the command's options, e.g.::

        partition: gpu
        gpus_per_task: 1
        time_limit: 240        # minutes
        array_parallelism: 16
        tasks: 8
        executor_folder: /shared/apbench-jobs
        setup:
          - module load cuda/12.1
          - source /shared/venv/bin/activate

    Returns ``ExecutorOptions`` keyword arguments; an unknown key or a wrong type is refused in one line.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ExecutorError(f"cannot read --executor-config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ExecutorError(f"--executor-config {path} is not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExecutorError(f"--executor-config {path} must be a mapping of keys to values, e.g. 'partition: gpu'")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = CONFIG_KEYS.get(str(key).replace("-", "_"))
        if name is None:
            raise ExecutorError(
                f"unknown key {key!r} in --executor-config {path}; known: {', '.join(sorted(CONFIG_KEYS))}"
            )
        if name == "setup":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ExecutorError(f"setup in --executor-config {path} must be a shell line or a list of them")
            value = tuple(value)
        elif name in ("partition", "folder"):
            if not isinstance(value, str) or not value.strip():
                raise ExecutorError(f"{key} in --executor-config {path} must be a non-empty string")
        elif name in ("mem_gb", "poll_s"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ExecutorError(f"{key} in --executor-config {path} must be a number; got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ExecutorError(f"{key} in --executor-config {path} must be a whole number; got {value!r}")
        out[name] = value
    return out


def executor_options(kind: str, config: str | Path | None = None, **given: Any) -> ExecutorOptions:
    """Options from ``--executor-config`` (if any) overridden by those given on the command line (not None)."""
    settings = load_executor_config(config) if config is not None else {}
    known = {f.name for f in fields(ExecutorOptions)}
    for name, value in given.items():
        if name not in known:
            raise TypeError(f"unknown executor option {name!r}")
        if value is not None and value != ():
            settings[name] = tuple(value) if name == "setup" else value
    return ExecutorOptions(kind=kind, **settings)


def refuse_sqlite(url: str) -> None:
    """SLURM's tasks run on other machines: they need a database server, not a SQLite file."""
    if url.startswith("sqlite"):
        raise ExecutorError(
            "--executor slurm needs a PostgreSQL store that every node reaches (SQLite's locking does not work "
            f"over a network filesystem): give --db postgresql://user@host/db ({POSTGRES_INSTALL}; "
            "create it with bench db upgrade --db ...)"
        )


@dataclass(frozen=True)
class Shard:
    """One task's work: some chunks of one evaluation, and what it needs to redo them anywhere (all picklable)."""

    db_url: str
    evaluation_id: int
    model_id: int
    spec: dict[str, Any]
    chunk_ids: tuple[int, ...]
    data_dir: str | None = None
    threads: int = 1


@dataclass(frozen=True)
class ShardResult:
    """What a task reports back: where it ran and what it committed."""

    evaluation_id: int
    chunk_ids: tuple[int, ...]
    worker: str
    host: str
    committed: int
    complete: bool
    seconds: float


@dataclass
class TaskOutcome:
    """One task as the submitting command saw it end: its result, or a one-line error and where its log is."""

    task: str
    shard: Shard
    result: ShardResult | None = None
    error: str | None = None
    log: str | None = None


def shard_chunks(missing: Iterable[int], n_tasks: int) -> list[tuple[int, ...]]:
    """Task ``i`` of ``n_tasks`` gets ``missing[i::n_tasks]``; no empty shard (fewer tasks than chunks left)."""
    missing = sorted(missing)
    n = max(1, min(n_tasks, len(missing)))
    return [tuple(missing[i::n]) for i in range(n)] if missing else []


def worker_label() -> str:
    """Who attacks: the SLURM array task (``slurm:1234_5``) or job, else this process (``local:PID``, with its GPU)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    gpu = env.get("CUDA_VISIBLE_DEVICES")
    return f"local:{os.getpid()}" + (f":gpu{gpu}" if gpu else "")


def _say(message: str) -> None:
    # A task's stdout is its log file (SLURM) or the submitting terminal (local).
    print(f"[{worker_label()}] {message}", flush=True)


def run_shard(shard: Shard) -> ShardResult:
    """Attack a shard's chunks and commit them (the function every task runs; see the module doc)."""
    from bench.catalog import load_stored_model
    from bench.data import load_split
    from bench.evaluate import evaluate_chunks, finalize_evaluation
    from bench.spec import RunSpec
    from bench.store import Model, Store
    from bench.store.db import shown_url

    start = time.perf_counter()
    torch.set_num_threads(shard.threads)
    worker, host = worker_label(), socket.gethostname()
    spec = RunSpec.from_dict(shard.spec)
    store = Store(shard.db_url)
    try:
        with store.session() as s:
            row = s.get(Model, shard.model_id)
            if row is None:
                raise RuntimeError(
                    f"model #{shard.model_id} is not in the store {shown_url(shard.db_url)} (removed meanwhile?)"
                )
        model = load_stored_model(row).to(spec.device)
        x, y = load_split(spec.dataset, "test", data_dir=shard.data_dir)
        _say(f"on {host}: evaluation #{shard.evaluation_id} of {row.name}, chunks {list(shard.chunk_ids)}")
        todo = list(shard.chunk_ids)
        committed = 0
        stall = _stall_hook()
        if stall is not None:
            after, marker = stall
            committed += evaluate_chunks(
                store, shard.evaluation_id, model, x, y, spec, todo[:after], worker=worker, log=_say
            )
            todo, model = todo[after:], _Stalling(model, marker)
        committed += evaluate_chunks(store, shard.evaluation_id, model, x, y, spec, todo, worker=worker, log=_say)
        summary = finalize_evaluation(store, shard.evaluation_id, spec)
    finally:
        store.dispose()
    seconds = time.perf_counter() - start
    _say(
        f"committed {committed} of {len(shard.chunk_ids)} chunks in {seconds:.1f} s"
        + ("; the evaluation is complete" if summary is not None else "")
    )
    return ShardResult(
        evaluation_id=shard.evaluation_id,
        chunk_ids=shard.chunk_ids,
        worker=worker,
        host=host,
        committed=committed,
        complete=summary is not None,
        seconds=seconds,
    )


class ShardTask:
    """:func:`run_shard` as submitit runs it. Its ``checkpoint`` makes a task that SLURM stops at its time limit
    (or preempts) requeue itself with the same shard, whose committed chunks it then skips."""

    def __call__(self, shard: Shard) -> ShardResult:
        return run_shard(shard)

    def checkpoint(self, shard: Shard):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, shard)


def _stall_hook() -> tuple[int, str] | None:
    """``(chunks before stalling, marker file)`` when the tests' hook names this array task, else None."""
    value = os.environ.get(STALL_ENV)
    if not value:
        return None
    task, after, marker = value.split(":", 2)
    if os.environ.get("SLURM_ARRAY_TASK_ID") != task:
        return None
    return int(after), marker


class _Stalling(torch.nn.Module):
    """``inner`` until the first forward pass of an attack (an input that requires grad: past the chunk's clean
    pass, inside AutoAttack), which writes ``marker`` and waits to be killed (the tests' hook only)."""

    def __init__(self, inner: torch.nn.Module, marker: str) -> None:
        super().__init__()
        self.inner = inner
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            Path(self.marker).write_text(f"{worker_label()} {os.getpid()}\n")
            _say(f"stalling mid-chunk (test hook {STALL_ENV}); waiting to be killed")
            time.sleep(STALL_MAX_S)
            os._exit(3)
        return self.inner(x)


@dataclass
class PlannedEvaluation:
    """An evaluation the command opened, the chunks it still misses, and (after the run) its summary."""

    evaluation_id: int
    model_id: int
    model_name: str
    spec: Any  # bench.spec.RunSpec
    missing: list[int]
    summary: Any = None  # bench.evaluate.EvaluationSummary once finalised
    reused: bool = False


@dataclass
class ShardedRun:
    """The evaluations of one ``bench evaluate --executor`` command: collected, sharded, run, finalised.

    ``add`` opens an evaluation (race-free) and notes its missing chunks; ``run`` submits every shard of every
    evaluation at once (one job array for a whole zoo), waits, and finalises each evaluation.
    """

    options: ExecutorOptions
    db_url: str
    data_dir: str | None = None
    log: Callable[[str], None] = print
    planned: list[PlannedEvaluation] = field(default_factory=list)
    outcomes: list[TaskOutcome] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def add(self, store, row, spec, *, overwrite: bool = False) -> PlannedEvaluation:
        from bench.evaluate import finalize_evaluation, missing_chunks, open_evaluation

        evaluation_id = open_evaluation(store, row.id, spec, overwrite=overwrite)
        missing = missing_chunks(store, evaluation_id, spec)
        plan = PlannedEvaluation(evaluation_id, row.id, row.name, spec, missing)
        if not missing:
            # Complete, or every chunk stored but never finalised (its last task died just before): finalise now.
            summary = finalize_evaluation(store, evaluation_id, spec)
            plan.summary = None if summary is None else replace(summary, reused=True)
            plan.reused = True
            self.log(f"evaluation #{evaluation_id} of {row.name} has every chunk stored: nothing to submit")
        else:
            n_chunks = len(spec.chunks())
            self.log(
                f"evaluation #{evaluation_id} of {row.name}: {len(missing)} of {n_chunks} chunks missing"
                + ("" if len(missing) == n_chunks else " (the others are stored and kept)")
            )
        self.planned.append(plan)
        return plan

    def shards(self) -> list[Shard]:
        n_tasks = self.options.tasks or (
            DEFAULT_SLURM_TASKS if self.options.kind == "slurm" else len(local_slots(self.options, self._device()))
        )
        return [
            Shard(
                db_url=self.db_url,
                evaluation_id=plan.evaluation_id,
                model_id=plan.model_id,
                spec=plan.spec.to_dict(),
                chunk_ids=chunk_ids,
                data_dir=self.data_dir,
                threads=self.options.threads,
            )
            for plan in self.planned
            for chunk_ids in shard_chunks(plan.missing, n_tasks)
        ]

    def _device(self) -> str:
        devices = {plan.spec.device for plan in self.planned}
        return devices.pop() if len(devices) == 1 else "cpu"

    def run(self) -> list[PlannedEvaluation]:
        """Run every shard, then finalise; returns the plans (``summary`` None where chunks are still missing)."""
        from bench.store import Store

        shards = self.shards()
        store = Store(self.db_url)
        try:
            if shards and self.options.kind == "slurm":
                from bench.executors.slurm import submit, wait

                jobs = submit(shards, self.options, log=self.log)
                self.job_ids = sorted({job.job_id.split("_")[0] for job in jobs})
                if not self.options.wait:
                    return self.planned
                self.outcomes = wait(jobs, shards, self.options, progress=lambda: self._progress(store), log=self.log)
            elif shards:
                from bench.executors.local import run_local

                self.outcomes = run_local(shards, self.options, self._device(), log=self.log)
            self._finalize(store)
        finally:
            store.dispose()
        return self.planned

    def _progress(self, store) -> str:
        """Chunks stored, read from the store: one line for the waiting command's log."""
        from bench.evaluate import missing_chunks

        counts = []
        for plan in self.planned:
            if not plan.reused:
                total = len(plan.spec.chunks())
                counts.append(
                    (plan.evaluation_id, total - len(missing_chunks(store, plan.evaluation_id, plan.spec)), total)
                )
        if len(counts) <= 4:
            return "chunks stored: " + ", ".join(f"#{i} {done}/{total}" for i, done, total in counts)
        done = sum(c[1] for c in counts)
        total = sum(c[2] for c in counts)
        finished = sum(c[1] == c[2] for c in counts)
        return f"chunks stored: {done}/{total} over {len(counts)} evaluations ({finished} with every chunk)"

    def _finalize(self, store) -> None:
        from bench.evaluate import finalize_evaluation, missing_chunks

        for plan in self.planned:
            if not plan.reused:
                plan.summary = finalize_evaluation(store, plan.evaluation_id, plan.spec)
                if plan.summary is None:
                    plan.missing = missing_chunks(store, plan.evaluation_id, plan.spec)

    def failure_message(self, incomplete: list[PlannedEvaluation]) -> str:
        """One line for the evaluations left incomplete (failed or killed tasks) and what to do."""
        parts = [f"#{p.evaluation_id} ({p.model_name}) misses {len(p.missing)} chunk(s)" for p in incomplete]
        failed = [o for o in self.outcomes if o.error is not None]
        first = f"; task {failed[0].task} {failed[0].error}" if failed else ""
        logs = f", its log: {failed[0].log}" if failed and failed[0].log else ""
        return (
            f"{len(failed)} task(s) failed or were killed, so evaluation {', '.join(parts)}: run the same command "
            f"again to attack only the missing chunks{first}{logs}"
        )


def local_slots(options: ExecutorOptions, device: str) -> list[dict[str, str]]:
    """The processes ``--executor local`` starts, as the environment each one gets: one per visible GPU on
    ``cuda`` (its ``CUDA_VISIBLE_DEVICES``), one on ``cuda:N``, else ``--workers`` CPU processes."""
    if device == "cuda":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
        count = torch.cuda.device_count()
        ids = (ids or [str(i) for i in range(count)])[:count]
        if options.workers is not None:
            ids = ids[: options.workers]
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in ids] or [{}]
    if device.startswith("cuda"):
        return [{}]
    return [{} for _ in range(options.workers or os.cpu_count() or 1)]


def describe(options: ExecutorOptions) -> str:
    """The resources a SLURM array asks for, for the command's log."""
    parts = [f"partition {options.partition}" if options.partition else "the default partition"]
    parts.append(f"{options.gpus_per_task} GPU(s)" if options.gpus_per_task else "no GPU")
    parts.append(f"{options.cpus_per_task or options.threads} CPU(s)")
    parts.append(f"{options.time_limit} min per task")
    if options.array_parallelism:
        parts.append(f"at most {options.array_parallelism} at once")
    return ", ".join(parts)


__all__ = [
    "EXECUTORS",
    "ExecutorError",
    "ExecutorOptions",
    "PlannedEvaluation",
    "Shard",
    "ShardResult",
    "ShardTask",
    "ShardedRun",
    "TaskOutcome",
    "executor_options",
    "load_executor_config",
    "local_slots",
    "refuse_sqlite",
    "run_shard",
    "shard_chunks",
    "worker_label",
]
