"""Finalising an evaluation: its aggregates computed from the stored rows once every chunk is in, and its summary.

Accuracies and distances come from the per-sample rows, attack seconds (summed per stage over all chunks), flags
(their union, with those derived from the aggregates) and AutoAttack warnings (in chunk order) from
``evaluation_chunks``. Nothing is accumulated while chunks are committed, so the figures do not depend on how the
chunks were split between processes or runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select, update

from bench.analysis.best_known import distance_gap, eps_float32
from bench.analysis.stats import SampleOutcome, aggregate, wilson_interval
from bench.attacks.autoattack import square_check_flags
from bench.evaluation.commits import EVALUATIONS, check_evaluation
from bench.evaluation.flags import (
    BEST_KNOWN_ABOVE_EPS_FLAG,
    FMN_BEAT_AA_FLAG,
    MIXED_EXECUTION_FLAG,
    UNRELIABLE_FLAGS,
    distinct_executions,
    result_settings,
)
from bench.provenance import environment, utcnow
from bench.spec import RunSpec
from bench.store import Evaluation, Model, SampleResult, Store
from bench.store.schema import EvaluationChunk


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


def finalize_evaluation(store: Store, evaluation_id: int, spec: RunSpec) -> EvaluationSummary | None:
    """Aggregate a fully committed evaluation and mark it complete; None while some chunk is missing.

    Every figure comes from the stored rows: accuracies and distances from the per-sample rows, attack seconds
    (summed per stage over all chunks), flags (their union, with those derived from the aggregates) and AutoAttack
    warnings (in chunk order) from ``evaluation_chunks``. Idempotent: the row is written by one conditional UPDATE
    (``WHERE status = 'running'``), so whichever of several concurrent or repeated calls commits first writes it
    and the others, finding it complete, return it as stored.
    """
    with store.session() as s:
        status = check_evaluation(s, evaluation_id, spec)
    if status != "complete":
        values = _aggregates(store, evaluation_id, spec)
        if values is None:
            return None
        with store.session() as s:
            s.execute(
                update(EVALUATIONS)
                .where(EVALUATIONS.c.id == evaluation_id, EVALUATIONS.c.status == "running")
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
    executions = distinct_executions(c.execution for c in chunks)
    if len({result_settings(e) for e in executions}) > 1:
        flags.add(MIXED_EXECUTION_FLAG)
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
