"""``bench analyze``, ``bench report`` and ``bench reported`` on a small store built through the ORM."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from click.testing import CliRunner

from bench.analysis.records import load_records
from bench.analysis.thin_ice import thin_ice
from bench.cli import main
from bench.store import Model, Store
from tests.analysis_store import add_evaluation, add_model, digits_spec

CIFAR = digits_spec(dataset="cifar10", n_samples=20, eps="8/255", eps_value=8 / 255)


@pytest.fixture
def db(tmp_path):
    """dense (#1) → pruned (#2, HYDRA VGG16 90 % on CIFAR-10, matching the shipped tables) and other (#3)."""
    url = f"sqlite:///{tmp_path / 'analysis.db'}"
    store = Store(url)
    cifar = dict(arch="vgg16_bn", dataset="cifar10")
    dense = add_model(store, "dense-vgg", **cifar)
    pruned = add_model(store, "hydra-vgg-90", parent_id=dense, **cifar)
    other = add_model(store, "other-vgg-90", parent_id=dense, method="mad", **cifar)
    dense_correct = [True] * 16 + [False] * 4
    pruned_correct = [True] * 13 + [False] * 3 + [True, False, False, False]
    eps = [0.02 + 0.001 * i for i in range(13)] + [0.001, 0.002, 0.003] + [-0.001, -0.02, -0.03, -0.04]
    store.ids = {
        "dense": add_evaluation(store, dense, clean_correct=dense_correct, signed_eps=eps, spec=CIFAR),
        "pruned": add_evaluation(
            store,
            pruned,
            clean_correct=pruned_correct,
            aa_broken_by=["apgd-ce"] * 4 + ["square"] + [None] * 15,
            spec=CIFAR,
        ),
        "other": add_evaluation(
            store, other, clean_correct=[True] * 20, aa_broken_by=["apgd-ce"] * 12 + [None] * 8, spec=CIFAR
        ),
    }
    store.url_text = url
    yield store
    store.dispose()


def _run(db, *args):
    return CliRunner().invoke(main, [*args, "--db", db.url_text])


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_thin_ice_prints_the_table2_layout(db):
    result = _run(db, "analyze", "thin-ice", "--pruned", "hydra-vgg-90", "--dense", "dense-vgg")
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()[2:4]
    for column in (
        "Method",
        "Sparsity %",
        "Network",
        "S00 %",
        "S01 %",
        "S10 %",
        "S11 %",
        "AUC ε10<ε11 (p)",
        "AUC |ε01|<|ε00| (p)",
    ):
        assert column in header
    with db.session() as s:
        expected = thin_ice(load_records(s, db.ids["dense"]), load_records(s, db.ids["pruned"]), min_group=5)
    values = expected.as_table_row()
    populations = [values[k] for k in ("S00 %", "S01 %", "S10 %", "S11 %")]
    assert row.split()[:7] == ["HYDRA", "90.00", "vgg16_bn", *populations]
    assert populations == ["15.00", "5.00", "15.00", "65.00"]
    assert values["AUC ε10<ε11 (p)"] in row and values["AUC |ε01|<|ε00| (p)"] in row
    assert "note: S01 has 1 sample" in result.output
    # --dense defaults to the recorded parent; ids and eval:N work as well as names.
    by_parent = _run(db, "analyze", "thin-ice", "--pruned", "2")
    by_eval = _run(
        db, "analyze", "thin-ice", "--pruned", f"eval:{db.ids['pruned']}", "--dense", f"eval:{db.ids['dense']}"
    )
    assert by_parent.output == by_eval.output == result.output


def test_thin_ice_json_holds_the_numbers(db):
    result = _run(db, "analyze", "thin-ice", "--pruned", "hydra-vgg-90", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["counts"] == {"S00": 3, "S01": 1, "S10": 3, "S11": 13}
    assert data["percent"]["S11"] == pytest.approx(65.0)


def test_thin_ice_refuses_another_threat_model_in_one_line(db):
    dense2 = add_model(db, "dense-l2", arch="vgg16_bn", dataset="cifar10")
    add_evaluation(
        db,
        dense2,
        clean_correct=[True] * 20,
        spec=digits_spec(dataset="cifar10", n_samples=20, norm="L2", eps="0.5", eps_value=0.5),
    )
    line = _error_line(_run(db, "analyze", "thin-ice", "--pruned", "hydra-vgg-90", "--dense", "dense-l2"))
    assert line.startswith("Error: thin-ice analysis refused:")
    assert "different threat models (L2 eps=0.5 vs Linf eps=8/255)" in line and "bench evaluate" in line


def test_compare_prints_the_discordant_counts_and_p_value(db):
    result = _run(db, "analyze", "compare", "hydra-vgg-90", "3")
    assert result.exit_code == 0, result.output
    assert "20 shared samples" in result.output
    # A (pruned) is correct on 0–12 and 16, broken on 0–4: robust on 5–12 and 16. B (other) is robust on 12–19.
    out = json.loads(_run(db, "analyze", "compare", "hydra-vgg-90", "3", "--format", "json").output)
    assert (out["n_shared"], out["both"], out["a_only"], out["b_only"], out["neither"]) == (20, 2, 7, 6, 5)
    assert re.search(r"^A +45\.00 % \[", result.output, re.M) and re.search(r"^B +40\.00 % \[", result.output, re.M)
    assert f"p = {out['pvalue']:.3g}" in result.output
    assert f"{out['a_only']} A-only against {out['b_only']} B-only" in result.output


def test_report_prints_everything_known(db):
    result = _run(db, "report", "hydra-vgg-90")
    assert result.exit_code == 0, result.output
    out = result.output
    for text in (
        "model #2 hydra-vgg-90",
        "HYDRA (hydra), structure US",
        "90.00 % measured (target 90.00 %)",
        "100 non-zero of 1,000",
        "600 counting non-zero weights, 5,000 dense",
        "parent        #1 dense-vgg",
        f"evaluation #{db.ids['pruned']} (complete): AutoAttack-plus Linf eps=8/255",
        "(Wilson 95 %)",
        "git_commit",
    ):
        assert text in out, text
    # 20 samples: 4 clean errors (pruned_correct), 5 broken first by apgd-ce/square among the correct ones.
    breakdown = {
        line.split()[0]: int(line.split()[1])
        for line in out.splitlines()
        if line.startswith("    ") and "%" in line and line.split()[0] in ("apgd-ce", "square", "robust", "fab")
    }
    assert breakdown["apgd-ce"] == 4 and breakdown["square"] == 1 and breakdown["fab"] == 0
    # The shipped thin-ice Table 1 entry for HYDRA VGG-16 90 % matches: reported 49.50 % − measured.
    with db.session() as s:
        measured = s.get(Model, 2).evaluations[0].aa_robust_accuracy
    assert f"→ drop {100 * (0.495 - measured):+.2f} points" in out
    assert "thin ice vs parent     S00 15.00 %" in out


def test_reported_set_then_drops(db):
    bad = _run(db, "reported", "set", "other-vgg-90", "--robust", "45", "--attack", "PGD-20", "--source", "paper")
    assert "write 0.45" in _error_line(bad)
    ok = _run(
        db,
        "reported",
        "set",
        "other-vgg-90",
        "--clean",
        "0.9",
        "--robust",
        "0.55",
        "--attack",
        "PGD-20",
        "--source",
        "paper T2",
    )
    assert ok.exit_code == 0, ok.output
    rows = list(csv.DictReader(io.StringIO(_run(db, "analyze", "drops", "--format", "csv").output)))
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"hydra-vgg-90", "other-vgg-90"}
    other = by_model["other-vgg-90"]
    assert other["reported_attack"] == "PGD-20" and other["reported_origin"] == "model"
    assert float(other["drop_points"]) == pytest.approx(100 * (0.55 - 0.4))
    table = _run(db, "analyze", "drops")
    assert "+15.00" in table.output and "PGD-20 — paper T2" in table.output
    cleared = _run(db, "reported", "clear", "other-vgg-90")
    assert cleared.exit_code == 0
    # MAD VGG16 90 % on CIFAR-10 still matches the shipped tables (MAD's own supplementary Table 1 first).
    rows = list(csv.DictReader(io.StringIO(_run(db, "analyze", "drops", "--format", "csv").output)))
    assert {r["model"]: r["reported_origin"] for r in rows}["other-vgg-90"] == "mad-supp-t1-vgg16_bn-90"


def test_curve_marks_the_nominal_eps(db):
    result = _run(db, "analyze", "curve", "dense-vgg", "--points", "4")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("  eps")]
    assert len(lines) == 4 and lines[0].endswith("80.00 %")
    assert "<- nominal eps; AutoAttack robust 80.00 %" in lines[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("report", "nosuch"),
            "Error: no model 'nosuch' in the store (give its numeric id or its name; `bench results` lists them)",
        ),
        (("report", "99"), "Error: no model '99' in the store"),
        (
            ("analyze", "thin-ice", "--pruned", "eval:999"),
            "Error: no evaluation 'eval:999' in the store; `bench results`",
        ),
        (
            ("analyze", "thin-ice", "--pruned", "dense-vgg"),
            "Error: model 'dense-vgg' has no dense parent in the store; name one with --dense",
        ),
        (("analyze", "compare", "hydra-vgg-90", "ghost"), "Error: no model 'ghost'"),
    ],
)
def test_bad_ids_fail_in_one_line_naming_the_fix(db, args, message):
    assert _error_line(_run(db, *args)).startswith(message)


def test_a_model_without_a_complete_evaluation_says_how_to_get_one(db):
    add_model(db, "fresh")
    line = _error_line(_run(db, "analyze", "compare", "fresh", "hydra-vgg-90"))
    assert "model 'fresh' has no complete evaluation; evaluate it first with `bench evaluate`" in line


def test_reported_list_shows_the_shipped_tables():
    result = CliRunner().invoke(main, ["reported", "list", "--method", "admm"])
    assert result.exit_code == 0, result.output
    assert "thin-ice-t1-admm-resnet18-90" in result.output
    assert "apb-RADMM_Ye2019Adversarial_R18_CIFAR10_S_50" in result.output
    assert "hydra" not in result.output


def test_drops_skip_a_model_whose_reported_numbers_are_malformed(db):
    with db.session() as s:
        # What bench.zoo stores for a manifest with `attack: null`: accepted, shown without an attack.
        s.get(Model, 3).reported = {"clean": 0.8, "robust": 0.5, "source": "paper"}
        s.get(Model, 1).reported = {"robust": 45.3, "attack": "PGD", "source": "paper"}  # a percentage
    result = CliRunner().invoke(main, ["analyze", "drops", "--format", "csv", "--db", db.url_text])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(
        "warning: model 'dense-vgg' skipped: model 'dense-vgg' reported numbers: robust 45.3"
    )
    rows = {r["model"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(rows) == {"hydra-vgg-90", "other-vgg-90"}
    assert rows["other-vgg-90"]["reported_attack"] == "" and float(
        rows["other-vgg-90"]["drop_points"]
    ) == pytest.approx(10.0)
    table = _run(db, "analyze", "drops")
    assert table.exit_code == 0 and "attack not stated — paper" in table.output


def test_drops_use_the_claim_and_show_other_reevaluations_beside_it(db):
    rows = list(csv.DictReader(io.StringIO(_run(db, "analyze", "drops", "--format", "csv").stdout)))
    hydra = next(r for r in rows if r["model"] == "hydra-vgg-90")
    # thin-ice Table 1 (the authors' claim, 49.50 %) is subtracted; the APB's AutoAttack figure is not.
    assert hydra["reported_origin"] == "thin-ice-t1-hydra-vgg16_bn-90"
    assert float(hydra["drop_points"]) == pytest.approx(100 * (0.495 - float(hydra["measured_robust"])))
    assert hydra["reevaluation_origin"] == "thin-ice-t1-hydra-vgg16_bn-90:reevaluated"
    assert float(hydra["reevaluation_robust"]) == 0.467


def test_drops_csv_cannot_start_a_spreadsheet_formula(db):
    with db.session() as s:
        s.get(Model, 2).name = '=HYPERLINK("http://x","y")'
        s.get(Model, 3).reported = {"robust": 0.5, "attack": "@SUM(A1)", "source": "-1+2"}
    out = _run(db, "analyze", "drops", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    cells = [v for r in rows for k, v in r.items() if k not in ("drop_points",)]
    assert '\'=HYPERLINK("http://x","y")' in cells and "'@SUM(A1)" in cells and "'-1+2" in cells
    assert not any(v.startswith(("=", "+", "@")) for v in cells)
    assert rows[0]["sparsity"] == "0.9" and rows[0]["n"] == "20"


def test_report_survives_inconsistent_rows_and_says_why_thin_ice_is_missing(db):
    from sqlalchemy import select

    from bench.store import Evaluation, SampleResult

    with db.session() as s:
        # AutoAttack's own clean pass disagreed on sample 5 (correct for us, not attacked, not robust) and a stage
        # no AutoAttack version has on sample 0 of the other model.
        row = s.scalars(
            select(SampleResult).where(SampleResult.evaluation_id == db.ids["pruned"], SampleResult.sample_id == 5)
        ).one()
        row.aa_robust = False
        s.get(Evaluation, db.ids["pruned"]).flags = ["clean_pass_disagreement"]
        odd = s.scalars(
            select(SampleResult).where(SampleResult.evaluation_id == db.ids["other"], SampleResult.sample_id == 0)
        ).one()
        odd.aa_broken_by = "mystery"
        s.get(Evaluation, db.ids["dense"]).protocol_hash = "f" * 64
    result = _run(db, "report", "hydra-vgg-90")
    assert result.exit_code == 0, result.output
    assert re.search(r"^    AutoAttack's clean pass disagreed +1 ", result.output, re.M)
    assert (
        "thin ice vs parent     not computed: the dense parent dense-vgg has no complete evaluation under this "
        f"protocol ({CIFAR.protocol_hash[:12]}); it was evaluated under ffffffffffff" in result.output
    )
    other = _run(db, "report", "other-vgg-90")
    assert other.exit_code == 0, other.output
    assert (
        f"  note: the AutoAttack stage breakdown failed: evaluation #{db.ids['other']} has samples broken by mystery"
        in (other.output)
    )
    assert "security curve (best-known distances)" in other.output


def test_thin_ice_without_dense_picks_an_evaluation_the_parent_shares(db):
    # The pruned model's newest evaluation is under a protocol its parent lacks; the older one is shared.
    newer = digits_spec(dataset="cifar10", n_samples=20, eps="8/255", eps_value=8 / 255, seed=5)
    add_evaluation(db, 2, clean_correct=[True] * 20, spec=newer, finished_offset_s=3600)
    result = _run(db, "analyze", "thin-ice", "--pruned", "hydra-vgg-90", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["pruned_evaluation"], data["dense_evaluation"]) == (db.ids["pruned"], db.ids["dense"])
    # Asked for explicitly, the unshared evaluation is refused with the difference.
    line = _error_line(_run(db, "analyze", "thin-ice", "--pruned", f"eval:{db.ids['other'] + 1}"))
    assert "different protocols" in line and "seed" in line


def test_report_notes_malformed_reported_numbers_and_goes_on(db):
    with db.session() as s:
        s.get(Model, 2).reported = {"robust": 45.3, "attack": "PGD", "source": "paper"}
    result = _run(db, "report", "hydra-vgg-90")
    assert result.exit_code == 0, result.output
    assert "  note: reading the reported numbers failed: model 'hydra-vgg-90' reported numbers: robust 45.3" in (
        result.output
    )
    assert "\nnote: reading the reported numbers failed:" in result.output
    assert "thin ice vs parent     S00 15.00 %" in result.output


def _best_known_pair(db):
    """A dense parent whose plain FMN overstates three flipped samples' distance (the best known is smaller), and a
    pruned child; returns (dense name, pruned name)."""
    cifar = dict(arch="vgg16_bn", dataset="cifar10")
    dense = add_model(db, "dense-best", **cifar)
    pruned = add_model(db, "pruned-best", parent_id=dense, **cifar)
    fmn = [0.02 + 0.001 * i for i in range(17)] + [0.05, 0.051, 0.052]
    best = fmn[:17] + [0.002, 0.003, 0.004]
    add_evaluation(db, dense, clean_correct=[True] * 20, signed_eps=fmn, best_eps=best, spec=CIFAR)
    add_evaluation(db, pruned, clean_correct=[True] * 17 + [False] * 3, spec=CIFAR)
    return "dense-best", "pruned-best"


def test_report_shows_plain_fmn_against_the_best_known(db):
    dense, pruned = _best_known_pair(db)
    out = _run(db, "report", dense).output
    # D = 0.036; plain FMN is above the best known on 3 of 20 samples.
    assert "FMN median distance" in out and "(plain FMN, as the thin-ice paper)" in out
    assert "best-known median" in out
    line = next(line for line in out.splitlines() if "plain FMN vs best" in line)
    assert "local optimality 0." in line and "3 samples more than 1 % above it" in line
    assert "security curve (best-known distances)" in out and "security curve (plain FMN distances)" in out
    child = _run(db, "report", pruned).output
    assert "ε = the parent's signed best-known distance" in child
    assert "with plain FMN ε (the paper's): AUC ε10<ε11 " in child


def test_thin_ice_and_curve_take_the_distance_to_read(db):
    dense, pruned = _best_known_pair(db)
    best = json.loads(_run(db, "analyze", "thin-ice", "--pruned", pruned, "--format", "json").output)
    plain = json.loads(
        _run(db, "analyze", "thin-ice", "--pruned", pruned, "--distance", "fmn", "--format", "json").output
    )
    assert (best["distance"], plain["distance"]) == ("best", "fmn")
    # The best-known distances put the three flipped samples nearest the boundary; plain FMN puts them farthest.
    assert best["auc_10_11"] == 1.0 and plain["auc_10_11"] == 0.0
    table = _run(db, "analyze", "thin-ice", "--pruned", pruned, "--distance", "fmn").output
    assert "ε = the dense model's signed plain FMN distance" in table
    curve = _run(db, "analyze", "curve", dense, "--distance", "fmn", "--points", "3").output
    assert "robust accuracy = correct and plain FMN distance > eps" in curve
    assert "best-known distance > eps" in _run(db, "analyze", "curve", dense, "--points", "3").output
    bad = _run(db, "analyze", "curve", dense, "--distance", "aa")
    assert bad.exit_code == 2 and "'aa' is not one of 'best', 'fmn'" in bad.output


def test_curve_of_an_evaluation_without_best_known_distances_says_it_reads_plain_fmn(db):
    legacy = add_model(db, "legacy-vgg", arch="vgg16_bn", dataset="cifar10")
    spec = digits_spec(dataset="cifar10", n_samples=20, eps="8/255", eps_value=8 / 255, fmn_init="none")
    add_evaluation(db, legacy, clean_correct=[True] * 20, spec=spec)
    out = _run(db, "analyze", "curve", "legacy-vgg", "--points", "3").output
    assert "plain FMN distance > eps" in out and "has no best-known distances" in out
    report = _run(db, "report", "legacy-vgg").output
    assert "plain FMN vs best" not in report and "security curve (plain FMN distances)" in report
