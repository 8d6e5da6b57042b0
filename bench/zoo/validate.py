"""``bench submit validate``: every check a submission must pass, each failure naming file, field, reason and fix.

Offline (no network): the file's place and name, the YAML (safe, no aliases, no duplicate keys), the schema,
the model id against the fields, the registries (methods, architectures, datasets, checkpoint formats), unique
ids, the dense parent, the size cap, and the rules for seeded entries. Online, in addition: the checkpoint is
fetched (size-capped, resumable, sha256-checked), loaded through its converter weights-only, its sparsity is
measured against the claim (:data:`SPARSITY_TOLERANCE`), and its clean accuracy on the first test samples is
compared with the reported one when the dataset is on this machine (:func:`clean_accuracy_interval`).

A manifest's text reaches terminals and CI logs, where a line break can start a workflow command
(``::error ...``) and an escape sequence can rewrite the screen: every message that echoes a field's location, a
path or a value goes through :func:`printable`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bench.zoo.fetch import DEFAULT_MAX_SIZE, FetchError, fetch_checkpoint
from bench.zoo.manifest import (
    DENSE,
    KNOWABLE_FIELDS,
    MODEL_ID_RE,
    Manifest,
    arch_token,
    dataset_token,
    parse_sparsity_token,
    printable,
    sparsity_token,
)
from bench.zoo.seeded import SEEDED

SPARSITY_TOLERANCE = 0.005  # 0.5 percentage points of the canonical sparsity
CLEAN_SAMPLES = 500
CLEAN_CONFIDENCE = 0.999
CLEAN_SLACK = 0.01  # one percentage point on either side of the interval
MAX_MANIFEST_BYTES = 64 * 1024
# Required of a new submission; the other knowable fields may be null with a reason under `unknown`.
REQUIRED_FOR_NEW = (
    "paper.url",
    "paper.venue",
    "paper.year",
    "model.claimed_sparsity",
    "checkpoint.url",
    "checkpoint.sha256",
    "checkpoint.size",
    "reported.clean",
    "reported.robust",
    "reported.attack",
    "license",
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# How to fix a schema error, by field (the first matching prefix wins).
_FIX_HINTS = {
    "model_id": "name it <ShortName>_<Author><Year><Word>_<Arch>_<Dataset>_<US|S>_<sparsity>, "
    "e.g. HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90",
    "method": "use a method key from `bench methods`, 'dense', or a new lower-case key with external_method",
    "checkpoint.url": "give a direct https:// download link to the file",
    "checkpoint.sha256": "run `sha256sum FILE` on the exact uploaded file and paste the 64 lower-case hex characters",
    "checkpoint.size": "give the file's size in bytes (`stat -c %s FILE`)",
    "checkpoint.file_name": "a plain file name such as model_best.pth.tar (letters, digits, '.', '_', '-')",
    "checkpoint.format": "one of `bench formats`",
    "paper.url": "a link such as https://arxiv.org/abs/2002.10509",
    "model.eps": "write it as a number or fraction, e.g. '8/255' (quoted)",
    "reported": "give accuracies as fractions in [0, 1], e.g. 0.4334 for 43.34 %",
    "model.sparsity": "a fraction in [0, 1), e.g. 0.9",
    "model.claimed_sparsity": "a fraction in [0, 1]: exactly-zero Conv2d/Linear weights over all of them",
}


@dataclass(frozen=True)
class Problem:
    """One finding. ``level`` is ``error`` (the submission is refused), ``warning`` or ``note``."""

    level: str
    field: str
    message: str
    fix: str = ""

    def render(self) -> str:
        fix = f" Fix: {printable(self.fix)}" if self.fix else ""
        return f"{self.level:<7} {printable(self.field)}: {printable(self.message)}{fix}"


@dataclass
class FileReport:
    """Everything ``bench submit validate`` found about one manifest file."""

    path: Path
    manifest: Manifest | None = None
    problems: list[Problem] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    @property
    def model_id(self) -> str | None:
        return self.manifest.model_id if self.manifest else None

    def error(self, field_: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem("error", field_, message, fix))

    def warn(self, field_: str, message: str, fix: str = "") -> None:
        self.problems.append(Problem("warning", field_, message, fix))

    def note(self, field_: str, message: str) -> None:
        self.problems.append(Problem("note", field_, message))


@dataclass(frozen=True)
class ValidationOptions:
    """Knobs of the online checks.

    Attributes:
        offline: skip everything that needs the network (fetch, load, sparsity, accuracy).
        max_size: download cap in bytes.
        sparsity_tolerance: allowed |measured − claimed| of the canonical sparsity.
        clean_samples: test samples for the clean-accuracy check.
        data_dir: where dataset archives are (never downloaded by validation).
        device: torch device for the accuracy check.
        cache_root: the zoo cache folder (default ``$BENCH_CACHE_DIR/zoo``).
    """

    offline: bool = False
    max_size: int = DEFAULT_MAX_SIZE
    sparsity_tolerance: float = SPARSITY_TOLERANCE
    clean_samples: int = CLEAN_SAMPLES
    data_dir: str | None = None
    device: str = "cpu"
    cache_root: Path | None = None


# --------------------------------------------------------------------------------------------------------
# Reading a file


class _ManifestLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors/aliases and without duplicate keys.

    Safe loading already refuses every Python tag (``!!python/object`` …); aliases are refused too (a
    hand-written manifest has no use for them and they can make tiny files expand enormously), and so are
    duplicate keys, which YAML would resolve silently to the last one.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.constructor.ConstructorError(
                None, None, "anchors and aliases (&name, *name) are not allowed in manifests", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_location(path: Path, report: FileReport, root: Path | None) -> bool:
    """The file's own name and place: a plain ``<method>/<model_id>.yaml`` under the submissions folder.

    Returns False when the file must not be read at all (traversal, symlink, odd name).
    """
    raw = str(path)
    if any(part == ".." for part in Path(raw).parts):
        report.error(
            "file", f"path {raw!r} contains '..'", "give the manifest's own path, e.g. submissions/hydra/X.yaml"
        )
        return False
    name = path.name
    if not _SAFE_NAME.match(name) or not name.endswith(".yaml") or ".." in name:
        report.error(
            "file",
            f"file name {name!r} is not a plain <model_id>.yaml name",
            "use only letters, digits, '.', '_' and '-', and the .yaml extension",
        )
        return False
    if not _SAFE_NAME.match(path.parent.name):
        report.error("file", f"folder {path.parent.name!r} is not a method key", "put it in submissions/<method>/")
        return False
    base = (root or path.parent.parent).absolute()
    current = path.absolute()
    while True:
        if current.is_symlink():
            report.error("file", f"{current} is a symbolic link", "commit the manifest itself, not a link to it")
            return False
        if current == base or current.parent == current:
            break
        current = current.parent
    if root is not None and path.absolute().parent.parent != base:
        report.error(
            "file",
            f"{path} is not at {root}/<method>/<model_id>.yaml",
            f"move it to {root}/<method>/ (one folder per method, no deeper nesting)",
        )
        return False
    if not path.is_file():
        report.error("file", f"{path} is not a file", "give the path of a .yaml manifest")
        return False
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        report.error(
            "file", f"{path.stat().st_size:,} bytes; a manifest is at most {MAX_MANIFEST_BYTES:,}", "shorten it"
        )
        return False
    return True


def read_manifest(path: str | os.PathLike[str], root: Path | None = None) -> FileReport:
    """Read one manifest: place and name, YAML, schema. No registry or network checks."""
    path = Path(path)
    report = FileReport(path)
    if not check_location(path, report, root):
        return report
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ManifestLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        report.error("file", "is not UTF-8 text", "save it as UTF-8")
        return report
    except yaml.YAMLError as err:
        report.error("file", f"is not valid YAML: {_yaml_message(err)}", "fix the YAML syntax at that line")
        return report
    except RecursionError:
        report.error("file", "is nested too deeply to be a manifest", "start from submissions/README.md")
        return report
    if not isinstance(data, dict):
        report.error(
            "file", f"holds a {type(data).__name__}, not a mapping of fields", "start from submissions/README.md"
        )
        return report
    try:
        report.manifest = Manifest.model_validate(data)
    except ValidationError as err:
        for item in err.errors():
            _schema_problem(report, item)
        return report
    report.passed.append("schema")
    m = report.manifest
    if path.stem != m.model_id:
        report.error(
            "model_id", f"{m.model_id!r} differs from the file name {path.name!r}", f"name the file {m.model_id}.yaml"
        )
    if path.parent.name != m.method:
        report.error(
            "method", f"{m.method!r} differs from the folder {path.parent.name!r}", f"put the file in {m.method}/"
        )
    return report


def _yaml_message(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if "could not determine a constructor for the tag" in str(err):
        problem = f"{problem}; tags such as !!python/object are not allowed"
    return f"{problem}{where}"


def _schema_problem(report: FileReport, item: Mapping[str, Any]) -> None:
    loc = printable(".".join(str(part) for part in item.get("loc", ())) or "file")
    kind = item.get("type", "")
    message = item.get("msg", "invalid")
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        report.error(loc, "is not a field of the manifest", "remove it or fix its spelling (submissions/schema.json)")
        return
    if kind == "missing":
        report.error(
            loc, "is missing", "add it (null where a seeded entry does not know it, with a reason under unknown)"
        )
        return
    value = item.get("input")
    shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool)) and len(repr(value)) < 100 else ""
    fix = next((hint for prefix, hint in _FIX_HINTS.items() if loc == prefix or loc.startswith(prefix + ".")), "")
    report.error(loc, f"{message}{shown}", fix)


# --------------------------------------------------------------------------------------------------------
# Checks that need the registries and the other manifests, not the network


def check_semantics(report: FileReport, known: Mapping[str, Manifest], *, max_size: int = DEFAULT_MAX_SIZE) -> None:
    """The model id against the fields, registries, seeded-entry rules, the dense parent, the size cap."""
    from bench.data import DATASETS, parse_eps
    from bench.models import ARCHS
    from methods.base import get_method, list_methods
    from methods.convert import FORMATS

    m = report.manifest
    if m is None:
        return
    n_errors = _count_errors(report)
    seeded = m.model_id in SEEDED
    parts = MODEL_ID_RE.match(m.model_id).groupdict()  # the schema checked the pattern

    # Method, and the id's <ShortName>_<Author><Year><Word>.
    registered = list_methods()
    if m.method == DENSE:
        if m.external_method is not None:
            report.error("external_method", "a dense model has no pruning method", "remove external_method")
        if parts["short"] != "Dense":
            report.error(
                "model_id", f"a dense model's id starts with Dense_, not {parts['short']}_", "rename it Dense_…"
            )
        expected_key = None
    elif m.method in registered:
        card = get_method(m.method).card
        expected_key = card.ap_key
        if m.external_method is not None:
            report.error(
                "external_method",
                f"method {m.method!r} is registered here; its name, key and taxonomy come from its card "
                "(bench methods)",
                "remove external_method",
            )
    else:
        expected_key = m.external_method.ap_key if m.external_method else None
        if m.external_method is None:
            from methods.base import METHODS

            report.error(
                "method",
                METHODS.unknown_message(m.method).replace("unknown method", "method"),
                "use a registered method, or describe this one under external_method (display_name, ap_key, taxonomy)",
            )
    if expected_key is not None and f"{parts['short']}_{parts['paper']}" != expected_key:
        report.error(
            "model_id",
            f"starts with {parts['short']}_{parts['paper']}, but method {m.method!r} is {expected_key}",
            f"start the id with {expected_key}_",
        )

    # Architecture, dataset, threat model.
    arch_known, dataset_known = m.model.arch in ARCHS, m.model.dataset in DATASETS
    for known_here, registry, fld in ((arch_known, ARCHS, "model.arch"), (dataset_known, DATASETS, "model.dataset")):
        if known_here:
            continue
        value = m.model.arch if fld == "model.arch" else m.model.dataset
        message = registry.unknown_message(value)
        if seeded:
            report.warn(fld, f"{message}; this seeded entry is listed but cannot be loaded until it is registered")
        else:
            report.error(fld, message, f"use one of {registry.list_command}, or register it first")
    if arch_token(m.model.arch) != parts["arch"]:
        report.error(
            "model_id",
            f"has architecture {parts['arch']!r} but model.arch is {m.model.arch!r}",
            f"use {arch_token(m.model.arch)!r} in the id",
        )
    if dataset_token(m.model.dataset) != parts["dataset"]:
        report.error(
            "model_id",
            f"has dataset {parts['dataset']!r} but model.dataset is {m.model.dataset!r}",
            f"use {dataset_token(m.model.dataset)!r} in the id",
        )
    if parts["structure"] != m.model.structure:
        report.error(
            "model_id",
            f"says {parts['structure']} but model.structure is {m.model.structure}",
            "make them agree (US: weights, S: filters/channels/layers)",
        )
    if not math.isclose(parse_sparsity_token(parts["sparsity"]), m.model.sparsity, abs_tol=1e-9):
        report.error(
            "model_id",
            f"says sparsity {parts['sparsity']} % but model.sparsity is {m.model.sparsity}",
            f"use {sparsity_token(m.model.sparsity)} in the id, or fix model.sparsity",
        )
    if m.method == DENSE and m.model.sparsity != 0:
        report.error("model.sparsity", "a dense model has sparsity 0", "set it to 0 (and _US_0 in the id)")
    if m.method != DENSE and m.model.sparsity == 0:
        report.error("model.sparsity", "a pruned model has a sparsity above 0", "give the method's target sparsity")
    granularity = m.model.granularity
    if granularity is not None and (granularity == "weights") != (m.model.structure == "US"):
        report.error(
            "model.granularity",
            f"{granularity!r} does not fit structure {m.model.structure}",
            "US prunes weights; S prunes filters, channels or layers",
        )
    for fld, value in (("model.eps", m.model.eps), ("reported.eps", m.reported.eps)):
        if value is not None:
            try:
                parse_eps(value)
            except ValueError as err:
                report.error(fld, str(err), "e.g. '8/255' or '0.5'")

    # Checkpoint format.
    if m.checkpoint.format not in FORMATS:
        report.error("checkpoint.format", FORMATS.unknown_message(m.checkpoint.format), "use one of `bench formats`")
    else:
        fmt = FORMATS.get(m.checkpoint.format)
        if fmt.needs_k and m.checkpoint.k is None:
            report.error(
                "checkpoint.k", f"format {fmt.name} needs HYDRA's kept fraction k", "add checkpoint.k, e.g. 0.1"
            )
        if not fmt.needs_k and m.checkpoint.k is not None:
            report.error("checkpoint.k", f"format {fmt.name} takes no k", "remove checkpoint.k")
        if fmt.archs and arch_known and m.model.arch not in fmt.archs:
            report.warn(
                "checkpoint.format",
                f"{fmt.name} files are known to fit {', '.join(fmt.archs)}, not {m.model.arch}; loading may fail",
            )
    from bench.checkpoints import SUPPORTED_EXTENSIONS

    if not m.checkpoint.file_name.lower().endswith(SUPPORTED_EXTENSIONS):
        report.error(
            "checkpoint.file_name",
            f"{m.checkpoint.file_name!r} has no supported extension",
            f"end it with one of {', '.join(SUPPORTED_EXTENSIONS)}",
        )

    # Size cap: a claim over the cap is refused before anything is downloaded.
    if m.checkpoint.size is not None and m.checkpoint.size > max_size:
        size = m.checkpoint.size
        report.error(
            "checkpoint.size",
            f"claims {size:,} bytes ({size / 1024**3:.1f} GiB), over the cap of {max_size:,} bytes "
            f"({max_size / 1024**3:.1f} GiB); nothing will be downloaded",
            "checkpoints above the cap are not accepted; give the real size, or ask the maintainers to raise the cap",
        )

    # Known and unknown fields; seeded entries.
    _check_knowledge(report, m, seeded)

    # Reported numbers.
    for i, rep in enumerate([m.reported, *m.other_reports]):
        where = "reported" if i == 0 else f"other_reports.{i - 1}"
        if rep.clean is not None and rep.robust is not None and rep.robust > rep.clean:
            report.warn(f"{where}.robust", f"robust accuracy {rep.robust} exceeds clean accuracy {rep.clean}")

    # The dense parent.
    parent = m.dense_parent
    if parent is not None:
        if m.method == DENSE:
            report.error("dense_parent", "a dense model has no dense parent", "set it to null")
        elif parent.startswith("robustbench:"):
            report.note("dense_parent", f"a RobustBench model: bench zoo import-robustbench {parent.split(':', 1)[1]}")
        elif parent == m.model_id:
            report.error("dense_parent", "is the model itself", "name the dense model it was pruned from")
        elif parent not in known:
            report.error(
                "dense_parent",
                f"{parent!r} is not a manifest in the zoo",
                "add the dense model's manifest too (submissions/dense/), or use robustbench:<ModelName>",
            )
        else:
            pm = known[parent]
            if pm.model.dataset != m.model.dataset:
                report.error(
                    "dense_parent",
                    f"{parent} is a {pm.model.dataset} model, this one {m.model.dataset}",
                    "name a parent trained on the same dataset",
                )
            elif pm.model.arch != m.model.arch:
                report.warn("dense_parent", f"{parent} is a {pm.model.arch}, this one a {m.model.arch}")
    if _count_errors(report) == n_errors:
        report.passed.append("names and registries")


def _lookup(m: Manifest, dotted: str) -> Any:
    obj: Any = m
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_knowledge(report: FileReport, m: Manifest, seeded: bool) -> None:
    for key in m.unknown:
        if key not in KNOWABLE_FIELDS:
            report.error(
                f"unknown.{key}", "is not a field that may be unknown", f"use one of {', '.join(KNOWABLE_FIELDS)}"
            )
        elif _lookup(m, key) is not None:
            report.warn(f"unknown.{key}", "explains a field that is given", "remove the stale explanation")
    missing = [key for key in KNOWABLE_FIELDS if _lookup(m, key) is None]
    if seeded:
        pinned = SEEDED[m.model_id]
        if m.checkpoint.url != pinned:
            report.error(
                "checkpoint.url",
                f"seeded entry {m.model_id}'s URL is pinned to {pinned!r} in bench/zoo/seeded.py",
                "a different file is a new submission (new id, with its sha256); a moved file needs the pin updated",
            )
        for key in missing:
            if key not in m.unknown:
                report.error(key, "is null without a reason", f"say why under unknown: {{{key}: ...}}")
        if m.checkpoint.sha256 is None and m.verified:
            report.error("verified", "is true, but there is no sha256 to verify against", "set verified: false")
        elif m.checkpoint.sha256 is not None and not m.verified:
            report.error("verified", "is false although checkpoint.sha256 is given", "set verified: true")
        if not m.verified:
            report.note(
                "verified",
                "unverified seeded entry: no sha256 is known for its checkpoint yet; `bench zoo fetch "
                f"{m.model_id}` records the hash of the first download and checks every later download against it",
            )
        return
    if not m.verified:
        report.error(
            "verified",
            "false is only for the seeded entries pinned in bench/zoo/seeded.py",
            "a new submission carries the sha256 of its file and verified: true",
        )
    for key in missing:
        if key in REQUIRED_FOR_NEW:
            report.error(key, "is required for a new submission", _FIX_HINTS.get(key, "fill it in"))
        elif key not in m.unknown:
            report.error(key, "is null without a reason", f"fill it in, or say why under unknown: {{{key}: ...}}")


def _count_errors(report: FileReport) -> int:
    return sum(p.level == "error" for p in report.problems)


# --------------------------------------------------------------------------------------------------------
# Online checks


def clean_accuracy_interval(correct: int, n: int) -> tuple[float, float]:
    """The range a reported clean accuracy must fall in: the 99.9 % Wilson interval of ``correct/n``, ±1 point."""
    from bench.analysis.stats import wilson_interval

    low, high = wilson_interval(correct, n, confidence=CLEAN_CONFIDENCE)
    return max(0.0, low - CLEAN_SLACK), min(1.0, high + CLEAN_SLACK)


def check_online(report: FileReport, options: ValidationOptions, log: Callable[[str], None]) -> None:
    """Fetch, load (weights only), measure sparsity and clean accuracy."""
    m = report.manifest
    if m is None or not report.ok:
        report.skipped.append(("fetch, load, sparsity, clean accuracy", "the manifest has errors"))
        return
    from bench.data import DATASETS
    from bench.models import ARCHS

    if m.checkpoint.url is None:
        reason = m.unknown.get("checkpoint.url", "no URL")
        report.skipped.append(("fetch, load, sparsity, clean accuracy", f"no checkpoint.url ({reason})"))
        return
    if m.model.arch not in ARCHS or m.model.dataset not in DATASETS:
        report.skipped.append(
            ("fetch, load, sparsity, clean accuracy", "its architecture or dataset is not registered")
        )
        return
    try:
        fetched = fetch_checkpoint(
            m.model_id,
            m.checkpoint.url,
            m.checkpoint.file_name,
            sha256=m.checkpoint.sha256,
            size=m.checkpoint.size,
            max_size=options.max_size,
            root=options.cache_root,
            log=log,
        )
    except FetchError as err:
        report.error(err.field, str(err))
        return
    report.measured.update(sha256=fetched.sha256, size=fetched.size, path=str(fetched.path))
    report.passed.append(f"fetch and sha256 ({fetched.verified_by})")
    if fetched.verified_by == "first download":
        report.note("checkpoint.sha256", f"first download: recorded sha256 {fetched.sha256} (size {fetched.size:,})")
    model = load_entry_model(report, fetched.path)
    if model is None:
        return
    report.passed.append("load (weights only)")
    _check_sparsity(report, model, options)
    _check_clean_accuracy(report, model, options)


def load_entry_model(report: FileReport, path: Path):
    """Convert and load the fetched file; a refusal becomes an error naming the field."""
    from bench.checkpoints import CheckpointMismatchError, UnsafeCheckpointError
    from methods.convert import load_converted_model

    m = report.manifest
    try:
        return load_converted_model(path, m.checkpoint.format, m.model.arch, m.model.dataset, k=m.checkpoint.k)
    except UnsafeCheckpointError as err:
        report.error("checkpoint.url", f"refused: {err}")
    except CheckpointMismatchError as err:
        report.error(
            "model.arch",
            f"the converted weights do not fit {m.model.arch}: {err}",
            "check model.arch and checkpoint.format (bench formats)",
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        report.error(
            "checkpoint.format",
            f"{m.checkpoint.format} could not read the file: {err}",
            "check checkpoint.format (bench formats) and checkpoint.k",
        )
    return None


def _check_sparsity(report: FileReport, model, options: ValidationOptions) -> None:
    from bench.checkpoints import measure_sparsity

    m = report.manifest
    measured = measure_sparsity(model).sparsity
    report.measured["sparsity"] = measured
    claim = m.model.claimed_sparsity
    if claim is None:
        reason = m.unknown.get("model.claimed_sparsity", "no claim")
        report.skipped.append(("sparsity claim", f"measured {measured:.4f}; nothing to compare ({reason})"))
        return
    if abs(measured - claim) > options.sparsity_tolerance:
        report.error(
            "model.claimed_sparsity",
            f"claims {claim:.4f} but the checkpoint measures {measured:.4f} (exactly-zero Conv2d/Linear weights, "
            f"biases and BatchNorm excluded); tolerance ±{options.sparsity_tolerance:.4f}",
            f"set it to {measured:.4f}, or check that the uploaded file is the pruned one",
        )
        return
    report.passed.append(f"sparsity {measured:.4f} vs claim {claim:.4f} (±{options.sparsity_tolerance})")


def _check_clean_accuracy(report: FileReport, model, options: ValidationOptions) -> None:
    import torch

    from bench.data import DatasetNotFoundError, load_split

    m = report.manifest
    if m.reported.clean is None:
        reason = m.unknown.get("reported.clean", "none reported")
        report.skipped.append(("clean accuracy", f"no reported clean accuracy ({reason})"))
        return
    try:
        x, y = load_split(m.model.dataset, "test", data_dir=options.data_dir, download=False)
    except DatasetNotFoundError as err:
        first = str(err).splitlines()[0]
        report.skipped.append(("clean accuracy", f"the {m.model.dataset} test split is not on this machine ({first})"))
        return
    n = min(options.clean_samples, len(y))
    model = model.to(options.device).eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, n, 250):
            xb = x[start : min(start + 250, n)].to(options.device)
            correct += int((model(xb).argmax(1).cpu() == y[start : min(start + 250, n)]).sum())
    accuracy = correct / n
    low, high = clean_accuracy_interval(correct, n)
    report.measured["clean_accuracy"] = accuracy
    report.measured["clean_samples"] = n
    if not low <= m.reported.clean <= high:
        report.error(
            "reported.clean",
            f"reported {m.reported.clean:.2%}, but the checkpoint gets {accuracy:.2%} on the first {n} "
            f"{m.model.dataset} test samples; accepted range [{low:.2%}, {high:.2%}] (99.9 % Wilson interval ±1 "
            "point)",
            "check the input normalisation (checkpoint.format) and that the file is the evaluated one",
        )
        return
    report.passed.append(f"clean accuracy {accuracy:.2%} on {n} samples vs reported {m.reported.clean:.2%}")


# --------------------------------------------------------------------------------------------------------
# Many files


def manifest_paths(root: Path) -> list[Path]:
    """Every ``.yaml``/``.yml`` file (or link) under the folder ``root``, sorted; links to folders are not followed."""
    found = []
    for folder, _dirs, names in os.walk(root, followlinks=False):
        found.extend(Path(folder) / n for n in names if n.endswith((".yaml", ".yml")))
    return sorted(found)


def read_tree(root: Path) -> list[FileReport]:
    """Read every manifest under the submissions folder ``root`` (schema only)."""
    return [read_manifest(path, root) for path in manifest_paths(root)]


def validate_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    root: Path | None,
    options: ValidationOptions = ValidationOptions(),
    log: Callable[[str], None] = lambda _msg: None,
) -> list[FileReport]:
    """Validate manifest files (folders are expanded to the manifests under them).

    Ids and checkpoints (sha256) must be unique among the given files and the manifests already in ``root``;
    dense parents are looked up among both.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not p.is_symlink():
            files.extend(manifest_paths(p))
        else:
            files.append(p)
    files = list(dict.fromkeys(files))
    reports = []
    for path in files:
        file_root = root if root is not None and _is_under(path, root) else None
        reports.append(read_manifest(path, file_root))
    in_root = _other_manifests(root, exclude={r.path.absolute() for r in reports})
    known: dict[str, tuple[Manifest, Path]] = {}
    for m, path in in_root:
        known.setdefault(m.model_id, (m, path))
    by_id: dict[str, list[FileReport]] = {}
    for r in reports:
        if r.manifest is not None:
            by_id.setdefault(r.manifest.model_id, []).append(r)
    for model_id, group in by_id.items():
        holders = [str(r.path) for r in group] + ([str(known[model_id][1])] if model_id in known else [])
        if len(holders) < 2:
            continue
        for r in group:
            others = sorted({h for h in holders if h != str(r.path)})
            r.error(
                "model_id",
                f"{model_id!r} is also the id of {', '.join(others)}",
                "ids are unique; add a tag (…_US_90_<Tag>) or remove the copy",
            )
    check_same_checkpoint(reports, in_root)
    manifests = {mid: pair[0] for mid, pair in known.items()}
    manifests.update({r.manifest.model_id: r.manifest for r in reports if r.manifest is not None})
    for r in reports:
        check_semantics(r, manifests, max_size=options.max_size)
        if options.offline:
            r.skipped.append(("fetch, sha256, load, sparsity, clean accuracy", "--offline"))
        else:
            check_online(r, options, log)
    return reports


def check_same_checkpoint(reports: Sequence[FileReport], others: Iterable[tuple[Manifest, Path]] = ()) -> None:
    """One checkpoint, one manifest: a sha256 that another manifest (in ``reports`` or ``others``) also gives is
    an error on each report holding it. Two manifests of one file would read the same bytes two ways (another
    format, k, architecture or dataset) or count one model twice."""
    holders: dict[str, list[tuple[str, Path]]] = {}
    pairs = [(r.manifest, r.path) for r in reports if r.manifest is not None] + list(others)
    for m, path in pairs:
        if m.checkpoint.sha256 is not None:
            holders.setdefault(m.checkpoint.sha256, []).append((m.model_id, path.absolute()))
    for r in reports:
        m = r.manifest
        if m is None or m.checkpoint.sha256 is None:
            continue
        same = sorted({(mid, path) for mid, path in holders[m.checkpoint.sha256] if path != r.path.absolute()})
        if same:
            names = ", ".join(f"{mid} ({path})" for mid, path in same)
            r.error(
                "checkpoint.sha256",
                f"{m.model_id}'s checkpoint (sha256 {m.checkpoint.sha256[:12]}…) is the same file that is already "
                f"submitted as {names}",
                "one file has one manifest: remove the copy, or give this manifest's own file and its sha256",
            )


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.absolute().relative_to(root.absolute())
    except ValueError:
        return False
    return True


def _other_manifests(root: Path | None, exclude: Iterable[Path]) -> list[tuple[Manifest, Path]]:
    """Every manifest under ``root`` that reads (schema-valid), except the files in ``exclude``."""
    if root is None:
        return []
    excluded = set(exclude)
    return [
        (r.manifest, r.path) for r in read_tree(root) if r.manifest is not None and r.path.absolute() not in excluded
    ]
