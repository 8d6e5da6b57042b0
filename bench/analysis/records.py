"""One evaluation's per-sample records as numpy arrays: the input of every analysis in this package.

Loading is the only I/O here; the analyses (:mod:`~bench.analysis.thin_ice`, :mod:`~bench.analysis.paired`,
:mod:`~bench.analysis.curves`) are pure functions of :class:`EvaluationRecords`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.analysis.export import csv_text
from bench.records import RECORD_COLUMNS, RECORD_FIELDS
from bench.spec import AA_ATTACKS
from bench.store import Evaluation, SampleResult

# Per-sample columns in the order of the CSV download: the per-sample record's fields (bench.records).
CSV_COLUMNS = RECORD_COLUMNS
# The array type of each per-sample field's Python type. numpy turns a missing float (None) into NaN when asked
# for floats; missing text stays None.
_DTYPES = {int: np.int64, bool: bool, float: np.float64, str: object}
# The distances an analysis can read: ``best`` (the best-known distance, where the evaluation has one) or ``fmn``
# (plain FMN's, comparable with the thin-ice paper).
DISTANCES = ("best", "fmn")


class IncomparableError(ValueError):
    """Two evaluations cannot be compared sample by sample; the message says why and how to fix it."""


@dataclass(frozen=True, eq=False)
class EvaluationRecords:
    """One evaluation's per-sample records, sorted by ``sample_id``.

    Accuracies are fractions in [0, 1]. ``fmn_distance`` and ``signed_eps`` are NaN where FMN failed (a
    failure is never a distance of 0). ``signed_eps`` follows the thin-ice convention (protocol section 4):
    +distance when the model classifies the sample correctly, −distance (to leave the predicted class) when
    it does not. ``best_distance`` and ``signed_best_eps`` are the same for the best-known distance
    (:mod:`~bench.analysis.best_known`), NaN where none is known and everywhere in an evaluation stored without
    them (``has_best_known`` False); :meth:`distance` and :meth:`signed` pick one kind.
    """

    evaluation_id: int
    model_id: int
    protocol_hash: str
    spec: dict[str, Any]
    eps: float
    norm: str
    sample_id: np.ndarray
    label: np.ndarray
    clean_correct: np.ndarray
    logit_margin: np.ndarray
    aa_robust: np.ndarray
    aa_broken_by: np.ndarray
    fmn_success: np.ndarray
    fmn_distance: np.ndarray
    signed_eps: np.ndarray
    best_robust: np.ndarray
    clean_pred: np.ndarray | None = field(default=None)
    adv_pred: np.ndarray | None = field(default=None)
    fmn_label: np.ndarray | None = field(default=None)
    fmn_adv_pred: np.ndarray | None = field(default=None)
    aa_distance: np.ndarray | None = field(default=None)
    fmn_warm_distance: np.ndarray | None = field(default=None)
    best_distance: np.ndarray | None = field(default=None)
    best_attack: np.ndarray | None = field(default=None)
    signed_best_eps: np.ndarray | None = field(default=None)

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def n(self) -> int:
        return len(self.sample_id)

    @property
    def stages(self) -> tuple[str, ...]:
        """The AutoAttack stages in run order for this evaluation's version (protocol section 3)."""
        version = self.spec.get("version", "plus")
        if version not in AA_ATTACKS:
            raise ValueError(f"evaluation #{self.evaluation_id} has an unknown AutoAttack version {version!r}")
        return AA_ATTACKS[version]

    @property
    def has_best_known(self) -> bool:
        """Whether the evaluation stored best-known distances (its spec started FMN from AutoAttack too)."""
        return self.spec.get("fmn_init", "none") != "none" and self.best_distance is not None

    def distance_used(self, kind: str = "best") -> str:
        """The distance :meth:`distance` returns for ``kind``: ``"best"`` only where the evaluation has it.

        Raises:
            ValueError: ``kind`` is neither ``"best"`` nor ``"fmn"``.
        """
        if kind not in DISTANCES:
            raise ValueError(f"unknown distance {kind!r}; use one of {', '.join(DISTANCES)}")
        return "best" if kind == "best" and self.has_best_known else "fmn"

    def distance(self, kind: str = "best") -> np.ndarray:
        """Per-sample unsigned distances of ``kind`` (NaN where none was found); ``"best"`` falls back to plain
        FMN's in an evaluation stored without best-known distances (:meth:`distance_used` says which)."""
        if self.distance_used(kind) == "best":
            return self.best_distance
        return np.where(self.fmn_success, self.fmn_distance, np.nan)

    def signed(self, kind: str = "best") -> np.ndarray:
        """Per-sample signed ε of ``kind`` (thin-ice convention), with the same fallback as :meth:`distance`."""
        return self.signed_best_eps if self.distance_used(kind) == "best" else self.signed_eps

    def to_csv(self) -> str:
        """The per-sample records as CSV text: a header, then one row per sample in sample_id order.

        Written by the project's one CSV writer (:func:`bench.analysis.export.csv_text`): booleans 1/0, missing
        values (FMN failures, a sample no stage broke) as empty fields, floats with Python's shortest round-trip
        repr (the same records always give the same bytes), text that could start a spreadsheet formula guarded.
        """
        columns = {name: getattr(self, name) for name in CSV_COLUMNS}
        present = [name for name in CSV_COLUMNS if columns[name] is not None]
        return csv_text(present, zip(*(columns[name].tolist() for name in present), strict=True))


def latest_evaluation(session: Session, model_id: int, protocol_hash: str | None = None) -> Evaluation | None:
    """The model's newest *complete* evaluation (optionally under one protocol), or None.

    Newest means the latest ``finished_at``; ties go to the higher id.
    """
    query = select(Evaluation).where(Evaluation.model_id == model_id, Evaluation.status == "complete")
    if protocol_hash is not None:
        query = query.where(Evaluation.protocol_hash == protocol_hash)
    query = query.order_by(Evaluation.finished_at.desc(), Evaluation.id.desc()).limit(1)
    return session.scalars(query).first()


def load_records(session: Session, evaluation_id: int) -> EvaluationRecords:
    """Read one complete evaluation's per-sample rows into arrays (one SQL query, no ORM objects per row).

    Raises:
        ValueError: no such evaluation, or it is not complete (its rows would be a partial sample).
    """
    ev = session.get(Evaluation, evaluation_id)
    if ev is None:
        raise ValueError(f"no evaluation #{evaluation_id} in the store; list them with `bench results`")
    if ev.status != "complete":
        raise ValueError(
            f"evaluation #{evaluation_id} is not complete (status {ev.status!r}); run the same `bench evaluate` "
            "command again to finish it (it resumes where it stopped)"
        )
    cols = [getattr(SampleResult, name) for name in CSV_COLUMNS]
    rows = session.execute(
        select(*cols).where(SampleResult.evaluation_id == evaluation_id).order_by(SampleResult.sample_id)
    ).all()
    data = list(zip(*rows, strict=True)) if rows else [() for _ in CSV_COLUMNS]
    col = dict(zip(CSV_COLUMNS, data, strict=True))
    spec = dict(ev.spec)
    return EvaluationRecords(
        evaluation_id=ev.id,
        model_id=ev.model_id,
        protocol_hash=ev.protocol_hash,
        spec=spec,
        eps=_spec_eps(spec),
        norm=spec.get("norm", "Linf"),
        **{f.name: np.array(col[f.name], dtype=_DTYPES[f.type]) for f in RECORD_FIELDS},
    )


def _spec_eps(spec: dict[str, Any]) -> float:
    if spec.get("eps_value") is not None:
        return float(spec["eps_value"])
    if spec.get("eps") is not None:
        from bench.data import parse_eps

        return parse_eps(str(spec["eps"]))
    return math.nan


def shared_samples(a: EvaluationRecords, b: EvaluationRecords, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays into ``a`` and ``b`` selecting their common sample_ids, after checking comparability.

    Two evaluations are compared sample by sample only under the same threat model and protocol (the same
    dataset, first-N samples, AutoAttack version, FMN budget and seed: protocol section 1).

    Args:
        a, b: the two evaluations.
        what: the analysis asking, for the messages (``"thin-ice analysis"``).

    Raises:
        IncomparableError: different norm or eps, different protocol hash, no shared sample_ids, or
            shared sample_ids with different labels (different datasets). The message names the fix.
    """
    ref = f"evaluations #{a.evaluation_id} and #{b.evaluation_id}"
    fix = (
        "evaluate both models with the same `bench evaluate` options (dataset, --n-samples, --norm, --eps, "
        "--version, --fmn-steps, --seed)"
    )
    if a.norm != b.norm or not math.isclose(a.eps, b.eps, rel_tol=1e-9, abs_tol=0.0):
        raise IncomparableError(
            f"{what} refused: {ref} use different threat models ({a.norm} eps={a.spec.get('eps', a.eps)} vs "
            f"{b.norm} eps={b.spec.get('eps', b.eps)}); {fix}"
        )
    if a.spec.get("dataset") != b.spec.get("dataset"):
        raise IncomparableError(
            f"{what} refused: {ref} are on different datasets ({a.spec.get('dataset')} vs {b.spec.get('dataset')})"
        )
    if a.protocol_hash != b.protocol_hash:
        differ = sorted(
            k for k in {*a.spec, *b.spec} if k not in ("device", "batch_size") and a.spec.get(k) != b.spec.get(k)
        )
        detail = f" (they differ in {', '.join(differ)})" if differ else ""
        raise IncomparableError(
            f"{what} refused: {ref} were run under different protocols {a.protocol_hash[:12]} vs "
            f"{b.protocol_hash[:12]}{detail}; {fix}"
        )
    common, ia, ib = np.intersect1d(a.sample_id, b.sample_id, assume_unique=True, return_indices=True)
    if len(common) == 0:
        raise IncomparableError(f"{what} refused: {ref} share no sample_id; {fix}")
    if not np.array_equal(a.label[ia], b.label[ib]):
        raise IncomparableError(
            f"{what} refused: {ref} give different labels to the same sample_ids, so they are not the same "
            f"test samples; {fix}"
        )
    return ia, ib
