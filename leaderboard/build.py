"""Build the static leaderboard site from the results store.

Flow: store → analysis → site. Model and evaluation rows are read through the ORM (a few hundred
objects); the tables, the method pages and their plots need only the evaluations' stored aggregates. The
per-sample work (each evaluation's records into numpy arrays, its CSV download, security curve, thin-ice
analysis against its dense parent) runs in worker processes (:mod:`leaderboard.per_sample`). Pages are rendered
with Jinja2 (autoescape on, so every string a submitter controls is shown as text); plots are deterministic SVG
files next to the pages; nothing is fetched from the network, so the site works opened from ``file://``. The same
database gives byte-identical files, whatever the number of workers.

Only evaluations under one protocol (one ``Evaluation.protocol_hash``) are ever ranked together: the index has a
section per protocol, each dataset's main protocol first (:func:`_order_protocols`), the others apart below. The
table columns are defined once, in :mod:`leaderboard.columns`. The site is written into a hidden folder next to
the output folder and renamed into place when complete (:func:`build_site`), so a killed build leaves the previous
site, never a partial one.

Layout of the output folder::

    index.html            per protocol, one table per (architecture, structure); models not evaluated
    methodology.html      the protocol in plain words
    methods.html          every method with its taxonomy
    downloads.html        each table as CSV and JSON, BibTeX of the papers
    models/<id>-<name>.html, .csv, -curve.svg, -thin-ice.svg    one page per model
    methods/<key>.html, -sparsity.svg                           one page per method
    data/*.csv, *.json, papers.bib
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import secrets
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
from bench.analysis.format import number, p_value
from bench.analysis.replicates import (
    ReplicateSummary,
    group_replicates,
    seed_of,
    setting_key,
    setting_label,
    summarize_evaluations,
)
from bench.analysis.report import failure, missing_parent_evaluation
from bench.analysis.reported import Reported, reevaluation_drop, reported_numbers
from bench.analysis.stats import wilson_interval
from bench.analysis.thin_ice import POPULATIONS
from bench.store import Evaluation, Model, SampleResult, Store
from leaderboard import plots
from leaderboard.columns import COLUMNS, Row
from leaderboard.formatting import (  # noqa: F401  (re-exported: tests and callers import them from here)
    format_value,
    human_count,
    model_slug,
    pct,
    safe_slug,
    safe_url,
    seeds_text,
    slugify,
    sort_value,
    word_breaks,
)
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
    "autoattack_adversarial_not_reproduced": (
        "an adversarial example AutoAttack returned was not adversarial in our forward pass (a randomised or "
        "input-dependent model): FMN did not start from it and its norm is no best-known distance"
    ),
    "best_known_above_eps": (
        "a sample AutoAttack broke at ε has a best-known distance just above ε (AutoAttack's perturbation, rounded "
        "in float32, exceeds ε by a last-place unit, and neither FMN run found a smaller one); shown, not unreliable"
    ),
}
# The badge a flag gets: FMN's and the best-known notes inform; every other flag is an AutoAttack or consistency
# check that marks the evaluation potentially unreliable (bench.evaluate.UNRELIABLE_FLAGS; a test checks the split).
FLAG_BADGE = {"fmn_beat_autoattack": "fmn", "best_known_above_eps": "notice"}
# Who found a sample's best-known distance (SampleResult.best_attack), in words.
BEST_ATTACK_TEXT = {"fmn": "plain FMN", "fmn_from_autoattack": "FMN from AutoAttack's adversarial"}

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
    # The entries grouped by protocol, in the site's protocol order: a method page never mixes them in one table.
    by_protocol: list[tuple[Protocol, list[Entry]]] = field(default_factory=list)
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
    # The model's training-seed replicates under this protocol (itself included), when two or more are evaluated.
    setting: Setting | None = None

    @property
    def spec(self) -> dict[str, Any]:
        return self.ev.spec

    @property
    def seed(self) -> int | None:
        """The pruning seed recorded in the model's provenance (None for dense, zoo and submitted models)."""
        return seed_of(self.model)

    @property
    def has_setting(self) -> bool:
        """Whether the model was pruned by ``bench prune`` with a recorded seed and config: other seeds of its setting
        would be its replicates (:func:`bench.analysis.replicates.setting_key`)."""
        return setting_key(self.model) is not None

    @property
    def has_best_known(self) -> bool:
        """Whether the evaluation's protocol stores best-known distances (FMN also started from AutoAttack's
        adversarial examples); the figures themselves may still be missing (shown as "–")."""
        return (self.spec or {}).get("fmn_init", "none") != "none"

    @property
    def inputs(self) -> str:
        """The model's input normalisation as ``--normalization`` spells it: ``dataset``, ``none`` or ``MEAN/STD``."""
        return inputs_label(self.model)

    @property
    def inputs_text(self) -> str | None:
        """The normalisation in words, or None for the dataset's own mean/std (the default)."""
        return inputs_text(self.model)

    @property
    def n(self) -> int:
        return self.ev.n_samples

    def interval(self, accuracy: float | None) -> tuple[float, float]:
        if accuracy is None:
            return (math.nan, math.nan)
        return wilson_interval(round(accuracy * self.n), self.n)

    @property
    def fmn_beat_aa(self) -> bool:
        return bool(self.ev.n_fmn_beat_aa) or "fmn_beat_autoattack" in (self.ev.flags or [])

    @property
    def file_stem(self) -> str:
        return f"{model_slug(self.model)}-e{self.ev.id}"


@dataclass(eq=False)
class Setting:
    """Training-seed replicates: the models of one setting (everything that defines a pruned model but its seed,
    :func:`bench.analysis.replicates.setting_of`) evaluated under one protocol, ordered by seed.

    Attributes:
        key: the setting key (:func:`bench.analysis.replicates.setting_key`).
        entries: one entry per seed (each model's newest complete evaluation under the protocol).
        summary: ``{"clean"|"autoattack"|"fmn"|"best_known": ReplicateSummary}`` across the seeds.
        error: why there is no summary (two models of the setting share a seed), else None.
    """

    key: str
    protocol_hash: str
    entries: list[Entry]
    summary: dict[str, ReplicateSummary] = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        """The first replicate's name without its seed suffix."""
        return setting_label(self.entries[0].model.name)

    @property
    def n(self) -> int:
        return len(self.entries)

    @property
    def seeds(self) -> list[int]:
        return [e.seed for e in self.entries if e.seed is not None]

    @property
    def seeds_text(self) -> str:
        return seeds_text(self.seeds)

    @property
    def sparsity(self) -> float:
        """Mean measured sparsity of the replicates (their masks differ, so may their sparsities, slightly)."""
        return math.fsum(e.model.measured_sparsity for e in self.entries) / len(self.entries)

    @property
    def model(self) -> Model:
        return self.entries[0].model

    @property
    def slug(self) -> str:
        return f"setting-{self.key[:12]}-{self.protocol_hash[:8]}"

    def sentence(self, metric: str = "autoattack") -> str | None:
        """ "seeds 0–2: mean 43.20 %, range 41.00–45.10 %" (as ``bench report`` words it), or None."""
        s = self.summary.get(metric)
        if s is None:
            return None
        return f"seeds {seeds_text(s.seeds)}: mean {pct(s.mean)} %, range {pct(s.min)}–{pct(s.max)} %"


def best_attack_text(name: str) -> str:
    """A ``best_attack`` value in words: "plain FMN", "AutoAttack (apgd-ce)"."""
    if name.startswith("autoattack:"):
        return f"AutoAttack ({name.split(':', 1)[1]})"
    return BEST_ATTACK_TEXT.get(name, name)


def inputs_label(model: Model) -> str:
    """A model's input normalisation as ``--normalization`` spells it (:func:`bench.catalog.normalization_label`)."""
    from bench.catalog import normalization_label

    key = getattr(model, "normalization", None)
    try:
        return normalization_label(key)
    except ValueError:  # a stored key that is not MEAN/STD numbers: shown as stored (as text), never the default
        return str(key)


def inputs_text(model: Model) -> str | None:
    """A model's input normalisation in words, None for the dataset's own
    (:func:`bench.catalog.describe_normalization`)."""
    from bench.catalog import describe_normalization

    key = getattr(model, "normalization", None)
    try:
        return describe_normalization(key)
    except ValueError:
        return f"mean/std {key}"


# Spec fields that are not part of the protocol hash (bench.spec.RunSpec.protocol_hash) and fields shown by name.
NOT_PROTOCOL = ("device", "batch_size")
PROTOCOL_FIELDS = ("dataset", "n_samples", "norm", "eps", "eps_value", "version", "fmn_steps", "seed", "protocol")


@dataclass
class Protocol:
    """Evaluations with one protocol hash: the same samples, threat model, attacks and settings.

    Only evaluations under one protocol are ever ranked together. Per dataset one protocol is the *main* one
    (:func:`_order_protocols`); the others get their own tables below it.
    """

    hash: str
    spec: dict[str, Any]
    models: int = 0
    main: bool = False
    canonical: bool = False
    tables: list[Table] = field(default_factory=list)
    # Settings with two or more seeds evaluated under this protocol (the index's "by setting" table).
    seed_settings: list[Setting] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.hash[:8]

    @property
    def slug(self) -> str:
        return f"protocol-{slugify(self.hash[:12])}"

    @property
    def dataset(self) -> str:
        return str(self.spec.get("dataset", "?"))

    @property
    def n(self) -> Any:
        return self.spec.get("n_samples", "?")

    @property
    def threat(self) -> str:
        return f"{plots.norm_symbol(str(self.spec.get('norm', '?')))} ε = {self.spec.get('eps', '?')}"

    @property
    def has_best_known(self) -> bool:
        """Whether FMN also started from AutoAttack's adversarial examples (best-known distances stored)."""
        return self.spec.get("fmn_init", "none") != "none"

    @property
    def fmn_note(self) -> str:
        # Protocols from before best-known distances differ from today's only there: their titles must too.
        return "" if self.has_best_known else " · plain FMN only"

    @property
    def title(self) -> str:
        """What the protocol is, in one line: dataset, threat model, AutoAttack version, N (and "plain FMN only" for
        a protocol without best-known distances)."""
        version = self.spec.get("version", "?")
        return f"{self.dataset} · {self.threat} · AutoAttack {version} · N = {self.n}{self.fmn_note}"

    @property
    def settings(self) -> list[tuple[str, str]]:
        """Every setting the protocol hash covers, as (name, value); fields this site does not know by name too."""
        spec = self.spec
        known = (*PROTOCOL_FIELDS, *NOT_PROTOCOL)
        fmn = [f"{spec.get('fmn_steps', '?')} steps"]
        fmn += [
            f"{k[4:].replace('_', ' ')} {format_value(spec[k])}"
            for k in sorted(spec)
            if k.startswith("fmn_") and k != "fmn_steps"
        ]
        out = [
            ("dataset", self.dataset),
            ("samples", f"the first {self.n} of the test split"),
            ("threat model", self.threat),
            ("AutoAttack", str(spec.get("version", "?"))),
            ("FMN", ", ".join(fmn)),
            ("attack seed", str(spec.get("seed", "?"))),
        ]
        for key in sorted(k for k in spec if k not in known and not k.startswith("fmn_")):
            out.append((key.replace("_", " "), format_value(spec[key])))
        out.append(("protocol", f"{spec.get('protocol', '?')} · hash {self.hash[:12]}"))
        return out


@dataclass
class Table:
    """One ranked table: the models of one architecture and structure evaluated under one protocol."""

    protocol: Protocol
    arch: str
    structure: str
    entries: list[Entry]
    slug: str = ""

    @property
    def dataset(self) -> str:
        return self.protocol.dataset

    @property
    def norm(self) -> str:
        return str(self.protocol.spec.get("norm", "?"))

    @property
    def eps(self) -> str:
        return str(self.protocol.spec.get("eps", "?"))

    @property
    def heading(self) -> str:
        """The table's heading inside its protocol's section."""
        return f"{self.arch} · {STRUCTURE_NAMES.get(self.structure, self.structure)}"

    @property
    def title(self) -> str:
        """The table's full name (downloads, the ``table`` column of the combined CSV): protocol and heading."""
        return f"{self.protocol.title} · {self.heading}"


# ---------------------------------------------------------------------------------------------- helpers


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
        self.protocols = _order_protocols(latest.values())
        self.protocol_of = {p.hash: p for p in self.protocols}
        # A model's evaluations in protocol order: its dataset's main protocol first.
        order = {p.hash: i for i, p in enumerate(self.protocols)}
        for entries in self.entries.values():
            entries.sort(key=lambda e: order[e.ev.protocol_hash])
        for entries in self.entries.values():
            for entry in entries:
                _link_parent(self, entry)
        _link_replicates(self)
        self.as_of = max((ev.finished_at for ev in evaluations if ev.finished_at), default=None)

    def entry(self, model_id: int, protocol_hash: str) -> Entry | None:
        """The model's evaluation under this protocol (the newest complete one), if it has one."""
        return next((e for e in self.entries.get(model_id, []) if e.ev.protocol_hash == protocol_hash), None)

    def protocol(self, entry: Entry) -> Protocol:
        return self.protocol_of[entry.ev.protocol_hash]


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


def _link_replicates(data: SiteData) -> None:
    """Group the shown evaluations of ranked models into settings (:func:`group_replicates`, the rule ``bench
    results`` uses) and attach each setting with two seeds or more to its entries and its protocol.

    Unranked models (sanity runs) never join a setting: their figures are not averaged with real models'.
    """
    by_evaluation = {e.ev.id: e for entries in data.entries.values() for e in entries if is_ranked(e.model)}
    groups = group_replicates(e.ev for e in by_evaluation.values())
    for (key, protocol_hash), evaluations in groups.items():
        if key.startswith("model:") or len(evaluations) < 2:
            continue
        setting = Setting(key, protocol_hash, [by_evaluation[ev.id] for ev in evaluations])
        try:
            setting.summary = summarize_evaluations(evaluations)
        except ValueError as err:  # two models of the setting share a seed: shown, never averaged
            setting.error = failure("the summary across seeds", err)
        for entry in setting.entries:
            entry.setting = setting
        data.protocol_of[protocol_hash].seed_settings.append(setting)
    for p in data.protocols:
        p.seed_settings.sort(key=lambda st: (st.model.method, st.model.arch, st.model.target_sparsity or 0.0, st.label))


def _newer(a: Evaluation, b: Evaluation) -> bool:
    return (a.finished_at or datetime.min, a.id) > (b.finished_at or datetime.min, b.id)


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


def _order_protocols(evaluations: Iterable[Evaluation]) -> list[Protocol]:
    """The protocols of the shown evaluations: per dataset (by name) its main protocol, then the dataset's others.

    The main protocol of a dataset is its canonical one when the store holds it: AutoAttack *plus*, the
    dataset's default threat model (L∞ at its default ε) on the full test split (its ``test_size``; for a dataset
    this installation does not know, the most samples any stored protocol of it used). Otherwise, and among the
    others: full split first, then AutoAttack plus, then the most models, then the most samples.
    """
    protocols: dict[str, Protocol] = {}
    for ev in evaluations:
        if ev.protocol_hash not in protocols:
            spec = {k: v for k, v in (ev.spec or {}).items() if k not in NOT_PROTOCOL}
            protocols[ev.protocol_hash] = Protocol(hash=ev.protocol_hash, spec=spec)
        protocols[ev.protocol_hash].models += 1
    by_dataset: dict[str, list[Protocol]] = defaultdict(list)
    for p in protocols.values():
        by_dataset[p.dataset].append(p)
    ordered = []
    for dataset in sorted(by_dataset):
        group = by_dataset[dataset]
        most = max((_int(p.spec.get("n_samples")) for p in group), default=0)
        ranks = {p.hash: _protocol_rank(p, most) for p in group}
        group.sort(key=lambda p: (tuple(-x for x in ranks[p.hash]), p.hash))
        for p in group:
            p.canonical = bool(ranks[p.hash][0])
        group[0].main = True
        ordered += group
    return ordered


def _protocol_rank(p: Protocol, most_samples: int) -> tuple[int, ...]:
    """(canonical, full split, plus, models, samples): larger is preferred."""
    from bench.data import get_dataset_info

    spec = p.spec
    try:
        info = get_dataset_info(p.dataset)
    except Exception:  # a dataset this installation does not know: no default threat model to compare with
        info = None
    n = _int(spec.get("n_samples"))
    full = n >= (getattr(info, "test_size", None) or most_samples)
    plus = spec.get("version") == "plus"
    default_threat = info is None or (
        spec.get("norm") == "Linf" and _close(spec.get("eps_value"), info.default_eps_value)
    )
    return (int(plus and full and default_threat), int(full), int(plus), p.models, n)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _close(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and math.isclose(float(a), b, rel_tol=1e-9, abs_tol=1e-12)


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
        max_workers=min(workers, n_tasks),
        mp_context=context,
        initializer=worker_init,
        initargs=(store.url, os.getpid()),
    )


def is_ranked(model: Model) -> bool:
    """False for a sanity run (``bench evaluate --unranked``): shown on its page and listed apart, never ranked."""
    return getattr(model, "ranked", True) is not False


def _tables(data: SiteData) -> list[Table]:
    """One table per (protocol, architecture, structure), in protocol order; a dense parent joins every structure
    of its architecture under the same protocol. A table never holds two protocols."""
    tables = []
    for protocol in data.protocols:
        pruned: dict[tuple[str, str], list[Entry]] = defaultdict(list)
        dense: dict[str, list[Entry]] = defaultdict(list)
        for model in data.models:
            entry = data.entry(model.id, protocol.hash)
            if entry is None or not is_ranked(model):
                continue
            if model.structure == "dense":
                dense[model.arch].append(entry)
            else:
                pruned[(model.arch, model.structure)].append(entry)
        groups = {key: entries + dense.get(key[0], []) for key, entries in pruned.items()}
        for arch, entries in dense.items():
            if not any(a == arch for a, _ in pruned):
                groups[(arch, "dense")] = entries
        protocol.tables = []
        for arch, structure in sorted(groups):
            rows = sorted(
                groups[(arch, structure)],
                key=lambda e: (
                    -(e.ev.aa_robust_accuracy or 0.0),
                    -(e.ev.best_robust_accuracy or 0.0),
                    -(e.ev.clean_accuracy or 0.0),
                    e.model.name,
                ),
            )
            name = slugify(
                "-".join(
                    (protocol.dataset, protocol.spec.get("norm", "?"), str(protocol.spec.get("eps")), arch, structure)
                )
            )
            slug = f"table-{len(tables) + 1:02d}-{name}-{slugify(protocol.short)}"
            table = Table(protocol, arch, structure, rows, slug=slug)
            protocol.tables.append(table)
            tables.append(table)
    return tables


# --------------------------------------------------------------------------------------------- rendering


def _row_record(table: Table, rank: int, e: Entry) -> dict[str, Any]:
    """One table row as plain values (fractions, counts): the CSV/JSON download and the page share it."""
    m, ev = e.model, e.ev
    aa_low, aa_high = e.interval(ev.aa_robust_accuracy)
    rep = e.reported
    across = e.setting.summary.get("autoattack") if e.setting else None
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
        "seed": e.seed,
        "replicates": across.n if across else None,
        "replicate_seeds": list(across.seeds) if across else [],
        "autoattack_seeds_mean": across.mean if across else None,
        "autoattack_seeds_min": across.min if across else None,
        "autoattack_seeds_max": across.max if across else None,
        "autoattack_seeds_std": across.std if across else None,
        "fmn_median_distance": ev.fmn_median_distance,
        "best_median_distance": ev.best_median_distance,
        "fmn_local_optimality": ev.fmn_local_optimality,
        "fmn_best_median_ratio": ev.fmn_best_median_ratio,
        "n_fmn_above_best": ev.n_fmn_above_best,
        "normalization": e.inputs,
        "params": m.params,
        "nonzero_params": m.nonzero_params,
        "flops": m.flops,
        "nonzero_flops": m.nonzero_flops,
        "potentially_unreliable": bool(ev.unreliable),
        "fmn_beat_autoattack": e.fmn_beat_aa,
        "n_fmn_beat_autoattack": ev.n_fmn_beat_aa,
        "best_known_above_eps": "best_known_above_eps" in (ev.flags or []),
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
    "seed",
    "replicates",
    "replicate_seeds",
    "autoattack_seeds_mean",
    "autoattack_seeds_min",
    "autoattack_seeds_max",
    "autoattack_seeds_std",
    "fmn_median_distance",
    "best_median_distance",
    "fmn_local_optimality",
    "fmn_best_median_ratio",
    "n_fmn_above_best",
    "normalization",
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
        p=p_value,
        norm=plots.norm_symbol,
        url=safe_url,
        wbr=word_breaks,
        num=number,
    )
    env.globals.update(
        version=bench.__version__,
        FLAG_TEXT=FLAG_TEXT,
        FLAG_BADGE=FLAG_BADGE,
        best_attack_text=best_attack_text,
        normalization_label=inputs_label,
        normalization_text=inputs_text,
        seed_of=seed_of,
        POPULATIONS=POPULATIONS,
        model_slug=model_slug,
        is_ranked=is_ranked,
    )
    return env


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out

    def text(self, rel: str, content: str) -> None:
        write_text(self.out / rel, content)


# A build writes into a hidden folder next to ``--out`` and renames it into place when every file is written, so a
# killed build never leaves a half-written site or a folder a later build refuses. The folder names carry the
# building process's id: a later build removes the leftovers of processes that are gone.
STAGING = "building"
REPLACED = "replaced"


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` this command may not replace: a file, a link, or a non-empty folder without the marker."""
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; give the folder it points to, or a new folder")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder for the site")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise ValueError(
                f"--out {out} is not empty and was not built by `bench leaderboard build` (no {MARKER} file); "
                "give a new or empty folder"
            )


def _side_path(out: Path, kind: str) -> Path:
    """A new name next to ``out`` for a staging (or replaced) folder of this process."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"


def _side_folders(out: Path) -> list[tuple[Path, int]]:
    """Folders next to ``out`` that a build of ``out`` made (staging or replaced), with the id of that process."""
    found = []
    if not out.parent.is_dir():
        return found
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{STAGING}|{REPLACED})-(\d+)-[A-Za-z0-9_]+$")
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((path, int(match.group(1))))
    return sorted(found)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    try:  # a killed process its parent has not reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_leftovers(out: Path) -> None:
    """Remove what killed builds of ``out`` left next to it (never a running build's folder)."""
    for path, pid in _side_folders(out):
        if not _process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _staging_folder(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = _side_path(out, STAGING)
        try:
            path.mkdir()  # the umask's permissions, like the folder it becomes (mkdtemp would make it 0700)
            return path
        except FileExistsError:
            continue


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``staging`` folder: two renames, the old site removed afterwards.

    Between the two renames (microseconds) ``out`` does not exist; a kill there leaves no site, and the next build
    writes one. Readers never see a partial site.
    """
    _check_out(out)  # again: the folder may have changed while the site was being built
    old = None
    if out.exists():
        old = _side_path(out, REPLACED)
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another build moved it away meanwhile
            old = None
    try:
        os.rename(staging, out)
    except OSError as err:
        if old is not None and not out.exists():
            os.rename(old, out)  # the previous site goes back
        raise ValueError(
            f"--out {out} was written by another build while this one ran ({err.strerror}); run the build again"
        ) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_site(store_or_url: Store | str | None, out_dir: str | Path, *, workers: int | None = None) -> Path:
    """Render the leaderboard site for the store into ``out_dir`` and return the path of its ``index.html``.

    The site is written into a hidden folder next to ``out_dir`` and renamed into place once complete, so
    ``out_dir`` always holds either the previous site or the new one; leftovers of killed builds are removed.

    Args:
        store_or_url: an open :class:`~bench.store.Store`, or a SQLAlchemy URL / SQLite path (None: the default
            store, ``$BENCH_DB`` or ``sqlite:///results.db``).
        out_dir: the site folder. It is created; a folder from an earlier build is replaced; any other
            non-empty folder is refused.
        workers: processes for the per-sample work (records, CSV files, plots) [default: the CPU count, at
            most 4]; 1 works in this process. The files do not depend on it.

    Raises:
        ValueError: ``out_dir`` is a file or a link, or a non-empty folder this command did not build.
    """
    out = Path(out_dir)
    target = Path(os.path.abspath(out))  # "site/", "." and "a/../site" name their folder
    if not target.name:
        raise ValueError(f"--out {out} is the root folder; give a folder for the site")
    _check_out(target)
    own = not isinstance(store_or_url, Store)
    store = Store(store_or_url) if own else store_or_url
    staging = None
    try:
        with store.session() as session:
            data = SiteData(session)
            _remove_leftovers(target)
            staging = _staging_folder(target)
            _write_site(store, data, staging, workers)
        _move_into_place(staging, target)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if own:
            store.dispose()
    return out / "index.html"


def _write_site(store: Store, data: SiteData, folder: Path, workers: int | None) -> None:
    # The marker first: a staging folder is recognisable from its first file on.
    w = _Writer(folder)
    w.text(MARKER, MARKER_TEXT)
    jobs = _jobs(data)
    pool = _pool(store, workers, sum(map(len, jobs)))
    if pool is None:
        results = {}
        for job in jobs:
            results.update(run_job(store, job, folder))
        pages = _render_overview(data, w)
    else:
        with pool:
            futures = [pool.submit(worker_job, (job, str(folder))) for job in jobs]
            pages = _render_overview(data, w)  # while the workers draw
            results = {}
            for future in futures:
                results.update(future.result())
    for entries in data.entries.values():
        for e in entries:
            e.results = results[e.ev.id]
    _render_models(data, w, pages)


def _render_overview(data: SiteData, w: _Writer) -> dict[str, Any]:
    """Index, methods, methodology and downloads pages, the data files, the method pages and their plots."""
    env = _environment()
    all_entries = [e for m in data.models for e in data.entries.get(m.id, [])]
    tables = _tables(data)
    table_rows = {t.slug: [_row_record(t, i, e) for i, e in enumerate(t.entries, 1)] for t in tables}
    shown_rows = {
        t.slug: [
            Row(r, e, bool(data.children.get(e.model.id))) for r, e in zip(table_rows[t.slug], t.entries, strict=True)
        ]
        for t in tables
    }
    # A column that only some evaluations have (seeds, best-known figures) is drawn in the tables where a row has it.
    table_columns = {t.slug: [c for c in COLUMNS if c.shown(shown_rows[t.slug])] for t in tables}
    methods = sorted(data.methods.values(), key=lambda mi: (not mi.registered, mi.display_name.lower(), mi.key))
    for mi in methods:
        mi.entries = [e for e in all_entries if e.model.method == mi.key]
        mi.by_protocol = [
            (p, [e for e in mi.entries if e.ev.protocol_hash == p.hash])
            for p in data.protocols
            if any(e.ev.protocol_hash == p.hash for e in mi.entries)
        ]
        mi.unevaluated = [m for m in data.models if m.method == mi.key and not data.entries.get(m.id)]
        mi.plot = _method_plot(data, mi)
    not_evaluated = [m for m in data.models if not data.entries.get(m.id)]
    unranked = [e for m in data.models if not is_ranked(m) for e in data.entries.get(m.id, [])]

    common = {"env": env, "data": data, "methods": methods, "tables": tables, "structure_names": STRUCTURE_NAMES}
    ctx = {k: v for k, v in common.items() if k != "env"}
    w.text(
        "index.html",
        env.get_template("index.html.j2").render(
            root="",
            page="index",
            rows=shown_rows,
            columns=table_columns,
            not_evaluated=not_evaluated,
            unranked=unranked,
            **ctx,
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
        meta = {
            "dataset": t.dataset,
            "norm": t.norm,
            "eps": t.eps,
            "arch": t.arch,
            "structure": t.structure,
            "protocol_hash": t.protocol.hash,
            "main_protocol": t.protocol.main,
            "protocol": t.protocol.spec,
        }
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
    """Robust accuracy against sparsity, one series per (protocol, architecture) with its dense parents under the
    same protocol: points from different protocols are never joined by a line. A setting pruned with several seeds
    is one point: the mean over its seeds with a min–max bar."""
    if not mi.entries:
        return None
    groups: dict[tuple[str, str], dict[int, Entry]] = defaultdict(dict)
    for e in mi.entries:
        if not is_ranked(e.model):
            continue
        key = (e.ev.protocol_hash, e.model.arch)
        groups[key][e.model.id] = e
        parent = data.by_id.get(e.model.parent_id) if e.model.parent_id else None
        if parent is not None:
            pe = data.entry(parent.id, e.ev.protocol_hash)
            if pe is not None and is_ranked(parent):
                groups[key].setdefault(parent.id, pe)
    if not groups:
        return None
    order = {p.hash: i for i, p in enumerate(data.protocols)}
    series = []
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1])):
        protocol_hash, arch = key
        p = data.protocol_of[protocol_hash]
        points: list[tuple[float, int, float, float, float, int]] = []
        seen: set[int] = set()
        for e in sorted(groups[key].values(), key=lambda e: (e.model.measured_sparsity, e.model.id)):
            across = e.setting.summary.get("autoattack") if e.setting else None
            if across is None:
                low, high = e.interval(e.ev.aa_robust_accuracy)
                robust = e.ev.aa_robust_accuracy or 0.0
                points.append((e.model.measured_sparsity, e.model.id, robust, low, high, 1))
            elif id(e.setting) not in seen:
                seen.add(id(e.setting))
                first = min(x.model.id for x in e.setting.entries)
                points.append((e.setting.sparsity, first, across.mean, across.min, across.max, across.n))
        points.sort()
        series.append(
            plots.Series(
                label=f"{arch} · {p.dataset} · {p.threat} · AA {p.spec.get('version', '?')} · N = {p.n}{p.fmn_note}",
                sparsity=[pt[0] for pt in points],
                robust=[pt[2] for pt in points],
                low=[pt[3] for pt in points],
                high=[pt[4] for pt in points],
                replicates=[pt[5] for pt in points],
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
