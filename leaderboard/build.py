"""Build the static leaderboard site from the results store.

Flow (STYLE.md): store → analysis → site. Model and evaluation rows are read through the ORM (a few hundred
objects); the tables, the method pages and their plots need only the evaluations' stored aggregates. The
per-sample work (each evaluation's records into numpy arrays, its CSV download, security curve, thin-ice
analysis against its dense parent) runs in worker processes (:mod:`leaderboard.per_sample`). Pages are rendered
with Jinja2 (autoescape on, so every string a submitter controls is shown as text); plots are deterministic SVG
files next to the pages; nothing is fetched from the network, so the site works opened from ``file://``. The same
database gives byte-identical files, whatever the number of workers.

Layout of the output folder::

    index.html            one table per (dataset, threat model, architecture, structure), plus models not evaluated
    methodology.html      the protocol in plain words
    methods.html          every method with its taxonomy
    downloads.html        each table as CSV and JSON, BibTeX of the papers
    models/<id>-<name>.html, .csv, -curve.svg, -thin-ice.svg    one page per model
    methods/<key>.html, -sparsity.svg                           one page per method
    data/*.csv, *.json, papers.bib
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

import bench
from bench.analysis.export import csv_text
from bench.analysis.report import missing_parent_evaluation
from bench.analysis.reported import Reported, reevaluation_drop, reported_numbers
from bench.analysis.stats import wilson_interval
from bench.analysis.thin_ice import POPULATIONS, format_p
from bench.store import Evaluation, Model, SampleResult, Store
from bench.zoo.manifest import check_link_url
from leaderboard import plots
from leaderboard.per_sample import EvalTask, SampleResults, run_job, worker_init, worker_job, write_text

# Written into every site folder: a later build may replace a folder only if it finds this file there.
MARKER = ".apbench-site"
MARKER_TEXT = "Built by `bench leaderboard build`; the whole folder is replaced on the next build.\n"

# Per-sample jobs: at most this many evaluations each (a dense parent's records are read once per job); worker
# processes only when there is enough work to pay for starting them.
JOB_SIZE = 10
MAX_WORKERS = 4
MIN_TASKS_FOR_POOL = 8

STRUCTURE_NAMES = {"US": "unstructured", "S": "structured", "dense": "dense only"}
FLAG_TEXT = {
    "randomized_defense": "AutoAttack saw a randomised forward pass",
    "softmax_output": "the model seems to output probabilities, not logits",
    "zero_gradients": "zero gradients for some samples",
    "dynamic_model": "the forward pass changes between calls",
    "square_beat_white_box": "Square (black-box) broke samples the white-box attacks could not",
    "too_few_classes": "too few classes for the targeted attacks",
    "fmn_beat_autoattack": "FMN found adversarials within eps that AutoAttack missed",
    "clean_pass_disagreement": (
        "AutoAttack's own clean pass disagreed with ours on some samples (a randomised or input-dependent "
        "model); a sample counts as robust only if both passes classified it correctly"
    ),
}

# Papers the protocol rests on (cited on the methodology page and in papers.bib).
PROTOCOL_PAPERS = [
    {
        "key": "Croce2020Reliable",
        "kind": "inproceedings",
        "title": "Reliable Evaluation of Adversarial Robustness with an Ensemble of Diverse Parameter-Free Attacks",
        "author": "Croce, Francesco and Hein, Matthias",
        "venue": "ICML",
        "year": 2020,
        "url": "https://arxiv.org/abs/2003.01690",
    },
    {
        "key": "Pintor2021Fast",
        "kind": "inproceedings",
        "title": "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints",
        "author": "Pintor, Maura and Roli, Fabio and Brendel, Wieland and Biggio, Battista",
        "venue": "NeurIPS",
        "year": 2021,
        "url": "https://arxiv.org/abs/2102.12827",
    },
    {
        "key": "Piras2023Samples",
        "kind": "inproceedings",
        "title": "Samples on Thin Ice: Re-Evaluating Adversarial Pruning of Neural Networks",
        "author": "Piras, Giorgio and Pintor, Maura and Demontis, Ambra and Biggio, Battista",
        "venue": "ICMLC",
        "year": 2023,
        "url": "https://arxiv.org/abs/2310.08073",
    },
    {
        "key": "Piras2024Adversarial",
        "kind": "article",
        "title": "Adversarial Pruning: A Survey and Benchmark of Pruning Methods for Adversarial Robustness",
        "author": (
            "Piras, Giorgio and Pintor, Maura and Demontis, Ambra and Biggio, Battista and Giacinto, Giorgio "
            "and Roli, Fabio"
        ),
        "venue": "Pattern Recognition",
        "year": 2025,
        "url": "https://arxiv.org/abs/2409.01249",
    },
]


# --------------------------------------------------------------------------------------------- view models


@dataclass
class MethodInfo:
    """What a method page shows: from the registry's card when the method is registered, else from the DB."""

    key: str
    slug: str
    display_name: str
    registered: bool
    paper_title: str | None = None
    paper_url: str | None = None
    venue: str | None = None
    year: int | None = None
    authors: str | None = None
    ap_key: str | None = None
    taxonomy: list[tuple[str, str]] = field(default_factory=list)
    native_sparsity: str | None = None
    entries: list[Entry] = field(default_factory=list)
    unevaluated: list[Model] = field(default_factory=list)
    plot: str | None = None

    @property
    def href(self) -> str:
        return f"methods/{self.slug}.html"

    @property
    def authors_short(self) -> str | None:
        """ "Sehwag et al." from a BibTeX author list ("Sehwag and others", "A and B and C")."""
        if not self.authors:
            return None
        names = [a.strip() for a in str(self.authors).split(" and ")]
        if len(names) > 2 or names[-1] == "others":
            return f"{names[0]} et al."
        return " and ".join(names)

    @property
    def venue_year(self) -> str:
        return " ".join(str(p) for p in (self.venue, self.year) if p)


@dataclass
class Entry:
    """One model under one complete evaluation, with everything its table row and page section need."""

    model: Model
    ev: Evaluation
    method: MethodInfo | None
    # The authors' claim the drop is computed from, and the best other benchmark's re-evaluation.
    reported: Reported | None = None
    reevaluation: Reported | None = None
    claims: list[Reported] = field(default_factory=list)
    reevaluations: list[Reported] = field(default_factory=list)
    reported_error: str | None = None
    drop: float | None = None
    parent_entry: Entry | None = None
    # Filled by the per-sample jobs (leaderboard.per_sample).
    results: SampleResults = field(default_factory=SampleResults)
    thin_error: str | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return self.ev.spec

    @property
    def n(self) -> int:
        return self.ev.n_samples

    def interval(self, accuracy: float | None) -> tuple[float, float]:
        if accuracy is None:
            return (math.nan, math.nan)
        return wilson_interval(round(accuracy * self.n), self.n)

    @property
    def threat(self) -> tuple[str, str]:
        return (self.spec.get("norm", "?"), str(self.spec.get("eps", "?")))

    @property
    def fmn_beat_aa(self) -> bool:
        return bool(self.ev.n_fmn_beat_aa) or "fmn_beat_autoattack" in (self.ev.flags or [])

    @property
    def file_stem(self) -> str:
        return f"{model_slug(self.model)}-e{self.ev.id}"


@dataclass
class Table:
    dataset: str
    norm: str
    eps: str
    arch: str
    structure: str
    entries: list[Entry]
    slug: str = ""

    @property
    def title(self) -> str:
        structure = STRUCTURE_NAMES.get(self.structure, self.structure)
        return f"{self.dataset} · {plots.norm_symbol(self.norm)} ε = {self.eps} · {self.arch} · {structure}"


# ---------------------------------------------------------------------------------------------- helpers


def slugify(text: str, limit: int = 60) -> str:
    """A file-name-safe form of ``text`` ([A-Za-z0-9_.-], no leading dot); never empty."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:limit].strip("-.")
    return slug or "x"


def safe_slug(text: str) -> str:
    """``slugify`` plus a short hash when the slug lost characters, so two names never share a file."""
    slug = slugify(text)
    return slug if slug == text else f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def model_slug(model: Model) -> str:
    return f"{model.id}-{slugify(model.name)}"


def safe_url(url: Any) -> str | None:
    """``url`` if it is a link a manifest could carry (:func:`check_link_url`), else None.

    A ``javascript:`` link, a ``user:password@`` host or a control character must never reach an href.
    """
    if not isinstance(url, str):
        return None
    try:
        return check_link_url(url.strip())
    except ValueError:
        return None


def pct(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage without the sign (``0.4483`` → ``44.83``); "–" for a missing value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return "–"
    return f"{100 * value:.{digits}f}"


def human_count(value: int | None) -> str:
    if not value:
        return "–" if value is None else "0"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return str(value)


def sort_value(value: Any) -> str:
    """The ``data-sort`` attribute: a plain number, or empty for a missing value (sorted last)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def format_value(value: Any) -> str:
    """A provenance value as text: scalars as they are, containers as compact, sorted JSON."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return "–" if value is None else str(value)


def inert_json(obj: Any) -> str:
    """JSON that is safe inside HTML or a ``<script>`` block: ``<``, ``>`` and ``&`` as \\u escapes.

    These characters only occur inside JSON strings, where the escapes mean the same characters.
    """
    text = json.dumps(_jsonable(obj), indent=1, sort_keys=False, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _jsonable(obj.item())
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def _bib_field(text: Any) -> str:
    # Braces and backslashes would end or escape the BibTeX field; nothing else needs care.
    return re.sub(r"[{}\\]", "", str(text)).replace("\n", " ").strip()


def bibtex(entry: dict[str, Any]) -> str:
    kind = entry.get("kind", "inproceedings")
    venue_field = "journal" if kind == "article" else "booktitle"
    lines = [f"@{kind}{{{slugify(str(entry['key']))},"]
    for name, value in (
        ("title", entry.get("title")),
        ("author", entry.get("author")),
        (venue_field, entry.get("venue")),
        ("year", entry.get("year")),
        ("url", safe_url(entry.get("url"))),
    ):
        if value:
            lines.append(f"  {name} = {{{_bib_field(value)}}},")
    lines.append("}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ collection


class SiteData:
    """Everything the pages need, read from one session."""

    def __init__(self, session) -> None:
        self.models: list[Model] = list(session.scalars(select(Model).order_by(Model.id)))
        evaluations = list(session.scalars(select(Evaluation).order_by(Evaluation.id)))
        incomplete_ids = [ev.id for ev in evaluations if ev.status != "complete"]
        stored = dict(
            session.execute(
                select(SampleResult.evaluation_id, func.count())
                .where(SampleResult.evaluation_id.in_(incomplete_ids))
                .group_by(SampleResult.evaluation_id)
            ).all()
        )
        self.by_id = {m.id: m for m in self.models}
        self.children: dict[int, list[Model]] = defaultdict(list)
        for m in self.models:
            if m.parent_id is not None and m.parent_id in self.by_id:
                self.children[m.parent_id].append(m)

        # The newest complete evaluation per (model, protocol) (bench.analysis.records.latest_evaluation's rule).
        latest: dict[tuple[int, str], Evaluation] = {}
        self.incomplete: dict[int, list[tuple[Evaluation, int]]] = defaultdict(list)
        for ev in evaluations:
            if ev.status != "complete":
                self.incomplete[ev.model_id].append((ev, int(stored.get(ev.id, 0))))
                continue
            key = (ev.model_id, ev.protocol_hash)
            if key not in latest or _newer(ev, latest[key]):
                latest[key] = ev
        self.methods = _methods(self.models)
        self.entries: dict[int, list[Entry]] = defaultdict(list)
        for (model_id, _), ev in sorted(latest.items(), key=lambda kv: kv[1].id):
            model = self.by_id[model_id]
            entry = Entry(model=model, ev=ev, method=self.methods.get(model.method))
            _attach_reported(entry)
            self.entries[model_id].append(entry)
        for entries in self.entries.values():
            entries.sort(key=_preference)
        for entries in self.entries.values():
            for entry in entries:
                _link_parent(self, entry)
        self.as_of = max((ev.finished_at for ev in evaluations if ev.finished_at), default=None)
        self.protocols = _protocols(latest.values())

    def primary(self, model_id: int, threat: tuple[str, str, str] | None = None) -> Entry | None:
        """The evaluation shown for a model in a table: AutoAttack plus over standard, then more samples."""
        for entry in self.entries.get(model_id, []):
            if threat is None or (entry.spec.get("dataset"), *entry.threat) == threat:
                return entry
        return None


def _attach_reported(entry: Entry) -> None:
    """The authors' claim under this evaluation's threat model and the drop against our AutoAttack figure, and
    other benchmarks' re-evaluations beside them."""
    spec = entry.spec
    try:
        found = reported_numbers(entry.model, spec.get("norm"), spec.get("eps_value"))
    except Exception as err:  # a malformed ``reported`` column must not stop the build
        entry.reported_error = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        return
    entry.claims = list(found.claims)
    entry.reevaluations = list(found.reevaluations)
    entry.reported = found.claim
    entry.reevaluation = found.reevaluation
    entry.drop = reevaluation_drop(entry.reported, entry.ev.aa_robust_accuracy)


def _newer(a: Evaluation, b: Evaluation) -> bool:
    return (a.finished_at or datetime.min, a.id) > (b.finished_at or datetime.min, b.id)


def _preference(entry: Entry) -> tuple:
    finished = entry.ev.finished_at
    newness = (finished - datetime(1970, 1, 1)).total_seconds() if finished else -math.inf
    return (entry.spec.get("version") != "plus", -entry.n, -newness, -entry.ev.id)


def _link_parent(data: SiteData, entry: Entry) -> None:
    """The dense parent's evaluation under the same protocol, for the thin-ice analysis."""
    parent_id = entry.model.parent_id
    if parent_id is None or parent_id not in data.by_id:
        return
    parent_entries = data.entries.get(parent_id, [])
    same = [e for e in parent_entries if e.ev.protocol_hash == entry.ev.protocol_hash]
    if same:
        entry.parent_entry = same[0]
    else:
        entry.thin_error = missing_parent_evaluation(
            data.by_id[parent_id].name, entry.ev.protocol_hash, [e.ev.protocol_hash for e in parent_entries]
        )


def _protocols(evaluations: Iterable[Evaluation]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for ev in evaluations:
        if ev.protocol_hash not in seen:
            spec = ev.spec
            seen[ev.protocol_hash] = {
                "hash": ev.protocol_hash,
                "short": ev.protocol_hash[:8],
                "spec": spec,
                "models": 0,
            }
        seen[ev.protocol_hash]["models"] += 1
    return sorted(seen.values(), key=lambda p: (str(p["spec"].get("dataset")), p["hash"]))


def _methods(models: list[Model]) -> dict[str, MethodInfo]:
    """Registered methods from their cards, plus every other method name the store holds."""
    from methods.base import get_method, list_methods

    out: dict[str, MethodInfo] = {}
    for key in list_methods():
        card = get_method(key).card
        out[key] = MethodInfo(
            key=key,
            slug=safe_slug(key),
            display_name=card.display_name,
            registered=True,
            paper_title=card.paper_title,
            paper_url=safe_url(card.paper_url),
            venue=card.venue,
            year=card.year,
            authors=_first_author(card.ap_key),
            ap_key=card.ap_key,
            taxonomy=_taxonomy_items(card.taxonomy),
            native_sparsity=card.native_sparsity,
        )
    for model in models:
        if model.method == "dense" or model.method in out:
            continue
        paper = _paper_from_db(model)
        # A zoo submission of a method without an adapter names it in its manifest (bench.zoo).
        external = ((model.provenance or {}).get("zoo") or {}).get("external_method") or {}
        authors = paper.get("authors")
        out[model.method] = MethodInfo(
            key=model.method,
            slug=safe_slug(model.method),
            display_name=str(external.get("display_name") or model.method),
            registered=False,
            paper_title=paper.get("title"),
            paper_url=safe_url(paper.get("url")),
            venue=paper.get("venue"),
            year=paper.get("year"),
            authors=" and ".join(map(str, authors)) if isinstance(authors, list) else authors,
            ap_key=external.get("ap_key"),
            taxonomy=_taxonomy_items(model.taxonomy or {}),
        )
    return out


def _first_author(ap_key: str) -> str | None:
    # "HYDRA_Sehwag2020Hydra" → "Sehwag and others" (the card names the first author only).
    match = re.search(r"_([A-Z][A-Za-z-]+?)\d{4}", ap_key or "")
    return f"{match.group(1)} and others" if match else None


def _taxonomy_items(taxonomy: dict[str, Any]) -> list[tuple[str, str]]:
    # A submitted method's training types are nested: {"training": {"pretraining": "AT", "1S/IT": "1S"}}.
    def text(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k}: {text(x)}" for k, x in v.items())
        return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return [(str(k), text(v)) for k, v in taxonomy.items()]


def _paper_from_db(model: Model) -> dict[str, Any]:
    """Paper fields a submitted model carries: its zoo manifest's (``provenance["zoo"]["paper"]``), else
    ``provenance["paper"]``, ``taxonomy["paper"]`` or flat ``paper_title``/``paper_url`` keys."""
    zoo = (model.provenance or {}).get("zoo")
    for source in (zoo if isinstance(zoo, dict) else {}, model.provenance or {}, model.taxonomy or {}):
        paper = source.get("paper")
        if isinstance(paper, dict):
            return {k: paper.get(k) for k in ("title", "url", "venue", "year", "authors")}
        if isinstance(paper, str):
            return {"title": paper}
        if source.get("paper_title") or source.get("paper_url"):
            return {"title": source.get("paper_title"), "url": source.get("paper_url")}
    return {}


# ------------------------------------------------------------------------------------------- per sample


def _jobs(data: SiteData) -> list[list[EvalTask]]:
    """Per-sample tasks grouped by dense parent (its records are read once per job), in slices of a few."""
    families: dict[int, list[EvalTask]] = defaultdict(list)
    for model in data.models:
        for e in data.entries.get(model.id, []):
            parent = e.parent_entry.ev.id if e.parent_entry else None
            task = EvalTask(
                evaluation_id=e.ev.id,
                stem=e.file_stem,
                autoattack=e.ev.aa_robust_accuracy or 0.0,
                best_known=e.ev.best_robust_accuracy or 0.0,
                parent_evaluation_id=parent,
            )
            families[parent if parent is not None else e.ev.id].append(task)
    jobs = [tasks[i : i + JOB_SIZE] for _, tasks in sorted(families.items()) for i in range(0, len(tasks), JOB_SIZE)]
    return sorted(jobs, key=len, reverse=True)


def _pool(store: Store, workers: int | None, n_tasks: int) -> ProcessPoolExecutor | None:
    """Worker processes for the per-sample jobs, or None to run them here (small sites, in-memory stores)."""
    workers = min(os.cpu_count() or 1, MAX_WORKERS) if workers is None else workers
    url = make_url(store.url)
    in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
    if workers <= 1 or n_tasks < MIN_TASKS_FOR_POOL or in_memory:
        return None
    # On Linux, fork starts a worker in milliseconds with everything imported; the workers never touch torch or
    # the parent's database connection (each opens its own engine). Elsewhere, spawn.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(
        max_workers=min(workers, n_tasks), mp_context=context, initializer=worker_init, initargs=(store.url,)
    )


def _tables(data: SiteData) -> list[Table]:
    """One table per (dataset, norm, eps, architecture, structure); dense parents join every structure."""
    pruned: dict[tuple, list[Entry]] = defaultdict(list)
    dense: dict[tuple, list[Entry]] = defaultdict(list)
    for model in data.models:
        for entry in data.entries.get(model.id, []):
            threat = (model.dataset, *entry.threat, model.arch)
            if model.structure == "dense":
                dense[threat].append(entry)
            else:
                pruned[(*threat, model.structure)].append(entry)
    groups: dict[tuple, list[Entry]] = {}
    for key, entries in pruned.items():
        groups[key] = entries + dense.get(key[:4], [])
    for key, entries in dense.items():
        if not any(k[:4] == key for k in pruned):
            groups[(*key, "dense")] = entries
    tables = []
    for i, key in enumerate(sorted(groups)):
        # A model appears once per table, under its preferred evaluation for this threat model.
        chosen: dict[int, Entry] = {}
        for entry in groups[key]:
            if entry.model.id not in chosen or _preference(entry) < _preference(chosen[entry.model.id]):
                chosen[entry.model.id] = entry
        rows = sorted(
            chosen.values(),
            key=lambda e: (
                -(e.ev.aa_robust_accuracy or 0.0),
                -(e.ev.best_robust_accuracy or 0.0),
                -(e.ev.clean_accuracy or 0.0),
                e.model.name,
            ),
        )
        dataset, norm, eps, arch, structure = key
        table = Table(dataset, norm, eps, arch, structure, rows, slug=f"table-{i + 1:02d}-{slugify('-'.join(key))}")
        tables.append(table)
    return tables


# --------------------------------------------------------------------------------------------- rendering


def _row_record(table: Table, rank: int, e: Entry) -> dict[str, Any]:
    """One table row as plain values (fractions, counts): the CSV/JSON download and the page share it."""
    m, ev = e.model, e.ev
    aa_low, aa_high = e.interval(ev.aa_robust_accuracy)
    rep = e.reported
    return {
        "rank": rank,
        "model": m.name,
        "method": m.method,
        "method_name": e.method.display_name if e.method else m.method,
        "paper_url": e.method.paper_url if e.method else None,
        "dataset": m.dataset,
        "norm": table.norm,
        "eps": table.eps,
        "arch": m.arch,
        "structure": m.structure,
        "sparsity": m.measured_sparsity,
        "clean": ev.clean_accuracy,
        "autoattack": ev.aa_robust_accuracy,
        "autoattack_low": aa_low,
        "autoattack_high": aa_high,
        "best_known": ev.best_robust_accuracy,
        "reported_robust": getattr(rep, "robust", None),
        "reported_attack": getattr(rep, "attack", None),
        "reported_source": getattr(rep, "source", None),
        "drop_points": e.drop,
        "reevaluation_robust": getattr(e.reevaluation, "robust", None),
        "reevaluation_attack": getattr(e.reevaluation, "attack", None),
        "reevaluation_source": getattr(e.reevaluation, "source", None),
        "fmn_median_distance": ev.fmn_median_distance,
        "params": m.params,
        "nonzero_params": m.nonzero_params,
        "flops": m.flops,
        "nonzero_flops": m.nonzero_flops,
        "potentially_unreliable": bool(ev.unreliable),
        "fmn_beat_autoattack": e.fmn_beat_aa,
        "n_fmn_beat_autoattack": ev.n_fmn_beat_aa,
        "flags": list(ev.flags or []),
        "n": ev.n_samples,
        "version": e.spec.get("version"),
        "protocol_hash": ev.protocol_hash,
        "evaluation_id": ev.id,
        "model_id": m.id,
    }


TABLE_CSV_COLUMNS = [
    "rank",
    "model",
    "method",
    "dataset",
    "norm",
    "eps",
    "arch",
    "structure",
    "sparsity",
    "clean",
    "autoattack",
    "autoattack_low",
    "autoattack_high",
    "best_known",
    "reported_robust",
    "reported_attack",
    "drop_points",
    "reevaluation_robust",
    "reevaluation_attack",
    "fmn_median_distance",
    "params",
    "nonzero_params",
    "flops",
    "nonzero_flops",
    "potentially_unreliable",
    "fmn_beat_autoattack",
    "flags",
    "n",
    "version",
    "protocol_hash",
    "evaluation_id",
    "model_id",
]


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("leaderboard", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        pct=pct,
        human=human_count,
        sortval=sort_value,
        value=format_value,
        p=format_p,
        norm=plots.norm_symbol,
        url=safe_url,
    )
    env.globals.update(version=bench.__version__, FLAG_TEXT=FLAG_TEXT, POPULATIONS=POPULATIONS, model_slug=model_slug)
    return env


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out

    def text(self, rel: str, content: str) -> None:
        write_text(self.out / rel, content)


def _prepare(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder for the site")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise ValueError(
                    f"--out {out} is not empty and was not built by `bench leaderboard build` (no {MARKER} file); "
                    "give a new or empty folder"
                )
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def build_site(store_or_url: Store | str | None, out_dir: str | Path, *, workers: int | None = None) -> Path:
    """Render the leaderboard site for the store into ``out_dir`` and return the path of its ``index.html``.

    Args:
        store_or_url: an open :class:`~bench.store.Store`, or a SQLAlchemy URL / SQLite path (None: the default
            store, ``$BENCH_DB`` or ``sqlite:///results.db``).
        out_dir: the site folder. It is created; a folder from an earlier build is replaced; any other
            non-empty folder is refused.
        workers: processes for the per-sample work (records, CSV files, plots) [default: the CPU count, at
            most 4]; 1 works in this process. The files do not depend on it.

    Raises:
        ValueError: ``out_dir`` is a file, or a non-empty folder this command did not build.
    """
    out = Path(out_dir)
    own = not isinstance(store_or_url, Store)
    store = Store(store_or_url) if own else store_or_url
    try:
        with store.session() as session:
            data = SiteData(session)
            _prepare(out)
            w = _Writer(out)
            jobs = _jobs(data)
            pool = _pool(store, workers, sum(map(len, jobs)))
            if pool is None:
                results = {}
                for job in jobs:
                    results.update(run_job(store, job, out))
                pages = _render_overview(data, w)
            else:
                with pool:
                    futures = [pool.submit(worker_job, (job, str(out))) for job in jobs]
                    pages = _render_overview(data, w)  # while the workers draw
                    results = {}
                    for future in futures:
                        results.update(future.result())
            for entries in data.entries.values():
                for e in entries:
                    e.results = results[e.ev.id]
            _render_models(data, w, pages)
    finally:
        if own:
            store.dispose()
    return out / "index.html"


def _render_overview(data: SiteData, w: _Writer) -> dict[str, Any]:
    """Index, methods, methodology and downloads pages, the data files, the method pages and their plots."""
    env = _environment()
    all_entries = [e for m in data.models for e in data.entries.get(m.id, [])]
    tables = _tables(data)
    table_rows = {t.slug: [_row_record(t, i, e) for i, e in enumerate(t.entries, 1)] for t in tables}
    methods = sorted(data.methods.values(), key=lambda mi: (not mi.registered, mi.display_name.lower(), mi.key))
    for mi in methods:
        mi.entries = [e for e in all_entries if e.model.method == mi.key]
        mi.unevaluated = [m for m in data.models if m.method == mi.key and not data.entries.get(m.id)]
        mi.plot = _method_plot(data, mi)
    not_evaluated = [m for m in data.models if not data.entries.get(m.id)]

    common = {"env": env, "data": data, "methods": methods, "tables": tables, "structure_names": STRUCTURE_NAMES}
    ctx = {k: v for k, v in common.items() if k != "env"}
    w.text(MARKER, MARKER_TEXT)
    w.text(
        "index.html",
        env.get_template("index.html.j2").render(
            root="", page="index", rows=table_rows, not_evaluated=not_evaluated, **ctx
        ),
    )
    w.text("methodology.html", env.get_template("methodology.html.j2").render(root="", page="methodology", **ctx))
    w.text("methods.html", env.get_template("methods.html.j2").render(root="", page="methods", **ctx))

    all_rows = []
    for t in tables:
        rows = table_rows[t.slug]
        all_rows += [{"table": t.title, **r} for r in rows]
        w.text(
            f"data/{t.slug}.csv",
            csv_text(TABLE_CSV_COLUMNS, ([_csv_value(r[c]) for c in TABLE_CSV_COLUMNS] for r in rows)),
        )
        meta = {"dataset": t.dataset, "norm": t.norm, "eps": t.eps, "arch": t.arch, "structure": t.structure}
        w.text(f"data/{t.slug}.json", inert_json({"table": meta, "rows": rows}))
    columns = ["table", *TABLE_CSV_COLUMNS]
    w.text("data/leaderboard.csv", csv_text(columns, ([_csv_value(r[c]) for c in columns] for r in all_rows)))
    w.text("data/leaderboard.json", inert_json(all_rows))
    papers = _papers(methods)
    w.text("data/papers.bib", "\n\n".join(bibtex(p) for p in papers) + "\n")
    w.text(
        "downloads.html", env.get_template("downloads.html.j2").render(root="", page="downloads", papers=papers, **ctx)
    )

    method_tpl = env.get_template("method.html.j2")
    for mi in methods:
        if mi.plot:
            w.text(f"methods/{mi.slug}-sparsity.svg", mi.plot)
        w.text(f"methods/{mi.slug}.html", method_tpl.render(root="../", page="method", mi=mi, **ctx))
    return common


def _render_models(data: SiteData, w: _Writer, common: dict[str, Any]) -> None:
    ctx = {k: v for k, v in common.items() if k != "env"}
    model_tpl = common["env"].get_template("model.html.j2")
    for model in data.models:
        w.text(
            f"models/{model_slug(model)}.html",
            model_tpl.render(
                root="../",
                page="model",
                model=model,
                entries=data.entries.get(model.id, []),
                method=data.methods.get(model.method),
                parent=data.by_id.get(model.parent_id) if model.parent_id else None,
                children=data.children.get(model.id, []),
                incomplete=data.incomplete.get(model.id, []),
                **ctx,
            ),
        )


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return value


def _method_plot(data: SiteData, mi: MethodInfo) -> str | None:
    """Robust accuracy against sparsity, one series per (architecture, dataset, threat model) with its dense parents."""
    if not mi.entries:
        return None
    groups: dict[tuple, dict[int, Entry]] = defaultdict(dict)
    for e in mi.entries:
        key = (e.model.arch, e.model.dataset, *e.threat)
        best = groups[key].get(e.model.id)
        if best is None or _preference(e) < _preference(best):
            groups[key][e.model.id] = e
        parent = data.by_id.get(e.model.parent_id) if e.model.parent_id else None
        if parent is not None:
            pe = data.primary(parent.id, (e.model.dataset, *e.threat))
            if pe is not None:
                groups[key].setdefault(parent.id, pe)
    series = []
    for key in sorted(groups):
        arch, dataset, norm, eps = key
        entries = sorted(groups[key].values(), key=lambda e: (e.model.measured_sparsity, e.model.id))
        intervals = [e.interval(e.ev.aa_robust_accuracy) for e in entries]
        series.append(
            plots.Series(
                label=f"{arch} · {dataset} · {plots.norm_symbol(norm)} {eps}",
                sparsity=[e.model.measured_sparsity for e in entries],
                robust=[e.ev.aa_robust_accuracy or 0.0 for e in entries],
                low=[lo for lo, _ in intervals],
                high=[hi for _, hi in intervals],
            )
        )
    return plots.sparsity_svg(series, ylabel="AutoAttack robust accuracy (%)")


def _papers(methods: list[MethodInfo]) -> list[dict[str, Any]]:
    papers = []
    seen = set()
    for mi in methods:
        if not mi.paper_title:
            continue
        key = mi.ap_key.split("_", 1)[-1] if mi.ap_key else safe_slug(mi.key)
        if key in seen:
            continue
        seen.add(key)
        papers.append(
            {
                "key": key,
                "kind": "inproceedings",
                "title": mi.paper_title,
                "author": mi.authors,
                "venue": mi.venue,
                "year": mi.year,
                "url": mi.paper_url,
                "method": mi,
            }
        )
    return papers + [p for p in PROTOCOL_PAPERS if p["key"] not in seen]
