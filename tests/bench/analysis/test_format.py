"""bench.analysis.format: every percentage, interval, range, p-value and missing mark the project prints."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench.analysis.format import MISSING, interval, is_missing, number, p_value, percent, percent_range, points

# Fractions an accuracy can take on N samples, and float noise around the rounding boundaries.
_RNG = np.random.default_rng(0)
FRACTIONS = [k / n for n in (7, 360, 1000, 10000) for k in range(0, n + 1, max(1, n // 97))]
FRACTIONS += list(_RNG.random(500)) + [0.12345, 0.98765, 0.005, 0.995, 1 / 3, 2 / 3]


@pytest.mark.parametrize("digits", [0, 1, 2, 4])
def test_percent_with_a_percent_sign_is_python_s_percent_format(digits):
    # What bench evaluate's summary printed with f"{v:.2%}" (the README's figures are parsed from it).
    for v in FRACTIONS:
        assert percent(v, digits, unit="%") == f"{v:.{digits}%}", v
        assert percent(v, digits, unit="%", width=9) == f"{v:9.{digits}%}", v
        assert percent(v, digits) == f"{100 * v:.{digits}f} %"
        assert percent(np.float64(v), digits, unit="") == f"{100 * v:.{digits}f}"


def test_percent_forms_used_across_the_project():
    assert percent(0.4483) == "44.83 %"
    assert percent(0.4483, unit="") == "44.83"
    assert percent(0.4483, 1) == "44.8 %"
    assert percent(0.9861, unit="%", width=7) == " 98.61%"
    assert percent(0.15, width=8) == " 15.00 %"
    assert percent(1.0, width=8) == "100.00 %"
    assert percent(np.float32(0.5), unit="") == "50.00"
    assert percent(1, unit="") == "100.00"


@pytest.mark.parametrize("missing", [None, math.nan, np.nan, pd.NA, True, "0.5", []])
def test_one_mark_for_every_missing_value(missing):
    assert is_missing(missing)
    assert percent(missing) == MISSING and percent(missing, unit="") == MISSING
    assert points(missing) == MISSING and number(missing) == MISSING and p_value(missing) == MISSING
    assert interval(missing, 0.5) == MISSING and interval(0.5, missing) == MISSING
    assert percent_range(0.1, missing) == MISSING


def test_the_missing_mark_is_the_site_s_en_dash_and_keeps_the_alignment():
    assert MISSING == "–"
    assert percent(None, width=8) == "       –"
    assert not is_missing(0.0) and not is_missing(0) and not is_missing(math.inf)


def test_points_intervals_and_ranges():
    assert points(-3.5) == "-3.50 points" and points(12.0, unit="") == "+12.00" and points(0.0) == "+0.00 points"
    assert interval(0.4, 0.5) == "[40.00 %, 50.00 %]"
    assert interval(0.9679, 0.9941, unit="%") == "[96.79%, 99.41%]"
    assert interval(0.9679, 0.9941, unit="") == "[96.79, 99.41]"
    assert percent_range(0.1, 0.7, unit="%") == "10.00%–70.00%"


def test_number_shows_finite_decimals_only():
    assert number(0.25654) == "0.2565" and number(1.5, 3) == "1.500" and number(np.float32(0.5), 2) == "0.50"
    assert number(math.inf) == MISSING and number(-math.inf) == MISSING


@pytest.mark.parametrize(("p", "text"), [(4.2e-170, "4e-170"), (0.0312, "0.03"), (0.0, "<1e-300"), (None, "–")])
def test_p_values_are_written_as_in_the_paper(p, text):
    assert p_value(p) == text
