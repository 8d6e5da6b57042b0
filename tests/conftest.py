"""Shared fixtures: small real models trained on the built-in digits data, and a temporary store."""

from __future__ import annotations

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
