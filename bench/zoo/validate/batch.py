"""Validating many files together: ids and checkpoints unique across them and the submissions folder, dense
parents looked up among both, then each file's rules and online checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from bench.zoo.manifest import Manifest
from bench.zoo.validate.online import check_online
from bench.zoo.validate.reading import manifest_paths, read_manifest, read_tree
from bench.zoo.validate.report import FileReport, ValidationOptions
from bench.zoo.validate.rules import check_semantics

_DEFAULT_OPTIONS = ValidationOptions()  # frozen, so one shared default is safe


def validate_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    root: Path | None,
    options: ValidationOptions = _DEFAULT_OPTIONS,
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
