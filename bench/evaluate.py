"""The standardized evaluator: AutoAttack + FMN per sample, committed chunk by chunk, resumable, shareable.

Flow: dataset + checkpoint → model → attacks → store. One evaluation = one model × one
:class:`~bench.spec.RunSpec`. Samples are processed in fixed chunks of ``spec.batch_size``. Each chunk's
per-sample rows and its bookkeeping row (``evaluation_chunks``: attack seconds, flags, warnings, host, device,
worker) are committed in one transaction, both inserted with ON CONFLICT DO NOTHING: a run killed at any point
restarts at the chunks without rows, a chunk committed twice (a retried task, two workers racing) is stored once,
and no shared row is rewritten while chunks are committed, so any number of processes on any machines can work on
one evaluation (SQLite or PostgreSQL). The evaluation's aggregates are computed from the stored rows when it is
finalised. An evaluation whose rows are complete is reused unless ``overwrite`` is given.

The pieces executors build on: :func:`open_evaluation` (race-free get-or-create), :func:`missing_chunks`,
:func:`evaluate_chunks` (attack and commit a subset of chunks) and :func:`finalize_evaluation` (idempotent);
:func:`evaluate` runs them on this machine (one process, or CPU worker processes).

Under the default spec (``fmn_init="autoattack"``) FMN runs a second time, started from AutoAttack's adversarial
example, on every sample AutoAttack broke, and each row stores the best-known minimal distance over plain FMN, that
run and AutoAttack's own perturbation (:mod:`bench.analysis.best_known`): no stored best-known distance exceeds a
perturbation the evaluation already holds. The plain FMN figures stay as they were (the thin-ice paper's).
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import math
import multiprocessing
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from tqdm.auto import tqdm

from bench.analysis.best_known import FMN, FMN_FROM_AUTOATTACK, autoattack_source, best_known, distance_gap, eps_float32
from bench.analysis.stats import SampleOutcome, aggregate, wilson_interval
from bench.attacks.autoattack import AA_FLAGS, run_autoattack, square_check_flags
from bench.attacks.fmn import NotAdversarialError, minimum_norm
from bench.attacks.utils import logit_difference
from bench.performance import execution_settings, fast_model
from bench.provenance import environment, utcnow
from bench.spec import RunSpec
from bench.store import Evaluation, Model, SampleResult, Store
from bench.store.db import _sqlite_file
from bench.store.schema import EvaluationChunk

try:
    import fcntl
except ImportError:  # not POSIX: evaluations of a SQLite store are not locked against each other (_RunLock)
    fcntl = None

FMN_BEAT_AA_FLAG = "fmn_beat_autoattack"
# AutoAttack's own clean pass disagreed with ours on some sample (a randomised or input-dependent model).
CLEAN_DISAGREEMENT_FLAG = "clean_pass_disagreement"
# Our forward pass did not find an adversarial example AutoAttack returned adversarial (the same kind of model):
# FMN does not start from it and its norm is no best-known distance.
AA_ADV_NOT_REPRODUCED_FLAG = "autoattack_adversarial_not_reproduced"
# A sample AutoAttack broke at eps ended with a best-known distance above eps: AutoAttack's own perturbation, rounded
# in float32, exceeds eps by a last-place unit and neither FMN run found a smaller one. Visible, not unreliable.
BEST_KNOWN_ABOVE_EPS_FLAG = "best_known_above_eps"
UNRELIABLE_FLAGS = AA_FLAGS | {CLEAN_DISAGREEMENT_FLAG, AA_ADV_NOT_REPRODUCED_FLAG}
# The stage name of FMN's warm start (timings, progress bars).
FMN_WARM_STAGE = FMN_FROM_AUTOATTACK


@dataclass
class EvaluationSummary:
    """What ``bench evaluate`` prints at the end; every figure is derived from the stored rows."""

    evaluation_id: int
    model_name: str
    spec: dict[str, Any]
    n: int
    clean_accuracy: float
    aa_robust_accuracy: float
    fmn_robust_accuracy: float
    best_robust_accuracy: float
    fmn_median_distance: float | None
    n_fmn_beat_aa: int
    flags: list[str]
    unreliable: bool
    attack_seconds: dict[str, float]
    reused: bool = False
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Plain FMN against the best-known distances (None for the protocol without FMN's warm start).
    best_median_distance: float | None = None
    fmn_local_optimality: float | None = None
    fmn_best_median_ratio: float | None = None
    n_fmn_above_best: int | None = None

    @classmethod
    def from_row(cls, ev: Evaluation, reused: bool = False) -> EvaluationSummary:
        n = ev.n_samples
        accs = {
            "clean": ev.clean_accuracy,
            "autoattack": ev.aa_robust_accuracy,
            "fmn": ev.fmn_robust_accuracy,
            "best_known": ev.best_robust_accuracy,
        }
        return cls(
            evaluation_id=ev.id,
            model_name=ev.model.name,
            spec=ev.spec,
            n=n,
            clean_accuracy=ev.clean_accuracy,
            aa_robust_accuracy=ev.aa_robust_accuracy,
            fmn_robust_accuracy=ev.fmn_robust_accuracy,
            best_robust_accuracy=ev.best_robust_accuracy,
            fmn_median_distance=ev.fmn_median_distance,
            n_fmn_beat_aa=ev.n_fmn_beat_aa,
            flags=list(ev.flags),
            unreliable=ev.unreliable,
            attack_seconds=dict(ev.attack_seconds),
            reused=reused,
            intervals={k: wilson_interval(round(v * n), n) for k, v in accs.items()},
            best_median_distance=ev.best_median_distance,
            fmn_local_optimality=ev.fmn_local_optimality,
            fmn_best_median_ratio=ev.fmn_best_median_ratio,
            n_fmn_above_best=ev.n_fmn_above_best,
        )


def attack_chunk(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sample_ids: list[int],
    spec: RunSpec,
    *,
    run_checks: bool,
    on_stage_done: Callable[[str, int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float], set[str], list[str]]:
    """Clean pass, AutoAttack, FMN and (spec ``fmn_init="autoattack"``) FMN from AutoAttack's adversarial examples on
    one chunk; returns (rows, seconds per stage, flags, warnings)."""
    device = spec.device
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x.to(device)).cpu()
    pred = logits.argmax(1)
    margin = logit_difference(logits, y)  # z_y − max_{j≠y} z_j: positive when classified correctly
    seconds["clean"] = time.perf_counter() - start
    if on_stage_done is not None:
        on_stage_done("clean", len(y), int((pred != y).sum()))

    aa = run_autoattack(
        model,
        x,
        y,
        norm=spec.norm,
        eps=spec.eps_value,
        version=spec.version,
        seed=spec.seed,
        device=device,
        run_checks=run_checks,
        on_stage_done=on_stage_done,
    )
    seconds.update(aa.seconds)

    # Protocol section 4: misclassified samples are attacked with their *predicted* class as the label,
    # giving the distance needed to leave it; stored as a negative epsilon.
    correct = pred == y
    fmn_labels = torch.where(correct, y, pred)
    p = _norm_p(spec.norm)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        fmn = minimum_norm(model, x.to(device), fmn_labels.to(device), norm=p, steps=spec.fmn_steps)
    seconds["fmn"] = time.perf_counter() - start
    if on_stage_done is not None:
        on_stage_done("fmn", len(y), int(fmn.success.sum()))

    # AutoAttack decides clean correctness with its own forward pass. For a deterministic model the two passes
    # agree; where they do not (a randomised or input-dependent model), a sample counts as AutoAttack-robust
    # only if both passes classified it correctly, and the evaluation is flagged (potentially unreliable).
    aa_robust = aa.robust.cpu() & correct
    flags = set(aa.flags)
    if bool((aa.clean_pred.cpu() != pred).any()):
        flags.add(CLEAN_DISAGREEMENT_FLAG)

    aa_distance: dict[int, float] = {}
    warm_distance: dict[int, float] = {}
    if spec.fmn_init == "autoattack":
        start = time.perf_counter()
        aa_distance, warm_distance, reproduced = _fmn_from_autoattack(model, x, y, correct, aa, spec)
        if not reproduced:
            flags.add(AA_ADV_NOT_REPRODUCED_FLAG)
        seconds[FMN_WARM_STAGE] = time.perf_counter() - start
        if on_stage_done is not None:
            on_stage_done(FMN_WARM_STAGE, len(aa_distance), len(warm_distance))

    rows = []
    for i, sid in enumerate(sample_ids):
        success = bool(fmn.success[i])
        distance = float(fmn.distance[i]) if success else None
        signed = None if distance is None else (distance if correct[i] else -distance)
        fmn_broke = bool(correct[i]) and distance is not None and distance <= spec.eps_value
        best: dict[str, Any] = dict(
            aa_distance=None, fmn_warm_distance=None, best_distance=None, best_attack=None, signed_best_eps=None
        )
        if spec.fmn_init == "autoattack":
            # Ties go to the attack that produced the point: AutoAttack before the FMN run that started from it.
            candidates = [(FMN, distance)]
            if i in aa_distance:
                candidates = [
                    (autoattack_source(aa.broken_by[i]), aa_distance[i]),
                    *candidates,
                    (FMN_FROM_AUTOATTACK, warm_distance.get(i)),
                ]
            best_distance, best_attack = best_known(candidates)
            best.update(
                aa_distance=aa_distance.get(i),
                fmn_warm_distance=warm_distance.get(i),
                best_distance=best_distance,
                best_attack=best_attack,
                signed_best_eps=None if best_distance is None else (best_distance if correct[i] else -best_distance),
            )
        rows.append(
            dict(
                sample_id=sid,
                label=int(y[i]),
                clean_pred=int(pred[i]),
                clean_correct=bool(correct[i]),
                logit_margin=float(margin[i]),
                aa_robust=bool(aa_robust[i]),
                aa_broken_by=aa.broken_by[i],
                adv_pred=int(aa.adv_pred[i]),
                fmn_label=int(fmn_labels[i]),
                fmn_success=success,
                fmn_distance=distance,
                signed_eps=signed,
                fmn_adv_pred=int(fmn.adv_pred[i]),
                best_robust=bool(aa_robust[i]) and not fmn_broke,
                **best,
            )
        )
    return rows, seconds, flags, aa.warnings


def _fmn_from_autoattack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, aa, spec: RunSpec
) -> tuple[dict[int, float], dict[int, float], bool]:
    """FMN started from AutoAttack's adversarial example on each sample AutoAttack broke (and we classify right).

    Returns:
        ``(aa_distance, warm_distance, reproduced)``: per chunk index, the norm of AutoAttack's perturbation and
        the warm-started FMN's distance; whether our forward passes found every such example adversarial (one they
        do not is left out of both: it is not a perturbation we hold; when FMN's own check disagrees with ours, a
        model whose output changes from one pass to the next, the whole chunk is left out).
    """
    device, p = spec.device, _norm_p(spec.norm)
    broken = [i for i, stage in enumerate(aa.broken_by) if stage is not None and bool(correct[i])]
    if not broken:
        return {}, {}, True
    idx = torch.tensor(broken)
    xs, ys, starts = x[idx].to(device), y[idx].to(device), aa.x_adv[idx].to(device)
    with torch.no_grad():
        adversarial = (model(starts).argmax(1) != ys).cpu()
    keep = adversarial.nonzero().flatten()
    # Measured as minimum_norm measures FMN's distances: the same float32 perturbation norm.
    norms = torch.linalg.vector_norm((starts - xs).flatten(1), ord=p, dim=1).float().cpu()
    aa_distance = {broken[k]: float(norms[k]) for k in keep.tolist()}
    warm_distance: dict[int, float] = {}
    if len(keep):
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                warm = minimum_norm(
                    model, xs[keep], ys[keep], norm=p, steps=spec.fmn_steps, starting_points=starts[keep]
                )
        except NotAdversarialError:
            return {}, {}, False
        for j, k in enumerate(keep.tolist()):
            if bool(warm.success[j]):
                warm_distance[broken[k]] = float(warm.distance[j])
    return aa_distance, warm_distance, bool(adversarial.all())


def _norm_p(norm: str) -> float:
    return math.inf if norm == "Linf" else 2.0


def _device_label(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} {torch.cuda.get_device_name(dev)}"
    return str(dev)


@dataclass
class ChunkResult:
    """One attacked chunk, ready to commit: its per-sample rows and its bookkeeping (an ``evaluation_chunks`` row)."""

    chunk_index: int
    first_sample: int
    rows: list[dict[str, Any]]
    attack_seconds: dict[str, float]
    flags: list[str]
    warnings: list[str]
    host: str
    device: str
    worker: str | None
    pid: int
    execution: dict[str, Any] | None
    started_at: Any
    finished_at: Any


def _attack(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: RunSpec,
    index: int,
    *,
    worker: str | None,
    on_stage_done: Callable[[str, int, int], None] | None = None,
) -> ChunkResult:
    """Attack chunk ``index`` of ``spec`` (``x, y``: that chunk's samples)."""
    chunk = spec.chunks()[index]
    started = utcnow()
    # The sanity checks run once per evaluation, on its first chunk, whichever process attacks it: the flags they
    # raise then do not depend on how the chunks were split between processes or runs.
    rows, seconds, flags, warnings = attack_chunk(
        model, x, y, list(chunk), spec, run_checks=index == 0, on_stage_done=on_stage_done
    )
    return ChunkResult(
        chunk_index=index,
        first_sample=chunk.start,
        rows=rows,
        attack_seconds=seconds,
        flags=sorted(flags),
        warnings=list(warnings),
        host=socket.gethostname(),
        device=_device_label(spec.device),
        worker=worker,
        pid=os.getpid(),
        execution=execution_settings(model),
        started_at=started,
        finished_at=utcnow(),
    )


def _insert(session, table):
    """``INSERT`` of the session's dialect, which has ``on_conflict_do_nothing`` (SQLite and PostgreSQL)."""
    return (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(table)


_CHUNKS = EvaluationChunk.__table__
_SAMPLES = SampleResult.__table__
_EVALUATIONS = Evaluation.__table__


def _commit_chunk(store: Store, evaluation_id: int, result: ChunkResult) -> bool:
    """Commit one chunk's per-sample rows and its ``evaluation_chunks`` row in one transaction, idempotently.

    Both inserts are ON CONFLICT DO NOTHING. The chunk row goes first: a second commit of the same chunk (a retried
    task, two workers racing on it) finds it, on PostgreSQL after waiting for the first transaction, and inserts
    nothing. Nothing is read and rewritten, so concurrent commits of different chunks cannot lose an update.

    Returns:
        Whether this call committed the chunk (False: it was already committed, and the rows stored are those of
        the first commit, from the same inputs and seed).
    """
    try:
        with store.session() as s:
            statement = (
                _insert(s, _CHUNKS)
                .values(
                    evaluation_id=evaluation_id,
                    chunk_index=result.chunk_index,
                    first_sample=result.first_sample,
                    n_samples=len(result.rows),
                    attack_seconds=result.attack_seconds,
                    flags=result.flags,
                    warnings=result.warnings,
                    host=result.host,
                    device=result.device,
                    worker=result.worker,
                    pid=result.pid,
                    execution=result.execution,
                    started_at=result.started_at,
                    finished_at=result.finished_at,
                )
                .on_conflict_do_nothing(index_elements=["evaluation_id", "chunk_index"])
            )
            if s.get_bind().dialect.name == "postgresql":
                # psycopg reports no row count for the INSERT SQLAlchemy gives an implicit RETURNING; ask for one.
                inserted = s.execute(statement.returning(_CHUNKS.c.id)).first() is not None
            else:  # SQLite's count of changed rows (RETURNING needs SQLite 3.35)
                inserted = s.execute(statement).rowcount == 1
            if not inserted:
                return False
            s.execute(
                _insert(s, _SAMPLES).on_conflict_do_nothing(index_elements=["evaluation_id", "sample_id"]),
                [{"evaluation_id": evaluation_id, **row} for row in result.rows],
            )
            return True
    except IntegrityError:
        with store.session() as s:
            if s.get(Evaluation, evaluation_id) is not None:
                raise
        raise RuntimeError(
            f"evaluation #{evaluation_id} was deleted (--overwrite or bench db rm in another process) while chunk "
            f"{result.chunk_index} was attacked; nothing was committed"
        ) from None


def _check_evaluation(session, evaluation_id: int, spec: RunSpec) -> str:
    """The evaluation's status, after checking that it exists and was opened under ``spec``."""
    row = session.execute(
        select(Evaluation.spec_hash, Evaluation.status).where(Evaluation.id == evaluation_id)
    ).one_or_none()
    if row is None:
        raise ValueError(f"no evaluation #{evaluation_id} in the store; open one with open_evaluation")
    if row.spec_hash != spec.hash:
        raise ValueError(
            f"evaluation #{evaluation_id} was opened under another run spec (hash {row.spec_hash[:12]}…, this spec's "
            f"is {spec.hash[:12]}…); pass the spec it was opened with"
        )
    return row.status


def _check_split(y: torch.Tensor, spec: RunSpec) -> None:
    if spec.n_samples > len(y):
        raise ValueError(
            f"--n-samples {spec.n_samples} exceeds the {len(y)} samples of the {spec.dataset} test split; "
            f"use at most {len(y)}"
        )


def _prepared(model: torch.nn.Module, spec: RunSpec, x: torch.Tensor) -> torch.nn.Module:
    """The model ready for the attacks (:func:`bench.performance.fast_model`): a prepared copy, so that the
    caller's module keeps its parameters' ``requires_grad`` and memory format; a model already prepared for the
    spec's device is used as it is."""
    settings = execution_settings(model)
    if settings is not None and settings["device"] == str(torch.device(spec.device)):
        return model
    # The layout check runs on a few of the evaluation's own inputs.
    return fast_model(copy.deepcopy(model), spec.device, sample=x[: min(16, spec.n_samples)])


def open_evaluation(store: Store, model_id: int, spec: RunSpec, *, overwrite: bool = False) -> int:
    """The id of model ``model_id``'s evaluation under ``spec``, created (status "running") where there is none.

    Race-free: the row is inserted with ON CONFLICT DO NOTHING on its unique key (model, spec hash), then read in
    the same transaction, so processes opening one evaluation at once all get the one row. A complete evaluation
    is returned as it is (:func:`finalize_evaluation` gives its summary without recomputing).

    Args:
        overwrite: first delete the stored evaluation with its per-sample and chunk rows (in the same transaction):
            the id returned is then a new, empty evaluation. Workers still attacking the old one fail at their next
            commit, saying so: overwrite before starting workers, not while they run.
    """
    with store.session() as s:
        if overwrite:
            old = (
                select(Evaluation.id)
                .where(Evaluation.model_id == model_id, Evaluation.spec_hash == spec.hash)
                .scalar_subquery()
            )
            # Dependents first: the foreign keys cascade too, but SQLite only with its pragma on.
            s.execute(delete(_SAMPLES).where(_SAMPLES.c.evaluation_id.in_(old)))
            s.execute(delete(_CHUNKS).where(_CHUNKS.c.evaluation_id.in_(old)))
            s.execute(delete(_EVALUATIONS).where(_EVALUATIONS.c.id.in_(old)))
        s.execute(
            _insert(s, _EVALUATIONS)
            .values(
                model_id=model_id,
                spec_hash=spec.hash,
                protocol_hash=spec.protocol_hash,
                spec=spec.to_dict(),
                status="running",
                n_samples=spec.n_samples,
                flags=[],
                unreliable=False,
                attack_seconds={},
                provenance={},
                started_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["model_id", "spec_hash"])
        )
        # READ COMMITTED: this statement sees a row another transaction committed while our insert waited for it.
        return s.scalars(
            select(Evaluation.id).where(Evaluation.model_id == model_id, Evaluation.spec_hash == spec.hash)
        ).one()


def _committed_chunks(store: Store, evaluation_id: int) -> set[int]:
    with store.session() as s:
        return set(s.scalars(select(EvaluationChunk.chunk_index).where(EvaluationChunk.evaluation_id == evaluation_id)))


def _is_committed(store: Store, evaluation_id: int, index: int) -> bool:
    with store.session() as s:
        return (
            s.scalar(
                select(EvaluationChunk.id).where(
                    EvaluationChunk.evaluation_id == evaluation_id, EvaluationChunk.chunk_index == index
                )
            )
            is not None
        )


def missing_chunks(store: Store, evaluation_id: int, spec: RunSpec) -> list[int]:
    """Indices into ``spec.chunks()`` of the chunks of evaluation ``evaluation_id`` not committed yet, ascending."""
    with store.session() as s:
        _check_evaluation(s, evaluation_id, spec)
    done = _committed_chunks(store, evaluation_id)
    return [i for i in range(len(spec.chunks())) if i not in done]


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
    attacked at once is stored once (:func:`_commit_chunk`); the results do not depend on which process attacks
    which chunk (same inputs, same seed per chunk). Call :func:`finalize_evaluation` once no chunk is missing.

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
    todo = set(missing_chunks(store, evaluation_id, spec))
    chunk_ids = [i for i in chunk_ids if i in todo]
    if not chunk_ids:
        return 0
    return _attack_and_commit(
        store, evaluation_id, _prepared(model, spec, x), x, y, spec, chunk_ids, worker=worker, log=log
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
        if _is_committed(store, evaluation_id, index):
            log(f"chunk {index} (samples {c.start}-{c.stop - 1}) was committed by another worker; skipped")
            if on_skipped is not None:
                on_skipped(len(c))
            continue
        result = _attack(
            model, x[c.start : c.stop], y[c.start : c.stop], spec, index, worker=worker, on_stage_done=on_stage_done
        )
        if _commit_chunk(store, evaluation_id, result):
            committed += 1
            if log_commits:
                seconds = sum(result.attack_seconds.values())
                log(f"chunk {index} (samples {c.start}-{c.stop - 1}) committed after {seconds:.1f} s attacking")
        else:
            log(
                f"chunk {index} (samples {c.start}-{c.stop - 1}) was committed by another worker meanwhile; kept theirs"
            )
    return committed


def finalize_evaluation(store: Store, evaluation_id: int, spec: RunSpec) -> EvaluationSummary | None:
    """Aggregate a fully committed evaluation and mark it complete; None while some chunk is missing.

    Every figure comes from the stored rows: accuracies and distances from the per-sample rows, attack seconds
    (summed per stage over all chunks), flags (their union, with those derived from the aggregates) and AutoAttack
    warnings (in chunk order) from ``evaluation_chunks``. Idempotent: the row is written by one conditional UPDATE
    (``WHERE status = 'running'``), so whichever of several concurrent or repeated calls commits first writes it
    and the others, finding it complete, return it as stored.
    """
    with store.session() as s:
        status = _check_evaluation(s, evaluation_id, spec)
    if status != "complete":
        values = _aggregates(store, evaluation_id, spec)
        if values is None:
            return None
        with store.session() as s:
            s.execute(
                update(_EVALUATIONS)
                .where(_EVALUATIONS.c.id == evaluation_id, _EVALUATIONS.c.status == "running")
                .values(**values)
            )
    with store.session() as s:
        return EvaluationSummary.from_row(s.get(Evaluation, evaluation_id))


def _aggregates(store: Store, evaluation_id: int, spec: RunSpec) -> dict[str, Any] | None:
    """The evaluation row's values once complete, from its per-sample and chunk rows; None while a chunk is missing."""
    with store.session() as s:
        chunks = s.scalars(
            select(EvaluationChunk)
            .where(EvaluationChunk.evaluation_id == evaluation_id)
            .order_by(EvaluationChunk.chunk_index)
        ).all()
        if {c.chunk_index for c in chunks} != set(range(len(spec.chunks()))):
            return None
        ev = s.get(Evaluation, evaluation_id)
        started_at = ev.started_at
        checkpoint_sha256 = s.get(Model, ev.model_id).checkpoint_sha256
        records = s.scalars(
            select(SampleResult).where(SampleResult.evaluation_id == evaluation_id).order_by(SampleResult.sample_id)
        ).all()
    if [r.sample_id for r in records] != list(range(spec.n_samples)):
        raise RuntimeError(
            f"evaluation #{evaluation_id} has every chunk committed but {len(records)} per-sample rows for "
            f"{spec.n_samples} samples; the store was changed by hand: rerun it with --overwrite"
        )
    agg = aggregate(
        [
            SampleOutcome(r.clean_correct, r.aa_robust, r.aa_broken_by, r.fmn_success, r.fmn_distance, r.best_robust)
            for r in records
        ],
        spec.eps_value,
        spec.attacks,
    )
    flags = {flag for c in chunks for flag in c.flags} | square_check_flags(agg.stage_robust_accuracy)
    if agg.n_fmn_beat_aa:
        flags.add(FMN_BEAT_AA_FLAG)
    gap_values: dict[str, Any] = {}
    if spec.fmn_init == "autoattack":
        correct = np.array([r.clean_correct for r in records], dtype=bool)
        gap = distance_gap(
            _floats(r.fmn_distance if r.fmn_success else None for r in records),
            _floats(r.best_distance for r in records),
            correct,
        )
        gap_values = dict(
            best_median_distance=gap.best_median_distance,
            fmn_local_optimality=gap.local_optimality,
            fmn_best_median_ratio=gap.median_ratio,
            n_fmn_above_best=gap.n_above,
        )
        if any(
            r.clean_correct and r.aa_distance is not None and (r.best_distance or 0.0) > eps_float32(spec.eps_value)
            for r in records
        ):
            flags.add(BEST_KNOWN_ABOVE_EPS_FLAG)
    stages = sorted({stage for c in chunks for stage in c.attack_seconds})
    # fsum: the total does not depend on the order the chunks are added in.
    attack_seconds = {stage: math.fsum(c.attack_seconds.get(stage, 0.0) for c in chunks) for stage in stages}
    warnings = [w for c in chunks for w in c.warnings]
    # The evaluation finished when its last chunk was committed (chunks moved by migration 0005 carry no times).
    finished_at = max((c.finished_at for c in chunks if c.finished_at is not None), default=None) or utcnow()
    executions = []
    for c in chunks:
        if c.execution is not None and c.execution not in executions:
            executions.append(c.execution)
    provenance = {
        **environment(spec.device),
        "protocol": spec.protocol,
        "protocol_hash": spec.protocol_hash,
        "spec_hash": spec.hash,
        "n_samples": spec.n_samples,
        "seed": spec.seed,
        "threat_model": {"norm": spec.norm, "eps": spec.eps, "eps_value": spec.eps_value},
        "autoattack_version": spec.version,
        "checkpoint_sha256": checkpoint_sha256,
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "attack_seconds": attack_seconds,
        "broken_by": agg.broken_by,
        "stage_robust_accuracy": agg.stage_robust_accuracy,
        # Where the chunks ran (environment() above describes the process that finalised the evaluation).
        "chunks": {
            "n": len(chunks),
            "hosts": sorted({c.host for c in chunks if c.host}),
            "devices": sorted({c.device for c in chunks if c.device}),
            "processes": len({(c.host, c.pid) for c in chunks if c.pid is not None}),
        },
    }
    if executions:
        provenance["execution"] = executions[0] if len(executions) == 1 else executions
    if warnings:
        provenance["autoattack_warnings"] = warnings
    return dict(
        status="complete",
        flags=sorted(flags),
        unreliable=bool(flags & UNRELIABLE_FLAGS),
        clean_accuracy=agg.clean_accuracy,
        aa_robust_accuracy=agg.aa_robust_accuracy,
        fmn_robust_accuracy=agg.fmn_robust_accuracy,
        best_robust_accuracy=agg.best_robust_accuracy,
        fmn_median_distance=agg.fmn_median_distance,
        n_fmn_beat_aa=agg.n_fmn_beat_aa,
        attack_seconds=attack_seconds,
        provenance=provenance,
        finished_at=finished_at,
        **gap_values,
    )


def _floats(values) -> np.ndarray:
    # None (no distance) becomes NaN.
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


class _RunLock:
    """At most one :func:`evaluate` per (model, run spec) at a time, across processes; released when its holder
    ends, however it ends (killed included).

    PostgreSQL: a session-level advisory lock on a connection held for the run (the server drops it with the
    connection), whose ``application_name`` names the holder's pid and host. SQLite: a POSIX record lock on one
    byte of ``<store>-evaluations.lock`` next to the store (SQLite's own files are never locked by us: closing any
    descriptor of a file drops every POSIX lock the process holds on it); ``F_GETLK`` names the holder's pid. A
    store without a file (in memory) or a system without ``fcntl`` runs unlocked.
    """

    def __init__(self, store: Store, model_id: int, spec: RunSpec) -> None:
        # 56 bits: a positive PostgreSQL bigint and a byte offset every off_t holds.
        self.key = int.from_bytes(hashlib.sha256(f"{model_id}:{spec.hash}".encode()).digest()[:7], "big")
        self.store = store
        self.held = False
        self._conn = None
        self._fd: int | None = None
        url = make_url(store.url)
        self._postgres = url.get_backend_name() == "postgresql"
        path = None if self._postgres or fcntl is None else _sqlite_file(url)
        self._path = None if path is None else Path(f"{path}-evaluations.lock")

    def try_acquire(self) -> bool:
        if self._postgres:
            if self._conn is None:
                self._conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self.held = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            if self.held:
                name = f"apbench evaluate pid {os.getpid()} on {socket.gethostname()}"[:63]
                self._conn.execute(text("SELECT set_config('application_name', :n, false)"), {"n": name})
            return self.held
        if self._path is None:
            self.held = True
            return True
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError:  # a folder we cannot write: the store cannot be written either, and says so
                self._path = None
                self.held = True
                return True
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.key)
        except OSError:  # EAGAIN or EACCES: another process holds it
            return False
        self.held = True
        return True

    def acquire(self, poll_s: float = 1.0) -> None:
        while not self.try_acquire():
            time.sleep(poll_s)

    def holder(self) -> tuple[int | None, str | None]:
        """The pid and host of the process holding the lock, where the system tells (None, None) otherwise."""
        if self._postgres and self._conn is not None:
            name = self._conn.execute(
                text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                    "AND l.classid::bigint = :hi AND l.objid::bigint = :lo "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"hi": self.key >> 32, "lo": self.key & 0xFFFFFFFF},
            ).scalar()
            found = re.fullmatch(r"apbench evaluate pid (\d+) on (.*)", name or "")
            return (int(found[1]), found[2]) if found else (None, None)
        if self._fd is not None and sys.platform.startswith("linux"):
            # struct flock on Linux (x86-64, arm64): l_type, l_whence, l_start, l_len, l_pid.
            fmt = "hhqqi"
            request = struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, self.key, 1, 0)
            try:
                kind, _, _, _, pid = struct.unpack(fmt, fcntl.fcntl(self._fd, fcntl.F_GETLK, request))
            except OSError:
                return None, None
            if kind != fcntl.F_UNLCK and pid > 0:
                return pid, socket.gethostname()
        return None, None

    def release(self) -> None:
        if self._conn is not None:
            try:
                if self.held:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                    self._conn.execute(text("RESET application_name"))
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # drops the record lock
            self._fd = None
        self.held = False


def _running_line(store: Store, evaluation_id: int, spec: RunSpec, holder: tuple[int | None, str | None]) -> str:
    with store.session() as s:
        name = s.scalar(select(Model.name).join(Evaluation).where(Evaluation.id == evaluation_id))
    n = len(spec.chunks())
    done = n - len(missing_chunks(store, evaluation_id, spec))
    pid, host = holder
    who = f"pid {pid} on {host}" if pid is not None else "another process"
    return f"evaluation #{evaluation_id} of {name} is running ({who}, chunks {done}/{n} done); waiting…"


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
            parameters, channels_last for convolution networks: :func:`bench.performance.fast_model`), which leaves
            the per-sample results as they are with the plain model.
        x, y: the dataset's test split in canonical order (only the first N are used).
        spec: the run spec.
        overwrite: discard stored results for this (model, spec) and recompute.
        progress: show progress bars (tqdm; silent anyway when not a terminal).
        workers: CPU processes attacking chunks in parallel, one torch thread each (CPU only). Chunks are
            attacked independently with the same seed, so the results do not depend on this number. The worker
            processes end with this one, killed or not (:func:`_worker_init`).
        log: receives one-line status messages (waiting, resuming, reusing).

    Returns:
        The summary, recomputed from the stored rows.
    """
    _check_split(y, spec)
    if workers > 1 and torch.device(spec.device).type != "cpu":
        raise ValueError("--workers > 1 is for CPU evaluation; on a GPU use one worker and a larger --batch-size")
    lock = _RunLock(store, model_id, spec)
    try:
        if not lock.try_acquire():
            log(_running_line(store, open_evaluation(store, model_id, spec), spec, lock.holder()))
            lock.acquire()
        return _evaluate_locked(store, model_id, model, x, y, spec, overwrite, progress, workers, log)
    finally:
        lock.release()


def _evaluate_locked(store, model_id, model, x, y, spec, overwrite, progress, workers, log) -> EvaluationSummary:
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
        _run_chunks(store, evaluation_id, _prepared(model, spec, x), x, y, spec, todo, n_done, progress, workers, log)
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
            ctx = multiprocessing.get_context("spawn")
            initargs = (model, spec.device, settings.get("channels_last"), os.getpid())
            with ctx.Pool(workers, initializer=_worker_init, initargs=initargs) as pool:
                for result in pool.imap_unordered(_worker_attack, jobs):
                    _commit_chunk(store, evaluation_id, result)
                    advance_all(len(result.rows))
    finally:
        for bar in bars.values():
            bar.close()


_WORKER_MODEL: torch.nn.Module | None = None
# How often a worker checks that the process that started it still lives (where no parent-death signal exists).
_PARENT_POLL_S = 1.0


def _die_with_parent(parent_pid: int) -> None:
    """End this worker process when ``parent_pid`` ends, however it ends (``kill -9`` included).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, the kernel kills the worker the moment its parent dies. Everywhere:
    a daemon thread polling ``os.getppid()``, which changes when the parent dies (the orphan is reparented). Without
    either, orphaned pool workers kept attacking and printed BrokenPipe tracebacks when sending their results.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="apbench-parent-watch", daemon=True).start()


def _worker_init(model: torch.nn.Module, device: str, channels_last: bool | None, parent_pid: int) -> None:
    global _WORKER_MODEL
    _die_with_parent(parent_pid)
    torch.set_num_threads(1)
    # The parent's prepared model, prepared again here with the parent's memory format (the per-process settings,
    # cuDNN's included, do not travel with a pickle).
    _WORKER_MODEL = fast_model(model, device, channels_last=channels_last)


def _worker_attack(job) -> ChunkResult:
    index, x, y, spec = job
    return _attack(_WORKER_MODEL, x, y, spec, index, worker=None)
