"""bench prune and bench evaluate --method: dense → adapter → pruned checkpoint in the store with its parent."""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import bench.track as track_module
from bench.analysis.replicates import setting_key
from bench.checkpoints import sha256_file
from bench.cli import main
from bench.store import Model, Store
from methods.base import PruningMethod
from methods.hydra import Hydra
from methods.pipeline import config_tag

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
    provenance = json.loads(pruned[6])
    # The schedule is not the paper's (--set), so the name carries the hash of config, eps and parent.
    tag = config_tag(provenance["config"], provenance["eps"], sha256_file(digits_cnn_checkpoint))
    assert pruned[0] == f"HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90_c{tag}_s0"
    assert pruned[1:4] == ("hydra", "US", 0.9) and pruned[4] == pytest.approx(0.9, abs=1e-3)
    assert pruned[5] == 1
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
    from bench.checkpoints import load_checkpoint_model, load_state_dict, load_weights, sha256_file
    from bench.models import build_model
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


# --- names that say what makes a model distinct; nothing stored by a command that fails --------------------------

TINY_DEFAULTS = {"prune_epochs": 1, "finetune_epochs": 1, "pgd_steps": 1, "batch_size": 256}
SHORT = "HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90"


@pytest.fixture
def tiny_hydra(monkeypatch):
    """HYDRA whose paper and digits-track defaults are a 1+1-epoch schedule, so a default-config run is fast."""

    def tiny(self, **overrides):
        return PruningMethod.config(self, **{**TINY_DEFAULTS, **overrides})

    monkeypatch.setattr(Hydra, "config", tiny)
    monkeypatch.setattr(Hydra, "digits_config", tiny)


@pytest.fixture
def tiny_track(monkeypatch):
    """The digits track with a 1-epoch dense recipe (the real training code, minutes shorter)."""
    digits = track_module.TRACKS["digits"]
    monkeypatch.setitem(track_module.TRACKS, "digits", replace(digits, training=replace(digits.training, epochs=1)))


def _models(db) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT id, name, parent_id, checkpoint_sha256 FROM models ORDER BY id").fetchall()
    finally:
        con.close()


def _prune_dense(db, checkpoint, *options):
    return _invoke(
        "prune", "--method", "hydra", "--sparsity", "0.9", "--dense", str(checkpoint), "--arch", "small_cnn",
        "--dataset", "digits", "--db", f"sqlite:///{db}", *options,
    )  # fmt: skip


def test_the_readme_tour_override_and_the_default_get_distinct_names(tmp_path, tiny_hydra, tiny_track):
    db = tmp_path / "r.db"
    track = ["prune", "--method", "hydra", "--sparsity", "0.9", "--track", "digits", "--db", f"sqlite:///{db}"]
    overridden = _invoke(*track, "--set", "finetune_epochs=2")
    assert overridden.exit_code == 0, overridden.output
    default = _invoke(*track)
    assert default.exit_code == 0, default.output
    (dense, child_a, child_b) = _models(db)
    assert dense[1] == "digits-dense" and child_a[2] == child_b[2] == dense[0]
    assert child_a[1].startswith(f"{SHORT}_c") and child_a[1].endswith("_s0") and len(child_a[1]) == len(SHORT) + 13
    assert child_b[1] == f"{SHORT}_s0"  # the default config keeps the name the README and the demo use
    # Running either again reuses its row: no third model, no clash.
    assert _invoke(*track, "--set", "finetune_epochs=2").exit_code == 0
    assert len(_models(db)) == 3
    # Another training eps is another setting too.
    other_eps = _invoke(*track, "--eps", "0.1")
    assert other_eps.exit_code == 0, other_eps.output
    names = [row[1] for row in _models(db)]
    assert len(names) == len(set(names)) == 4 and names[3].startswith(f"{SHORT}_c")


def test_a_short_name_held_by_another_checkpoint_falls_back_to_the_tagged_one(tmp_path, tiny_hydra, digits):
    from bench.models import build_model

    # Two dense parents pruned with the same (default) config and seed: e.g. a changed track recipe, or two files.
    db = tmp_path / "r.db"
    dense = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        dense.append(tmp_path / f"dense_{seed}.pt")
        torch.save(build_model("small_cnn", "digits").state_dict(), dense[-1])
    a = _prune_dense(db, dense[0])
    b = _prune_dense(db, dense[1])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    children = [row for row in _models(db) if row[2] is not None]
    assert children[0][1] == f"{SHORT}_s0"
    provenance = json.loads(_provenance(db, children[1][0]))
    assert provenance["config"] == {**provenance["config"], **TINY_DEFAULTS}
    assert children[1][1] == f"{SHORT}_c{config_tag(provenance['config'], provenance['eps'], sha256_file(dense[1]))}_s0"


def _provenance(db, model_id: int) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT provenance FROM models WHERE id = ?", (model_id,)).fetchone()[0]
    finally:
        con.close()


def test_a_prune_that_fails_stores_nothing(tmp_path, monkeypatch, digits_cnn_checkpoint):
    import methods.pipeline as pipeline
    from bench.data import DatasetNotFoundError

    def no_data(name, split, **_kw):
        raise DatasetNotFoundError(f"{name} {split} split not found in /nowhere; download it or pass --data-dir")

    monkeypatch.setattr(pipeline, "load_split", no_data)
    db = tmp_path / "r.db"
    result = _prune_dense(db, digits_cnn_checkpoint, *TINY_HYDRA)
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "Error: digits train split not found in /nowhere; download it or pass --data-dir"
    ]
    assert not db.exists()  # not even an empty store
    # With a store already there: still no dense parent left behind.
    Store(f"sqlite:///{db}").dispose()
    assert _prune_dense(db, digits_cnn_checkpoint, *TINY_HYDRA).exit_code == 1
    assert _models(db) == []


def test_a_method_that_fails_mid_run_stores_nothing(tmp_path, monkeypatch, digits_cnn_checkpoint):
    def broken(self, *args, **kwargs):
        raise RuntimeError("finetune diverged (loss is nan)")

    monkeypatch.setattr(Hydra, "prune", broken)
    db = tmp_path / "r.db"
    Store(f"sqlite:///{db}").dispose()
    result = _prune_dense(db, digits_cnn_checkpoint, *TINY_HYDRA)
    assert result.exit_code == 1 and "finetune diverged" in result.output
    assert _models(db) == [] and not list((tmp_path / "cache").rglob("*.pt"))


# --- seeds ---------------------------------------------------------------------------------------------------


def test_prune_seeds_makes_replicates_of_one_setting(tmp_path, digits_cnn_checkpoint):
    db = tmp_path / "r.db"
    result = _prune_dense(db, digits_cnn_checkpoint, "--seeds", "0-1,3", *TINY_HYDRA)
    assert result.exit_code == 0, result.output
    assert "3 replicates of one setting" in result.output
    store = Store(f"sqlite:///{db}")
    with store.session() as s:
        children = [m for m in s.query(Model).order_by(Model.id) if m.parent_id is not None]
        assert [m.provenance["seed"] for m in children] == [0, 1, 3]
        stems = {m.name.rsplit("_s", 1)[0] for m in children}
        assert len(stems) == 1 and [m.name.rsplit("_s", 1)[1] for m in children] == ["0", "1", "3"]
        assert len({setting_key(m) for m in children}) == 1
        # Different seeds train differently: three distinct checkpoints.
        assert len({m.checkpoint_sha256 for m in children}) == 3
    store.dispose()
    for seed in ("0", "1", "3"):
        assert re.search(rf"^{seed}\s+{re.escape(children[0].name[:-1])}{seed}\s+90\.00%$", result.output, re.M)
    # --seed keeps working and is the same run as that seed of --seeds (reused).
    single = _prune_dense(db, digits_cnn_checkpoint, "--seed", "1", *TINY_HYDRA)
    assert single.exit_code == 0 and "reusing the pruned checkpoint" in single.output
    assert len(_models(db)) == 4


@pytest.mark.parametrize(
    "options, message",
    [
        (["--seeds", "0,1,0"], "--seeds lists seed 0 twice ('0,1,0'); give each seed once"),
        (["--seeds", "-1"], "--seeds has a negative seed '-1'"),
        (["--seeds", "2-1"], "--seeds range '2-1' is empty"),
        (["--seed", "1", "--seeds", "0,1"], "give --seed N for one seed or --seeds LIST for several, not both"),
    ],
)
def test_bad_seeds_are_refused_before_any_work(tmp_path, digits_cnn_checkpoint, options, message):
    db = tmp_path / "r.db"
    result = _prune_dense(db, digits_cnn_checkpoint, *options)
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert message in line
    assert not db.exists()


def test_evaluate_refuses_seeds_without_a_method(tmp_path, digits_cnn_checkpoint):
    result = _invoke(
        "evaluate", "--checkpoint", str(digits_cnn_checkpoint), "--arch", "small_cnn", "--dataset", "digits",
        "--seeds", "0,1", "--db", f"sqlite:///{tmp_path / 'r.db'}",
    )  # fmt: skip
    assert result.exit_code == 1 and "--prune-seed/--seeds pick the pruning runs" in result.output
    assert not (tmp_path / "r.db").exists()


# --- --name ------------------------------------------------------------------------------------------------------


def _store_other_model(db, name: str, tmp_path) -> str:
    """Register another checkpoint (random small_cnn) under ``name``; returns its sha256."""
    from bench.models import build_model
    from bench.store.registration import register_model

    torch.manual_seed(7)
    model = build_model("small_cnn", "digits")
    path = tmp_path / "someone_else.pt"
    torch.save(model.state_dict(), path)
    store = Store(f"sqlite:///{db}")
    register_model(store, path, model.eval(), arch="small_cnn", dataset="digits", name=name)
    store.dispose()
    return sha256_file(path)


def test_evaluate_refuses_a_name_another_checkpoint_holds_before_any_work(tmp_path, digits_cnn_checkpoint):
    db = tmp_path / "r.db"
    sha = _store_other_model(db, "mine", tmp_path)
    result = _invoke(
        "evaluate", "--checkpoint", str(digits_cnn_checkpoint), "--arch", "small_cnn", "--dataset", "digits",
        "--name", "mine", "--n-samples", "12", "--version", "standard", "--no-progress", "--db", f"sqlite:///{db}",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert f"--name 'mine' is already model #1, a different model (checkpoint sha256 {sha[:12]}" in line
    assert "choose another --name, or omit it" in line
    assert [row[1] for row in _models(db)] == ["mine"]
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 0
    con.close()


def test_a_taken_name_for_the_track_model_is_refused_before_training(tmp_path, tiny_track):
    db = tmp_path / "r.db"
    _store_other_model(db, "mine", tmp_path)
    result = _invoke("evaluate", "--name", "mine", "--n-samples", "12", "--no-progress", "--db", f"sqlite:///{db}")
    assert result.exit_code == 1 and "--name 'mine' is already model #1" in result.output
    assert "training" not in result.output
    assert not (tmp_path / "cache" / "tracks").exists()


@pytest.mark.slow
def test_evaluate_seeds_after_the_readme_override_ends_with_the_seed_table(tmp_path, tiny_hydra, tiny_track):
    db = tmp_path / "r.db"
    url = f"sqlite:///{db}"
    tour = _invoke("prune", "--method", "hydra", "--sparsity", "0.9", "--track", "digits", "--db", url,
                   "--set", "finetune_epochs=2")  # fmt: skip
    assert tour.exit_code == 0, tour.output
    result = _invoke(
        "evaluate", "--method", "hydra", "--sparsity", "0.9", "--seeds", "0,1", "--n-samples", "12",
        "--version", "standard", "--fmn-steps", "10", "--workers", "1", "--no-progress", "--db", url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = [row[1] for row in _models(db)]
    assert names[0] == "digits-dense" and names[2:] == [f"{SHORT}_s0", f"{SHORT}_s1"]
    con = sqlite3.connect(db)
    stored = dict(
        con.execute(
            "SELECT m.name, e.aa_robust_accuracy FROM evaluations e JOIN models m ON m.id = e.model_id"
        ).fetchall()
    )
    con.close()
    lines = result.output.splitlines()
    header = next(i for i, x in enumerate(lines) if x.split()[:2] == ["clean", "AutoAttack"])
    rows = {x.split("  ")[0].strip(): x for x in lines[header + 1 : header + 6]}
    assert list(rows) == ["dense", "seed 0", "seed 1", "mean of 2 seeds", "range (min–max)"], result.output
    aa = [stored[f"{SHORT}_s0"], stored[f"{SHORT}_s1"]]
    assert f"{sum(aa) / 2:.2%}" in rows["mean of 2 seeds"]
    assert f"{min(aa):.2%}–{max(aa):.2%}" in rows["range (min–max)"]
    assert f"{SHORT}_s1" in rows["seed 1"] and f"{stored[f'{SHORT}_s1']:.2%}" in rows["seed 1"]
    assert "the seed spread is the pruning run's, the interval only the test samples'" in result.output
    by_setting = json.loads(_invoke("results", "--by-setting", "--format", "json", "--db", url).output)
    (setting,) = [r for r in by_setting if r["setting"] == SHORT]
    assert setting["n_seeds"] == 2 and setting["seeds"] == "0,1"
    assert setting["autoattack_mean"] == pytest.approx(sum(aa) / 2)


def test_the_same_bytes_behind_another_normalisation_cannot_take_the_name(tmp_path, digits_cnn_checkpoint):
    # Another input normalisation makes another model, so the name of the first is not the second's to take.
    from bench.checkpoints import load_checkpoint_model
    from bench.store.registration import register_model

    db = tmp_path / "r.db"
    store = Store(f"sqlite:///{db}")
    model = load_checkpoint_model(digits_cnn_checkpoint, "small_cnn", "digits")
    register_model(store, digits_cnn_checkpoint, model, arch="small_cnn", dataset="digits", name="mine")
    store.dispose()
    result = _invoke(
        "evaluate", "--checkpoint", str(digits_cnn_checkpoint), "--arch", "small_cnn", "--dataset", "digits",
        "--normalization", "none", "--name", "mine", "--n-samples", "12", "--no-progress", "--db", f"sqlite:///{db}",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert "--name 'mine' is already model #1, a different model" in line
    assert len(_models(db)) == 1


def test_the_track_dense_name_held_by_an_older_recipe_falls_back(tmp_path, tiny_hydra, tiny_track):
    # A store from before a track recipe change holds `digits-dense` for other bytes.
    db = tmp_path / "r.db"
    _store_other_model(db, "digits-dense", tmp_path)
    result = _invoke("prune", "--method", "hydra", "--sparsity", "0.9", "--track", "digits", "--db", f"sqlite:///{db}")
    assert result.exit_code == 0, result.output
    old, dense, child = _models(db)
    assert old[1] == "digits-dense" and dense[1] == f"digits-dense-{dense[3][:8]}"
    assert child[1] == f"{SHORT}_s0" and child[2] == dense[0]
