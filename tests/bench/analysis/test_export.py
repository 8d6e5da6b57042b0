"""Every CSV the project writes goes through one writer with the spreadsheet-formula guard."""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
import pytest
from click.testing import CliRunner

from bench.analysis.export import FORMULA_STARTS, csv_cell, csv_text
from bench.analysis.records import load_records
from bench.cli import main
from bench.store import Store
from leaderboard.per_sample import records_csv
from tests.analysis_store import add_evaluation, add_model

HOSTILE = '=HYPERLINK("http://evil.example","x")'


@pytest.mark.parametrize("start", FORMULA_STARTS)
def test_text_that_starts_a_formula_is_guarded(start):
    assert csv_cell(f"{start}1+1") == f"'{start}1+1"
    assert csv_cell("plain") == "plain" and csv_cell(True) == 1 and csv_cell(float("nan")) == ""


def test_bench_results_csv_writes_a_hostile_model_name_as_text(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    model = add_model(store, HOSTILE)
    add_evaluation(store, model, clean_correct=[True, False, True])
    store.dispose()
    result = CliRunner().invoke(main, ["results", "--format", "csv", "--db", url])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert [r["model"] for r in rows] == ["'" + HOSTILE]
    assert "<NA>" not in result.output
    assert not any(cell.startswith(FORMULA_STARTS) for row in rows for cell in row.values() if cell)


def test_per_sample_csv_fast_path_and_writer_agree_and_guard(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    model = add_model(store, "m")
    ev = add_evaluation(store, model, clean_correct=[True, False, True, True])
    with store.session() as s:
        rec = load_records(s, ev)
    assert (
        records_csv(rec)
        == rec.to_csv()
        == csv_text(
            [name for name in rec.to_csv().splitlines()[0].split(",")],
            zip(*(getattr(rec, n).tolist() for n in rec.to_csv().splitlines()[0].split(",")), strict=True),
        )
    )
    # A text column whose value would start a formula: both paths write the guarded text.
    hostile = dataclasses.replace(rec, best_attack=np.array(["=cmd"] + [None] * (rec.n - 1), dtype=object))
    assert records_csv(hostile) == hostile.to_csv()
    assert "\n'=cmd," in hostile.to_csv() or ",'=cmd" in hostile.to_csv()
