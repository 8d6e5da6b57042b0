"""The objects the site's pages are drawn from: a method, an entry (one model under one evaluation), a setting
(training-seed replicates), a protocol and a ranked table.

They are built by :class:`leaderboard.site_data.SiteData` (entries, settings, protocols, methods) and
:func:`leaderboard.tables.build_tables` (tables); the per-sample jobs fill :attr:`Entry.results`. Nothing here
reads the store or renders a page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.analysis.replicates import ReplicateSummary, seed_of, setting_key, setting_label
from bench.analysis.reported import Reported
from bench.analysis.stats import wilson_interval
from bench.store import Evaluation, Model
from leaderboard import plots
from leaderboard.formatting import format_value, model_slug, pct, seeds_text, slugify
from leaderboard.per_sample import SampleResults

STRUCTURE_NAMES = {"US": "unstructured", "S": "structured", "dense": "dense only"}


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


def inputs_label(model: Model) -> str:
    """A model's input normalisation as ``--normalization`` spells it
    (:func:`bench.models.normalize.normalization_label`)."""
    from bench.models.normalize import normalization_label

    key = getattr(model, "normalization", None)
    try:
        return normalization_label(key)
    except ValueError:  # a stored key that is not MEAN/STD numbers: shown as stored (as text), never the default
        return str(key)


def inputs_text(model: Model) -> str | None:
    """A model's input normalisation in words, None for the dataset's own
    (:func:`bench.models.normalize.describe_normalization`)."""
    from bench.models.normalize import describe_normalization

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
    (:func:`leaderboard.site_data._order_protocols`); the others get their own tables below it.
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


def is_ranked(model: Model) -> bool:
    """False for a sanity run (``bench evaluate --unranked``): shown on its page and listed apart, never ranked."""
    return getattr(model, "ranked", True) is not False
