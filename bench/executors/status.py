"""``bench status``: where each evaluation stands, read from the store alone (no scheduler is asked).

Each committed chunk has a row (``evaluation_chunks``) with its attack seconds, the worker that attacked it, its host
and when it started and finished; an evaluation's progress is the chunks with a row against the chunks its spec
makes. "Recently" is a window of at least ten minutes, or three times the mean wall time of a chunk when chunks are
slower than that, so a worker busy with one long chunk still counts. The estimate of what remains is the mean wall
time of a chunk times the missing chunks, divided by the workers seen recently: it assumes they keep going.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from datetime import datetime

from bench.analysis.format import MISSING

MIN_RECENT_S = 600.0
RECENT_CHUNKS = 3.0


@dataclass
class EvaluationStatus:
    """One evaluation's progress (see the module doc); ``remaining_s`` is None when nothing is running."""

    evaluation_id: int
    model: str
    protocol: str
    status: str  # complete | running | stalled | waiting | unfinalised
    chunks_done: int
    chunks_total: int
    samples_stored: int
    n_samples: int
    attack_seconds: float
    seconds_per_chunk: float | None
    workers_recent: list[str] = field(default_factory=list)
    workers_total: int = 0
    remaining_s: float | None = None
    last_chunk_at: datetime | None = None
    started_at: datetime | None = None


def _status(complete: bool, done: int, total: int, last: datetime | None, window: float, now: datetime) -> str:
    if complete:
        return "complete"
    if done >= total:
        return "unfinalised"
    if last is None:
        return "waiting"
    return "running" if (now - last).total_seconds() <= window else "stalled"


def evaluation_status(store, model: str | None = None, *, now: datetime | None = None) -> list[EvaluationStatus]:
    """The status of every evaluation in ``store`` (of the models whose name matches ``model``, a name or a
    shell pattern, or whose id it is), oldest first.

    Raises:
        ValueError: ``model`` matches no stored model.
    """
    from sqlalchemy import func, select

    from bench.provenance import utcnow
    from bench.spec import RunSpec
    from bench.store import Evaluation, Model, SampleResult
    from bench.store.schema import EvaluationChunk

    now = now or utcnow()
    with store.session() as s:
        models = s.execute(select(Model.id, Model.name)).all()
        if model is not None:
            picked = {
                mid for mid, name in models if name == model or fnmatch.fnmatchcase(name, model) or str(mid) == model
            }
            if not picked:
                raise ValueError(f"no stored model matches {model!r} (bench db list shows them)")
        else:
            picked = {mid for mid, _ in models}
        names = dict(models)
        evaluations = s.scalars(select(Evaluation).where(Evaluation.model_id.in_(picked)).order_by(Evaluation.id)).all()
        ids = [ev.id for ev in evaluations]
        stored = dict(
            s.execute(
                select(SampleResult.evaluation_id, func.count())
                .where(SampleResult.evaluation_id.in_(ids))
                .group_by(SampleResult.evaluation_id)
            ).all()
        )
        chunks: dict[int, list] = {i: [] for i in ids}
        for chunk in s.scalars(select(EvaluationChunk).where(EvaluationChunk.evaluation_id.in_(ids))):
            chunks[chunk.evaluation_id].append(chunk)
        out = []
        for ev in evaluations:
            spec = RunSpec.from_dict(ev.spec)
            rows = chunks[ev.id]
            total = len(spec.chunks())
            attack = sum(float(v) for c in rows for v in (c.attack_seconds or {}).values())
            walls = [
                (c.finished_at - c.started_at).total_seconds()
                for c in rows
                if c.started_at is not None and c.finished_at is not None
            ]
            # Chunks migrated from an older store carry no times: their attack seconds stand in for wall time.
            per_chunk = (sum(walls) / len(walls)) if walls else (attack / len(rows) if rows else None)
            window = max(MIN_RECENT_S, RECENT_CHUNKS * per_chunk) if per_chunk else MIN_RECENT_S
            finished = [c.finished_at for c in rows if c.finished_at is not None]
            last = max(finished) if finished else None
            recent = sorted(
                {
                    c.worker or c.host or "?"
                    for c in rows
                    if c.finished_at is not None and (now - c.finished_at).total_seconds() <= window
                }
            )
            status = _status(ev.status == "complete", len(rows), total, last, window, now)
            missing = total - len(rows)
            remaining = None
            if status == "running" and per_chunk is not None and recent:
                remaining = per_chunk * missing / len(recent)
            out.append(
                EvaluationStatus(
                    evaluation_id=ev.id,
                    model=names[ev.model_id],
                    protocol=f"{spec.norm} {spec.eps} AA-{spec.version} N={spec.n_samples}",
                    status=status,
                    chunks_done=len(rows),
                    chunks_total=total,
                    samples_stored=stored.get(ev.id, 0),
                    n_samples=ev.n_samples,
                    attack_seconds=attack,
                    seconds_per_chunk=per_chunk,
                    workers_recent=recent,
                    workers_total=len({c.worker or c.host or "?" for c in rows}),
                    remaining_s=remaining,
                    last_chunk_at=last,
                    started_at=ev.started_at,
                )
            )
        return out


def format_duration(seconds: float | None) -> str:
    """``45s``, ``3m20s``, ``2h05m``, ``3d04h``; the missing-value mark for None."""
    if seconds is None or not math.isfinite(seconds):
        return MISSING
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
