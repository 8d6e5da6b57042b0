"""The standardized evaluator: AutoAttack + FMN per sample, committed chunk by chunk, resumable, shareable.

Flow: dataset + checkpoint → model → attacks → store. One evaluation = one model × one
:class:`~bench.spec.RunSpec`. Samples are processed in fixed chunks of ``spec.batch_size``; each chunk is attacked
(:mod:`bench.evaluation.chunk`) and committed with its bookkeeping in one idempotent transaction
(:mod:`bench.evaluation.commits`), so a run killed at any point restarts at the chunks without rows and any number
of processes on any machines can work on one evaluation (SQLite or PostgreSQL). The evaluation's aggregates are
computed from the stored rows when it is finalised (:mod:`bench.evaluation.finalize`). An evaluation whose rows
are complete is reused unless ``overwrite`` is given.

The pieces executors build on: :func:`open_evaluation` (race-free get-or-create), :func:`missing_chunks`,
:func:`evaluate_chunks` (attack and commit a subset of chunks) and :func:`finalize_evaluation` (idempotent);
:func:`evaluate` runs them on this machine (one process, or CPU worker processes: :mod:`bench.evaluation.workers`).

The attacks run on a prepared copy of the model (:func:`bench.performance.fast_model`: eval mode, frozen
parameters, exact float32 on CUDA), in the standard memory layout: channels_last (NHWC) convolutions add their
products in another order, which moved FMN distances by a last-place unit on the digits model and by up to 3e-5 on
a CIFAR-10 ResNet-18 (frozen parameters alone change nothing), and the protocol promises the same per-sample
results whatever the execution settings. ``APBENCH_CHANNELS_LAST=1`` in the environment opts in to channels_last
for convolution networks (faster on CPU and cuDNN); each chunk records the layout it ran in (``execution``).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from contextlib import closing

import torch
from tqdm.auto import tqdm

from bench.evaluation.chunk import FMN_WARM_STAGE, attack_chunk, attack_one_chunk
from bench.evaluation.commits import (
    commit_chunk,
    is_committed,
    missing_chunks,
    open_evaluation,
    stored_executions,
)
from bench.evaluation.finalize import EvaluationSummary, finalize_evaluation
from bench.evaluation.flags import MIXED_EXECUTION_FLAG, RESULT_SETTINGS, UNRELIABLE_FLAGS, result_settings
from bench.evaluation.lock import RunLock, running_line
from bench.evaluation.workers import attack_in_workers
from bench.performance import execution_settings, fast_model
from bench.spec import RunSpec
from bench.store import Evaluation, Store

__all__ = [
    "CHANNELS_LAST_ENV",
    "UNRELIABLE_FLAGS",
    "EvaluationSummary",
    "attack_chunk",
    "evaluate",
    "evaluate_chunks",
    "finalize_evaluation",
    "missing_chunks",
    "open_evaluation",
]

# "1": run convolution networks in channels_last (see the module docstring: it changes the arithmetic).
CHANNELS_LAST_ENV = "APBENCH_CHANNELS_LAST"


def evaluate(
    store: Store,
    model_id: int,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: RunSpec,
    *,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    log: Callable[[str], None] = lambda _msg: None,
) -> EvaluationSummary:
    """Evaluate ``model`` (stored as ``model_id``) on the first ``spec.n_samples`` of ``x, y``, on this machine.

    Built on :func:`open_evaluation`, :func:`missing_chunks`, :func:`evaluate_chunks` and
    :func:`finalize_evaluation`: a finished evaluation is reused, a partial one resumed at its missing chunks.

    A second identical evaluation (same model, same run spec) started while one runs waits for it: it logs one
    line, "evaluation #N of MODEL is running (pid P on HOST, chunks k/n done); waiting…", and then reuses the
    finished result (or, if the first run died, resumes its work), instead of attacking the same chunks twice.
    Executors that split an evaluation between processes call :func:`evaluate_chunks` directly; an ``evaluate``
    running beside them skips the chunks they commit.

    Args:
        store: the results store.
        model_id: primary key of the model's row.
        model: the network (inputs in [0, 1], logits out); the attacks run on a prepared copy (eval mode, frozen
            parameters: :func:`bench.performance.fast_model`), which gives the per-sample results of the plain
            model bit for bit (channels_last only with ``APBENCH_CHANNELS_LAST=1``, see the module docstring).
        x, y: the dataset's test split in canonical order (only the first N are used).
        spec: the run spec.
        overwrite: discard stored results for this (model, spec) and recompute.
        progress: show progress bars (tqdm; silent anyway when not a terminal).
        workers: CPU processes attacking chunks in parallel, one torch thread each (CPU only). Chunks are
            attacked independently with the same seed, so the results do not depend on this number. The worker
            processes end with this one, killed or not; one that cannot start ends the evaluation with one line
            naming its error (:mod:`bench.evaluation.workers`).
        log: receives one-line status messages (waiting, resuming, reusing).

    Returns:
        The summary, recomputed from the stored rows.
    """
    _check_not_starting_a_worker()
    _check_split(y, spec)
    channels_last = _channels_last()
    if workers > 1 and torch.device(spec.device).type != "cpu":
        raise ValueError("--workers > 1 is for CPU evaluation; on a GPU use one worker and a larger --batch-size")
    lock = RunLock(store, model_id, spec)
    try:
        if not lock.try_acquire():
            log(running_line(store, open_evaluation(store, model_id, spec), spec, lock.holder()))
            lock.acquire()
        return _evaluate_locked(store, model_id, model, x, y, spec, overwrite, progress, workers, log, channels_last)
    finally:
        lock.release()


def _evaluate_locked(
    store, model_id, model, x, y, spec, overwrite, progress, workers, log, channels_last
) -> EvaluationSummary:
    evaluation_id = open_evaluation(store, model_id, spec, overwrite=overwrite)
    with store.session() as s:
        ev = s.get(Evaluation, evaluation_id)
        if ev.status == "complete":
            log(f"reusing the finished evaluation #{ev.id} (same checkpoint and run spec); --overwrite recomputes")
            return EvaluationSummary.from_row(ev, reused=True)
    chunks = spec.chunks()
    todo = missing_chunks(store, evaluation_id, spec)
    n_done = spec.n_samples - sum(len(chunks[i]) for i in todo)
    if n_done:
        log(f"resuming evaluation #{evaluation_id}: {n_done}/{spec.n_samples} samples already stored")
    if todo:
        prepared = _prepared(model, spec, x, channels_last)
        if n_done:
            _note_other_settings(store, evaluation_id, execution_settings(prepared), log)
        _run_chunks(store, evaluation_id, prepared, x, y, spec, todo, n_done, progress, workers, log)
    summary = finalize_evaluation(store, evaluation_id, spec)
    if summary is None:
        missing = missing_chunks(store, evaluation_id, spec)
        raise RuntimeError(f"evaluation #{evaluation_id} still misses chunks {missing} after attacking them")
    return summary


def _run_chunks(store, evaluation_id, model, x, y, spec, todo, n_done, progress, workers, log) -> None:
    """Attack and commit ``todo`` here (one process) or in ``workers`` spawned processes, with progress bars."""
    chunks = spec.chunks()
    stages = ("clean", *spec.attacks, "fmn", *((FMN_WARM_STAGE,) if spec.fmn_init == "autoattack" else ()))
    bars = {
        stage: tqdm(
            total=spec.n_samples,
            desc=f"{stage:>8}",
            unit="sample",
            position=i,
            leave=True,
            disable=None if progress else True,
            initial=n_done,
        )
        for i, stage in enumerate(stages)
    }

    def advance_all(n: int) -> None:
        for bar in bars.values():
            bar.update(n)

    workers = max(1, min(workers, len(todo)))
    try:
        if workers == 1:
            for index in todo:

                def stage_done(stage: str, _n_attacked: int, _n_broken: int, n: int = len(chunks[index])) -> None:
                    bars[stage].update(n)

                _attack_and_commit(
                    store,
                    evaluation_id,
                    model,
                    x,
                    y,
                    spec,
                    [index],
                    worker=None,
                    log=log,
                    on_stage_done=stage_done,
                    on_skipped=advance_all,
                    log_commits=False,
                )
        else:
            log(f"attacking {len(todo)} chunks in {workers} worker processes")
            # Clones: a slice would pickle the whole test split's storage into every job.
            jobs = [
                (i, x[chunks[i].start : chunks[i].stop].clone(), y[chunks[i].start : chunks[i].stop].clone(), spec)
                for i in todo
            ]
            settings = execution_settings(model) or {}
            results = attack_in_workers(
                model,
                jobs,
                workers=workers,
                device=spec.device,
                channels_last=bool(settings.get("channels_last")),
            )
            # closing: the workers end as soon as a commit fails, not when the traceback is freed.
            with closing(results):
                for result in results:
                    commit_chunk(store, evaluation_id, result)
                    advance_all(len(result.rows))
    finally:
        for bar in bars.values():
            bar.close()


def _note_other_settings(store: Store, evaluation_id: int, ours: dict | None, log: Callable[[str], None]) -> None:
    """Say so when a resumed evaluation's stored chunks ran under other result-relevant settings than this run's
    (typically APBENCH_CHANNELS_LAST set then, not now): the finished evaluation carries MIXED_EXECUTION_FLAG."""
    theirs = [e for e in stored_executions(store, evaluation_id) if result_settings(e) != result_settings(ours)]
    if ours is None or not theirs:
        return

    def text(execution: dict) -> str:
        return ", ".join(f"{key}={execution.get(key)}" for key in RESULT_SETTINGS)

    log(
        f"note: evaluation #{evaluation_id}'s stored chunks ran with {text(theirs[0])}, this run with {text(ours)} "
        f"({CHANNELS_LAST_ENV} sets the layout): their distances may differ in the last float bits, and the "
        f"evaluation will carry the flag {MIXED_EXECUTION_FLAG}; --overwrite recomputes it under one setting"
    )


def _check_not_starting_a_worker() -> None:
    """Refuse to run in a worker process that is still starting: a spawned worker runs the caller's script again,
    and a script that calls :func:`evaluate` outside ``if __name__ == "__main__":`` would wait there for the lock
    its own parent holds, so neither would ever end. ``_inheriting`` is the flag multiprocessing itself reads to
    refuse starting processes from a re-run script."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "evaluate() was called while a worker process was starting: worker processes run the calling script "
            'again; call it under `if __name__ == "__main__":`'
        )


def _check_split(y: torch.Tensor, spec: RunSpec) -> None:
    if spec.n_samples > len(y):
        raise ValueError(
            f"--n-samples {spec.n_samples} exceeds the {len(y)} samples of the {spec.dataset} test split; "
            f"use at most {len(y)}"
        )


def _channels_last() -> bool | None:
    """The memory layout :func:`bench.performance.fast_model` is asked for: False (the standard layout, the plain
    model's arithmetic) unless ``APBENCH_CHANNELS_LAST=1``, then None (channels_last where the architecture and the
    device gain from it and the layout check passes)."""
    value = os.environ.get(CHANNELS_LAST_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return None
    raise ValueError(f"{CHANNELS_LAST_ENV}={value!r} is neither 1 (channels_last) nor 0 (the standard layout)")


def _prepared(model: torch.nn.Module, spec: RunSpec, x: torch.Tensor, channels_last: bool | None) -> torch.nn.Module:
    """The model ready for the attacks (:func:`bench.performance.fast_model`): a prepared copy, so that the
    caller's module keeps its parameters' ``requires_grad`` and memory format. A model already prepared for the
    spec's device, in the layout asked for (``channels_last``: :func:`_channels_last`), is used as it is."""
    settings = execution_settings(model)
    if (
        settings is not None
        and settings["device"] == str(torch.device(spec.device))
        and (channels_last is None or settings["channels_last"] == channels_last)
    ):
        return model
    # The layout check (channels_last only) runs on a few of the evaluation's own inputs.
    return fast_model(model, spec.device, channels_last=channels_last, sample=x[: min(16, spec.n_samples)])


def evaluate_chunks(
    store: Store,
    evaluation_id: int,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: RunSpec,
    chunk_ids,
    *,
    worker: str | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> int:
    """Attack and commit the chunks ``chunk_ids`` (indices into ``spec.chunks()``) of an open evaluation.

    The unit of work of an executor: any number of processes, on any machines reaching the store, may run it on
    one evaluation at once, on disjoint or overlapping chunk sets. A chunk already committed is skipped (checked
    again before each chunk, so processes sharing a set skip each other's work), and a chunk two processes
    attacked at once is stored once (:func:`bench.evaluation.commits.commit_chunk`); the results do not depend on
    which process attacks which chunk (same inputs, same seed per chunk). Call :func:`finalize_evaluation` once no
    chunk is missing.

    Args:
        store: the results store.
        evaluation_id: from :func:`open_evaluation` with the same ``spec``.
        model: the network (inputs in [0, 1], logits out); a prepared copy runs the attacks (:func:`_prepared`).
        x, y: the dataset's test split in canonical order.
        spec: the run spec the evaluation was opened with.
        chunk_ids: the chunks to attack, in that order.
        worker: the executor's name for this worker (a SLURM array task id, ...), stored with each chunk.
        log: receives one line per chunk committed or skipped.

    Returns:
        How many chunks this call committed.
    """
    n_chunks = len(spec.chunks())
    chunk_ids = list(dict.fromkeys(int(i) for i in chunk_ids))
    outside = [i for i in chunk_ids if not 0 <= i < n_chunks]
    if outside:
        raise ValueError(f"chunk indices {outside} out of range: the spec has {n_chunks} chunks, 0 to {n_chunks - 1}")
    _check_split(y, spec)
    channels_last = _channels_last()
    todo = set(missing_chunks(store, evaluation_id, spec))
    chunk_ids = [i for i in chunk_ids if i in todo]
    if not chunk_ids:
        return 0
    return _attack_and_commit(
        store, evaluation_id, _prepared(model, spec, x, channels_last), x, y, spec, chunk_ids, worker=worker, log=log
    )


def _attack_and_commit(
    store: Store,
    evaluation_id: int,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: RunSpec,
    chunk_ids: list[int],
    *,
    worker: str | None,
    log: Callable[[str], None],
    on_stage_done: Callable[[str, int, int], None] | None = None,
    on_skipped: Callable[[int], None] | None = None,
    log_commits: bool = True,
) -> int:
    chunks = spec.chunks()
    committed = 0
    for index in chunk_ids:
        c = chunks[index]
        if is_committed(store, evaluation_id, index):
            log(f"chunk {index} (samples {c.start}-{c.stop - 1}) was committed by another worker; skipped")
            if on_skipped is not None:
                on_skipped(len(c))
            continue
        result = attack_one_chunk(
            model, x[c.start : c.stop], y[c.start : c.stop], spec, index, worker=worker, on_stage_done=on_stage_done
        )
        if commit_chunk(store, evaluation_id, result):
            committed += 1
            if log_commits:
                seconds = sum(result.attack_seconds.values())
                log(f"chunk {index} (samples {c.start}-{c.stop - 1}) committed after {seconds:.1f} s attacking")
        else:
            log(
                f"chunk {index} (samples {c.start}-{c.stop - 1}) was committed by another worker meanwhile; kept theirs"
            )
    return committed
