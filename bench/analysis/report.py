"""Finding models and evaluations by what a person types, and gathering everything known about one model.

The functions here read the store (through an open session) and return plain data; formatting for the
terminal is in :mod:`bench.cli_analysis`, for the site in ``leaderboard/``.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.analysis.curves import attack_breakdown, robust_at
from bench.analysis.records import EvaluationRecords, IncomparableError, latest_evaluation, load_records
from bench.analysis.reported import reevaluation_drop, reported_all
from bench.analysis.stats import wilson_interval
from bench.analysis.thin_ice import ThinIce, thin_ice
from bench.store import Evaluation, Model

EVALUATION_PREFIX = "eval:"
ACCURACIES = (
    ("clean", "clean_accuracy"),
    ("autoattack", "aa_robust_accuracy"),
    ("fmn", "fmn_robust_accuracy"),
    ("best_known", "best_robust_accuracy"),
)


def resolve_model(session: Session, ref: str | int) -> Model:
    """A model by numeric id or by name.

    Raises:
        ValueError: nothing matches; the message says how to list the stored models.
    """
    text = str(ref).strip()
    row = None
    if text.isdigit():
        row = session.get(Model, int(text))
    if row is None:
        row = session.scalars(select(Model).where(Model.name == text)).one_or_none()
    if row is None:
        raise ValueError(
            f"no model {text!r} in the store (give its numeric id or its name; `bench results` lists them)"
        )
    return row


def resolve_evaluation(session: Session, ref: str | int, protocol_hash: str | None = None) -> Evaluation:
    """``eval:N`` is evaluation N; anything else names a model, whose newest complete evaluation is taken.

    Args:
        ref: ``eval:12``, a model id or a model name.
        protocol_hash: prefer the model's newest complete evaluation under this protocol; when it has none
            there, its newest complete evaluation under any protocol is returned (the analysis that needs
            two comparable evaluations then refuses with the difference).

    Raises:
        ValueError: no such evaluation or model, or the model has no complete evaluation.
    """
    text = str(ref).strip()
    if text.startswith(EVALUATION_PREFIX):
        number = text[len(EVALUATION_PREFIX) :]
        ev = session.get(Evaluation, int(number)) if number.isdigit() else None
        if ev is None:
            raise ValueError(f"no evaluation {text!r} in the store; `bench results` lists the evaluation ids")
        return ev
    model = resolve_model(session, text)
    ev = None
    if protocol_hash is not None:
        ev = latest_evaluation(session, model.id, protocol_hash)
    ev = ev or latest_evaluation(session, model.id)
    if ev is None:
        raise ValueError(
            f"model {model.name!r} has no complete evaluation; evaluate it first with `bench evaluate` "
            "(an unfinished run resumes when the same command is run again)"
        )
    return ev


def intervals(ev: Evaluation) -> dict[str, tuple[float, float, float]]:
    """``{name: (accuracy, low, high)}``: the evaluation's stored accuracies with Wilson 95 % intervals."""
    out = {}
    for name, attr in ACCURACIES:
        value = getattr(ev, attr)
        if value is None:
            continue
        low, high = wilson_interval(round(value * ev.n_samples), ev.n_samples)
        out[name] = (value, low, high)
    return out


def _threat(ev: Evaluation) -> tuple[str | None, float | None]:
    spec = ev.spec or {}
    eps = spec.get("eps_value")
    return spec.get("norm"), (float(eps) if eps is not None else None)


def drop_rows(session: Session) -> list[dict[str, Any]]:
    """One row per complete evaluation of a model that has a reported number under the same threat model.

    The drop is reported robust − measured AutoAttack robust accuracy, in percentage points (the thin-ice
    paper's Table 1 "Drop %"); accuracies are fractions.
    """
    rows = []
    evaluations = session.scalars(
        select(Evaluation).where(Evaluation.status == "complete").order_by(Evaluation.model_id, Evaluation.id)
    )
    for ev in evaluations:
        model = ev.model
        norm, eps = _threat(ev)
        found = reported_all(model, norm, eps)
        if not found:
            continue
        rep = found[0]
        acc = intervals(ev).get("autoattack")
        rows.append(
            {
                "model_id": model.id,
                "model": model.name,
                "method": model.method,
                "arch": model.arch,
                "dataset": model.dataset,
                "structure": model.structure,
                "sparsity": model.measured_sparsity,
                "evaluation_id": ev.id,
                "norm": norm,
                "eps": (ev.spec or {}).get("eps"),
                "n": ev.n_samples,
                "reported_clean": rep.clean,
                "reported_robust": rep.robust,
                "reported_attack": rep.attack,
                "reported_source": rep.source,
                "reported_origin": rep.origin,
                "reported_kind": rep.kind,
                "measured_clean": ev.clean_accuracy,
                "measured_robust": ev.aa_robust_accuracy,
                "measured_robust_low": acc[1] if acc else None,
                "measured_robust_high": acc[2] if acc else None,
                "drop_points": reevaluation_drop(rep, ev.aa_robust_accuracy),
            }
        )
    return rows


def parent_thin_ice(session: Session, model: Model, records: EvaluationRecords) -> ThinIce | None:
    """Thin-ice statistics of ``model`` against its dense parent's newest evaluation under the same protocol.

    None when the model has no parent or the parent has no comparable complete evaluation.
    """
    if model.parent_id is None:
        return None
    dense_ev = latest_evaluation(session, model.parent_id, records.protocol_hash)
    if dense_ev is None:
        return None
    try:
        return thin_ice(load_records(session, dense_ev.id), records)
    except IncomparableError:
        return None


def model_report(session: Session, ref: str | int) -> dict[str, Any]:
    """Everything known about one model: its figures, every evaluation (with intervals, the per-stage
    breakdown and security-curve points), the reported numbers and drops, thin ice against its parent, and
    the provenance of the model and of each evaluation.
    """
    model = resolve_model(session, ref)
    parent = session.get(Model, model.parent_id) if model.parent_id is not None else None
    children = session.scalars(select(Model).where(Model.parent_id == model.id).order_by(Model.id)).all()
    evaluations = session.scalars(
        select(Evaluation).where(Evaluation.model_id == model.id).order_by(Evaluation.id.desc())
    ).all()
    evs = []
    for ev in evaluations:
        entry: dict[str, Any] = {
            "id": ev.id,
            "status": ev.status,
            "spec": dict(ev.spec or {}),
            "protocol_hash": ev.protocol_hash,
            "n": ev.n_samples,
            "intervals": intervals(ev),
            "fmn_median_distance": ev.fmn_median_distance,
            "n_fmn_beat_aa": ev.n_fmn_beat_aa,
            "flags": list(ev.flags or []),
            "unreliable": ev.unreliable,
            "attack_seconds": dict(ev.attack_seconds or {}),
            "provenance": dict(ev.provenance or {}),
            "started_at": ev.started_at,
            "finished_at": ev.finished_at,
        }
        if ev.status == "complete":
            records = load_records(session, ev.id)
            entry["breakdown"] = attack_breakdown(records)
            entry["curve"] = [(k / 2 * records.eps, robust_at(records, k / 2 * records.eps)) for k in range(7)]
            norm, eps = _threat(ev)
            entry["reported"] = [
                (rep, reevaluation_drop(rep, ev.aa_robust_accuracy)) for rep in reported_all(model, norm, eps)
            ]
            entry["thin_ice"] = parent_thin_ice(session, model, records)
        evs.append(entry)
    return {
        "model": model,
        "parent": parent,
        "children": list(children),
        "evaluations": evs,
        "reported": reported_all(model),
    }


def percent(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage string, ``-`` for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.{digits}f} %"
