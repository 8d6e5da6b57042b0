"""bench prune and bench evaluate --method: dense → adapter → pruned checkpoint in the store with its parent."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import bench.track as track_module
from bench.cli import main

TINY_HYDRA = [
    "--set",
    "prune_epochs=1",
    "--set",
    "finetune_epochs=1",
    "--set",
    "pgd_steps=1",
    "--set",
    "batch_size=256",
]


def _invoke(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_prune_registers_the_child_with_its_parent_and_reuses_it(tmp_path, digits_cnn_checkpoint):
    db = tmp_path / "r.db"
    args = [
        "prune",
        "--method",
        "hydra",
        "--sparsity",
        "0.9",
        "--dense",
        str(digits_cnn_checkpoint),
        "--arch",
        "small_cnn",
        "--dataset",
        "digits",
        "--db",
        f"sqlite:///{db}",
        "--out",
        str(tmp_path / "out"),
        *TINY_HYDRA,
    ]
    first = _invoke(*args)
    assert first.exit_code == 0, first.output
    assert "measured sparsity 90.00%" in first.output
    again = _invoke(*args)
    assert again.exit_code == 0 and "reusing the pruned checkpoint" in again.output
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT name, method, structure, target_sparsity, measured_sparsity, parent_id, provenance "
        "FROM models ORDER BY id"
    ).fetchall()
    con.close()
    assert len(rows) == 2
    dense, pruned = rows
    assert dense[1] == "dense" and dense[5] is None
    assert pruned[0] == "HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90_s0"
    assert pruned[1:4] == ("hydra", "US", 0.9) and pruned[4] == pytest.approx(0.9, abs=1e-3)
    assert pruned[5] == 1
    provenance = json.loads(pruned[6])
    assert provenance["native_sparsity"] == {"k": 0.1} and provenance["config"]["prune_epochs"] == 1
    assert provenance["seed"] == 0 and provenance["wall_seconds"] > 0


def test_unknown_method_and_option_are_refused(tmp_path, digits_cnn_checkpoint):
    base = [
        "prune",
        "--sparsity",
        "0.9",
        "--dense",
        str(digits_cnn_checkpoint),
        "--arch",
        "small_cnn",
        "--dataset",
        "digits",
        "--db",
        f"sqlite:///{tmp_path / 'r.db'}",
    ]
    bad_method = _invoke(*base, "--method", "hydrra")
    assert bad_method.exit_code != 0 and "did you mean 'hydra'" in bad_method.output
    bad_option = _invoke(*base, "--method", "hydra", "--set", "prune_epoch=1")
    assert bad_option.exit_code != 0 and "unknown option(s) prune_epoch" in bad_option.output
    assert not (tmp_path / "r.db").exists()


@pytest.mark.slow
def test_evaluate_method_on_the_track_stores_dense_and_pruned(tmp_path, monkeypatch):
    # The real track with a 1-epoch dense recipe, so the test does not spend minutes training.
    tiny = replace(track_module.TRACKS["digits"], training=replace(track_module.TRACKS["digits"].training, epochs=1))
    monkeypatch.setitem(track_module.TRACKS, "digits", tiny)
    db = tmp_path / "r.db"
    result = _invoke(
        "evaluate",
        "--method",
        "hydra",
        "--sparsity",
        "0.9",
        "--n-samples",
        "12",
        "--version",
        "standard",
        "--fmn-steps",
        "10",
        "--workers",
        "1",
        "--db",
        f"sqlite:///{db}",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "dense" in result.output and "pruned" in result.output
    table = _invoke("results", "--db", f"sqlite:///{db}", "--format", "json")
    records = json.loads(table.output)
    assert [r["method"] for r in records] == ["dense", "hydra"]
    assert all(r["status"] == "complete" and r["n"] == 12 for r in records)
    assert records[1]["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_structured_prune_writes_the_physically_smaller_network(tmp_path, digits_cnn_checkpoint, digits):
    from bench.catalog import build_model, load_checkpoint_model
    from bench.checkpoints import load_state_dict, load_weights, sha256_file
    from methods.structured import compact_model

    db = tmp_path / "r.db"
    out = tmp_path / "out"
    result = _invoke(
        "prune", "--method", "structured", "--sparsity", "0.5", "--dense", str(digits_cnn_checkpoint),
        "--arch", "small_cnn", "--dataset", "digits", "--db", f"sqlite:///{db}", "--out", str(out),
        "--set", "criterion=l1", "--set", "finetune_epochs=1", "--set", "max_iterations=2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    con = sqlite3.connect(db)
    provenance = json.loads(con.execute("SELECT provenance FROM models WHERE method = 'structured'").fetchone()[0])
    con.close()
    native, compact = provenance["native_sparsity"], provenance["compact"]
    (masked_path,) = [p for p in out.glob("structured-*.pt") if not p.name.endswith(".compact.pt")]
    compact_path = out / compact["file"]
    assert sha256_file(compact_path) == compact["sha256"]
    assert compact_path.stat().st_size < masked_path.stat().st_size
    # Rebuild the slimmer architecture from the recorded widths and load the compact weights strictly.
    small = compact_model(build_model("small_cnn", "digits"), native["widths"], native["removed_blocks"])
    load_weights(small, load_state_dict(compact_path))
    assert sum(p.numel() for p in small.parameters()) == compact["params"] == native["rebuilt_params"]
    assert small.net.features[0].out_channels == native["widths"]["features.0"] < 16
    masked = load_checkpoint_model(masked_path, "small_cnn", "digits")
    x = digits[2][:64]
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), masked(x), atol=1e-5)
