"""The offline rules a schema-valid manifest must pass: the model id against the fields, the registries, the
checkpoint format, the size cap, known and unknown fields, the seeded-entry rules and the dense parent.

Each rule is a small function ``(manifest, context) -> list[Problem]`` registered with :func:`rule`;
:data:`RULES` holds them in the order they are defined here, which is the order of the findings in a report.
A rule reads only its arguments, so it can be run on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.registry import Registry
from bench.zoo.fetch import DEFAULT_MAX_SIZE
from bench.zoo.manifest import (
    DENSE,
    KNOWABLE_FIELDS,
    MODEL_ID_RE,
    Manifest,
    arch_token,
    dataset_token,
    parse_sparsity_token,
    sparsity_token,
)
from bench.zoo.seeded import SEEDED
from bench.zoo.validate.report import FIX_HINTS, REQUIRED_FOR_NEW, FileReport, Problem, error, note, warning


@dataclass(frozen=True)
class Context:
    """What the rules know besides the manifest.

    Attributes:
        known: every manifest in the zoo and among the files being validated, by id (dense parents).
        max_size: the download cap in bytes.
        seeded: the manifest is one of the seeded entries pinned in ``bench/zoo/seeded.py``.
        id_parts: the model id's named parts (``short``, ``paper``, ``arch``, ``dataset``, ``structure``,
            ``sparsity``), as :data:`bench.zoo.manifest.MODEL_ID_RE` splits it.
        archs, datasets, methods, formats: the registries names are checked against.
    """

    known: Mapping[str, Manifest]
    max_size: int
    seeded: bool
    id_parts: Mapping[str, str]
    archs: Registry
    datasets: Registry
    methods: Registry
    formats: Registry

    @classmethod
    def for_manifest(cls, m: Manifest, known: Mapping[str, Manifest], *, max_size: int = DEFAULT_MAX_SIZE) -> Context:
        # Imported when first needed: the method registry imports every adapter, which reading manifests does not.
        from bench.data import DATASETS
        from bench.formats import FORMATS
        from bench.models import ARCHS
        from methods.base import METHODS

        return cls(
            known=known,
            max_size=max_size,
            seeded=m.model_id in SEEDED,
            id_parts=MODEL_ID_RE.match(m.model_id).groupdict(),  # the schema checked the pattern
            archs=ARCHS,
            datasets=DATASETS,
            methods=METHODS,
            formats=FORMATS,
        )


Rule = Callable[[Manifest, Context], list[Problem]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    """Register ``fn`` as the next rule of :func:`check_semantics`."""
    RULES.append(fn)
    return fn


def check_semantics(
    report: FileReport,
    known: Mapping[str, Manifest],
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    rules: Sequence[Rule] = RULES,
) -> None:
    """Run ``rules`` in order on the report's manifest; "names and registries" passes when none found an error."""
    m = report.manifest
    if m is None:
        return
    context = Context.for_manifest(m, known, max_size=max_size)
    found = [problem for check in rules for problem in check(m, context)]
    report.problems.extend(found)
    if not any(p.level == "error" for p in found):
        report.passed.append("names and registries")


# --------------------------------------------------------------------------------------------------------
# The method, and the id's <ShortName>_<Author><Year><Word>


@rule
def method_is_known(m: Manifest, ctx: Context) -> list[Problem]:
    """Dense, a method registered here, or a new one described under external_method: exactly one of them."""
    if m.method == DENSE:
        problems = []
        if m.external_method is not None:
            problems.append(error("external_method", "a dense model has no pruning method", "remove external_method"))
        short = ctx.id_parts["short"]
        if short != "Dense":
            problems.append(
                error("model_id", f"a dense model's id starts with Dense_, not {short}_", "rename it Dense_…")
            )
        return problems
    if m.method in ctx.methods:
        if m.external_method is None:
            return []
        return [
            error(
                "external_method",
                f"method {m.method!r} is registered here; its name, key and taxonomy come from its card "
                "(bench methods)",
                "remove external_method",
            )
        ]
    if m.external_method is None:
        return [
            error(
                "method",
                ctx.methods.unknown_message(m.method).replace("unknown method", "method"),
                "use a registered method, or describe this one under external_method (display_name, ap_key, taxonomy)",
            )
        ]
    return []


@rule
def id_starts_with_method_key(m: Manifest, ctx: Context) -> list[Problem]:
    """The id starts with the method's key: its card's, or the one given under external_method."""
    if m.method == DENSE:
        return []
    if m.method in ctx.methods:
        expected = ctx.methods.get(m.method).card.ap_key
    elif m.external_method is not None:
        expected = m.external_method.ap_key
    else:
        return []
    start = f"{ctx.id_parts['short']}_{ctx.id_parts['paper']}"
    if start == expected:
        return []
    return [
        error(
            "model_id", f"starts with {start}, but method {m.method!r} is {expected}", f"start the id with {expected}_"
        )
    ]


# --------------------------------------------------------------------------------------------------------
# Architecture, dataset, threat model


@rule
def arch_and_dataset_are_registered(m: Manifest, ctx: Context) -> list[Problem]:
    """Unregistered names refuse a new submission; a seeded entry is only warned (it is listed, not loadable)."""
    problems = []
    for registry, fld, value in (
        (ctx.archs, "model.arch", m.model.arch),
        (ctx.datasets, "model.dataset", m.model.dataset),
    ):
        if value in registry:
            continue
        message = registry.unknown_message(value)
        if ctx.seeded:
            problems.append(
                warning(fld, f"{message}; this seeded entry is listed but cannot be loaded until it is registered")
            )
        else:
            problems.append(error(fld, message, f"use one of {registry.list_command}, or register it first"))
    return problems


@rule
def id_agrees_with_model(m: Manifest, ctx: Context) -> list[Problem]:
    """The id's architecture, dataset, structure and sparsity say what the model fields say."""
    parts = ctx.id_parts
    problems = []
    if arch_token(m.model.arch) != parts["arch"]:
        problems.append(
            error(
                "model_id",
                f"has architecture {parts['arch']!r} but model.arch is {m.model.arch!r}",
                f"use {arch_token(m.model.arch)!r} in the id",
            )
        )
    if dataset_token(m.model.dataset) != parts["dataset"]:
        problems.append(
            error(
                "model_id",
                f"has dataset {parts['dataset']!r} but model.dataset is {m.model.dataset!r}",
                f"use {dataset_token(m.model.dataset)!r} in the id",
            )
        )
    if parts["structure"] != m.model.structure:
        problems.append(
            error(
                "model_id",
                f"says {parts['structure']} but model.structure is {m.model.structure}",
                "make them agree (US: weights, S: filters/channels/layers)",
            )
        )
    if not math.isclose(parse_sparsity_token(parts["sparsity"]), m.model.sparsity, abs_tol=1e-9):
        problems.append(
            error(
                "model_id",
                f"says sparsity {parts['sparsity']} % but model.sparsity is {m.model.sparsity}",
                f"use {sparsity_token(m.model.sparsity)} in the id, or fix model.sparsity",
            )
        )
    return problems


@rule
def sparsity_fits_method(m: Manifest, ctx: Context) -> list[Problem]:
    """A dense model has sparsity 0, a pruned one more."""
    if m.method == DENSE and m.model.sparsity != 0:
        return [error("model.sparsity", "a dense model has sparsity 0", "set it to 0 (and _US_0 in the id)")]
    if m.method != DENSE and m.model.sparsity == 0:
        return [error("model.sparsity", "a pruned model has a sparsity above 0", "give the method's target sparsity")]
    return []


@rule
def granularity_fits_structure(m: Manifest, ctx: Context) -> list[Problem]:
    """Unstructured (US) pruning removes weights; structured (S) removes filters, channels or layers."""
    granularity = m.model.granularity
    if granularity is None or (granularity == "weights") == (m.model.structure == "US"):
        return []
    return [
        error(
            "model.granularity",
            f"{granularity!r} does not fit structure {m.model.structure}",
            "US prunes weights; S prunes filters, channels or layers",
        )
    ]


@rule
def eps_values_parse(m: Manifest, ctx: Context) -> list[Problem]:
    """Each eps reads as a number or fraction, as ``bench evaluate --eps`` reads it."""
    from bench.data import parse_eps

    problems = []
    for fld, value in (("model.eps", m.model.eps), ("reported.eps", m.reported.eps)):
        if value is not None:
            try:
                parse_eps(value)
            except ValueError as err:
                problems.append(error(fld, str(err), "e.g. '8/255' or '0.5'"))
    return problems


# --------------------------------------------------------------------------------------------------------
# The checkpoint


@rule
def checkpoint_format_fits(m: Manifest, ctx: Context) -> list[Problem]:
    """A registered format, with HYDRA's k exactly when the format needs it, on an architecture it is known to fit."""
    if m.checkpoint.format not in ctx.formats:
        return [
            error("checkpoint.format", ctx.formats.unknown_message(m.checkpoint.format), "use one of `bench formats`")
        ]
    fmt = ctx.formats.get(m.checkpoint.format)
    problems = []
    if fmt.needs_k and m.checkpoint.k is None:
        problems.append(
            error("checkpoint.k", f"format {fmt.name} needs HYDRA's kept fraction k", "add checkpoint.k, e.g. 0.1")
        )
    if not fmt.needs_k and m.checkpoint.k is not None:
        problems.append(error("checkpoint.k", f"format {fmt.name} takes no k", "remove checkpoint.k"))
    if fmt.archs and m.model.arch in ctx.archs and m.model.arch not in fmt.archs:
        problems.append(
            warning(
                "checkpoint.format",
                f"{fmt.name} files are known to fit {', '.join(fmt.archs)}, not {m.model.arch}; loading may fail",
            )
        )
    return problems


@rule
def file_name_has_supported_extension(m: Manifest, ctx: Context) -> list[Problem]:
    """The loader picks the reader by extension, so an unknown one could never be loaded."""
    from bench.checkpoints import SUPPORTED_EXTENSIONS

    if m.checkpoint.file_name.lower().endswith(SUPPORTED_EXTENSIONS):
        return []
    return [
        error(
            "checkpoint.file_name",
            f"{m.checkpoint.file_name!r} has no supported extension",
            f"end it with one of {', '.join(SUPPORTED_EXTENSIONS)}",
        )
    ]


@rule
def size_within_cap(m: Manifest, ctx: Context) -> list[Problem]:
    """A claim over the cap is refused before anything is downloaded."""
    size, cap = m.checkpoint.size, ctx.max_size
    if size is None or size <= cap:
        return []
    return [
        error(
            "checkpoint.size",
            f"claims {size:,} bytes ({size / 1024**3:.1f} GiB), over the cap of {cap:,} bytes "
            f"({cap / 1024**3:.1f} GiB); nothing will be downloaded",
            "checkpoints above the cap are not accepted; give the real size, or ask the maintainers to raise the cap",
        )
    ]


# --------------------------------------------------------------------------------------------------------
# Known and unknown fields; seeded entries


def _lookup(m: Manifest, dotted: str) -> Any:
    obj: Any = m
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _missing(m: Manifest) -> list[str]:
    return [key for key in KNOWABLE_FIELDS if _lookup(m, key) is None]


@rule
def unknown_explains_null_fields(m: Manifest, ctx: Context) -> list[Problem]:
    """``unknown`` names only fields that may be unknown, and only those left null."""
    problems = []
    for key in m.unknown:
        if key not in KNOWABLE_FIELDS:
            problems.append(
                error(
                    f"unknown.{key}", "is not a field that may be unknown", f"use one of {', '.join(KNOWABLE_FIELDS)}"
                )
            )
        elif _lookup(m, key) is not None:
            problems.append(warning(f"unknown.{key}", "explains a field that is given", "remove the stale explanation"))
    return problems


@rule
def seeded_url_is_pinned(m: Manifest, ctx: Context) -> list[Problem]:
    """A seeded entry keeps the URL pinned for it: another file is another submission."""
    if not ctx.seeded:
        return []
    pinned = SEEDED[m.model_id]
    if m.checkpoint.url == pinned:
        return []
    return [
        error(
            "checkpoint.url",
            f"seeded entry {m.model_id}'s URL is pinned to {pinned!r} in bench/zoo/seeded.py",
            "a different file is a new submission (new id, with its sha256); a moved file needs the pin updated",
        )
    ]


@rule
def seeded_nulls_have_reasons(m: Manifest, ctx: Context) -> list[Problem]:
    """A seeded entry may leave a knowable field null, with the reason under ``unknown``."""
    if not ctx.seeded:
        return []
    return [
        error(key, "is null without a reason", f"say why under unknown: {{{key}: ...}}")
        for key in _missing(m)
        if key not in m.unknown
    ]


@rule
def seeded_verified_matches_sha256(m: Manifest, ctx: Context) -> list[Problem]:
    """``verified`` says whether a sha256 is known; an unverified entry is noted with how it gets one."""
    if not ctx.seeded:
        return []
    problems = []
    if m.checkpoint.sha256 is None and m.verified:
        problems.append(error("verified", "is true, but there is no sha256 to verify against", "set verified: false"))
    elif m.checkpoint.sha256 is not None and not m.verified:
        problems.append(error("verified", "is false although checkpoint.sha256 is given", "set verified: true"))
    if not m.verified:
        problems.append(
            note(
                "verified",
                "unverified seeded entry: no sha256 is known for its checkpoint yet; `bench zoo fetch "
                f"{m.model_id}` records the hash of the first download and checks every later download against it",
            )
        )
    return problems


@rule
def new_submission_is_verified(m: Manifest, ctx: Context) -> list[Problem]:
    """Only the pinned seeded entries may be unverified."""
    if ctx.seeded or m.verified:
        return []
    return [
        error(
            "verified",
            "false is only for the seeded entries pinned in bench/zoo/seeded.py",
            "a new submission carries the sha256 of its file and verified: true",
        )
    ]


@rule
def new_submission_is_complete(m: Manifest, ctx: Context) -> list[Problem]:
    """A new submission gives every field of :data:`REQUIRED_FOR_NEW`; other nulls need a reason."""
    if ctx.seeded:
        return []
    problems = []
    for key in _missing(m):
        if key in REQUIRED_FOR_NEW:
            problems.append(error(key, "is required for a new submission", FIX_HINTS.get(key, "fill it in")))
        elif key not in m.unknown:
            problems.append(
                error(key, "is null without a reason", f"fill it in, or say why under unknown: {{{key}: ...}}")
            )
    return problems


# --------------------------------------------------------------------------------------------------------
# Reported numbers and the dense parent


@rule
def robust_not_above_clean(m: Manifest, ctx: Context) -> list[Problem]:
    """An attack cannot raise accuracy: robust above clean points at a typo or a broken evaluation."""
    problems = []
    for i, rep in enumerate([m.reported, *m.other_reports]):
        where = "reported" if i == 0 else f"other_reports.{i - 1}"
        if rep.clean is not None and rep.robust is not None and rep.robust > rep.clean:
            problems.append(
                warning(f"{where}.robust", f"robust accuracy {rep.robust} exceeds clean accuracy {rep.clean}")
            )
    return problems


@rule
def dense_parent_is_known(m: Manifest, ctx: Context) -> list[Problem]:
    """A pruned model's parent is another manifest of the zoo (same dataset) or a RobustBench model."""
    parent = m.dense_parent
    if parent is None:
        return []
    if m.method == DENSE:
        return [error("dense_parent", "a dense model has no dense parent", "set it to null")]
    if parent.startswith("robustbench:"):
        return [note("dense_parent", f"a RobustBench model: bench zoo import-robustbench {parent.split(':', 1)[1]}")]
    if parent == m.model_id:
        return [error("dense_parent", "is the model itself", "name the dense model it was pruned from")]
    if parent not in ctx.known:
        return [
            error(
                "dense_parent",
                f"{parent!r} is not a manifest in the zoo",
                "add the dense model's manifest too (submissions/dense/), or use robustbench:<ModelName>",
            )
        ]
    pm = ctx.known[parent]
    if pm.model.dataset != m.model.dataset:
        return [
            error(
                "dense_parent",
                f"{parent} is a {pm.model.dataset} model, this one {m.model.dataset}",
                "name a parent trained on the same dataset",
            )
        ]
    if pm.model.arch != m.model.arch:
        return [warning("dense_parent", f"{parent} is a {pm.model.arch}, this one a {m.model.arch}")]
    return []
