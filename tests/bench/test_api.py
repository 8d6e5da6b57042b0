"""The public Python API (bench/api.py, the apbench package): the README's example run as written and checked
against `bench evaluate` on the same weights and spec, in-memory identity, load_results against `bench results`,
the command line's spec defaults, refusals."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import select
from torch import nn

import apbench
import bench.api
from bench.analysis.records import CSV_COLUMNS, load_records
from bench.api import infer_arch, state_dict_sha256
from bench.cli import main
from bench.models import build_model, unwrap
from bench.spec import RunSpec
from bench.store import Evaluation, Model, Store
from tests.paths import REPO_ROOT

# Cheap evaluations: the standard AutoAttack on 12 digits in chunks of 4, short FMN.
CHEAP = dict(n_samples=12, batch_size=4, version="standard", fmn_steps=10)


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- api-example -->\s*```python\n(.*?)```\s*<!-- /api-example -->", text, re.S)
    assert found, "README.md has no ```python block between <!-- api-example --> and <!-- /api-example -->"
    return found.group(1)


def samples_of(db: str, evaluation_id: int) -> pd.DataFrame:
    store = Store(db, read_only=True)
    try:
        with store.session() as s:
            records = load_records(s, evaluation_id)
    finally:
        store.dispose()
    return pd.DataFrame({c: getattr(records, c) for c in CSV_COLUMNS if getattr(records, c) is not None})


class PlainNet(nn.Module):
    """A module of no registered architecture, with no normalisation layer: it sees raw [0, 1] digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def plain_net(seed: int = 0) -> PlainNet:
    torch.manual_seed(seed)
    return PlainNet().eval()


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One cheap in-memory evaluation of a plain module: (db URL, model, result)."""
    db = f"sqlite:///{tmp_path_factory.mktemp('api') / 'api.db'}"
    model = plain_net()
    return db, model, apbench.evaluate(model, dataset="digits", db=db, **CHEAP)


# --- The README's example -----------------------------------------------------------------------------------------


def test_the_readme_example_runs_and_gives_the_rows_bench_evaluate_gives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example's sqlite:///api.db lands here
    # The example's fresh weights, drawn from a seeded generator: a draw that classifies some samples right, so
    # that the attacks run on them (an untrained model's AutoAttack rows are otherwise trivially alike).
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md <!-- api-example -->", "exec"), namespace)
    result, model = namespace["result"], namespace["model"]
    assert isinstance(result, apbench.EvaluationResult)
    assert result.samples.clean_correct.sum() >= 3, "this draw leaves too few samples for the attacks to compare"
    assert list(result.samples.columns) == list(CSV_COLUMNS)
    assert list(result.samples.sample_id) == list(range(result.spec.n_samples))
    assert str(result).startswith(f"evaluation #{result.evaluation_id} of {result.model_name}: digits")

    # The same weights as a checkpoint file, through the command line, with the options the example gives.
    torch.save(model.state_dict(), tmp_path / "model.pt")
    args = ["evaluate", "--checkpoint", "model.pt", "--arch", "small_cnn", "--dataset", "digits", "--n-samples"]
    out = CliRunner().invoke(main, [*args, "40", "--db", "sqlite:///api.db", "--workers", "1", "--no-progress"])
    assert out.exit_code == 0, out.output

    store = Store("sqlite:///api.db", read_only=True)
    try:
        with store.session() as s:
            evaluations = s.scalars(select(Evaluation).order_by(Evaluation.id)).all()
            assert [ev.id for ev in evaluations][0] == result.evaluation_id and len(evaluations) == 2
            ours, cli = evaluations
            # The same key: the Python defaults are the command line's.
            assert ours.spec_hash == cli.spec_hash == result.spec.hash
            assert ours.spec == cli.spec
            # Two model rows: the file's sha256 is not the state dict's, and only the file has a path.
            assert ours.model.checkpoint_sha256 == state_dict_sha256(model) and ours.model.checkpoint_path is None
            assert cli.model.checkpoint_path == str(tmp_path / "model.pt")
            assert (ours.model.arch, ours.model.normalization, ours.model.source) == ("small_cnn", "dataset", "python")
            assert ours.model.measured_sparsity == cli.model.measured_sparsity
            cli_id = cli.id
            for attr in ("clean_accuracy", "aa_robust_accuracy", "fmn_robust_accuracy", "best_robust_accuracy"):
                assert getattr(ours, attr) == getattr(cli, attr), attr
    finally:
        store.dispose()
    pd.testing.assert_frame_equal(result.samples, samples_of("sqlite:///api.db", cli_id), check_exact=True)


def test_the_spec_key_from_python_equals_the_command_lines():
    from bench.cli.config import run_spec

    cli_defaults = dict(
        n_samples=None,
        eps=None,
        norm="Linf",
        aa_version="plus",
        fmn_steps=100,
        batch_size=None,
        seed=0,
        device="cpu",
        data_dir=None,
    )
    cases = [
        ({}, {}),
        ({"n_samples": 40}, {"n_samples": 40}),
        ({"eps": "0.3", "norm": "L2", "aa_version": "standard"}, {"eps": 0.3, "norm": "L2", "version": "standard"}),
        ({"batch_size": 7, "seed": 3, "fmn_steps": 20}, {"batch_size": 7, "seed": 3, "fmn_steps": 20}),
    ]
    for cli_options, api_options in cases:
        spec, _, y = run_spec("digits", **{**cli_defaults, **cli_options})
        assert RunSpec.for_dataset("digits", **api_options).hash == spec.hash
        assert spec.n_samples <= len(y)
    # The API's own default batch size is the dataset's, not the dataclass's 250.
    assert RunSpec.for_dataset("digits").batch_size == 180


# --- In-memory identity -------------------------------------------------------------------------------------------


def test_state_dict_sha256_is_the_documented_serialisation():
    model = nn.Module()
    model.register_buffer("w", torch.tensor([1.0, 2.0]))
    model.register_buffer("a", torch.tensor([[3]], dtype=torch.int64))
    expected = hashlib.sha256()
    expected.update(b'{"dtype":"int64","key":"a","shape":[1,1]}\n' + struct.pack("<q", 3))
    expected.update(b'{"dtype":"float32","key":"w","shape":[2]}\n' + struct.pack("<2f", 1.0, 2.0))
    assert state_dict_sha256(model) == expected.hexdigest()


class AB(nn.Module):
    def __init__(self, first: str) -> None:
        super().__init__()
        for name in (first, "b" if first == "a" else "a"):
            self.add_module(name, nn.Linear(2, 2))


def test_in_memory_identity_is_stable_and_changes_when_a_weight_does():
    model = build_model("small_cnn", "digits")
    sha = state_dict_sha256(model)
    assert len(sha) == 64 and sha == state_dict_sha256(model)
    assert state_dict_sha256(type(model)(model.normalize, model.net)) == sha
    # Another process, same weights (seeded): the same identity.
    code = (
        "import torch\nfrom bench.api import state_dict_sha256\nfrom bench.models import build_model\n"
        "torch.manual_seed(0)\nprint(state_dict_sha256(build_model('small_cnn', 'digits')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    torch.manual_seed(0)
    assert out.stdout.strip() == state_dict_sha256(build_model("small_cnn", "digits"))
    # requires_grad and training mode are not weights.
    for p in model.parameters():
        p.requires_grad_(False)
    assert state_dict_sha256(model.train()) == sha
    # One weight, one float32 step: another model.
    first = next(iter(model.parameters()))
    with torch.no_grad():
        first.view(-1)[0] = torch.nextafter(first.view(-1)[0], torch.tensor(1.0))
    assert state_dict_sha256(model) != sha
    # A BatchNorm statistic counts too.
    net = plain_net()
    before = state_dict_sha256(net)
    net.bn.running_mean[0] += 1
    assert state_dict_sha256(net) != before
    # The order the submodules were registered in does not.
    torch.manual_seed(1)
    ab = AB("a")
    ba = AB("b")
    ba.load_state_dict(ab.state_dict())
    assert list(ab.state_dict()) != list(ba.state_dict())
    assert state_dict_sha256(ab) == state_dict_sha256(ba)
    assert state_dict_sha256(ab.double()) != state_dict_sha256(ba)


def test_a_state_dict_entry_that_is_no_dense_tensor_is_refused():
    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    with pytest.raises(ValueError, match=r"state dict entry '_extra_state' is not a dense tensor .* checkpoint"):
        state_dict_sha256(Extra(2, 2))


def test_the_same_weights_reuse_the_stored_evaluation(stored):
    db, model, result = stored
    again = apbench.evaluate(plain_net(), dataset="digits", db=db, **CHEAP)
    assert again.summary.reused and again.evaluation_id == result.evaluation_id
    pd.testing.assert_frame_equal(again.samples, result.samples, check_exact=True)
    store = Store(db, read_only=True)
    try:
        with store.session() as s:
            row = s.scalars(select(Model).where(Model.name == result.model_name)).one()
            # A module without a normalisation layer takes raw inputs; its label is its class.
            assert (row.arch, row.normalization, row.checkpoint_path) == ("PlainNet", "0.0/1.0", None)
            assert row.provenance["identity"] == "state_dict_sha256"
            assert row.checkpoint_sha256 == state_dict_sha256(model)
    finally:
        store.dispose()


def test_an_in_memory_model_evaluates_in_worker_processes(stored, tmp_path):
    db, model, result = stored
    other = apbench.evaluate(model, dataset="digits", db=f"sqlite:///{tmp_path / 'w.db'}", workers=2, **CHEAP)
    assert not other.summary.reused and other.spec == result.spec
    pd.testing.assert_frame_equal(other.samples, result.samples, check_exact=True)


def test_the_model_given_is_left_as_it_was(stored):
    _, model, _ = stored
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert state_dict_sha256(model) == state_dict_sha256(plain_net())


# --- load_results -------------------------------------------------------------------------------------------------


def test_load_results_is_what_bench_results_lists(stored):
    db, _, result = stored
    frame = apbench.load_results(db)
    out = CliRunner().invoke(main, ["results", "--format", "json", "--db", db])
    assert out.exit_code == 0, out.output
    assert json.loads(frame.to_json(orient="records")) == json.loads(out.output)
    assert list(frame.evaluation) == [result.evaluation_id]
    assert frame.loc[0, "autoattack"] == result.summary.aa_robust_accuracy
    assert list(apbench.load_results(db, model=result.model_name).evaluation) == [result.evaluation_id]
    assert len(apbench.load_results(db, model="Plain*")) == 1
    with pytest.raises(ValueError, match=r"no evaluation of a model 'nomatch'"):
        apbench.load_results(db, model="nomatch")


# --- What a model is, and refusals --------------------------------------------------------------------------------


def test_the_architecture_is_found_by_its_state_dict():
    model = build_model("small_cnn", "digits")
    assert infer_arch(model, "digits") == "small_cnn"
    assert infer_arch(unwrap(model), "digits") == "small_cnn"
    assert infer_arch(plain_net(), "digits") is None


def test_a_model_with_the_wrong_outputs_is_refused_before_any_store(tmp_path):
    db = tmp_path / "x.db"
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"returns \(2, 3\) for 2 digits images, .* logits of shape \(2, 10\)"):
        apbench.evaluate(wrong, dataset="digits", db=str(db), **CHEAP)
    with pytest.raises(ValueError, match=r"fails on digits inputs of shape \(2, 1, 8, 8\)"):
        apbench.evaluate(nn.Linear(3, 10), dataset="digits", db=str(db), **CHEAP)
    assert not db.exists()


@pytest.mark.parametrize(
    ("model", "kw", "pattern"),
    [
        ("m.pt", {}, r"checkpoint m.pt needs arch="),
        ("m.pt", {"arch": "small_cn"}, r"did you mean 'small_cnn'"),
        (None, {"normalization": "none"}, r"normalization= describes a checkpoint file"),
        (None, {"eps": "8"}, r"eps must be in \(0, 1\] under Linf"),
        (None, {"n_samples": 1000}, r"n_samples must be between 1 and 360"),
        (None, {"device": "gpu"}, r"invalid device 'gpu'"),
        (None, {"workers": 0}, r"workers must be an int of at least 1"),
        (3, {}, r"model must be an nn.Module, a checkpoint path or what apbench.prune returns; got int"),
    ],
)
def test_bad_options_are_refused_with_the_fix(tmp_path, model, kw, pattern):
    db = tmp_path / "x.db"
    with pytest.raises(Exception, match=pattern):
        apbench.evaluate(plain_net() if model is None else model, dataset="digits", db=str(db), **kw)
    assert not db.exists()


def test_a_name_another_model_holds_is_refused(stored):
    db, _, result = stored
    with pytest.raises(ValueError, match=rf"name '{result.model_name}' is already model #\d+, a different model"):
        apbench.evaluate(plain_net(seed=1), dataset="digits", db=db, name=result.model_name, **CHEAP)


def test_a_notebook_class_is_refused_for_worker_processes(monkeypatch):
    notebook = types.ModuleType("__main__")  # an interactive __main__ has no __file__
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    local = type("NotebookNet", (PlainNet,), {"__module__": "__main__"})
    with pytest.raises(ValueError, match=r"cannot import NotebookNet \(defined in this interactive session\)"):
        apbench.evaluate(local(), dataset="digits", workers=2, db="sqlite:///never.db", **CHEAP)


def test_the_package_exports_the_api():
    assert apbench.evaluate is bench.api.evaluate and apbench.RunSpec is RunSpec
    assert {"evaluate", "prune", "load_results", "RunSpec"} <= set(apbench.__all__)
    # Installed (pip install -e .), it imports from anywhere, not only from the repository root.
    out = subprocess.run(
        [sys.executable, "-c", "import apbench; print(apbench.evaluate.__module__)"],
        capture_output=True,
        text=True,
        cwd=Path(sys.prefix),
    )
    assert out.returncode == 0 and out.stdout.strip() == "bench.api", out.stderr


# --- prune --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prune_an_in_memory_model_and_evaluate_the_child(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    db = f"sqlite:///{tmp_path / 'p.db'}"
    torch.manual_seed(0)
    dense = build_model("small_cnn", "digits")
    pruned = apbench.prune(
        dense, "hydra", 0.9, schedule="digits-track", db=db, prune_epochs=1, finetune_epochs=1, pgd_steps=1
    )
    assert isinstance(pruned.model, nn.Module) and pruned.arch == "small_cnn"
    assert pruned.sparsity == pytest.approx(0.9, abs=0.01)
    assert pruned.name.startswith("HYDRA_") and pruned.checkpoint.is_file()
    parent = apbench.evaluate(dense, db=db, **CHEAP)
    child = apbench.evaluate(pruned, db=db, **CHEAP)
    assert child.model_name == pruned.name
    store = Store(db, read_only=True)
    try:
        with store.session() as s:
            rows = {m.name: m for m in s.scalars(select(Model))}
            assert len(rows) == 2  # the dense model's row is the one evaluate(dense) uses
            assert rows[pruned.name].parent_id == rows[parent.model_name].id
            assert rows[parent.model_name].checkpoint_sha256 == state_dict_sha256(dense)
    finally:
        store.dispose()
    # The same pruning again reuses the cached checkpoint and the stored rows.
    again = apbench.prune(
        dense, "hydra", 0.9, schedule="digits-track", db=db, prune_epochs=1, finetune_epochs=1, pgd_steps=1
    )
    assert again.name == pruned.name and again.checkpoint == pruned.checkpoint
