"""Shared fixtures: small real models trained on the built-in digits data, and temporary stores.

``store_url`` runs a test on SQLite and on a real PostgreSQL server (a throwaway cluster that the first test
needing it starts, see tests/pg_cluster.py). Where PostgreSQL cannot be started the PostgreSQL tests fail, with
the reason; a developer without PostgreSQL may set APBENCH_NO_POSTGRES=1 to skip them instead (CI never does).
``slurm_cluster`` does the same for a single-node SLURM (scripts/slurm-test-cluster; APBENCH_NO_SLURM=1 skips).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.data import load_split
from bench.models import build_model
from bench.store import Store


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # One OpenMP thread per process is fastest for small models on these 2-core machines (protocol §8).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_DB", raising=False)


@pytest.fixture(scope="session")
def digits():
    xtr, ytr = load_split("digits", "train")
    xte, yte = load_split("digits", "test")
    return xtr, ytr, xte, yte


def _fit(model: nn.Module, x, y, *, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_mlp(digits):
    """A tiny clean-trained MLP on digits: cheap enough for AutoAttack-plus on a few dozen samples."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return _fit(model, xtr, ytr, epochs=15, lr=1e-2)


@pytest.fixture(scope="session")
def small_cnn_init():
    """An untrained small_cnn for digits (seed 0): deep-copy it before pruning or training."""
    torch.manual_seed(0)
    return build_model("small_cnn", "digits").eval()


@pytest.fixture(scope="session")
def digits_cnn(digits):
    """small_cnn briefly clean-trained on digits: the dense input of the method tests (deep-copy before pruning)."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    return _fit(build_model("small_cnn", "digits"), xtr, ytr, epochs=2, lr=2e-3)


@pytest.fixture(scope="session")
def digits_cnn_checkpoint(digits, tmp_path_factory):
    """A registered architecture (small_cnn) clean-trained on digits, saved as a plain state dict."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = _fit(build_model("small_cnn", "digits"), xtr, ytr, epochs=4, lr=2e-3)
    path = tmp_path_factory.mktemp("ckpt") / "small_cnn_digits.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'results.db'}")
    yield s
    s.dispose()


NO_POSTGRES_ENV = "APBENCH_NO_POSTGRES"


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL server for the whole run, stopped (by its pid) and removed at the end."""
    if os.environ.get(NO_POSTGRES_ENV) == "1":
        pytest.skip(f"{NO_POSTGRES_ENV}=1: PostgreSQL store tests skipped on this machine")
    from tests.pg_cluster import PostgresUnavailable, start_cluster

    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail(
            "the PostgreSQL store tests need psycopg 3: pip install -e '.[test]' (or set "
            f"{NO_POSTGRES_ENV}=1 to skip them)",
            pytrace=False,
        )
    try:
        cluster = start_cluster()
    except PostgresUnavailable as err:
        reason = f"cannot start a PostgreSQL server for the store tests: {err} (or set {NO_POSTGRES_ENV}=1 to skip)"
        pytest.fail(reason, pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster):
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty store URL on each database the store runs on (the test runs once per database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def any_store(store_url):
    """A store migrated to head on each database (see ``store_url``)."""
    s = Store(store_url)
    yield s
    s.dispose()


NO_SLURM_ENV = "APBENCH_NO_SLURM"
SLURM_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm-test-cluster"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private single-node SLURM for the whole run (scripts/slurm-test-cluster: munge, slurmctld, slurmd, its
    configuration, state and logs in a temporary folder); yields its SLURM_CONF, also set in os.environ so that
    sbatch, squeue and submitit find it. Stopped (the daemons it started, by their pid) and removed at the end.

    Where it cannot start (not root, no apt-get) the tests that need it fail with the reason; a developer without
    root may set APBENCH_NO_SLURM=1 to skip them instead (CI never does).
    """
    if os.environ.get(NO_SLURM_ENV) == "1":
        pytest.skip(f"{NO_SLURM_ENV}=1: SLURM executor tests skipped on this machine")
    # Directly under the system's temporary folder: munged runs as its own user, which cannot enter pytest's
    # private (0700) temporary folders.
    folder = Path(tempfile.mkdtemp(prefix="apbench-slurm-"))
    env = {**os.environ, "APBENCH_SLURM_DIR": str(folder)}
    # GNU nproc, which sizes the node, honours OMP_NUM_THREADS: the node gets every CPU whatever the tests' setting.
    env.pop("OMP_NUM_THREADS", None)
    try:
        up = subprocess.run([SLURM_SCRIPT, "up"], env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"cannot start the single-node SLURM for the executor tests: {err}", pytrace=False)
    last = up.stdout.strip().splitlines()[-1] if up.stdout.strip() else ""
    if up.returncode != 0 or not last.startswith("export SLURM_CONF="):
        reason = " | ".join((up.stderr or up.stdout).strip().splitlines()[-4:]) or f"exit status {up.returncode}"
        subprocess.run([SLURM_SCRIPT, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(
            f"cannot start the single-node SLURM for the executor tests ({SLURM_SCRIPT.name} up): {reason} "
            f"(or set {NO_SLURM_ENV}=1 to skip them)",
            pytrace=False,
        )
    conf = last.split("=", 1)[1]
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    print(f"\nsingle-node SLURM up: {(up.stderr.strip().splitlines() or [''])[-1]}")
    try:
        yield conf
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        # Jobs a failed test left behind first (SIGKILL: submitit's tasks ignore SIGTERM), so that no task outlives
        # the daemons that started it.
        user = pwd.getpwuid(os.getuid()).pw_name
        subprocess.run(["scancel", "--signal=KILL", "--full", f"--user={user}"], capture_output=True, timeout=60)
        subprocess.run([SLURM_SCRIPT, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
