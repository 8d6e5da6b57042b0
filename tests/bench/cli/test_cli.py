"""The ``bench`` command line through click's CliRunner: listings, refusals with a fix, a small evaluation, results."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
from importlib.metadata import version as package_version

import click
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.data import DATASETS
from bench.models import ARCHS
from tests.cli import invoke

# The columns `bench results` documents (one row per evaluation; accuracies as fractions in csv/json).
RESULT_COLUMNS = [
    "evaluation",
    "model",
    "method",
    "arch",
    "dataset",
    "inputs",
    "sparsity",
    "norm",
    "eps",
    "version",
    "n",
    "status",
    "clean",
    "autoattack",
    "fmn",
    "best_known",
    "fmn_median",
    "flags",
    "autoattack_low",
    "autoattack_high",
    "seed",
    "replicates",
    "autoattack_seeds_mean",
    "autoattack_seeds_min",
    "autoattack_seeds_max",
]
FRACTION_COLUMNS = ["sparsity", "clean", "autoattack", "fmn", "best_known"]
EVAL_ARGS = [
    "--arch",
    "small_cnn",
    "--dataset",
    "digits",
    "--n-samples",
    "12",
    "--batch-size",
    "6",
    "--aa-version",
    "standard",
    "--fmn-steps",
    "10",
    "--eps",
    "0.3",
    "--no-progress",
]
PERCENT_WITH_INTERVAL = r"\d{1,3}\.\d\d%\s+\[\d{1,3}\.\d\d%, \d{1,3}\.\d\d%\]"


def _evaluate(tmp_path, checkpoint, *options: str):
    """``bench evaluate`` on ``checkpoint`` with a throw-away store (never ./results.db)."""
    return invoke("evaluate", "--checkpoint", str(checkpoint), *options, "--db", f"sqlite:///{tmp_path / 'r.db'}")


def _listed_names(output: str) -> list[str]:
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def test_models_lists_every_registered_architecture():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    names = _listed_names(result.output)
    assert names == sorted(name for name, _ in ARCHS.items())
    assert {"small_cnn", "resnet18", "resnet34", "resnet56", "vgg16_bn", "wrn28_4", "wrn34_10"} <= set(names)
    for name, info in ARCHS.items():
        line = next(line for line in result.output.splitlines() if line.split()[0] == name)
        assert info.description in line


def test_models_filters_with_a_wildcard():
    result = invoke("models", "resnet*")
    assert result.exit_code == 0, result.output
    names = _listed_names(result.output)
    assert names and all(n.startswith("resnet") for n in names)
    assert set(names) == {n for n, _ in ARCHS.items() if n.startswith("resnet")}
    assert "small_cnn" not in result.output


def test_datasets_lists_the_registered_datasets():
    result = invoke("datasets")
    assert result.exit_code == 0, result.output
    names = _listed_names(result.output)
    assert {"digits", "cifar10", "cifar100"} <= set(names)
    assert set(names) == {n for n, _ in DATASETS.items()}
    digits_line = next(line for line in result.output.splitlines() if line.startswith("digits"))
    assert "eps 0.2" in digits_line
    assert "8/255" in next(line for line in result.output.splitlines() if line.startswith("cifar10 "))


@pytest.mark.parametrize(
    ("option", "wrong", "right", "hint"),
    [("--arch", "resnt18", "resnet18", "bench models"), ("--dataset", "digts", "digits", "bench datasets")],
)
def test_a_misspelt_name_fails_with_a_suggestion(tmp_path, digits_cnn_checkpoint, option, wrong, right, hint):
    names = {"--arch": "resnet18", "--dataset": "digits"}
    names[option] = wrong
    result = _evaluate(tmp_path, digits_cnn_checkpoint, "--arch", names["--arch"], "--dataset", names["--dataset"])
    assert result.exit_code != 0
    assert f"did you mean '{right}'" in result.output
    assert f"({hint})" in result.output
    assert "Traceback" not in result.output


class _WritesMarker:
    """Unpickling it would create a file: proof that a checkpoint's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["nested", "bare"])
def test_a_checkpoint_with_pickled_code_is_refused_unexecuted(tmp_path, layout):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    payload = _WritesMarker(str(marker))
    obj = {"state_dict": {"w": torch.zeros(3)}, "extra": payload} if layout == "nested" else payload
    torch.save(obj, path)
    result = _evaluate(tmp_path, path, "--arch", "small_cnn", "--dataset", "digits")
    assert result.exit_code != 0
    assert "weights-only" in result.output
    assert "state_dict()" in result.output  # the fix: re-save just the weights
    assert not marker.exists()
    # The trick is real: a full unpickle does run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_with_a_renamed_key_names_the_missing_and_unexpected_keys(tmp_path, digits_cnn_checkpoint):
    sd = torch.load(digits_cnn_checkpoint, weights_only=True)
    key = next(k for k in sd if k.endswith("weight"))
    sd[key + "_renamed"] = sd.pop(key)
    path = tmp_path / "renamed.pt"
    torch.save(sd, path)
    result = _evaluate(tmp_path, path, "--arch", "small_cnn", "--dataset", "digits")
    assert result.exit_code != 0
    assert "missing" in result.output and "unexpected" in result.output
    assert key in result.output
    assert key + "_renamed" in result.output
    assert "bench models" in result.output


def test_checkpoint_without_arch_fails_clearly(tmp_path, digits_cnn_checkpoint):
    result = _evaluate(tmp_path, digits_cnn_checkpoint, "--dataset", "digits")
    assert result.exit_code != 0
    assert "--checkpoint needs --arch and --dataset" in result.output
    assert "Traceback" not in result.output


def test_a_missing_checkpoint_file_fails_clearly(tmp_path):
    result = _evaluate(tmp_path, tmp_path / "nope.pt", "--arch", "small_cnn", "--dataset", "digits")
    assert result.exit_code != 0
    assert "checkpoint not found" in result.output


def test_results_on_an_empty_store_says_so(tmp_path):
    # Read-only commands never create a store (tests/bench/store/test_backends.py): make an empty one first.
    assert invoke("db", "upgrade", "--db", f"sqlite:///{tmp_path / 'empty.db'}").exit_code == 0
    result = invoke("results", "--db", f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.exit_code == 0, result.output
    assert "no evaluations stored yet" in result.output
    csv_out = invoke("results", "--db", f"sqlite:///{tmp_path / 'empty.db'}", "--format", "csv")
    assert csv_out.exit_code == 0
    assert list(csv.reader(io.StringIO(csv_out.output))) == [RESULT_COLUMNS]


@pytest.fixture(scope="module")
def evaluated(digits_cnn_checkpoint, tmp_path_factory):
    """One small evaluation through the CLI, then the same command again, spelt with the old option names
    (``--version``, ``--format``); returns (db url, both results)."""
    db = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'results.db'}"
    args = ["evaluate", "--checkpoint", str(digits_cnn_checkpoint), *EVAL_ARGS, "--db", db]
    first = CliRunner().invoke(main, [*args, "--checkpoint-format", "plain"])
    old_spelling = [{"--aa-version": "--version"}.get(arg, arg) for arg in args]
    assert old_spelling != args
    second = CliRunner().invoke(main, [*old_spelling, "--format", "plain"])
    return db, first, second


def test_a_small_evaluation_prints_the_summary(evaluated):
    _, first, _ = evaluated
    assert first.exit_code == 0, first.output
    out = first.output
    assert "reusing" not in out
    assert "N=12" in out and "AutoAttack-standard" in out and "eps=0.3" in out
    for label in ("clean accuracy", "AutoAttack robust", "FMN robust at eps", "best-known robust"):
        assert re.search(rf"{label}\s+{PERCENT_WITH_INTERVAL}", out), (label, out)
    assert "on 12 samples" in out


def test_the_summary_matches_the_stored_rows(evaluated):
    db, first, _ = evaluated
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        n, clean = conn.execute("SELECT COUNT(*), SUM(clean_correct) FROM sample_results").fetchone()
        ids = [r[0] for r in conn.execute("SELECT sample_id FROM sample_results ORDER BY sample_id")]
    assert n == 12 and ids == list(range(12))
    shown = re.search(r"clean accuracy\s+(\d+\.\d\d)%", first.output).group(1)
    assert float(shown) == pytest.approx(100 * clean / 12, abs=0.006)


def test_running_it_again_reuses_the_stored_evaluation(evaluated):
    db, first, second = evaluated
    assert second.exit_code == 0, second.output
    assert "reusing" in second.output
    assert "stored run reused" in second.output
    summary = [line for line in first.output.splitlines() if "%" in line]
    assert summary == [line for line in second.output.splitlines() if "%" in line]
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 1
        assert conn.execute("SELECT COUNT(*) FROM sample_results").fetchone()[0] == 12


def _model_name(db: str) -> str:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT name FROM models").fetchone()[0]


def test_results_table_shows_the_model(evaluated):
    db, _, _ = evaluated
    result = invoke("results", "--db", db)
    assert result.exit_code == 0, result.output
    assert _model_name(db) in result.output
    assert "small_cnn" in result.output and "complete" in result.output


def test_results_csv_has_one_row_with_the_documented_columns(evaluated):
    db, _, _ = evaluated
    result = invoke("results", "--db", db, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 1
    assert list(rows[0]) == RESULT_COLUMNS
    row = rows[0]
    assert row["model"] == _model_name(db)
    described = {k: row[k] for k in ("arch", "dataset", "norm", "eps", "version", "n")}
    assert described == {
        "arch": "small_cnn",
        "dataset": "digits",
        "norm": "Linf",
        "eps": "0.3",
        "version": "standard",
        "n": "12",
    }
    assert row["status"] == "complete"
    df = pd.read_csv(io.StringIO(result.output))
    assert df.shape == (1, len(RESULT_COLUMNS))
    for col in FRACTION_COLUMNS:
        assert 0.0 <= df.loc[0, col] <= 1.0


def test_results_json_holds_fractions(evaluated):
    db, _, _ = evaluated
    result = invoke("results", "--db", db, "--format", "json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert len(records) == 1
    record = records[0]
    assert set(record) == set(RESULT_COLUMNS)
    assert record["n"] == 12 and record["model"] == _model_name(db)
    for col in FRACTION_COLUMNS:
        assert isinstance(record[col], float) and 0.0 <= record[col] <= 1.0, (col, record[col])
    assert record["best_known"] <= record["autoattack"] <= record["clean"]
    assert record["autoattack_low"] <= record["autoattack"] <= record["autoattack_high"]
    # A plain checkpoint records no pruning seed, so it has no replicates to summarise.
    assert record["seed"] is None and record["replicates"] is None and record["autoattack_seeds_mean"] is None
    assert record["best_known"] <= record["fmn"] <= record["clean"]
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        clean, best = conn.execute("SELECT AVG(clean_correct), AVG(best_robust) FROM sample_results").fetchone()
    assert record["clean"] == pytest.approx(clean)
    assert record["best_known"] == pytest.approx(best)


def test_bench_db_env_var_is_used_when_no_db_option(evaluated, monkeypatch, tmp_path):
    db, _, _ = evaluated
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_DB", db)
    result = invoke("results", "--format", "json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)) == 1
    assert not (tmp_path / "results.db").exists()


# Each measured case of a bad numeric option (issue: "--n-samples 0 evaluates all 360", "--batch-size 0 stores
# 180", "--workers 0 runs 1", "--eps 1e9 is accepted", "--n-samples 1000000000 leaves a store with a model row"),
# and the other ranges: (command line, the one error line).
RANGE_ERROR = "Error: Invalid value for '{}': {} is not in the range {}."
DIGITS_N = "Error: --n-samples must be between 1 and 360 (the digits test split); got {}"
LINF_EPS = (
    "Error: --eps must be in (0, 1] under Linf (inputs lie in [0, 1], so a larger budget allows any image); "
    "got {}: give the budget in [0, 1] units, e.g. 8/255"
)
REFUSED = [
    (["evaluate", "--n-samples", "0"], DIGITS_N.format(0)),
    (["evaluate", "--n-samples", "1000000000"], DIGITS_N.format(1000000000)),
    (["evaluate", "--n-samples", "361"], DIGITS_N.format(361)),
    (["evaluate", "--n-samples", "-3"], DIGITS_N.format(-3)),
    (["evaluate", "--batch-size", "0"], RANGE_ERROR.format("--batch-size", 0, "x>=1")),
    (["evaluate", "--workers", "0"], RANGE_ERROR.format("--workers", 0, "x>=1")),
    (["evaluate", "--threads", "0"], RANGE_ERROR.format("--threads", 0, "x>=1")),
    (["evaluate", "--fmn-steps", "0"], RANGE_ERROR.format("--fmn-steps", 0, "x>=1")),
    (["evaluate", "--eps", "1e9"], LINF_EPS.format("1e9")),
    # Without --checkpoint the track's dense model is evaluated: it is never trained only to be refused.
    (
        ["evaluate", "--checkpoint-format", "mad"],
        "Error: --checkpoint-format and --k describe a --checkpoint file; give one",
    ),
    (["evaluate", "--k", "0.1"], "Error: --checkpoint-format and --k describe a --checkpoint file; give one"),
    (["evaluate", "--eps", "256/255"], LINF_EPS.format("256/255")),
    (
        ["evaluate", "--norm", "L2", "--eps", "inf"],
        "Error: --eps: invalid eps 'inf': must be finite and > 0; expected a positive number or fraction such as "
        "'8/255', '0.031' or '0.5'",
    ),
    (
        ["evaluate", "--norm", "L2", "--eps", "0"],
        "Error: --eps: invalid eps '0': must be finite and > 0; expected a positive number or fraction such as "
        "'8/255', '0.031' or '0.5'",
    ),
    (["evaluate", "--method", "hydra", "--sparsity", "0"], RANGE_ERROR.format("--sparsity", 0.0, "0.0<x<1.0")),
    (["evaluate", "--method", "hydra", "--sparsity", "1"], RANGE_ERROR.format("--sparsity", 1.0, "0.0<x<1.0")),
    (["evaluate", "--method", "hydra", "--sparsity", "nan"], RANGE_ERROR.format("--sparsity", "nan", "0.0<x<1.0")),
    # CIFAR's split size comes from the registry: nothing is loaded or downloaded to refuse it.
    (
        ["evaluate", "--checkpoint", "r18.pt", "--arch", "resnet18", "--dataset", "cifar10", "--n-samples", "10001"],
        "Error: --n-samples must be between 1 and 10000 (the cifar10 test split); got 10001",
    ),
    # A zoo entry's dataset is known only from its manifest: the largest split bounds N before anything is fetched.
    (
        ["evaluate", "--model-id", "Any_Entry", "--n-samples", "0"],
        "Error: --n-samples must be between 1 and 10000 (the largest test split, cifar10's); got 0",
    ),
    (
        ["prune", "--method", "hydra", "--sparsity", "1.5", "--track", "digits"],
        RANGE_ERROR.format("--sparsity", 1.5, "0.0<x<1.0"),
    ),
    (
        ["prune", "--method", "hydra", "--sparsity", "0.9", "--track", "digits", "--threads", "0"],
        RANGE_ERROR.format("--threads", 0, "x>=1"),
    ),
    (["prune", "--method", "hydra", "--sparsity", "0.9", "--track", "digits", "--eps", "8"], LINF_EPS.format("8")),
]


@pytest.mark.parametrize(("args", "error"), REFUSED, ids=[" ".join(a[1:]) for a, _ in REFUSED])
def test_a_bad_numeric_option_is_refused_before_any_work(tmp_path, monkeypatch, args, error):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "data"))
    result = invoke(*args, "--db", str(tmp_path / "r.db"))
    assert result.exit_code in (1, 2), result.output  # 2: click's usage error
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [error] and result.output.rstrip().endswith(error)
    # No store, no trained dense model in the cache ($BENCH_CACHE_DIR), no data: nothing at all was written.
    assert list(tmp_path.iterdir()) == []


def test_the_registry_knows_the_test_split_sizes():
    from bench.data import get_dataset_info, load_split

    assert get_dataset_info("digits").test_size == len(load_split("digits", "test")[1]) == 360
    assert get_dataset_info("cifar10").test_size == get_dataset_info("cifar100").test_size == 10000


def test_evaluate_unranked_marks_the_model_and_a_later_run_keeps_it(evaluated, tmp_path):
    db, _, _ = evaluated
    copy = tmp_path / "copy.db"
    # SQLite's backup copies what still sits in the write-ahead log too; the module's store stays untouched.
    with sqlite3.connect(db.removeprefix("sqlite:///")) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    url = f"sqlite:///{copy}"
    name = _model_name(url)
    args = ["evaluate", "--checkpoint", str(_checkpoint_of(url)), *EVAL_ARGS, "--db", url]
    result = invoke(*args, "--unranked")
    assert result.exit_code == 0, result.output
    assert "stored run reused" in result.output  # the same evaluation: only the flag changed
    assert f"model {name} stored unranked: kept off the ranked tables (bench db rank {name} --on)" in result.output
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT ranked FROM models").fetchall() == [(0,)]
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "stored unranked" not in again.output
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT ranked FROM models").fetchall() == [(0,)]  # only bench db rank --on ranks it


def _checkpoint_of(db: str) -> str:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT checkpoint_path FROM models").fetchone()[0]


# --------------------------------------------------------------------------------------------------------
# Names, help and listings


def _all_commands(command: click.Command, path: tuple[str, ...] = ("bench",)):
    """Every command under ``command`` (the lazily imported ones too), with the words that reach it."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _all_commands(command.get_command(ctx, name), (*path, name))


def test_every_option_of_every_command_has_help_text():
    commands = dict(_all_commands(main))
    assert {("bench", "evaluate"), ("bench", "db", "rm"), ("bench", "leaderboard", "build")} <= set(commands)
    missing = [
        f"{' '.join(path)} {param.opts[0]}"
        for path, command in commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == []


def _parsed(*args: str) -> dict:
    evaluate = main.get_command(click.Context(main), "evaluate")
    return evaluate.make_context("evaluate", list(args)).params


def test_evaluate_takes_the_old_spellings_of_the_renamed_options_as_hidden_aliases():
    assert _parsed("--checkpoint-format", "mad")["ckpt_format"] == _parsed("--format", "mad")["ckpt_format"] == "mad"
    assert _parsed("--aa-version", "standard")["aa_version"] == _parsed("--version", "standard")["aa_version"]
    assert _parsed()["aa_version"] == "plus" and _parsed()["ckpt_format"] == "plain"
    shown = invoke("evaluate", "--help")
    assert shown.exit_code == 0, shown.output
    assert "--checkpoint-format" in shown.output and "--aa-version" in shown.output
    # The old names parse, but neither help nor errors offer them: --format and --version mean output format and
    # the program's version everywhere else.
    assert not re.search(r"(?<![\w-])--(format|version)\b", shown.output), shown.output
    for spelling in ("--aa-version", "--version"):
        refused = invoke("evaluate", spelling, "strong")
        assert refused.exit_code == 2 and "Invalid value for '--aa-version': 'strong' is not one of" in refused.output
    # At the top, --version is still the program's.
    program = invoke("--version")
    assert program.exit_code == 0 and program.output.rstrip().endswith(f"version {package_version('apbench')}")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["models", "resnt18"], "Error: unknown architecture 'resnt18'; did you mean 'resnet18'? (bench models)"),
        (["models", "nomatch"], "Error: unknown architecture 'nomatch'; known: "),
        (["models", "zz*"], "Error: no architecture matches 'zz*'; known: "),
        (["methods", "hydar"], "Error: unknown method 'hydar'; did you mean 'hydra'? (bench methods)"),
        (["methods", "q*"], "Error: no method matches 'q*'; known: "),
    ],
)
def test_a_listing_pattern_that_matches_nothing_says_so_and_fails(args, says):
    result = invoke(*args)
    assert result.exit_code == 1 and result.output.startswith(says), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_methods_lists_one_method_by_name():
    result = invoke("methods", "hydra")
    assert result.exit_code == 0, result.output
    assert _listed_names(result.output)[0] == "hydra" and "HYDRA" in result.output


def test_bench_help_loads_no_torch():
    code = (
        "import sys\n"
        "from bench.cli import main\n"
        "try:\n"
        "    main(['--help'], prog_name='bench')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = sorted(m for m in ('torch', 'pandas', 'sqlalchemy', 'pydantic') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "evaluate" in done.stdout and "leaderboard" in done.stdout
    assert "HEAVY []" in done.stdout, done.stdout


def test_a_missing_checkpoint_is_reported_before_a_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no-data").mkdir()
    args = ["--checkpoint", "missing.pt", "--arch", "resnet18", "--dataset", "cifar10", "--data-dir", "no-data"]
    result = invoke("evaluate", *args, "--db", "sqlite:///r.db")
    assert result.exit_code == 1 and result.output.strip() == "Error: checkpoint not found: missing.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-data"]  # no store, nothing downloaded
