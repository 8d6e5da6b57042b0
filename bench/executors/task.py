"""One task's work: a shard of an evaluation's chunks, and :func:`run_shard`, the function every task runs.

A shard carries everything a task needs to redo its chunks on any machine (the store's URL, the stored model's id,
the spec, the chunk ids), all picklable: submitit pickles it into its folder for SLURM, ``spawn`` for local
processes. The task opens the store, rebuilds the stored model from its checkpoint, attacks the chunks (one that
another task already committed is skipped), finalises the evaluation when it was the last chunk, and reports back.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Test hook (never set outside the tests): "TASK:N:MARKER" makes array task TASK, after committing N chunks of its
# shard, write MARKER and stall inside its next chunk's first forward pass, so that a test can kill it mid-chunk.
STALL_ENV = "APBENCH_TEST_STALL"
STALL_MAX_S = 600


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
    from bench.data import load_split
    from bench.evaluate import evaluate_chunks, finalize_evaluation
    from bench.spec import RunSpec
    from bench.store import Model, Store
    from bench.store.db import shown_url
    from bench.store.registration import load_stored_model

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
