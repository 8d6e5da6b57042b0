"""Reported accuracies (what a paper or another benchmark claims) and the re-evaluation drop.

Two sources, in this order:

1. the model's own ``reported`` JSON column, set by ``bench reported set`` or a submission:
   ``{"clean": 0.84, "robust": 0.52, "attack": "PGD-20", "source": "https://…", "eps": "8/255",
   "norm": "Linf", "note": "…"}`` — accuracies as fractions in [0, 1]; ``clean`` may be null; ``eps``,
   ``norm`` and ``note`` are optional;
2. the data files shipped in ``bench/analysis/reported/*.json`` (thin-ice Table 1, the APB leaderboard, the
   methods' own papers), matched to a model by its APB-style id (the model's name, or
   ``provenance["apb_id"]``), else by (method, arch, dataset, structure, sparsity within 0.005) and threat
   model.

Every file is ``{"source", "source_url", "table", "kind", "dataset", "norm", "eps", "attack", "note",
"entries": [...]}``; an entry may override any of those keys. ``kind`` is ``"claim"`` (the method's authors'
number) or ``"reevaluation"`` (another benchmark's, e.g. the APB's AutoAttack-standard figure). A null
``norm``/``eps`` means the source does not state it. Accuracies are fractions in [0, 1] everywhere; drops
are in percentage points.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPORTED_DIR = Path(__file__).parent / "reported"
# Files read first win ties between equally good matches.
FILE_ORDER = ("thin_ice_table1.json", "authors_papers.json", "apb_leaderboard.json")
ENTRY_FIELDS = (
    "id",
    "method",
    "arch",
    "dataset",
    "structure",
    "sparsity",
    "norm",
    "eps",
    "clean",
    "robust",
    "attack",
    "source",
    "kind",
)
KINDS = ("claim", "reevaluation")
SPARSITY_TOLERANCE = 0.005
# Relative: the APB's eps 0.031 matches 8/255 = 0.03137 (1.2 % apart).
EPS_REL_TOLERANCE = 0.02


@dataclass(frozen=True)
class Reported:
    """A reported clean and robust accuracy (fractions in [0, 1]) with the attack and source behind it.

    Attributes:
        clean, robust: accuracies as fractions; None when the source gives none.
        attack: what produced the robust figure, in words (``"PGD-20"``, ``"AutoAttack standard, …"``).
        source: the paper, table or URL.
        eps: the budget as the source writes it (``"8/255"``); None when it does not say.
        note: caveats.
        norm: ``"Linf"`` or ``"L2"``; None when the source does not say.
        source_url: a link, when there is one.
        origin: ``"model"`` for the model's own ``reported`` JSON, else the shipped entry's id.
        kind: ``"claim"`` (the authors' number) or ``"reevaluation"`` (another benchmark's).
    """

    clean: float | None
    robust: float | None
    attack: str
    source: str
    eps: str | None
    note: str | None
    norm: str | None = None
    source_url: str | None = None
    origin: str = "model"
    kind: str = "claim"

    def to_json(self) -> dict[str, Any]:
        """The form stored in a model's ``reported`` column."""
        out = {"clean": self.clean, "robust": self.robust, "attack": self.attack, "source": self.source}
        for key in ("eps", "norm", "note", "source_url"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _fraction(value: Any, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {what} must be a number in [0, 1] or null, got {value!r}")
    if not 0.0 <= value <= 1.0:
        hint = f" (it looks like a percentage: write {value / 100:g})" if 1 < value <= 100 else ""
        raise ValueError(f"{where}: {what} {value!r} is not a fraction in [0, 1]{hint}")
    return float(value)


def parse_reported(data: dict[str, Any], where: str = "reported numbers") -> Reported:
    """Validate a reported-numbers mapping (a model's ``reported`` JSON) into :class:`Reported`.

    Raises:
        ValueError: a missing ``attack``/``source``, an accuracy outside [0, 1] (percentages are refused
            with the fraction to write instead), an unknown norm or an unparsable eps.
    """
    for key in ("attack", "source"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{where}: {key!r} is required (the attack that produced the number, and its source)")
    clean = _fraction(data.get("clean"), "clean", where)
    robust = _fraction(data.get("robust"), "robust", where)
    if clean is None and robust is None:
        raise ValueError(f"{where}: give at least one of clean and robust")
    norm = data.get("norm")
    if norm is not None and norm not in ("Linf", "L2"):
        raise ValueError(f"{where}: unknown norm {norm!r}; use Linf or L2")
    eps = data.get("eps")
    if eps is not None:
        from bench.data import parse_eps

        eps = str(eps)
        parse_eps(eps)
    return Reported(
        clean=clean,
        robust=robust,
        attack=data["attack"],
        source=data["source"],
        eps=eps,
        note=data.get("note"),
        norm=norm,
        source_url=data.get("source_url"),
        origin=data.get("id", "model"),
        kind=data.get("kind", "claim"),
    )


@functools.lru_cache(maxsize=1)
def _table() -> tuple[dict[str, Any], ...]:
    files = sorted(
        REPORTED_DIR.glob("*.json"), key=lambda p: (FILE_ORDER.index(p.name) if p.name in FILE_ORDER else 99, p.name)
    )
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in files:
        doc = json.loads(path.read_text(encoding="utf-8"))
        defaults = {k: v for k, v in doc.items() if k != "entries"}
        for i, raw in enumerate(doc.get("entries", [])):
            entry = {**defaults, **raw, "file": path.name}
            where = f"{path.name} entry {i} ({entry.get('id', '?')})"
            missing = [k for k in ENTRY_FIELDS if k not in entry]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            if entry["id"] in seen:
                raise ValueError(f"{where}: duplicate id {entry['id']!r}")
            seen.add(entry["id"])
            if entry["kind"] not in KINDS:
                raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}")
            if entry["structure"] not in ("US", "S"):
                raise ValueError(f"{where}: structure must be US or S")
            if not 0.0 < entry["sparsity"] < 1.0:
                raise ValueError(f"{where}: sparsity must be a fraction in (0, 1)")
            parse_reported(entry, where)
            for key, value in (entry.get("reevaluated") or {}).items():
                if key in ("clean", "robust"):
                    _fraction(value, f"reevaluated {key}", where)
            out.append(entry)
    return tuple(out)


def load_reported_table() -> list[dict[str, Any]]:
    """Every shipped reported number, validated, in priority order.

    Each entry has: ``id``, ``method`` (apbench method key), ``arch`` and ``dataset`` (apbench names),
    ``paper_arch`` (the source's name), ``structure`` (US/S), ``sparsity`` (fraction), ``norm``, ``eps``,
    ``clean``, ``robust`` (fractions or null), ``attack``, ``source``, ``source_url``, ``table``, ``kind``,
    ``note``, ``file``, and where there is one ``apb_id`` (the APB model id) and ``reevaluated`` (the
    source's own re-evaluation: thin-ice Table 1's AutoAttack columns).
    """
    return copy.deepcopy(list(_table()))


def _eps_matches(entry_eps: str | None, eps: float | None) -> bool:
    if entry_eps is None or eps is None:
        return True
    from bench.data import parse_eps

    return math.isclose(parse_eps(entry_eps), eps, rel_tol=EPS_REL_TOLERANCE)


def _threat_matches(norm_: str | None, eps_: str | None, norm: str | None, eps: float | None) -> bool:
    return (norm_ is None or norm is None or norm_ == norm) and _eps_matches(eps_, eps)


def model_sparsity(model_row) -> float:
    """The sparsity a model is matched on: its target (the method's request) if set, else the measured one."""
    return model_row.target_sparsity if model_row.target_sparsity is not None else model_row.measured_sparsity


def matching_entries(model_row, norm: str | None = None, eps: float | None = None) -> list[dict[str, Any]]:
    """Shipped entries describing this model, best first.

    An entry whose ``apb_id`` equals the model's name (case-insensitive) or its ``provenance["apb_id"]``
    matches first (it is the same checkpoint); then entries with the same method, arch, dataset and
    structure and a sparsity within 0.005; authors' claims before other benchmarks' re-evaluations. With
    ``norm``/``eps`` given (an evaluation's threat model), entries stating a different one are left out.
    """
    provenance = model_row.provenance or {}
    ids = {str(model_row.name).lower(), str(provenance.get("apb_id", "")).lower()} - {""}
    by_id, by_fields = [], []
    for entry in _table():
        if not _threat_matches(entry["norm"], entry["eps"], norm, eps):
            continue
        if entry.get("apb_id") and entry["apb_id"].lower() in ids:
            by_id.append(entry)
        elif (
            model_row.method == entry["method"]
            and model_row.arch == entry["arch"]
            and model_row.dataset == entry["dataset"]
            and model_row.structure == entry["structure"]
            and abs(model_sparsity(model_row) - entry["sparsity"]) <= SPARSITY_TOLERANCE
        ):
            by_fields.append(entry)
    by_fields.sort(key=lambda e: (KINDS.index(e["kind"]), e["robust"] is None))
    return copy.deepcopy(by_id + by_fields)


def _from_model(model_row, norm: str | None, eps: float | None) -> Reported | None:
    if not model_row.reported:
        return None
    rep = parse_reported(model_row.reported, f"model {model_row.name!r} reported numbers")
    return rep if _threat_matches(rep.norm, rep.eps, norm, eps) else None


def reported_all(model_row, norm: str | None = None, eps: float | None = None) -> list[Reported]:
    """Every reported number for this model, best first: its own ``reported`` JSON, then matching entries."""
    own = _from_model(model_row, norm, eps)
    shipped = [parse_reported(e, e["id"]) for e in matching_entries(model_row, norm, eps)]
    return ([own] if own else []) + shipped


def reported_for(model_row, norm: str | None = None, eps: float | None = None) -> Reported | None:
    """The model's reported numbers: its own ``reported`` JSON first, else the best shipped match, else None.

    Args:
        model_row: a :class:`~bench.store.Model` row (or anything with its attributes).
        norm, eps: the evaluation's threat model, to leave out numbers reported under another one
            (sources that do not state theirs still match).
    """
    found = reported_all(model_row, norm, eps)
    return found[0] if found else None


def reevaluation_drop(reported: Reported | None, measured_robust: float | None) -> float | None:
    """Reported robust accuracy minus measured robust accuracy, in percentage points (positive: overclaimed).

    Both inputs are fractions; None when either number is missing.
    """
    if reported is None or reported.robust is None or measured_robust is None or math.isnan(measured_robust):
        return None
    return 100.0 * (reported.robust - measured_robust)
