"""Tables as CSV text that a spreadsheet opens as data: shared by ``bench analyze drops`` and the site's downloads."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from typing import Any

# A cell starting with one of these is run as a formula by spreadsheet programs (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """One cell: None and non-finite floats empty, floats as their shortest round-trip repr, booleans 1/0, and
    text that could start a formula prefixed with ``'``."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_text(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """CSV with a header row; every cell through :func:`csv_cell` (text cannot start a spreadsheet formula)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(list(header))
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])
    return out.getvalue()
