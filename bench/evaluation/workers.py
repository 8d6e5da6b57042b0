"""CPU worker processes attacking an evaluation's chunks in parallel (:func:`attack_in_workers`).

Each worker is a spawned process, started once. It first arms its own end with the parent's
(:func:`bench.processes.die_with_parent`), then runs its start-up (one torch thread; the model unpickled and
prepared as the parent prepared it), says it is ready, and attacks the chunks the parent hands it one at a time
over its own pipe.

Not ``multiprocessing.Pool``: a Pool replaces every worker that ends, so a worker whose start-up raised (a model
class it cannot import, a failing preparation) was started again and again, printing the same traceback each time,
and the evaluation never ended; and a worker killed in the middle of a chunk (by the out-of-memory killer) left the
Pool's result iterator waiting forever. Here a start-up error ends the evaluation with one line naming it
(:class:`WorkerError`), an error raised while attacking is raised again in the parent with the worker's traceback
as its cause, and a worker that ends without a word is named with its exit status.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from bench.evaluation.chunk import ChunkResult, attack_one_chunk
from bench.performance import fast_model
from bench.processes import die_with_parent
from bench.spec import RunSpec

# How long a worker that was told to stop (its pipe closed) may take to exit before it is terminated.
_STOP_TIMEOUT_S = 10.0


class WorkerError(RuntimeError):
    """A worker process could not start, or ended before it finished its chunk; the message is one line."""


class WorkerTraceback(Exception):
    """The traceback of an error raised in a worker process: the ``__cause__`` of that error raised again here."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def attack_in_workers(
    model: torch.nn.Module,
    jobs: Iterable[tuple[int, torch.Tensor, torch.Tensor, RunSpec]],
    *,
    workers: int,
    device: str,
    channels_last: bool,
) -> Iterator[ChunkResult]:
    """Attack chunks ``(index, x, y, spec)`` in ``workers`` spawned CPU processes; yields each result when it is done.

    Args:
        model: the prepared model (:func:`bench.performance.fast_model`); each worker receives a pickled copy and
            prepares it again with the same memory format (the per-process settings do not travel with a pickle).
        jobs: one chunk each: its index into ``spec.chunks()``, its samples and labels, the spec.
        workers: the number of processes.
        device: the torch device (CPU).
        channels_last: the memory format the parent's model was prepared with.

    Raises:
        ValueError: the model cannot be pickled (its class is not importable, it holds a lambda, ...).
        WorkerError: a worker could not start, or ended in the middle of a chunk.
    """
    return run_in_workers(
        workers, _start_attacker, (model, device, channels_last), _attack, jobs, describe=lambda job: f"chunk {job[0]}"
    )


def _start_attacker(model: torch.nn.Module, device: str, channels_last: bool) -> torch.nn.Module:
    torch.set_num_threads(1)
    return fast_model(model, device, channels_last=channels_last, inplace=True)


def _attack(model: torch.nn.Module, job: tuple[int, torch.Tensor, torch.Tensor, RunSpec]) -> ChunkResult:
    index, x, y, spec = job
    return attack_one_chunk(model, x, y, spec, index, worker=None)


@dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    job: Any = None
    started: bool = False


def run_in_workers(
    n: int,
    setup: Callable[..., Any],
    setup_args: tuple,
    job: Callable[[Any, Any], Any],
    items: Iterable[Any],
    *,
    describe: Callable[[Any], str] = repr,
) -> Iterator[Any]:
    """Yield ``job(state, item)`` for each of ``items``, in the order they finish, computed in ``n`` spawned
    processes that each run ``state = setup(*setup_args)`` once first.

    ``setup`` and ``job`` are module-level functions (the workers import them); ``setup_args`` and the items are
    pickled with the standard pickle. The workers end when the iteration does, however it ends: at once when it
    is abandoned or fails, after their last item otherwise.

    Raises:
        ValueError: ``setup_args`` cannot be pickled.
        WorkerError: a worker's start-up raised (the message names the error), or a worker ended without a word.
        Whatever ``job`` raised in a worker, with the worker's traceback as ``__cause__``.
    """
    pending = deque(items)
    try:
        payload = pickle.dumps((setup, setup_args, job), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:
        raise ValueError(
            f"the worker processes cannot receive the model ({_describe(err)}); define its class in an importable "
            "module, or use --workers 1"
        ) from err
    ctx = multiprocessing.get_context("spawn")
    pool: list[_Worker] = []
    finished = False
    try:
        for k in range(n):
            parent_end, child_end = ctx.Pipe()
            process = ctx.Process(
                target=_worker_main, args=(child_end, os.getpid(), payload), name=f"apbench-worker-{k}", daemon=True
            )
            process.start()
            child_end.close()  # the worker's end lives in the worker only: its exit is EOF here
            pool.append(_Worker(process, parent_end))
        by_conn = {w.conn: w for w in pool}
        busy = 0
        while pending or busy:
            for conn in wait(list(by_conn)):
                worker = by_conn[conn]
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    raise WorkerError(_ended(worker, n, describe)) from None
                kind, value = pickle.loads(message)
                if kind == "start_failed":
                    raise WorkerError(
                        f"worker process {worker.process.pid} could not start: {value}; --workers 1 attacks in this "
                        "process instead"
                    )
                if kind == "failed":
                    raise _raised_in_worker(*value)
                if kind == "done":
                    busy -= 1
                    worker.job = None
                    yield value
                worker.started = True
                if pending:
                    worker.job = pending.popleft()
                    busy += 1
                    try:
                        conn.send_bytes(pickle.dumps(worker.job, protocol=pickle.HIGHEST_PROTOCOL))
                    except OSError:  # it ended since its last message
                        raise WorkerError(_ended(worker, n, describe)) from None
        finished = True
    finally:
        _stop(pool, terminate=not finished)


def _worker_main(conn: Connection, parent_pid: int, payload: bytes) -> None:
    die_with_parent(parent_pid)
    try:
        setup, setup_args, job = pickle.loads(payload)
        state = setup(*setup_args)
    except BaseException as err:  # reported, not raised: the parent says what failed and ends the evaluation
        _send(conn, "start_failed", _describe(err))
        return
    _send(conn, "ready", None)
    while True:
        try:
            item = pickle.loads(conn.recv_bytes())
        except EOFError:  # the parent closed its end: no more work
            return
        try:
            result = job(state, item)
        except BaseException as err:
            _send(conn, "failed", (_pickled(err), _describe(err), traceback.format_exc()))
        else:
            _send(conn, "done", result)


def _send(conn: Connection, kind: str, value: Any) -> None:
    try:
        conn.send_bytes(pickle.dumps((kind, value), protocol=pickle.HIGHEST_PROTOCOL))
    except (BrokenPipeError, ConnectionResetError):  # the parent is gone; so is the one who would read this
        os._exit(1)


def _pickled(err: BaseException) -> bytes | None:
    try:
        return pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None


def _raised_in_worker(pickled: bytes | None, description: str, remote_traceback: str) -> BaseException:
    """The worker's error as the parent raises it: the exception itself where it survives pickling (same type, so
    callers catch it as if it had been raised here), else a :class:`WorkerError` naming it."""
    err: BaseException | None = None
    if pickled is not None:
        try:
            err = pickle.loads(pickled)
        except Exception:  # e.g. an exception class whose __init__ takes other arguments than its args
            err = None
    if err is None:
        err = WorkerError(f"a worker process raised {description}")
    err.__cause__ = WorkerTraceback(remote_traceback)
    return err


def _ended(worker: _Worker, n: int, describe: Callable[[Any], str]) -> str:
    """One line for a worker that ended without a word: how it ended and what it was doing."""
    worker.process.join(timeout=5)
    code = worker.process.exitcode
    if code is None:
        how = "closed its pipe"
    elif code < 0:
        how = f"killed by {signal.Signals(-code).name}"
    else:
        how = f"exit status {code}"
    if not worker.started:
        return f"worker process {worker.process.pid} ended ({how}) while starting; any error it printed is above"
    if worker.job is None:
        return f"worker process {worker.process.pid} ended ({how}) between chunks"
    return (
        f"worker process {worker.process.pid} ended ({how}) while attacking {describe(worker.job)}; the chunks "
        f"committed are kept: run the same command again to resume (with fewer than {n} workers if memory ran out)"
    )


def _stop(pool: list[_Worker], *, terminate: bool) -> None:
    for w in pool:
        w.conn.close()  # a waiting worker reads EOF and returns
    deadline = time.monotonic() + (0 if terminate else _STOP_TIMEOUT_S)
    for w in pool:
        w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()


def _describe(err: BaseException) -> str:
    """``Type: message`` on one line (a message over several lines joined)."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
