"""What the site shows, selected from the store: models, their newest complete evaluation per protocol, the
protocols in site order (which one is each dataset's main protocol), the dense parents, the seed replicates, the
methods, and the models that are unranked or not evaluated.

Everything is read through the ORM in one session (a few hundred objects); the per-sample records are read later,
by the per-sample jobs (:mod:`leaderboard.per_sample`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from bench.analysis.replicates import group_replicates, summarize_evaluations
from bench.analysis.report import failure, missing_parent_evaluation
from bench.analysis.reported import reevaluation_drop, reported_numbers
from bench.store import Evaluation, Model, SampleResult
from leaderboard.formatting import safe_slug, safe_url
from leaderboard.view_models import NOT_PROTOCOL, Entry, MethodInfo, Protocol, Setting, is_ranked


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
        self.method_list = _group_by_method(self)
        self.not_evaluated = [m for m in self.models if not self.entries.get(m.id)]
        # Sanity runs (``bench evaluate --unranked``): listed apart, never in a ranked table.
        self.unranked = [e for m in self.models if not is_ranked(m) for e in self.entries.get(m.id, [])]

    def entry(self, model_id: int, protocol_hash: str) -> Entry | None:
        """The model's evaluation under this protocol (the newest complete one), if it has one."""
        return next((e for e in self.entries.get(model_id, []) if e.ev.protocol_hash == protocol_hash), None)

    def protocol(self, entry: Entry) -> Protocol:
        return self.protocol_of[entry.ev.protocol_hash]


def _group_by_method(data: SiteData) -> list[MethodInfo]:
    """Every method in the site's order (registered ones first, then by name), each with its entries (grouped by
    protocol too) and its models without a complete evaluation."""
    all_entries = [e for m in data.models for e in data.entries.get(m.id, [])]
    methods = sorted(data.methods.values(), key=lambda mi: (not mi.registered, mi.display_name.lower(), mi.key))
    for mi in methods:
        mi.entries = [e for e in all_entries if e.model.method == mi.key]
        mi.by_protocol = [
            (p, [e for e in mi.entries if e.ev.protocol_hash == p.hash])
            for p in data.protocols
            if any(e.ev.protocol_hash == p.hash for e in mi.entries)
        ]
        mi.unevaluated = [m for m in data.models if m.method == mi.key and not data.entries.get(m.id)]
    return methods


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
