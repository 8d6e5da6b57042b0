"""The README's track figures: parsed from what the main job prints, rendered from docs/figures/, checked by CI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("figures", ROOT / "scripts" / "figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

PRINTED = """\
training the digits track's dense small_cnn ...
evaluation #1 of digits-dense on 360 samples (Wilson 95 % intervals)
  clean accuracy             98.61%  [96.79%, 99.41%]
  AutoAttack robust          69.44%  [64.50%, 73.98%]
  FMN robust at eps          75.83%  [71.15%, 79.97%]
  best-known robust          69.44%  [64.50%, 73.98%]
  FMN median distance      0.2565 (Linf)
  time                     190.2 s attacking, 104.1 s this run
  stored in                sqlite:////tmp/x/results.db

evaluation #2 of HYDRA_Sehwag2020Hydra_small_cnn_digits_US_95_s0 on 360 samples (Wilson 95 % intervals)
  clean accuracy             95.00%  [92.22%, 96.82%]
  AutoAttack robust          55.28%  [50.11%, 60.33%]
  FMN robust at eps          66.11%  [61.08%, 70.80%]
  best-known robust          55.28%  [50.11%, 60.33%]
  FMN median distance      0.2950 (Linf)
  time                     150.0 s attacking, 80.0 s this run
  stored in                sqlite:////tmp/x/results.db

                               dense    pruned
  clean accuracy              98.61%    95.00%
  AutoAttack robust           69.44%    55.28%
  best-known robust           69.44%    55.28%
  sparsity (measured)          0.00%    95.00%
"""


def test_parse_reads_both_summaries_and_the_sparsity():
    got = figures.parse_demo_output(PRINTED)
    assert got["dense"]["name"] == "digits-dense" and got["dense"]["n"] == 360
    assert got["dense"]["autoattack"] == pytest.approx(0.6944)
    assert got["pruned"]["fmn_at_eps"] == pytest.approx(0.6611)
    assert got["pruned"]["fmn_median"] == pytest.approx(0.2950)
    assert got["dense"]["sparsity"] == 0.0 and got["pruned"]["sparsity"] == pytest.approx(0.95)


def test_parse_fails_loudly_on_a_changed_format():
    with pytest.raises(ValueError, match="summaries"):
        figures.parse_demo_output(PRINTED.split("evaluation #2")[0])
    with pytest.raises(ValueError, match="sparsity"):
        figures.parse_demo_output(PRINTED.replace("sparsity (measured)", "sparsity"))


@pytest.mark.parametrize("successes", [0, 1, 200, 359, 360])
def test_wilson_matches_scipy(successes):
    lo, hi = figures.wilson(successes / 360, 360)
    ref = binomtest(successes, 360).proportion_ci(confidence_level=0.95, method="wilson")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def _documented(printed):
    return {"evaluations": printed, "ranges": {w: figures.ranges_for(f) for w, f in printed.items()}}


def test_check_accepts_the_documented_run_and_refuses_a_collapse():
    printed = figures.parse_demo_output(PRINTED)
    documented = _documented(printed)
    assert figures.check_figures(printed, documented) == []
    # The measured failure: a fresh run printed 5.83 % for the HYDRA 95 % child that the README said was 55.28 %.
    collapsed = figures.parse_demo_output(PRINTED.replace("55.28%", "5.83%"))
    problems = figures.check_figures(collapsed, documented)
    assert any(p.startswith("pruned autoattack") for p in problems)
    assert any(p.startswith("pruned best_known") for p in problems)
    moved = figures.parse_demo_output(PRINTED.replace("0.2950", "0.3500"))
    assert [p.split(":")[0] for p in figures.check_figures(moved, documented)] == ["pruned fmn_median"]


def test_check_demo_command_exit_codes(tmp_path):
    printed = figures.parse_demo_output(PRINTED)
    doc = tmp_path / "demo.json"
    doc.write_text(
        json.dumps({**_documented(printed), "command": "bench evaluate", "provenance": {"cpu": figures._cpu()["cpu"]}})
    )
    log = tmp_path / "demo.log"
    log.write_text(PRINTED)
    assert figures.main(["check-demo", str(log), "--figures", str(doc)]) == 0
    log.write_text(PRINTED.replace("98.61%", "90.00%"))
    assert figures.main(["check-demo", str(log), "--figures", str(doc)]) == 1


def test_ranges_hold_the_documented_figure():
    printed = figures.parse_demo_output(PRINTED)
    for figs in printed.values():
        for key, (lo, hi) in figures.ranges_for(figs).items():
            assert lo <= figs[key] <= hi and not math.isnan(lo)


def test_rendered_blocks_replace_only_marked_text():
    text = "a\n<!-- figures:x -->\nold\n<!-- /figures:x -->\nb\n"
    assert figures.rendered_readme(text, {"x": "new"}) == "a\n<!-- figures:x -->\nnew\n<!-- /figures:x -->\nb\n"
    with pytest.raises(SystemExit, match="no figures file"):
        figures.rendered_readme(text, {})


def test_readme_figures_are_the_rendering_of_docs_figures():
    """Nobody typed a track figure into the README: its marked blocks equal their rendering from the JSON files."""
    text = (ROOT / "README.md").read_text()
    assert figures.rendered_readme(text, figures.render_blocks()) == text, "run: python scripts/figures.py render"
