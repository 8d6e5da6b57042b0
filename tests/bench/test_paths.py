"""bench.paths: the folders from the environment, atomic writes, and the one JSON hash with its two spellings.

The pinned hex values were computed with the code these keys came from before they shared
:func:`bench.paths.stable_hash` (``RunSpec.hash``, ``Track.key``, ``config_tag``, the pruned-checkpoint key,
``setting_key``): stored results and cached files are found by them, so they may never change.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import paths
from bench.paths import atomic_write, cache_dir, default_data_dir, stable_hash

PRUNE_KEY_PAYLOAD = {
    "dense": "ab" * 32,
    "method": "hydra",
    "sparsity": 0.9,
    "seed": 0,
    "config": {"k": [1, 2.5], "s": "é"},
    "eps": 0.2,
}


def test_runspec_hashes_are_pinned():
    from bench.spec import RunSpec

    digits = RunSpec(dataset="digits", n_samples=360, norm="Linf", eps="0.2", eps_value=0.2)
    assert digits.hash == "deabd580c06f3b7d1a6199df8656813131d3ba74fa19c71eecee9eafe47bb6af"
    assert digits.protocol_hash == "be6adfb499b413b2cdce28909aad9c3edbfdce1def9541bc060069d94c070c3f"
    assert digits.hash == stable_hash(digits.to_dict())


def test_track_key_is_pinned():
    from bench.track import TRACKS

    # The digits dense checkpoint is cached as tracks/digits-dense-<key[:16]>.pt.
    assert TRACKS["digits"].key == "34df872dc44f5f45d2d442ecbd7b38b23937417653c064df03caf060ef4e77fa"


def test_pruning_keys_are_pinned():
    from methods.pipeline import config_tag

    # default=str: a Path in a config is hashed by its text.
    assert config_tag({"a": 1, "b": [1, 2], "p": Path("/x")}, 0.2, "ab" * 32) == "ec02cf26"
    assert config_tag({"lr": 0.01, "name": "é"}, 8 / 255, "cd" * 32) == "897ca1b9"
    # prune_checkpoint's cache key (pruned/<method>-<arch>-<dataset>-<key[:16]>.pt), spaced spelling.
    key = "60c8be5021828eef9530e1f82d53a357c21d49c7e1cf231cfdf25b63a44c68ce"
    assert stable_hash(PRUNE_KEY_PAYLOAD, compact=False) == key


def test_replicate_setting_key_is_pinned():
    from bench.analysis.replicates import setting_key

    model = SimpleNamespace(
        provenance={
            "seed": 3,
            "config": {"seed": 3, "lr": 0.1, "path": Path("/x"), "name": "é"},
            "dense_sha256": "ab" * 32,
            "schedule": "paper",
            "eps": 8 / 255,
        },
        parent_id=None,
        method="hydra",
        target_sparsity=0.9,
        structure="US",
        name="x_s3",
    )
    assert setting_key(model) == "f7df9a894fd00347ab87d9bc2c710930d4585b51772f484f27dad863bffc627d"


@pytest.mark.parametrize(
    "obj",
    [
        {"b": 1, "a": {"d": [1, 2.5, None, True], "c": "é"}},
        PRUNE_KEY_PAYLOAD,
        [],
        {"x": 1e-300, "y": -0.0, "z": 10**20},
    ],
)
def test_both_spellings_are_json_dumps_sorted(obj):
    compact = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    spaced = json.dumps(obj, sort_keys=True)
    assert stable_hash(obj) == hashlib.sha256(compact.encode()).hexdigest()
    assert stable_hash(obj, compact=False) == hashlib.sha256(spaced.encode()).hexdigest()
    if len(obj) > 1:  # the spellings differ as soon as there is a separator, so they are not interchangeable
        assert stable_hash(obj) != stable_hash(obj, compact=False)


def test_stable_hash_ignores_key_order_and_refuses_what_json_cannot_encode():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    with pytest.raises(TypeError, match="PosixPath|WindowsPath"):
        stable_hash({"p": Path("/x")})
    assert stable_hash({"p": Path("/x")}, default=str) == stable_hash({"p": "/x"})


def test_folders_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "d"))
    assert cache_dir() == tmp_path / "c" and default_data_dir() == tmp_path / "d"
    # Empty counts as unset; the data folder does not follow the cache folder.
    monkeypatch.setenv("BENCH_CACHE_DIR", "")
    monkeypatch.setenv("BENCH_DATA_DIR", "")
    assert cache_dir() == Path("~/.cache/apbench").expanduser()
    assert default_data_dir() == Path("~/.cache/apbench/data").expanduser()
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("BENCH_DATA_DIR")
    assert default_data_dir() == Path("~/.cache/apbench/data").expanduser()


def test_data_package_uses_the_same_folder(monkeypatch, tmp_path):
    from bench import data

    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"old")
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temporary file left behind


def test_paths_imports_only_the_standard_library():
    code = "import sys, bench.paths; print(sorted(m for m in ('torch', 'numpy', 'sqlalchemy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert set(paths.__all__) <= set(dir(paths))
