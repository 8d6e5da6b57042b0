"""Training-seed replicates: the seed list, the setting key, the summary across seeds, and the commands that
show it (`bench results`, `bench results --by-setting`, `bench report`) on stores built through the ORM."""

from __future__ import annotations

import csv
import io
import json
import statistics
from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from bench.analysis.replicates import (
    MAX_SEED,
    group_replicates,
    parse_seeds,
    seed_of,
    setting_key,
    setting_label,
    summarize,
    summarize_evaluations,
)
from bench.analysis.results import SETTING_COLUMNS
from bench.analysis.stats import wilson_interval
from bench.cli import main
from bench.store import Store
from tests.analysis_store import add_evaluation, add_model, digits_spec

# --- parse_seeds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seeds",
    [
        ("0", [0]),
        ("0,1,2", [0, 1, 2]),
        ("0-4", [0, 1, 2, 3, 4]),
        ("3, 0-1 ,7", [3, 0, 1, 7]),
        ("5-5", [5]),
        (str(MAX_SEED), [MAX_SEED]),
        ("0-999", list(range(1000))),
    ],
)
def test_seed_lists_and_ranges(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    "text, message",
    [
        ("0,1,1", "lists seed 1 twice"),
        ("0-2,2", "lists seed 2 twice"),
        ("-1", "negative seed '-1'"),
        ("0,-3", "negative seed '-3'"),
        ("4-0", "range '4-0' is empty; write ranges low-high, e.g. 0-4"),
        ("a", "item 'a' is not a seed or a range"),
        ("1.5", "item '1.5' is not a seed or a range"),
        ("0,,1", "item '' is not a seed or a range"),
        ("", "--seeds is empty"),
        (str(MAX_SEED + 1), "above the largest allowed"),
        (f"0-{MAX_SEED}", "asks for more than 1000 pruning runs; list fewer seeds"),
        ("0-999,1000", "asks for more than 1000 pruning runs"),
    ],
)
def test_bad_seed_lists_are_refused_with_the_fix(text, message):
    with pytest.raises(ValueError, match=None) as err:
        parse_seeds(text)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- the setting ---------------------------------------------------------------------------------------------


def _model(seed=0, *, config=None, parent_id=1, model_id=10, name=None, **provenance):
    prov = {
        "seed": seed,
        "config": config if config is not None else {"prune_epochs": 3, "finetune_epochs": 5},
        "schedule": "digits-track",
        "eps": 0.2,
        "dense_sha256": "d" * 64,
        **provenance,
    }
    return SimpleNamespace(
        id=model_id,
        name=name or f"HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90_s{seed}",
        parent_id=parent_id,
        method="hydra",
        target_sparsity=0.9,
        structure="US",
        provenance=prov,
    )


def test_models_differing_only_in_seed_share_a_setting():
    a, b = _model(0), _model(1, model_id=11)
    assert setting_key(a) == setting_key(b) is not None
    assert (seed_of(a), seed_of(b)) == (0, 1)
    # A seed recorded inside the config does not split a setting either.
    assert setting_key(_model(2, config={"prune_epochs": 3, "finetune_epochs": 5, "seed": 2})) == setting_key(a)


@pytest.mark.parametrize(
    "change",
    [
        {"config": {"prune_epochs": 3, "finetune_epochs": 2}},
        {"eps": 0.3},
        {"schedule": "paper"},
        {"dense_sha256": "e" * 64},
    ],
)
def test_anything_but_the_seed_makes_another_setting(change):
    assert setting_key(_model(0, **change)) != setting_key(_model(0))


def test_row_fields_are_part_of_the_setting():
    base = _model(0)
    for field, value in [("method", "mad"), ("target_sparsity", 0.95), ("structure", "S")]:
        other = _model(0)
        setattr(other, field, value)
        assert setting_key(other) != setting_key(base), field


def test_models_without_a_pruning_record_have_no_setting():
    dense = SimpleNamespace(id=1, parent_id=None, method="dense", target_sparsity=None, structure="dense",
                            provenance={"track": "digits", "recipe_key": "k"})  # fmt: skip
    zoo = SimpleNamespace(id=2, parent_id=None, method="hydra", target_sparsity=0.9, structure="US", provenance={})
    assert setting_key(dense) is None and setting_key(zoo) is None
    assert seed_of(dense) is None
    assert seed_of(SimpleNamespace(provenance={"seed": True})) is None  # a JSON boolean is not a seed


def test_setting_label_strips_the_seed():
    assert setting_label("HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90_c1a2b3c4_s12") == (
        "HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90_c1a2b3c4"
    )
    assert setting_label("X_US_95_s0-0123abcd") == "X_US_95"
    assert setting_label("digits-dense") == "digits-dense"


# --- the summary ---------------------------------------------------------------------------------------------


def test_summary_matches_the_statistics_module():
    values = {0: 0.111, 1: 0.45, 2: 0.114, 4: 0.7}
    s = summarize(values)
    xs = list(values.values())
    assert s.n == 4 and s.seeds == (0, 1, 2, 4) and s.values == (0.111, 0.45, 0.114, 0.7)
    assert s.mean == pytest.approx(statistics.fmean(xs), abs=1e-15)
    assert s.std == pytest.approx(statistics.stdev(xs), abs=1e-15)
    assert (s.min, s.max) == (0.111, 0.7) and s.range == pytest.approx(0.589)


def test_summary_of_one_and_of_missing_values():
    one = summarize({3: 0.5, 4: None, 5: float("nan")})
    assert (one.n, one.mean, one.min, one.max, one.std, one.seeds) == (1, 0.5, 0.5, 0.5, None, (3,))
    assert summarize({}) is None and summarize({0: None}) is None


def _ev(model, protocol="p", *, ev_id, finished=0, status="complete", aa=0.5):
    return SimpleNamespace(
        id=ev_id,
        model=model,
        status=status,
        protocol_hash=protocol,
        finished_at=datetime(2024, 1, 1) + timedelta(seconds=finished),
        clean_accuracy=0.9,
        aa_robust_accuracy=aa,
        fmn_robust_accuracy=aa,
        best_robust_accuracy=aa,
    )


def test_grouping_takes_each_models_newest_complete_evaluation_per_protocol():
    s0, s1, s2 = _model(0, model_id=10), _model(1, model_id=11), _model(2, model_id=12)
    other = _model(0, model_id=13, config={"prune_epochs": 1})
    dense = SimpleNamespace(id=1, name="digits-dense", provenance={}, parent_id=None, method="dense",
                            target_sparsity=None, structure="dense")  # fmt: skip
    evs = [
        _ev(s1, ev_id=1, aa=0.2),
        _ev(s0, ev_id=2, finished=5, aa=0.3),
        _ev(s0, ev_id=3, finished=1, aa=0.9),  # older than #2 although created later
        _ev(s2, ev_id=4, status="running", aa=0.0),
        _ev(s2, "q", ev_id=5, aa=0.4),
        _ev(other, ev_id=6),
        _ev(dense, ev_id=7),
    ]
    groups = group_replicates(evs)
    key = setting_key(s0)
    assert [e.id for e in groups[(key, "p")]] == [2, 1]  # by seed: s0's newest (#2), s1
    assert [e.id for e in groups[(key, "q")]] == [5]
    assert [e.id for e in groups[(setting_key(other), "p")]] == [6]
    assert [e.id for e in groups[("model:1", "p")]] == [7]
    assert len(groups) == 4
    summary = summarize_evaluations(groups[(key, "p")])
    assert summary["autoattack"].seeds == (0, 1) and summary["autoattack"].values == (0.3, 0.2)
    assert set(summary) == {"clean", "autoattack", "fmn", "best_known"}


def test_evaluations_that_are_not_replicates_are_refused():
    a, b = _model(0, model_id=10), _model(0, model_id=11, name="B_s0")
    with pytest.raises(ValueError, match="both have seed 0"):
        summarize_evaluations([_ev(a, ev_id=1), _ev(b, ev_id=2)])
    dense = SimpleNamespace(id=1, name="digits-dense", provenance={})
    with pytest.raises(ValueError, match="records no pruning seed"):
        summarize_evaluations([_ev(dense, ev_id=3)])


# --- the commands --------------------------------------------------------------------------------------------

SETTING = "HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90"
# AutoAttack-robust samples out of 20 per seed; seed 2 is the collapse the digits track once showed.
ROBUST = {0: 14, 1: 9, 2: 2}


def _pruning_record(seed: int, **kw) -> dict:
    return {"seed": seed, "config": {"prune_epochs": 3}, "schedule": "digits-track", "eps": 0.2,
            "dense_sha256": "d" * 64, **kw}  # fmt: skip


@pytest.fixture
def replicate_db(tmp_path):
    """A dense parent, three HYDRA seeds of one setting and one seed of another config, each evaluated on 20
    samples under one protocol; seed 0 also under a second protocol."""
    url = f"sqlite:///{tmp_path / 'rep.db'}"
    store = Store(url)
    spec = digits_spec(n_samples=20)
    other_spec = digits_spec(n_samples=20, eps="0.1", eps_value=0.1)
    dense = add_model(store, "digits-dense")
    add_evaluation(store, dense, clean_correct=[True] * 20, spec=spec)
    ids = {}
    for seed, robust in ROBUST.items():
        ids[seed] = add_model(
            store,
            f"{SETTING}_s{seed}",
            parent_id=dense,
            provenance=_pruning_record(seed),
            checkpoint_sha256=f"{seed}" * 64,
        )
        broken = [None] * robust + ["apgd-ce"] * (18 - robust) + [None, None]
        add_evaluation(store, ids[seed], clean_correct=[True] * 18 + [False] * 2, aa_broken_by=broken, spec=spec)
    add_evaluation(store, ids[0], clean_correct=[True] * 20, spec=other_spec)
    lone = add_model(store, f"{SETTING}_cabcdef12_s0", parent_id=dense, checkpoint_sha256="c" * 64,
                     provenance=_pruning_record(0, config={"prune_epochs": 1}))  # fmt: skip
    add_evaluation(store, lone, clean_correct=[True] * 20, aa_broken_by=["apgd-ce"] * 5 + [None] * 15, spec=spec)
    store.url_text = url
    store.ids = ids
    yield store
    store.dispose()


def _run(store, *args):
    return CliRunner().invoke(main, [*args, "--db", store.url_text])


def test_results_show_the_mean_and_range_across_seeds_beside_the_wilson_interval(replicate_db):
    result = _run(replicate_db, "results", "--format", "json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    by_model = {(r["model"], r["eps"]): r for r in records}
    robust = [k / 20 for k in ROBUST.values()]
    for seed, k in ROBUST.items():
        r = by_model[(f"{SETTING}_s{seed}", "0.2")]
        assert r["autoattack"] == pytest.approx(k / 20)
        assert (r["autoattack_low"], r["autoattack_high"]) == pytest.approx(wilson_interval(k, 20))
        assert r["seed"] == seed and r["replicates"] == 3
        assert r["autoattack_seeds_mean"] == pytest.approx(statistics.fmean(robust))
        assert (r["autoattack_seeds_min"], r["autoattack_seeds_max"]) == pytest.approx((0.1, 0.7))
    # Under the second protocol seed 0 has no replicate; the dense model and the other config have none either.
    for key in [(f"{SETTING}_s0", "0.1"), ("digits-dense", "0.2"), (f"{SETTING}_cabcdef12_s0", "0.2")]:
        assert by_model[key]["replicates"] is None and by_model[key]["autoattack_seeds_mean"] is None, key
    assert by_model[("digits-dense", "0.2")]["seed"] is None
    table = _run(replicate_db, "results")
    assert table.exit_code == 0, table.output
    line = next(x for x in table.output.splitlines() if f"{SETTING}_s1 " in x)
    assert "45.00%" in line and "[25.82%, 65.79%]" in line and "41.67% (10.00%–70.00%), 3 seeds" in line


def test_results_by_setting_aggregates_the_replicates(replicate_db):
    result = _run(replicate_db, "results", "--by-setting", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 4  # the dense model, the 3-seed setting, the same setting under eps 0.1, the other config
    (row,) = [r for r in rows if r["setting"] == SETTING and r["eps"] == "0.2"]
    robust = [k / 20 for k in ROBUST.values()]
    assert row["n_seeds"] == "3" and row["seeds"] == "0,1,2" and row["n"] == "20"
    assert float(row["autoattack_mean"]) == pytest.approx(statistics.fmean(robust))
    assert float(row["autoattack_std"]) == pytest.approx(statistics.stdev(robust))
    assert (float(row["autoattack_min"]), float(row["autoattack_max"])) == pytest.approx((0.1, 0.7))
    assert float(row["clean_mean"]) == pytest.approx(0.9) and float(row["clean_std"]) == 0.0
    k_mean = round(statistics.fmean(robust) * 20)
    assert (float(row["autoattack_wilson_low"]), float(row["autoattack_wilson_high"])) == pytest.approx(
        wilson_interval(k_mean, 20)
    )
    assert row["models"] == ",".join(f"{SETTING}_s{s}" for s in ROBUST)
    (lone,) = [r for r in rows if r["setting"] == f"{SETTING}_cabcdef12"]
    assert lone["n_seeds"] == "1" and lone["seeds"] == "0" and lone["autoattack_std"] == ""
    (dense,) = [r for r in rows if r["setting"] == "digits-dense"]
    assert dense["seeds"] == "" and dense["n_seeds"] == "1"
    table = _run(replicate_db, "results", "--by-setting")
    assert table.exit_code == 0, table.output
    line = next(x for x in table.output.splitlines() if x.startswith(f"{SETTING} ") and "0,1,2" in x)
    assert "41.67% (10.00%–70.00%)" in line and "90.00% (90.00%–90.00%)" in line


def test_the_api_reads_the_by_setting_table_the_command_prints(replicate_db):
    import apbench

    frame = apbench.load_results(replicate_db.url_text, by_setting=True)
    printed = json.loads(_run(replicate_db, "results", "--by-setting", "--format", "json").output)
    assert json.loads(frame.to_json(orient="records")) == printed
    assert list(frame.columns) == SETTING_COLUMNS and len(frame) == 4
    with pytest.raises(ValueError, match="leave model= out"):
        apbench.load_results(replicate_db.url_text, model="x", by_setting=True)


def test_report_shows_the_seed_summary_next_to_the_interval(replicate_db):
    result = _run(replicate_db, "report", f"{SETTING}_s1")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.strip().startswith("AutoAttack robust"))
    assert "45.00 % [25.82, 65.79]" in line
    assert "(Wilson 95 %; seeds 0,1,2: mean 41.67 %, range 10.00–70.00 %)" in line
    # Seed 0's second protocol has no replicate, so that evaluation shows the interval alone.
    seed0 = _run(replicate_db, "report", f"{SETTING}_s0").output
    lines = [x for x in seed0.splitlines() if x.strip().startswith("AutoAttack robust")]
    assert len(lines) == 2 and sum("seeds 0,1,2" in x for x in lines) == 1
    assert "seeds" not in next(x for x in _run(replicate_db, "report", "digits-dense").output.splitlines()
                               if x.strip().startswith("AutoAttack robust"))  # fmt: skip
