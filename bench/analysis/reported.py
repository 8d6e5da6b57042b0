"""Reported accuracies (what a paper or another benchmark claims) and the re-evaluation drop.

Two kinds of reported number: the method's authors' **claim** (their paper, README or submission) and another
benchmark's **re-evaluation** (the APB leaderboard's AutoAttack, RobustBench's AutoAttack, the "A.A." columns of
thin-ice Table 1). The re-evaluation drop is claim − measured (thin-ice Table 1); the other benchmarks' numbers
are shown beside ours, never subtracted as if they were claims.

Sources, in this order:

1. the model's own ``reported`` JSON column, set by ``bench reported set`` or a submission:
   ``{"clean": 0.84, "robust": 0.52, "attack": "PGD-20", "source": "https://…", "eps": "8/255",
   "norm": "Linf", "note": "…", "kind": "claim", "other": [{…}, …]}`` — accuracies as fractions in [0, 1] or
   null; ``attack``, ``eps``, ``norm``, ``note``, ``source_url``, ``kind`` and ``other`` are optional.
   ``kind`` is ``"claim"`` or ``"reevaluation"`` (the zoo sets the latter for manifests whose numbers are the
   APB leaderboard's); without it the numbers are a claim, unless the shipped tables hold the very same numbers
   as a re-evaluation of this checkpoint (a model registered from an APB manifest before ``kind`` existed).
   ``other`` holds further published numbers (a manifest's ``other_reports``), each a re-evaluation unless it
   says ``"kind": "claim"``;
2. the data files shipped in ``bench/analysis/reported/*.json`` (thin-ice Table 1, the APB leaderboard, the
   methods' own papers), matched to a model by its APB-style id (the model's name, or
   ``provenance["apb_id"]``), else by (method, arch, dataset, structure, sparsity within 0.005) and threat
   model. Thin-ice Table 1's entries carry the paper's own AutoAttack re-evaluation (``reevaluated``).

Every file is ``{"source", "source_url", "table", "kind", "dataset", "norm", "eps", "attack", "note",
"entries": [...]}``; an entry may override any of those keys. A null ``norm``/``eps`` means the source does not
state it. Accuracies are fractions in [0, 1] everywhere; drops are in percentage points.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass, replace
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
# How a shipped file is named in a table cell or a row label.
FILE_LABELS = {
    "thin_ice_table1.json": "thin-ice Table 1",
    "authors_papers.json": "method's paper",
    "apb_leaderboard.json": "APB leaderboard",
}
OWN_LABEL = "stored with the model"
SPARSITY_TOLERANCE = 0.005
# Relative: the APB's eps 0.031 matches 8/255 = 0.03137 (1.2 % apart).
EPS_REL_TOLERANCE = 0.02


@dataclass(frozen=True)
class Reported:
    """A reported clean and robust accuracy (fractions in [0, 1]) with the attack and source behind it.

    Attributes:
        clean, robust: accuracies as fractions; None when the source gives none.
        attack: what produced the robust figure, in words (``"PGD-20"``, ``"AutoAttack standard, …"``); None
            when the source does not say.
        source: the paper, table or URL.
        eps: the budget as the source writes it (``"8/255"``); None when it does not say.
        note: caveats.
        norm: ``"Linf"`` or ``"L2"``; None when the source does not say.
        source_url: a link, when there is one (shown as a link only if it is http(s)).
        origin: ``"model"`` for the model's own ``reported`` JSON (``"model:other[i]"`` for its further
            numbers), else the shipped entry's id (``"<id>:reevaluated"`` for thin-ice Table 1's A.A. columns).
        kind: ``"claim"`` (the authors' number) or ``"reevaluation"`` (another benchmark's).
        label: a few words naming the source for a table cell (``"APB leaderboard"``).
    """

    clean: float | None
    robust: float | None
    attack: str | None
    source: str
    eps: str | None
    note: str | None
    norm: str | None = None
    source_url: str | None = None
    origin: str = "model"
    kind: str = "claim"
    label: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The form stored in a model's ``reported`` column."""
        out = {"clean": self.clean, "robust": self.robust, "attack": self.attack, "source": self.source}
        for key in ("eps", "norm", "note", "source_url"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.kind != "claim":
            out["kind"] = self.kind
        return out


@dataclass(frozen=True)
class ReportedNumbers:
    """Everything reported for one model under one threat model, best first within each kind.

    Attributes:
        claims: the authors' numbers: the model's own (unless a re-evaluation), then the shipped claims.
        reevaluations: other benchmarks' numbers: the model's own re-evaluations, then shipped ones for the
            same checkpoint (APB id), then thin-ice Table 1's A.A. columns and the APB's for the same setting.
    """

    claims: tuple[Reported, ...] = ()
    reevaluations: tuple[Reported, ...] = ()

    @property
    def claim(self) -> Reported | None:
        """The claim the re-evaluation drop is computed from: the best one with a robust number, else the best."""
        return _best(self.claims)

    @property
    def reevaluation(self) -> Reported | None:
        """The other benchmarks' number shown beside ours (the leaderboard's "Other AutoAttack" column)."""
        return _best(self.reevaluations)

    def all(self) -> list[Reported]:
        return [*self.claims, *self.reevaluations]


def _best(found: tuple[Reported, ...]) -> Reported | None:
    return next((r for r in found if r.robust is not None), found[0] if found else None)


def _fraction(value: Any, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {what} must be a number in [0, 1] or null, got {value!r}")
    if not 0.0 <= value <= 1.0:
        hint = f" (it looks like a percentage: write {value / 100:g})" if 1 < value <= 100 else ""
        raise ValueError(f"{where}: {what} {value!r} is not a fraction in [0, 1]{hint}")
    return float(value)


def _text(data: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        what = "is required" if required else "must be a non-empty string or null"
        raise ValueError(f"{where}: {key!r} {what}" + (" (where the numbers are printed)" if key == "source" else ""))
    return value


def parse_reported(data: Any, where: str = "reported numbers") -> Reported:
    """Validate a reported-numbers mapping (a model's ``reported`` JSON) into :class:`Reported`.

    ``attack`` and both accuracies may be null or absent (a submission's manifest allows it: the numbers are
    then shown without a drop); ``source`` is required.

    Raises:
        ValueError: not a mapping, a missing ``source``, an accuracy outside [0, 1] (percentages are refused with
            the fraction to write instead), an unknown kind or norm, or an unparsable eps.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of clean, robust, attack, source…, got {type(data).__name__}")
    source = _text(data, "source", where, required=True)
    attack = _text(data, "attack", where)
    clean = _fraction(data.get("clean"), "clean", where)
    robust = _fraction(data.get("robust"), "robust", where)
    norm = data.get("norm")
    if norm is not None and norm not in ("Linf", "L2"):
        raise ValueError(f"{where}: unknown norm {norm!r}; use Linf or L2")
    kind = data.get("kind")
    if kind is None:
        kind = "claim"
    elif kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; use {' or '.join(KINDS)}")
    eps = data.get("eps")
    if eps is not None:
        from bench.data import parse_eps

        eps = str(eps)
        parse_eps(eps)
    note = data.get("note")
    source_url = data.get("source_url")
    return Reported(
        clean=clean,
        robust=robust,
        attack=attack,
        source=source,
        eps=eps,
        note=None if note is None else str(note),
        norm=norm,
        source_url=None if source_url is None else str(source_url),
        origin=str(data.get("id", "model")),
        kind=kind,
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
    """Shipped entries describing this model: the authors' claims first, then other benchmarks' re-evaluations.

    Within each kind, an entry whose ``apb_id`` equals the model's name (case-insensitive) or its
    ``provenance["apb_id"]`` comes first (it is the same checkpoint); then entries with the same method, arch,
    dataset and structure and a sparsity within 0.005, in file order, those without a robust number last. With
    ``norm``/``eps`` given (an evaluation's threat model), entries stating a different one are left out.
    """
    return copy.deepcopy([entry for entry, _ in _matches(model_row, norm, eps)])


def _apb_ids(model_row) -> set[str]:
    provenance = model_row.provenance or {}
    return {str(model_row.name).lower(), str(provenance.get("apb_id", "")).lower()} - {""}


def _matches(model_row, norm: str | None, eps: float | None) -> list[tuple[dict[str, Any], bool]]:
    """``(entry, matched by APB id)`` pairs in :func:`matching_entries`' order (the entries are not copied)."""
    ids = _apb_ids(model_row)
    found = []
    for position, entry in enumerate(_table()):
        if not _threat_matches(entry["norm"], entry["eps"], norm, eps):
            continue
        if entry.get("apb_id") and entry["apb_id"].lower() in ids:
            found.append(((KINDS.index(entry["kind"]), 0, False, position), entry, True))
        elif (
            model_row.method == entry["method"]
            and model_row.arch == entry["arch"]
            and model_row.dataset == entry["dataset"]
            and model_row.structure == entry["structure"]
            and abs(model_sparsity(model_row) - entry["sparsity"]) <= SPARSITY_TOLERANCE
        ):
            found.append(((KINDS.index(entry["kind"]), 1, entry["robust"] is None, position), entry, False))
    found.sort(key=lambda item: item[0])
    return [(entry, by_id) for _, entry, by_id in found]


def _threat_ok(rep: Reported, norm: str | None, eps: float | None) -> bool:
    return _threat_matches(rep.norm, rep.eps, norm, eps)


def _own(model_row) -> list[Reported]:
    """The model's own ``reported`` JSON: its main numbers, then its ``other`` ones (re-evaluations by default)."""
    data = model_row.reported
    if not data:
        return []
    where = f"model {model_row.name!r} reported numbers"
    if not isinstance(data, dict):
        parse_reported(data, where)  # raises, naming the problem
    main = {k: v for k, v in data.items() if k != "other"}
    out = []
    if any(v is not None for k, v in main.items() if k != "kind"):
        rep = replace(parse_reported(main, where), origin="model", label=OWN_LABEL)
        if "kind" not in main and _is_shipped_reevaluation(model_row, rep):
            rep = replace(rep, kind="reevaluation")
        out.append(rep)
    other = data.get("other") or []
    if not isinstance(other, list):
        raise ValueError(f"{where}: 'other' must be a list of reported numbers")
    for i, item in enumerate(other):
        item_where = f"{where}, other[{i}]"
        if not isinstance(item, dict):
            parse_reported(item, item_where)
        rep = parse_reported({"kind": "reevaluation", **item}, item_where)
        out.append(replace(rep, origin=f"model:other[{i}]", label=OWN_LABEL))
    return out


def _is_shipped_reevaluation(model_row, rep: Reported) -> bool:
    """The model's own numbers are, to the digit, a shipped re-evaluation of this very checkpoint (its APB id)."""
    ids = _apb_ids(model_row)
    return any(
        e["kind"] == "reevaluation"
        and e.get("apb_id", "").lower() in ids
        and rep.robust is not None
        and e["robust"] is not None
        and math.isclose(e["robust"], rep.robust, abs_tol=1e-9)
        for e in _table()
    )


def _shipped(entry: dict[str, Any]) -> list[Reported]:
    """A shipped entry as reported numbers: the entry's own, then (thin-ice Table 1) the paper's AutoAttack ones."""
    label = FILE_LABELS.get(entry["file"], entry["file"])
    out = [replace(parse_reported(entry, entry["id"]), label=label)]
    again = entry.get("reevaluated")
    if again and again.get("robust") is not None:
        out.append(
            Reported(
                clean=again.get("clean"),
                robust=again["robust"],
                attack=again.get("attack"),
                source=entry.get("reevaluated_source", entry["source"]),
                eps=entry["eps"],
                note=None,
                norm=entry["norm"],
                source_url=entry.get("source_url"),
                origin=f"{entry['id']}:reevaluated",
                kind="reevaluation",
                label=f"{label} (AutoAttack)",
            )
        )
    return out


def reported_numbers(model_row, norm: str | None = None, eps: float | None = None) -> ReportedNumbers:
    """The model's claims and other benchmarks' re-evaluations under a threat model, each best first.

    Claims: the model's own ``reported`` JSON (unless it is a re-evaluation), then the shipped claims. Re-evaluations:
    the model's own, then the shipped ones for the same checkpoint (APB id), then those for the same setting
    (thin-ice Table 1's A.A. columns, the APB leaderboard). Numbers equal to an earlier one of the same kind are
    left out (the same figure quoted by two sources).

    Args:
        model_row: a :class:`~bench.store.Model` row (or anything with its attributes).
        norm, eps: the evaluation's threat model, to leave out numbers reported under another one (sources
            that do not state theirs still match).

    Raises:
        ValueError: the model's own ``reported`` JSON is malformed (the message names the model and the field).
    """
    own = [r for r in _own(model_row) if _threat_ok(r, norm, eps)]
    matches = _matches(model_row, norm, eps)
    # The same checkpoint's numbers first, then the same setting's, each in matching_entries' order.
    same_checkpoint = [r for e, by_id in matches if by_id for r in _shipped(e)]
    same_setting = [r for e, by_id in matches if not by_id for r in _shipped(e)]
    ordered = own + same_checkpoint + same_setting
    claims: list[Reported] = []
    reevaluations: list[Reported] = []
    for rep in ordered:
        bucket = claims if rep.kind == "claim" else reevaluations
        if not any((r.clean, r.robust) == (rep.clean, rep.robust) for r in bucket):
            bucket.append(rep)
    return ReportedNumbers(tuple(claims), tuple(reevaluations))


def reported_all(model_row, norm: str | None = None, eps: float | None = None) -> list[Reported]:
    """Every reported number for this model: the claims (best first), then the re-evaluations."""
    return reported_numbers(model_row, norm, eps).all()


def reported_for(model_row, norm: str | None = None, eps: float | None = None) -> Reported | None:
    """The authors' claim the re-evaluation drop is computed from (see :func:`reported_numbers`), or None.

    Args:
        model_row: a :class:`~bench.store.Model` row (or anything with its attributes).
        norm, eps: the evaluation's threat model, to leave out numbers reported under another one (sources
            that do not state theirs still match).
    """
    return reported_numbers(model_row, norm, eps).claim


def reevaluation_drop(reported: Reported | None, measured_robust: float | None) -> float | None:
    """Reported robust accuracy minus measured robust accuracy, in percentage points (positive: overclaimed).

    Both inputs are fractions; None when either number is missing. The re-evaluation drop proper takes the
    authors' claim (:func:`reported_for`); with another benchmark's number it is the gap between two
    re-evaluations.
    """
    if reported is None or reported.robust is None or measured_robust is None or math.isnan(measured_robust):
        return None
    return 100.0 * (reported.robust - measured_robust)
