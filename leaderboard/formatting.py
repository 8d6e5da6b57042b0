"""Formatting helpers shared by the site's pages and its table columns (file names, links, numbers)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime
from typing import Any

import numpy as np
from markupsafe import Markup, escape

from bench.analysis.format import MISSING, percent
from bench.store import Model
from bench.zoo.manifest import check_link_url


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
    """A fraction as a percentage without the sign, as the site's "%" columns show it (``0.4483`` → ``44.83``)."""
    return percent(value, digits, unit="")


def human_count(value: int | None) -> str:
    if not value:
        return MISSING if value is None else "0"
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
    return MISSING if value is None else str(value)


def word_breaks(text: Any) -> Markup:
    """``text`` escaped, with a line-break opportunity after each ``_`` (long model names wrap on a phone)."""
    return Markup("_<wbr>").join(escape(part) for part in str(text).split("_"))


def seeds_text(seeds: Any) -> str:
    """Pruning seeds as ``--seeds`` takes them, runs joined: ``[0, 1, 2, 7]`` → ``"0–2,7"``."""
    values = sorted(int(s) for s in seeds)
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if j == i else f"{values[i]}{'–' if j > i + 1 else ','}{values[j]}")
        i = j + 1
    return ",".join(parts)
