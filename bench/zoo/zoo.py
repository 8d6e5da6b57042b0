"""The zoo: every valid manifest under the submissions folder, resolved by id or by method/sparsity/dataset/arch.

Where the manifests are: ``--submissions DIR``, else ``$BENCH_SUBMISSIONS_DIR``, else the repository's
``submissions/`` next to the ``bench`` package (an editable install, as ``make`` sets up; a wheel does not carry
it, and then the folder must be named).

:func:`prepare_entry` turns an entry into a stored model: fetch and verify the checkpoint, convert it weights-only
with its native format, and register it with the manifest's reported numbers, taxonomy, dense parent and
provenance (manifest id, manifest sha256, checkpoint URL and sha256).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.checkpoints import sha256_file
from bench.registry import UnknownNameError
from bench.zoo.fetch import DEFAULT_MAX_SIZE, FetchResult, fetch_checkpoint, read_records
from bench.zoo.manifest import DENSE, Manifest, arch_token, printable
from bench.zoo.validate import FileReport, check_same_checkpoint, check_semantics, read_tree

ENV_SUBMISSIONS_DIR = "BENCH_SUBMISSIONS_DIR"
_REPO_SUBMISSIONS = Path(__file__).resolve().parent.parent.parent / "submissions"


def submissions_dir(option: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``<method>/<model_id>.yaml``: ``option``, ``$BENCH_SUBMISSIONS_DIR``, ``./submissions``
    where the user stands (their own clone, with the manifests they are writing), else the installed checkout's.

    Raises:
        FileNotFoundError: the folder does not exist; the message says how to name one.
    """
    chosen = option or os.environ.get(ENV_SUBMISSIONS_DIR)
    here = Path.cwd() / "submissions"
    path = Path(chosen).expanduser() if chosen else (here if here.is_dir() else _REPO_SUBMISSIONS)
    if not path.is_dir():
        origin = "--submissions" if option else (f"${ENV_SUBMISSIONS_DIR}" if chosen else "the default")
        hint = (
            ""
            if chosen
            else " (an installed wheel does not include the repository's submissions/; clone the repository, "
            "or pass --submissions DIR / set $BENCH_SUBMISSIONS_DIR)"
        )
        raise FileNotFoundError(f"no submissions folder at {path} ({origin}){hint}")
    return path


@dataclass(frozen=True)
class ZooEntry:
    """A valid manifest and the file it came from."""

    manifest: Manifest
    path: Path

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def describe(self) -> str:
        m = self.manifest
        return f"{m.model_id} ({m.method}, {m.model.arch}, {m.model.dataset}, sparsity {m.model.sparsity:g})"


@dataclass
class Zoo:
    """The valid entries of a submissions folder, and the reports of the files left out."""

    root: Path
    entries: dict[str, ZooEntry] = field(default_factory=dict)
    invalid: list[FileReport] = field(default_factory=list)

    def get(self, model_id: str) -> ZooEntry:
        """The entry ``model_id``; an unknown id fails with a suggestion."""
        if model_id in self.entries:
            return self.entries[model_id]
        bad = next((r for r in self.invalid if r.model_id == model_id or r.path.stem == model_id), None)
        if bad is not None:
            first = next((p.render() for p in bad.problems if p.level == "error"), "invalid")
            raise ValueError(
                f"zoo entry {model_id} ({printable(bad.path)}) is invalid: {first}; run `bench submit validate "
                f"{printable(bad.path)}`"
            )
        import difflib

        close = difflib.get_close_matches(model_id, list(self.entries), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown zoo entry {model_id!r}{hint} (bench zoo list)")

    def find(
        self,
        *,
        method: str | None = None,
        sparsity: float | None = None,
        dataset: str | None = None,
        arch: str | None = None,
    ) -> list[ZooEntry]:
        """Entries matching every given filter; ``arch`` also matches the id's short name (``V16``)."""
        out = []
        for entry in self.entries.values():
            m = entry.manifest
            if method is not None and m.method != method:
                continue
            if sparsity is not None and not math.isclose(m.model.sparsity, sparsity, abs_tol=1e-9):
                continue
            if dataset is not None and m.model.dataset != dataset:
                continue
            if (
                arch is not None
                and arch not in (m.model.arch, arch_token(m.model.arch))
                and (arch_token(arch) != arch_token(m.model.arch))
            ):
                continue
            out.append(entry)
        return sorted(out, key=lambda e: e.model_id)

    def resolve(self, *, method: str, sparsity: float | None, dataset: str | None, arch: str | None) -> ZooEntry:
        """The one entry matching the filters; none or several is an error listing what there is."""
        filters = {"method": method, "sparsity": sparsity, "dataset": dataset, "arch": arch}
        shown = " ".join(f"--{k} {v}" for k, v in filters.items() if v is not None)
        found = self.find(**filters)
        if len(found) == 1:
            return found[0]
        if not found:
            same_method = self.find(method=method)
            listing = "".join(f"\n  {e.describe()}" for e in same_method[:20])
            more = f"; entries for method {method}:{listing}" if same_method else f"; no entries for method {method}"
            raise ValueError(f"no zoo entry matches {shown}{more}\n(bench zoo list --method {method})")
        listing = "".join(f"\n  {e.describe()}" for e in found)
        raise ValueError(
            f"{len(found)} zoo entries match {shown}; pick one with --model-id ID, or narrow with --arch/--dataset:"
            f"{listing}"
        )


def load_zoo(root: str | os.PathLike[str] | None = None) -> Zoo:
    """Read and check (offline) every manifest under the submissions folder; invalid files are set aside."""
    folder = submissions_dir(root)
    reports = read_tree(folder)
    manifests = {r.manifest.model_id: r.manifest for r in reports if r.manifest is not None}
    zoo = Zoo(folder)
    for r in reports:
        check_semantics(r, manifests)
    check_same_checkpoint([r for r in reports if r.ok])
    seen: set[str] = set()
    for r in reports:
        if r.ok and r.manifest.model_id not in seen:
            seen.add(r.manifest.model_id)
            zoo.entries[r.manifest.model_id] = ZooEntry(r.manifest, r.path)
        elif r.ok:
            r.error("model_id", f"{r.manifest.model_id!r} is also the id of another manifest", "ids are unique")
            zoo.invalid.append(r)
        else:
            zoo.invalid.append(r)
    return zoo


def known_sha256(entry: ZooEntry, cache_root: Path | None = None) -> str | None:
    """The checkpoint's sha256 from the manifest, else from the first-download record (None if never fetched)."""
    if entry.manifest.checkpoint.sha256:
        return entry.manifest.checkpoint.sha256
    record = read_records(cache_root).get(entry.model_id)
    return record["sha256"] if record else None


def fetch_entry(
    entry: ZooEntry,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    cache_root: Path | None = None,
    source_file: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> FetchResult:
    """Fetch (or, with ``source_file``, import by hand) the entry's checkpoint into the cache, verified."""
    m = entry.manifest
    kwargs = dict(sha256=m.checkpoint.sha256, size=m.checkpoint.size, root=cache_root)
    if source_file is not None:
        from bench.zoo.fetch import import_local_file

        return import_local_file(
            m.model_id, source_file, m.checkpoint.file_name, url=m.checkpoint.url, max_size=max_size, **kwargs
        )
    if m.checkpoint.url is None:
        from bench.zoo.fetch import cached_path, verify_cached

        if cached_path(m.model_id, m.checkpoint.file_name, cache_root) is not None:
            return verify_cached(m.model_id, m.checkpoint.file_name, **kwargs)
        reason = m.unknown.get("checkpoint.url", "the manifest gives none")
        raise ValueError(
            f"zoo entry {m.model_id} has no download URL: {reason}. Fix: download the file by hand and run "
            f"`bench zoo fetch {m.model_id} --from FILE`"
        )
    return fetch_checkpoint(m.model_id, m.checkpoint.url, m.checkpoint.file_name, max_size=max_size, log=log, **kwargs)


def load_model(entry: ZooEntry, path: Path):
    """The entry's network from its fetched file: converted weights-only, behind the authors' normalisation."""
    from bench.data import DATASETS
    from bench.formats import load_converted_model
    from bench.models import ARCHS

    m = entry.manifest
    for name, registry, value in (("architecture", ARCHS, m.model.arch), ("dataset", DATASETS, m.model.dataset)):
        if value not in registry:
            raise ValueError(
                f"zoo entry {m.model_id} needs {name} {value!r}, which is not registered here "
                f"({registry.list_command}); it cannot be evaluated until it is"
            )
    return load_converted_model(path, m.checkpoint.format, m.model.arch, m.model.dataset, k=m.checkpoint.k)


def entry_provenance(entry: ZooEntry, fetched: FetchResult) -> dict[str, Any]:
    """What the store keeps about where a zoo model came from (text fields verbatim)."""
    from bench.formats import converted_provenance

    m = entry.manifest
    return {
        **converted_provenance(m.checkpoint.format, m.model.dataset, m.checkpoint.k),
        "zoo": {
            "model_id": m.model_id,
            "manifest": entry.path.name,
            "manifest_sha256": sha256_file(entry.path),
            "url": m.checkpoint.url,
            "checkpoint_sha256": fetched.sha256,
            "sha256_verified_by": fetched.verified_by,
            "verified": m.verified,
            "dense_parent": m.dense_parent,
            "paper": m.paper.model_dump(),
            "license": m.license,
            "source": m.source,
            "external_method": m.external_method.model_dump() if m.external_method else None,
            "model": m.model.model_dump(),
        },
    }


def entry_taxonomy(entry: ZooEntry) -> dict[str, Any]:
    """The store's ``taxonomy``: the method card's, or an external method's with its training types nested under
    ``training`` (a submitter's keys there cannot replace ``pipeline`` or ``criterion``)."""
    m = entry.manifest
    if m.method == DENSE:
        return {}
    if m.external_method is not None:
        t = m.external_method.taxonomy
        return {
            "pipeline": t.pipeline,
            "training": dict(t.training),
            "structure": t.structure,
            "scope": t.scope,
            "criterion": t.criterion,
        }
    from methods.base import get_method

    return get_method(m.method).card.taxonomy


def entry_reported(entry: ZooEntry) -> dict[str, Any]:
    """The store's ``reported`` column: ``{"clean", "robust", "attack", "source", ...}`` (fractions)."""
    m = entry.manifest
    out = {k: v for k, v in m.reported.model_dump().items() if v is not None}
    if m.other_reports:
        out["other"] = [{k: v for k, v in r.model_dump().items() if v is not None} for r in m.other_reports]
    return out


def prepare_entry(
    store,
    entry: ZooEntry,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    cache_root: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
):
    """Fetch, verify, convert and register a zoo entry; returns ``(model row, model)``.

    The dense parent is linked when it is already in the store (a zoo entry registered earlier, or a RobustBench
    model imported with ``bench zoo import-robustbench``); children registered before their parent are linked
    when the parent arrives.
    """
    fetched = fetch_entry(entry, max_size=max_size, cache_root=cache_root, log=log)
    model = load_model(entry, fetched.path)
    row = register_entry(store, entry, fetched, model)
    return row, model


def register_entry(store, entry: ZooEntry, fetched: FetchResult, model):
    """Register the fetched checkpoint as a model (or enrich the row its bytes already have)."""
    from sqlalchemy import select

    from bench.store import Model
    from bench.store.registration import register_model

    m = entry.manifest
    provenance = entry_provenance(entry, fetched)
    row = register_model(
        store,
        fetched.path,
        model,
        arch=m.model.arch,
        dataset=m.model.dataset,
        method=m.method,
        structure="dense" if m.method == DENSE else m.model.structure,
        name=None if _name_taken(store, m.model_id, fetched.sha256) else m.model_id,
        source="zoo",
        target_sparsity=m.model.sparsity if m.method != DENSE else None,
        taxonomy=entry_taxonomy(entry),
        reported=entry_reported(entry),
        provenance=provenance,
    )
    with store.session() as s:
        stored = s.get(Model, row.id)
        # Same bytes registered earlier another way (e.g. bench evaluate --checkpoint): add what the zoo knows.
        if "zoo" not in (stored.provenance or {}):
            stored.provenance = {**(stored.provenance or {}), **provenance}
            stored.reported = stored.reported or entry_reported(entry)
            stored.taxonomy = stored.taxonomy or entry_taxonomy(entry)
            if stored.method == "dense" and m.method != DENSE:
                stored.method, stored.structure = m.method, m.model.structure
                stored.target_sparsity = m.model.sparsity
        if stored.parent_id is None and m.dense_parent is not None:
            parent = s.scalars(select(Model).where(Model.name == m.dense_parent)).one_or_none()
            if parent is not None and parent.id != stored.id:
                stored.parent_id = parent.id
        # Children registered before this parent.
        for child in s.scalars(select(Model).where(Model.parent_id.is_(None), Model.source == "zoo")):
            if (child.provenance or {}).get("zoo", {}).get("dense_parent") == stored.name and child.id != stored.id:
                child.parent_id = stored.id
        s.flush()
        s.expunge(stored)
    return stored


def _name_taken(store, name: str, sha256: str) -> bool:
    from sqlalchemy import select

    from bench.store import Model

    with store.session() as s:
        other = s.scalars(select(Model).where(Model.name == name)).one_or_none()
        return other is not None and other.checkpoint_sha256 != sha256
