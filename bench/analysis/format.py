"""Numbers as text, one way for the terminal, the reports and the site: percentages, percentage points, intervals,
ranges, plain decimals, p-values, and one mark for a missing value.

Accuracies are fractions in [0, 1] everywhere in the project; only text shows them as percentages. The unit is the
caller's choice because the places differ on purpose: a table column headed "%" shows ``44.83``, prose shows
``44.83 %``, and ``bench evaluate``'s summary keeps Python's ``44.83%`` (the README's figures are parsed from it).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["MISSING", "interval", "is_missing", "number", "p_value", "percent", "percent_range", "points"]

# What every table, report and page shows for a figure that is not there (an en dash, as typeset tables do).
MISSING = "–"


def is_missing(value: Any) -> bool:
    """Whether ``value`` is no number to show: None, NaN, pandas' NA, a bool, or anything but a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return True
    return math.isnan(value)


def percent(value: Any, digits: int = 2, *, unit: str = " %", width: int = 0) -> str:
    """A fraction as a percentage: ``0.4483`` → ``"44.83 %"``; :data:`MISSING` for a missing value.

    Args:
        value: a fraction (``1.0`` is 100 %).
        digits: decimals of the percentage.
        unit: written after the number: ``" %"`` (prose), ``"%"`` (``f"{value:.2%}"``'s form) or ``""`` (a cell
            under a "%" header).
        width: right-align the whole text (unit included) to this many characters.
    """
    if is_missing(value):
        return MISSING.rjust(width)
    # 100 * value is what Python's "%" format computes too, so "%" as the unit gives f"{value:.{digits}%}".
    return f"{100 * float(value):.{digits}f}{unit}".rjust(width)


def points(value: Any, digits: int = 2, *, unit: str = " points") -> str:
    """A difference already in percentage points, signed: ``-3.5`` → ``"-3.50 points"``; :data:`MISSING` if none."""
    if is_missing(value):
        return MISSING
    return f"{float(value):+.{digits}f}{unit}"


def interval(low: Any, high: Any, digits: int = 2, *, unit: str = " %") -> str:
    """A confidence interval of two fractions: ``"[40.00 %, 50.00 %]"``; :data:`MISSING` if a bound is missing."""
    if is_missing(low) or is_missing(high):
        return MISSING
    return f"[{percent(low, digits, unit=unit)}, {percent(high, digits, unit=unit)}]"


def percent_range(low: Any, high: Any, digits: int = 2, *, unit: str = " %") -> str:
    """The range of fractions across runs, en dash between: ``"40.00 %–50.00 %"``; :data:`MISSING` if none."""
    if is_missing(low) or is_missing(high):
        return MISSING
    return f"{percent(low, digits, unit=unit)}–{percent(high, digits, unit=unit)}"


def number(value: Any, digits: int = 4) -> str:
    """A distance or a ratio with ``digits`` decimals; :data:`MISSING` for a missing or non-finite value."""
    if is_missing(value) or not math.isfinite(value):
        return MISSING
    return f"{float(value):.{digits}f}"


def p_value(p: Any) -> str:
    """A p-value as the thin-ice paper writes it: one significant digit (``4e-170``, ``0.03``); ``<1e-300`` where
    it underflowed to 0; :data:`MISSING` if none."""
    if is_missing(p):
        return MISSING
    if p == 0.0:
        return "<1e-300"
    return format(p, ".1g")
