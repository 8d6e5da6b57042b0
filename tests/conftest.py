"""Shared fixtures: small real models trained on the built-in digits data, and temporary stores.

``store_url`` runs a test on SQLite and on a real PostgreSQL server (a throwaway cluster that the first test
needing it starts, see tests/pg_cluster.py). Where PostgreSQL cannot be started the PostgreSQL tests fail, with
the reason; a developer without PostgreSQL may set APBENCH_NO_POSTGRES=1 to skip them instead (CI never does).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.catalog import build_model
from bench.data import load_split
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
