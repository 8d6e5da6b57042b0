"""Reading one manifest: its place and name, safe YAML, the schema; and finding the manifests under a folder.

No registry or network checks: those are :mod:`bench.zoo.validate.rules` and :mod:`bench.zoo.validate.online`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bench.zoo.manifest import Manifest, printable
from bench.zoo.validate.report import FIX_HINTS, MAX_MANIFEST_BYTES, FileReport

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    fix = next((hint for prefix, hint in FIX_HINTS.items() if loc == prefix or loc.startswith(prefix + ".")), "")
    report.error(loc, f"{message}{shown}", fix)


def manifest_paths(root: Path) -> list[Path]:
    """Every ``.yaml``/``.yml`` file (or link) under the folder ``root``, sorted; links to folders are not followed."""
    found = []
    for folder, _dirs, names in os.walk(root, followlinks=False):
        found.extend(Path(folder) / n for n in names if n.endswith((".yaml", ".yml")))
    return sorted(found)


def read_tree(root: Path) -> list[FileReport]:
    """Read every manifest under the submissions folder ``root`` (schema only)."""
    return [read_manifest(path, root) for path in manifest_paths(root)]
