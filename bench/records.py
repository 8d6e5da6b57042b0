"""The per-sample record: what the protocol stores for one test sample of one evaluation, defined once.

:class:`SampleRecord` lists the fields in their order, each with its type (``X | None``: may be missing) and its
meaning. Everything else derives from it: the store's ``sample_results`` columns (:mod:`bench.store.schema`), the
per-sample CSV's columns (:data:`bench.analysis.records.CSV_COLUMNS`) and the rows the evaluator inserts
(:meth:`SampleRecord.to_row`). The Alembic migrations are the exception: each is a snapshot of the schema at its
revision, and must stay what it was when the stores it upgrades were written.

Distances are in input units (inputs in [0, 1]) under the evaluation's norm. A distance is None where no
adversarial example was found: a failure is never a distance of 0.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["RECORD_COLUMNS", "RECORD_FIELDS", "RecordField", "SampleRecord", "record_fields"]


def _field(meaning: str, *, length: int | None = None) -> Any:
    # ``length``: the most characters a text field holds (the store's VARCHAR length).
    return dataclasses.field(metadata={"meaning": meaning, "length": length})


@dataclass(frozen=True)
class SampleRecord:
    """The protocol's outcome for one test sample; field order is the CSV's and the store's column order."""

    sample_id: int = _field("index of the sample in the dataset's canonical test split")
    label: int = _field("the true class")
    clean_pred: int = _field("the class the model predicts on the clean input")
    clean_correct: bool = _field("clean_pred == label")
    logit_margin: float = _field(
        "z_y - max_{j != y} z_j on the clean input: positive when correct (the thin-ice scatter's y-axis)"
    )
    aa_robust: bool = _field("correct, and correct after every AutoAttack stage (both clean passes agreeing)")
    aa_broken_by: str | None = _field(
        "the first AutoAttack stage that broke the sample; None when robust or misclassified clean", length=16
    )
    adv_pred: int = _field("the class predicted on AutoAttack's output")
    fmn_label: int = _field(
        "the label FMN attacked: the true class, or the predicted class for a misclassified sample (protocol "
        "section 4: the distance to leave it)"
    )
    fmn_success: bool = _field("FMN found an adversarial example")
    fmn_distance: float | None = _field("the distance of FMN's best adversarial example; None when FMN failed")
    signed_eps: float | None = _field(
        "the thin-ice paper's signed epsilon: +fmn_distance when correct, -fmn_distance when misclassified"
    )
    fmn_adv_pred: int = _field("the class predicted on FMN's output")
    best_robust: bool = _field("correct and broken neither by AutoAttack nor by FMN within eps (best-known robust)")
    # The best-known minimal distance (spec fmn_init "autoattack"; None throughout evaluations run without it, those
    # stored before it existed included).
    aa_distance: float | None = _field("the norm of AutoAttack's adversarial perturbation where it broke the sample")
    fmn_warm_distance: float | None = _field("FMN's distance when started from AutoAttack's adversarial example")
    best_distance: float | None = _field(
        "the smallest distance plain FMN, warm-started FMN and AutoAttack found (bench.analysis.best_known)"
    )
    best_attack: str | None = _field(
        'the attack that found best_distance: "fmn", "fmn_from_autoattack" or "autoattack:<stage>"', length=32
    )
    signed_best_eps: float | None = _field("best_distance signed as signed_eps is")

    def to_row(self) -> dict[str, Any]:
        """The record as a row (column name → value, in column order), as the store inserts it."""
        return {f.name: getattr(self, f.name) for f in RECORD_FIELDS}


@dataclass(frozen=True)
class RecordField:
    """One per-sample field: its name, its Python type (``int``, ``bool``, ``float`` or ``str``), whether it may be
    missing (None), the most characters a text field holds, and what it means."""

    name: str
    type: type
    nullable: bool
    length: int | None
    meaning: str


def record_fields(record: type) -> tuple[RecordField, ...]:
    """The fields of a record dataclass declared as :class:`SampleRecord` is, checked: each an ``int``, ``bool``,
    ``float`` or ``str`` (optionally ``| None``), a text field with its length."""
    hints = typing.get_type_hints(record)
    fields = []
    for f in dataclasses.fields(record):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        base = next(a for a in args if a is not type(None)) if args else hint
        where = f"{record.__name__}.{f.name}"
        if base not in (int, bool, float, str) or len(args) > 2:
            raise TypeError(f"{where}: {hint} is not int, bool, float or str (optionally | None)")
        if (base is str) != (f.metadata.get("length") is not None):
            raise TypeError(f"{where}: a text field needs a length, and only a text field has one")
        fields.append(RecordField(f.name, base, bool(args), f.metadata.get("length"), f.metadata.get("meaning", "")))
    return tuple(fields)


RECORD_FIELDS: tuple[RecordField, ...] = record_fields(SampleRecord)
RECORD_COLUMNS: tuple[str, ...] = tuple(f.name for f in RECORD_FIELDS)
