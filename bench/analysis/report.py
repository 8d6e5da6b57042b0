"""Finding models and evaluations by what a person types, and gathering everything known about one model.

The functions here read the store (through an open session) and return plain data; formatting for the
terminal is in :mod:`bench.cli.report` and :mod:`bench.cli.analyze`, for the site in ``leaderboard/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.analysis.curves import attack_breakdown, robust_at
from bench.analysis.records import EvaluationRecords, latest_evaluation, load_records
from bench.analysis.replicates import ReplicateSummary, setting_key, summarize_evaluations
from bench.analysis.reported import reevaluation_drop, reported_all, reported_numbers
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


def resolve_pair(session: Session, a_ref: str | int, b_ref: str | int) -> tuple[Evaluation, Evaluation]:
    """Two evaluations to compare sample by sample (thin ice, McNemar).

    ``eval:N`` is taken as given, and a model on the other side is resolved under its protocol (see
    :func:`resolve_evaluation`). When both name models, A's newest complete evaluation under a protocol B also
    has is taken, with B's newest under it; when they share none, their newest ones are returned and the
    analysis refuses, naming the difference.

    Raises:
        ValueError: no such evaluation or model, or a model has no complete evaluation.
    """
    a_text, b_text = str(a_ref).strip(), str(b_ref).strip()
    if a_text.startswith(EVALUATION_PREFIX) or not b_text.startswith(EVALUATION_PREFIX):
        a_model = None if a_text.startswith(EVALUATION_PREFIX) else resolve_model(session, a_text)
        b_model = None if b_text.startswith(EVALUATION_PREFIX) else resolve_model(session, b_text)
        if a_model is not None and b_model is not None:
            b_protocols = set(
                session.scalars(
                    select(Evaluation.protocol_hash).where(
                        Evaluation.model_id == b_model.id, Evaluation.status == "complete"
                    )
                )
            )
            a_evaluations = session.scalars(
                select(Evaluation)
                .where(Evaluation.model_id == a_model.id, Evaluation.status == "complete")
                .order_by(Evaluation.finished_at.desc(), Evaluation.id.desc())
            )
            shared = next((ev for ev in a_evaluations if ev.protocol_hash in b_protocols), None)
            if shared is not None:
                return shared, latest_evaluation(session, b_model.id, shared.protocol_hash)
        a_ev = resolve_evaluation(session, a_text)
        return a_ev, resolve_evaluation(session, b_text, a_ev.protocol_hash)
    b_ev = resolve_evaluation(session, b_text)
    return resolve_evaluation(session, a_text, b_ev.protocol_hash), b_ev


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


def drop_rows(session: Session) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per complete evaluation of a model with a reported number under the same threat model.

    The drop is the authors' claim − measured AutoAttack robust accuracy, in percentage points (the thin-ice
    paper's Table 1 "Drop %"); another benchmark's re-evaluation is given beside it (``reevaluation_*``), not
    subtracted. Accuracies are fractions.

    Returns:
        ``(rows, warnings)``: a model whose own ``reported`` numbers cannot be read is left out, with one warning
        line naming it and the problem.
    """
    rows = []
    warnings: list[str] = []
    broken: set[int] = set()
    evaluations = session.scalars(
        select(Evaluation).where(Evaluation.status == "complete").order_by(Evaluation.model_id, Evaluation.id)
    )
    for ev in evaluations:
        model = ev.model
        if model.id in broken:
            continue
        norm, eps = _threat(ev)
        try:
            found = reported_numbers(model, norm, eps)
        except Exception as err:  # one malformed model must not hide every other model's drop
            broken.add(model.id)
            text = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            warnings.append(f"model {model.name!r} skipped: {text}")
            continue
        if not found.all():
            continue
        claim, other = found.claim, found.reevaluation
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
                "reported_clean": getattr(claim, "clean", None),
                "reported_robust": getattr(claim, "robust", None),
                "reported_attack": getattr(claim, "attack", None),
                "reported_source": getattr(claim, "source", None),
                "reported_origin": getattr(claim, "origin", None),
                "measured_clean": ev.clean_accuracy,
                "measured_robust": ev.aa_robust_accuracy,
                "measured_robust_low": acc[1] if acc else None,
                "measured_robust_high": acc[2] if acc else None,
                "drop_points": reevaluation_drop(claim, ev.aa_robust_accuracy),
                "reevaluation_clean": getattr(other, "clean", None),
                "reevaluation_robust": getattr(other, "robust", None),
                "reevaluation_attack": getattr(other, "attack", None),
                "reevaluation_source": getattr(other, "source", None),
                "reevaluation_origin": getattr(other, "origin", None),
            }
        )
    return rows, warnings


DROP_COLUMNS = (
    "model_id",
    "model",
    "method",
    "arch",
    "dataset",
    "structure",
    "sparsity",
    "evaluation_id",
    "norm",
    "eps",
    "n",
    "reported_clean",
    "reported_robust",
    "reported_attack",
    "reported_source",
    "reported_origin",
    "measured_clean",
    "measured_robust",
    "measured_robust_low",
    "measured_robust_high",
    "drop_points",
    "reevaluation_clean",
    "reevaluation_robust",
    "reevaluation_attack",
    "reevaluation_source",
    "reevaluation_origin",
)


def missing_parent_evaluation(parent_name: str, protocol_hash: str, parent_protocols: Iterable[str]) -> str:
    """Why a pruned model has no thin-ice analysis when its parent has no evaluation under its protocol."""
    fix = "evaluate the parent with the same `bench evaluate` options (dataset, --n-samples, --norm, --eps, …)"
    others = sorted({h[:12] for h in parent_protocols})
    if not others:
        return f"the dense parent {parent_name} has no complete evaluation; {fix}"
    return (
        f"the dense parent {parent_name} has no complete evaluation under this protocol ({protocol_hash[:12]}); it "
        f"was evaluated under {', '.join(others)}; {fix}"
    )


def parent_thin_ice(
    session: Session, model: Model, records: EvaluationRecords, distance: str = "best"
) -> tuple[ThinIce | None, str | None]:
    """Thin-ice statistics of ``model`` against its dense parent's newest evaluation under the same protocol, with
    ε the parent's ``distance`` (``"best"``: best-known where stored, else plain FMN; ``"fmn"``: plain FMN).

    Returns:
        ``(statistics, None)``, or ``(None, why not)`` when the parent has no comparable complete evaluation or
        the analysis fails, or ``(None, None)`` for a model without a parent.
    """
    if model.parent_id is None:
        return None, None
    parent = session.get(Model, model.parent_id)
    if parent is None:
        return None, f"its dense parent (model #{model.parent_id}) is not in the store"
    dense_ev = latest_evaluation(session, model.parent_id, records.protocol_hash)
    if dense_ev is None:
        protocols = session.scalars(
            select(Evaluation.protocol_hash).where(
                Evaluation.model_id == model.parent_id, Evaluation.status == "complete"
            )
        ).all()
        return None, missing_parent_evaluation(parent.name, records.protocol_hash, protocols)
    try:
        return thin_ice(load_records(session, dense_ev.id), records, distance=distance), None
    except ValueError as err:  # IncomparableError included
        return None, str(err)


def replicate_evaluations(session: Session, model: Model, protocol_hash: str) -> list[Evaluation]:
    """The newest complete evaluation under ``protocol_hash`` of each replicate of ``model`` (the models of its
    setting, :func:`bench.analysis.replicates.setting_key`, itself included), by seed; empty for a model without
    a setting (dense, zoo)."""
    key = setting_key(model)
    if key is None:
        return []
    candidates = session.scalars(
        select(Model).where(
            Model.parent_id == model.parent_id, Model.method == model.method, Model.structure == model.structure
        )
    )
    out = []
    for other in candidates:
        if setting_key(other) != key:
            continue
        ev = latest_evaluation(session, other.id, protocol_hash)
        if ev is not None:
            out.append(ev)
    return sorted(out, key=lambda ev: ev.model.provenance["seed"])


def replicate_summaries(session: Session, model: Model, protocol_hash: str) -> dict[str, ReplicateSummary]:
    """``{"clean"|"autoattack"|"fmn"|"best_known": summary across seeds}`` when ``model`` has at least one other
    replicate evaluated under ``protocol_hash``, else ``{}``."""
    evaluations = replicate_evaluations(session, model, protocol_hash)
    return summarize_evaluations(evaluations) if len(evaluations) > 1 else {}


def model_report(session: Session, ref: str | int) -> dict[str, Any]:
    """Everything known about one model: its figures, every evaluation (with intervals, the per-stage
    breakdown and security-curve points, and for a complete one the mean and range across the model's seed
    replicates under the same protocol, ``"replicates"``), the reported numbers and drops, thin ice against its
    parent, and the provenance of the model and of each evaluation.
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
            "best_known": best_known_figures(ev),
            "n_fmn_beat_aa": ev.n_fmn_beat_aa,
            "flags": list(ev.flags or []),
            "unreliable": ev.unreliable,
            "attack_seconds": dict(ev.attack_seconds or {}),
            "provenance": dict(ev.provenance or {}),
            "started_at": ev.started_at,
            "finished_at": ev.finished_at,
        }
        if ev.status == "complete":
            entry.update(_complete_evaluation(session, model, ev))
        evs.append(entry)
    out = {
        "model": model,
        "parent": parent,
        "children": list(children),
        "evaluations": evs,
        "reported": [],
        "reported_error": None,
    }
    try:
        out["reported"] = reported_all(model)
    except Exception as err:
        out["reported_error"] = failure("reading the reported numbers", err)
    return out


def _complete_evaluation(session: Session, model: Model, ev: Evaluation) -> dict[str, Any]:
    """The per-sample analyses of one complete evaluation; each one that fails leaves a line in ``errors``."""
    out: dict[str, Any] = {
        "breakdown": [],
        "curve": [],
        "curve_distance": None,
        "curve_fmn": [],
        "claims": [],
        "reevaluations": [],
        "thin_ice": None,
        "thin_ice_reason": None,
        "thin_ice_fmn": None,
        "replicates": {},
        "errors": [],
    }
    try:
        out["replicates"] = replicate_summaries(session, model, ev.protocol_hash)
    except Exception as err:
        out["errors"].append(failure("the summary across seeds", err))
    try:
        records = load_records(session, ev.id)
    except Exception as err:  # one evaluation's problem must not hide the rest of the report
        out["errors"].append(failure("reading the per-sample records", err))
        return out
    try:
        out["breakdown"] = attack_breakdown(records)
    except Exception as err:
        out["errors"].append(failure("the AutoAttack stage breakdown", err))
    try:
        budgets = [k / 2 * records.eps for k in range(7)]
        out["curve_distance"] = records.distance_used("best")
        out["curve"] = [(e, robust_at(records, e)) for e in budgets]
        if out["curve_distance"] == "best":
            out["curve_fmn"] = [(e, robust_at(records, e, "fmn")) for e in budgets]
    except Exception as err:
        out["errors"].append(failure("the security curve", err))
    norm, eps = _threat(ev)
    try:
        found = reported_numbers(model, norm, eps)
        measured = ev.aa_robust_accuracy
        out["claims"] = [(rep, reevaluation_drop(rep, measured)) for rep in found.claims]
        out["reevaluations"] = [(rep, reevaluation_drop(rep, measured)) for rep in found.reevaluations]
    except Exception as err:
        out["errors"].append(failure("reading the reported numbers", err))
    try:
        out["thin_ice"], out["thin_ice_reason"] = parent_thin_ice(session, model, records)
        if out["thin_ice"] is not None and out["thin_ice"].distance == "best":
            out["thin_ice_fmn"] = parent_thin_ice(session, model, records, distance="fmn")[0]
    except Exception as err:
        out["thin_ice_reason"] = failure("the thin-ice analysis", err)
    return out


def best_known_figures(ev: Evaluation) -> dict[str, Any] | None:
    """Plain FMN against the best-known distances on one evaluation (:mod:`bench.analysis.best_known`), or None for
    an evaluation whose protocol stores no best-known distances (spec ``fmn_init`` absent or ``"none"``)."""
    if (ev.spec or {}).get("fmn_init", "none") == "none":
        return None
    return {
        "best_median_distance": ev.best_median_distance,
        "fmn_median_distance": ev.fmn_median_distance,
        "fmn_local_optimality": ev.fmn_local_optimality,
        "fmn_best_median_ratio": ev.fmn_best_median_ratio,
        "n_fmn_above_best": ev.n_fmn_above_best,
    }


def failure(what: str, err: Exception) -> str:
    """An analysis error as one line for a page or the terminal (the exception's type unless a ValueError)."""
    text = str(err).strip() or type(err).__name__
    return f"{what} failed: {text}" if isinstance(err, ValueError) else f"{what} failed ({type(err).__name__}): {text}"
