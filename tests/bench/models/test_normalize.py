"""Input normalisation is explicit: ``bench evaluate --normalization``, and a model is its bytes *and* its
normalisation.

The independent reference is a real CIFAR-10 ResNet-18 trained on raw [0, 1] inputs that the AutoAttack authors
ship in their package (pyautoattack ``examples/model_test.pt``, with the network's code in ``examples/resnet.py``):
read through our plain path with ``--normalization none`` it must give that code's logits.
"""

from __future__ import annotations

import csv
import importlib.resources
import importlib.util
import io
import sqlite3
from pathlib import Path

import pytest
import torch
from alembic import command
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, select

import bench.cli.config as cli_config
import bench.cli.evaluate as cli_evaluate
from bench.checkpoints import load_checkpoint_model, sha256_file
from bench.cli import main
from bench.data import get_dataset_info
from bench.models import build_model
from bench.models.normalize import describe_normalization, normalization_key, parse_normalization
from bench.provenance import utcnow
from bench.store import Evaluation, Model, SampleResult, Store
from bench.store.db import alembic_config
from bench.store.registration import load_stored_model, register_model

torch.set_num_threads(1)

CIFAR10 = get_dataset_info("cifar10")
CIFAR10_TEXT = "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616"
RAW_KEY = "0.0,0.0,0.0/1.0,1.0,1.0"


@pytest.fixture(scope="module")
def examples():
    """pyautoattack's examples folder, wherever the package is installed."""
    with importlib.resources.as_file(importlib.resources.files("pyautoattack") / "examples") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def model_test(examples) -> Path:
    path = examples / "model_test.pt"
    assert path.is_file(), f"pyautoattack no longer ships {path}"
    return path


@pytest.fixture(scope="module")
def upstream(examples, model_test):
    """The authors' own ResNet-18 (examples/resnet.py), its weights loaded by torch alone."""
    spec = importlib.util.spec_from_file_location("pyautoattack_examples_resnet", examples / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.ResNet18()
    net.load_state_dict(torch.load(model_test, map_location="cpu", weights_only=True))
    return net.eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_model_test_pt_matches_the_authors_code_only_without_normalisation(model_test, upstream, inputs):
    reference = _logits(upstream, inputs)
    raw = load_checkpoint_model(model_test, "resnet18", "cifar10", normalization=parse_normalization("none", "cifar10"))
    torch.testing.assert_close(_logits(raw, inputs), reference, atol=1e-5, rtol=0)
    # The dataset's mean/std in front (the default for a plain file) is another function: the option matters.
    standardised = load_checkpoint_model(model_test, "resnet18", "cifar10")
    gap = (_logits(standardised, inputs) - reference).abs().max().item()
    assert gap > 1.0, gap
    assert (_logits(standardised, inputs).argmax(1) != reference.argmax(1)).any()


class _Captured:
    """Stands in for the evaluation: keeps the model and row that `bench evaluate` would attack."""

    def __init__(self):
        self.calls = []

    def __call__(self, store, row, model, **_):
        self.calls.append((row, model))


@pytest.fixture
def evaluate_cli(monkeypatch, tmp_path):
    """``bench evaluate`` as typed, up to the attack: the CIFAR-10 test split is not needed to load a model."""
    captured = _Captured()
    monkeypatch.setattr(cli_config, "run_spec", lambda dataset, **_: (None, None, None))
    monkeypatch.setattr(cli_evaluate, "evaluate_row", captured)
    db = f"sqlite:///{tmp_path / 'r.db'}"

    def run(*args: str):
        result = CliRunner().invoke(main, ["evaluate", *args, "--db", db, "--no-progress"])
        assert result.exit_code == 0, result.output
        return captured.calls[-1]

    return run, db


def _stored_evaluation(db: str, model_id: int) -> None:
    spec = {"norm": "Linf", "eps": 8 / 255, "version": "plus", "protocol": "test"}
    store = Store(db)
    try:
        with store.session() as s:
            s.add(
                Evaluation(
                    model_id=model_id,
                    spec_hash=f"s{model_id}",
                    protocol_hash="p",
                    spec=spec,
                    status="complete",
                    n_samples=1,
                    clean_accuracy=1.0,
                    aa_robust_accuracy=0.0,
                    started_at=utcnow(),
                )
            )
    finally:
        store.dispose()


def test_bench_evaluate_normalization_none_loads_model_test_pt_as_its_authors_run_it(
    evaluate_cli, model_test, upstream, inputs
):
    run, db = evaluate_cli
    args = ["--checkpoint", str(model_test), "--arch", "resnet18", "--dataset", "cifar10"]
    raw_row, raw_model = run(*args, "--normalization", "none")
    torch.testing.assert_close(_logits(raw_model, inputs), _logits(upstream, inputs), atol=1e-5, rtol=0)
    assert raw_row.normalization == RAW_KEY
    assert raw_row.provenance["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert raw_row.name.endswith("-raw")

    # The same bytes behind the dataset's mean/std are another model, with evaluations of its own.
    default_row, default_model = run(*args)
    assert default_row.id != raw_row.id and default_row.checkpoint_sha256 == raw_row.checkpoint_sha256
    assert default_row.normalization == "dataset"
    assert default_row.provenance["normalization"] == {"mean": list(CIFAR10.mean), "std": list(CIFAR10.std)}
    assert not torch.allclose(_logits(default_model, inputs), _logits(upstream, inputs), atol=1e-3)
    # ... and the same normalisation, however it is spelled, is the same model.
    assert run(*args, "--normalization", CIFAR10_TEXT)[0].id == default_row.id
    assert run(*args, "--normalization", "dataset")[0].id == default_row.id
    assert run(*args, "--normalization", "0,0,0/1,1,1")[0].id == raw_row.id
    store = Store(db)
    try:
        with store.session() as s:
            assert len(s.scalars(select(Model)).all()) == 2
            # Rebuilt from the store (what resuming and the analyses do): the recorded normalisation comes back.
            rebuilt = load_stored_model(s.get(Model, raw_row.id))
        torch.testing.assert_close(_logits(rebuilt, inputs), _logits(upstream, inputs), atol=1e-5, rtol=0)
    finally:
        store.dispose()

    _stored_evaluation(db, raw_row.id)
    _stored_evaluation(db, default_row.id)
    listed = CliRunner().invoke(main, ["results", "--format", "csv", "--db", db])
    assert listed.exit_code == 0, listed.output
    assert [r["inputs"] for r in csv.DictReader(io.StringIO(listed.output))] == ["none", "dataset"]
    table = CliRunner().invoke(main, ["results", "--db", db])
    assert table.exit_code == 0 and "inputs" in table.output.splitlines()[0], table.output

    report = CliRunner().invoke(main, ["report", str(raw_row.id), "--db", db])
    assert report.exit_code == 0, report.output
    assert "inputs        normalisation none (raw [0, 1] inputs)" in report.output
    plain = CliRunner().invoke(main, ["report", str(default_row.id), "--db", db])
    assert plain.exit_code == 0 and "inputs " not in plain.output


def test_a_format_keeps_its_authors_normalisation_unless_told(evaluate_cli, model_test, upstream, inputs):
    # model_test.pt is kuangliu's ResNet-18 (HYDRA's resnet18); HYDRA feeds raw [0, 1] images on CIFAR-10.
    run, _ = evaluate_cli
    args = ["--checkpoint", str(model_test), "--arch", "resnet18", "--dataset", "cifar10", "--format", "hydra-dense"]
    authors_row, authors_model = run(*args)
    torch.testing.assert_close(_logits(authors_model, inputs), _logits(upstream, inputs), atol=1e-5, rtol=0)
    assert authors_row.normalization == RAW_KEY and authors_row.provenance["native_format"] == "hydra-dense"
    told_row, told_model = run(*args, "--normalization", "dataset")
    assert told_row.id != authors_row.id and told_row.normalization == "dataset"
    assert told_row.provenance["normalization"] == {"mean": list(CIFAR10.mean), "std": list(CIFAR10.std)}
    assert told_model.normalize.std.flatten().tolist() == pytest.approx(CIFAR10.std)


def test_parse_normalization_forms():
    assert parse_normalization("none", "cifar10") == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert parse_normalization("Dataset", "cifar10") == {"mean": list(CIFAR10.mean), "std": list(CIFAR10.std)}
    assert parse_normalization(" 0.5 /0.25", "digits") == {"mean": [0.5], "std": [0.25]}
    assert parse_normalization("none", "digits") == {"mean": [0.0], "std": [1.0]}
    assert normalization_key("cifar10", parse_normalization(CIFAR10_TEXT, "cifar10")) == "dataset"
    assert normalization_key("cifar10", None) == "dataset"
    # float32 is what the layer holds: a spelling that rounds to the same float32 is the same layer.
    assert normalization_key("digits", {"mean": [0.30540000000000001], "std": [0.3761]}) == "dataset"
    assert normalization_key("digits", {"mean": [-0.0], "std": [2]}) == "0.0/2.0"
    assert describe_normalization("dataset") is None
    assert describe_normalization(RAW_KEY) == "none (raw [0, 1] inputs)"
    assert describe_normalization("0.5/0.25") == "mean/std 0.5/0.25"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0.5/0.5", "3 channels"),
        ("0,0,0,0/1,1,1,1", "3 channels"),
        ("0,0,0/1,0,1", "not positive"),
        ("0,0,0/1,-2,1", "not positive"),
        ("0,0,0/1,1e-50,1", "not positive"),
        ("nan,0,0/1,1,1", "finite"),
        ("0,0,0/inf,1,1", "finite"),
        ("0,0,0/1e39,1,1", "finite"),
        ("a,b,c/1,1,1", "comma-separated numbers"),
        ("0,0,0", "dataset, none or MEAN/STD"),
        ("raw", "dataset, none or MEAN/STD"),
        ("0/0/0", "dataset, none or MEAN/STD"),
    ],
)
def test_a_bad_normalization_is_one_clear_line_before_anything_is_stored(tmp_path, model_test, value, says):
    db = tmp_path / "r.db"
    args = ["--checkpoint", str(model_test), "--arch", "resnet18", "--dataset", "cifar10", "--db", f"sqlite:///{db}"]
    result = CliRunner().invoke(main, ["evaluate", *args, "--normalization", value])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --normalization") and says in lines[0], result.output
    assert not db.exists()


def test_normalization_needs_a_checkpoint_file(tmp_path):
    db = ["--db", f"sqlite:///{tmp_path / 'r.db'}"]
    track = CliRunner().invoke(main, ["evaluate", "--normalization", "none", *db])
    assert track.exit_code == 1 and "--normalization describes a --checkpoint file" in track.output
    zoo = CliRunner().invoke(main, ["evaluate", "--model-id", "ANY", "--normalization", "none", *db])
    assert zoo.exit_code == 1 and "drop --checkpoint/--checkpoint-format/--k/--normalization/--name" in zoo.output


def test_a_row_cannot_claim_another_normalisation_than_its_model_applies(tmp_path):
    model = build_model("small_cnn", "digits")
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        with pytest.raises(ValueError, match="normalisation layer has mean"):
            register_model(
                store,
                path,
                model,
                arch="small_cnn",
                dataset="digits",
                provenance={"normalization": parse_normalization("none", "digits")},
            )
    finally:
        store.dispose()


# --------------------------------------------------------------------------------------------------------
# The migration: a store written before models were keyed on (sha256, normalisation) is upgraded in place.

_MODEL_COLUMNS = (
    "name, checkpoint_sha256, checkpoint_path, method, arch, dataset, structure, measured_sparsity, layer_sparsity, "
    "params, nonzero_params, flops, nonzero_flops, source, reported, taxonomy, provenance, created_at"
)


def _old_model(conn, name: str, sha: str, dataset: str, provenance: str, path: str = "") -> int:
    conn.execute(
        f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, 'dense', 'small_cnn', ?, 'dense', 0.0, '{{}}', "
        "0, 0, 0, 0, 'local', '{}', '{}', ?, '2026-01-01 00:00:00')",
        (name, sha, path, dataset, provenance),
    )
    return conn.execute("SELECT id FROM models WHERE name = ?", (name,)).fetchone()[0]


def _old_evaluation(conn, model_id: int) -> None:
    conn.execute(
        "INSERT INTO evaluations (model_id, spec_hash, protocol_hash, spec, status, n_samples, clean_accuracy, flags, "
        "unreliable, attack_seconds, provenance, started_at) VALUES (?, ?, 'p', '{}', 'complete', 1, 1.0, '[]', 0, "
        "'{}', '{}', '2026-01-01 00:00:00')",
        (model_id, f"spec-{model_id}"),
    )
    evaluation_id = conn.execute("SELECT max(id) FROM evaluations").fetchone()[0]
    conn.execute(
        "INSERT INTO sample_results (evaluation_id, sample_id, label, clean_pred, clean_correct, logit_margin, "
        "aa_robust, adv_pred, fmn_label, fmn_success, fmn_adv_pred, best_robust) "
        "VALUES (?, 0, 1, 1, 1, 0.5, 1, 1, 1, 0, 1, 1)",
        (evaluation_id,),
    )


def test_the_migration_keys_an_existing_store_on_bytes_and_normalisation(tmp_path):
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    first = "0001"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, first)  # the schema as stores were first written
    finally:
        engine.dispose()
    digits = get_dataset_info("digits")
    model = build_model("small_cnn", "digits")
    checkpoint = tmp_path / "dense.pt"
    torch.save(model.state_dict(), checkpoint)
    sha = sha256_file(checkpoint)
    with sqlite3.connect(path) as conn:
        plain = _old_model(conn, "plain", sha, "digits", "{}", str(checkpoint))
        raw = _old_model(
            conn,
            "hydra",
            "b" * 64,
            "cifar10",
            '{"native_format": "hydra-dense", "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}',
        )
        # A converter that kept the dataset's own constants (MAD on digits) is the dataset's normalisation.
        same = _old_model(
            conn, "mad", "c" * 64, "digits",
            f'{{"native_format": "mad", "normalization": {{"mean": [{digits.mean[0]}], "std": [{digits.std[0]}]}}}}',
        )  # fmt: skip
        for model_id in (plain, raw, same):
            _old_evaluation(conn, model_id)

    store = Store(url)  # migrates to head, on the store's own connection (foreign keys on)
    try:
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head
        with store.session() as s:
            keys = {m.name: m.normalization for m in s.scalars(select(Model))}
            assert keys == {"plain": "dataset", "hydra": RAW_KEY, "mad": "dataset"}
            # Nothing was lost: every evaluation and its samples are still there.
            assert len(s.scalars(select(Evaluation)).all()) == 3
            assert len(s.scalars(select(SampleResult)).all()) == 3
        indexes = {ix["name"]: ix for ix in inspect(store.engine).get_indexes("models")}
        assert "ix_models_checkpoint_sha256" not in indexes
        assert indexes["uq_models_checkpoint_normalization"]["unique"]
        assert indexes["uq_models_checkpoint_normalization"]["column_names"] == ["checkpoint_sha256", "normalization"]

        # The old model is found again by its bytes and the dataset's normalisation; its evaluation still counts.
        again = register_model(store, checkpoint, model, arch="small_cnn", dataset="digits")
        assert again.id == plain
        assert load_stored_model(again).normalize.mean.flatten().tolist() == pytest.approx(digits.mean)
        # Behind another normalisation the same bytes are a new model.
        raw_model = build_model("small_cnn", "digits", parse_normalization("none", "digits"))
        raw_model.load_state_dict(model.state_dict())
        other = register_model(
            store, checkpoint, raw_model, arch="small_cnn", dataset="digits",
            provenance={"normalization": parse_normalization("none", "digits")},
        )  # fmt: skip
        assert other.id not in (plain, raw, same) and other.normalization == "0.0/1.0"
        with store.session() as s:
            assert [e.model_id for e in s.scalars(select(Evaluation).order_by(Evaluation.id))] == [plain, raw, same]
    finally:
        store.dispose()


def test_the_migration_downgrades_a_store_without_duplicates(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    with store.session() as s:
        model = Model(name="m", checkpoint_sha256="a" * 64, arch="small_cnn", dataset="digits", created_at=utcnow())
        s.add(model)
        s.flush()
        s.add(
            Evaluation(model_id=model.id, spec_hash="s", protocol_hash="p", spec={}, n_samples=1, started_at=utcnow())
        )
    store.dispose()
    script = ScriptDirectory.from_config(alembic_config(url))
    previous = script.get_revision("0003_model_identity").down_revision
    command.downgrade(alembic_config(url), previous)
    engine = create_engine(url)
    try:
        assert "normalization" not in {c["name"] for c in inspect(engine).get_columns("models")}
        indexes = {ix["name"]: ix for ix in inspect(engine).get_indexes("models")}
        assert indexes["ix_models_checkpoint_sha256"]["unique"]
        with engine.connect() as conn:  # the table was rebuilt without the column; its evaluation is still there
            assert conn.exec_driver_sql("SELECT count(*) FROM evaluations").scalar() == 1
    finally:
        engine.dispose()
