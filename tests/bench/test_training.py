"""PGD (L∞), PGD adversarial training and the digits track's cached dense checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import bench.track as track_module
from bench.checkpoints import load_checkpoint_model, sha256_file
from bench.models import build_model
from bench.track import TRACKS, Track, dense_checkpoint
from bench.training import AdversarialTrainingConfig, adversarial_training, pgd_linf, uniform_in_box

EPS = 0.2
# Float slack for the projection: x ± eps is rounded in float32.
TOL = 1e-6


def _per_sample_loss(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_the_eps_ball_and_the_image_box(digits, digits_mlp, random_start):
    _, _, xte, yte = digits
    x, y = xte[:100], yte[:100]
    x_before = x.clone()
    torch.manual_seed(0)
    x_adv = pgd_linf(digits_mlp, x, y, eps=0.1, steps=10, random_start=random_start)
    assert torch.equal(x, x_before)  # the clean input is not modified in place
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.1 + TOL
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # The bound is reached: sign steps end on the faces of the ball (or the box), not strictly inside.
    assert (x_adv - x).abs().max() >= 0.1 - TOL


@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_increases_the_loss(digits, digits_mlp, random_start):
    _, _, xte, yte = digits
    x, y = xte[:200], yte[:200]
    torch.manual_seed(0)
    x_adv = pgd_linf(digits_mlp, x, y, eps=0.1, steps=10, random_start=random_start)
    clean, adv = _per_sample_loss(digits_mlp, x, y), _per_sample_loss(digits_mlp, x_adv, y)
    assert adv.sum() > 2 * clean.sum()
    assert (adv >= clean).float().mean() > 0.95
    with torch.no_grad():
        assert (digits_mlp(x_adv).argmax(1) == y).float().mean() < (digits_mlp(x).argmax(1) == y).float().mean()


def test_pgd_with_a_large_step_and_a_custom_loss_projects(digits, digits_mlp):
    _, _, xte, yte = digits
    x, y = xte[:50], yte[:50]

    def margin_loss(logits, target):
        return -logits.gather(1, target[:, None]).sum()

    x_adv = pgd_linf(digits_mlp, x, y, eps=0.05, steps=3, step_size=1.0, loss_fn=margin_loss)
    assert (x_adv - x).abs().max() <= 0.05 + TOL
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    with torch.no_grad():
        assert digits_mlp(x_adv).gather(1, y[:, None]).sum() < digits_mlp(x).gather(1, y[:, None]).sum()


def test_pgd_zero_steps_without_random_start_returns_x(digits, digits_mlp):
    _, _, xte, yte = digits
    x = xte[:20]
    assert torch.equal(pgd_linf(digits_mlp, x, yte[:20], eps=EPS, steps=0, random_start=False), x)


def test_pgd_zero_steps_with_random_start_is_a_point_of_the_ball(digits, digits_mlp):
    _, _, xte, yte = digits
    x = xte[:20]
    torch.manual_seed(0)
    x0 = pgd_linf(digits_mlp, x, yte[:20], eps=EPS, steps=0, random_start=True)
    assert not torch.equal(x0, x)
    assert (x0 - x).abs().max() <= EPS + TOL
    assert x0.min() >= 0.0 and x0.max() <= 1.0


def test_the_box_start_is_uniform_in_the_ball_and_the_image_box(digits, digits_mlp):
    # The ball-then-clip start pins about half of a blank pixel's (x = 0) starts at exactly 0, where a pixel in the
    # dead zone of every first-layer unit has a zero gradient; the box start leaves none there, and covers the box.
    _, _, xte, yte = digits
    x = xte[:200]
    blank = x == 0
    assert blank.float().mean() > 0.3
    torch.manual_seed(0)
    ball = pgd_linf(digits_mlp, x, yte[:200], eps=EPS, steps=0)
    torch.manual_seed(0)
    box = pgd_linf(digits_mlp, x, yte[:200], eps=EPS, steps=0, box_start=True)
    assert 0.45 < (ball[blank] == 0).float().mean() < 0.55
    assert (box[blank] > 0).all() and box[blank].max() <= EPS
    assert (box - x).abs().max() <= EPS + TOL and box.min() >= 0.0 and box.max() <= 1.0
    # Uniform on [max(0, x − ε), min(1, x + ε)]: on blank pixels its mean is ε/2.
    assert box[blank].mean().item() == pytest.approx(EPS / 2, abs=0.01)
    torch.manual_seed(0)
    assert torch.equal(uniform_in_box(x, EPS), box)
    # Without a random start there is no start to place.
    assert torch.equal(pgd_linf(digits_mlp, x, yte[:200], eps=EPS, steps=0, random_start=False, box_start=True), x)


def test_pgd_leaves_the_model_mode_alone(digits, digits_mlp):
    _, _, xte, yte = digits
    digits_mlp.train()
    try:
        pgd_linf(digits_mlp, xte[:5], yte[:5], eps=EPS, steps=2)
        assert digits_mlp.training
    finally:
        digits_mlp.eval()


def _trained(cfg: AdversarialTrainingConfig, digits, init_seed: int = 0) -> torch.nn.Module:
    xtr, ytr, _, _ = digits
    torch.manual_seed(init_seed)
    model = build_model("small_cnn", "digits")
    adversarial_training(model, xtr, ytr, cfg)
    return model


def _pgd20_accuracy(model, x, y, eps: float) -> tuple[float, float]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        x_adv = pgd_linf(model, x, y, eps=eps, steps=20)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    return clean, robust


@pytest.fixture(scope="module")
def adv_and_clean_models(digits):
    schedule = dict(epochs=8, batch_size=64, lr=0.05, seed=0)
    adv = _trained(AdversarialTrainingConfig(eps=EPS, pgd_steps=5, **schedule), digits)
    # Same schedule, no inner maximisation: pgd_steps=0 with a vanishing random start is clean training.
    clean = _trained(AdversarialTrainingConfig(eps=1e-9, pgd_steps=0, **schedule), digits)
    return adv, clean


def test_adversarial_training_buys_robustness(digits, adv_and_clean_models):
    _, _, xte, yte = digits
    adv, clean = adv_and_clean_models
    adv_clean, adv_robust = _pgd20_accuracy(adv, xte, yte, EPS)
    clean_clean, clean_robust = _pgd20_accuracy(clean, xte, yte, EPS)
    assert clean_clean > 0.85  # the baseline learned the task
    assert adv_clean > 0.5
    assert adv_robust > clean_robust + 0.15, (adv_robust, clean_robust)
    assert adv_robust > 0.2


def test_adversarial_training_returns_its_log_and_leaves_eval_mode(digits):
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", "digits")
    messages = []
    record = adversarial_training(
        model, xtr[:256], ytr[:256], AdversarialTrainingConfig(eps=EPS, epochs=2, pgd_steps=1), log=messages.append
    )
    assert not model.training
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert all(0.0 <= h["adv_train_acc"] <= 1.0 and h["adv_loss"] > 0 for h in record["history"])
    assert record["wall_seconds"] > 0
    assert len(messages) == 2 and messages[0].startswith("epoch 1/2")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_adversarial_training_is_deterministic(digits):
    xtr, ytr, _, _ = digits
    x, y = xtr[:512], ytr[:512]
    cfg = AdversarialTrainingConfig(eps=EPS, epochs=1, pgd_steps=2, seed=3)
    states = []
    for seed in (3, 3, 4):
        torch.manual_seed(0)
        model = build_model("small_cnn", "digits")
        adversarial_training(model, x, y, dataclasses.replace(cfg, seed=seed))
        states.append(_state(model))
    same, other = states[0], states[2]
    assert same.keys() == states[1].keys()
    assert all(torch.equal(same[k], states[1][k]) for k in same)
    assert any(not torch.equal(same[k], other[k]) for k in same)


def _tiny_track(**training) -> Track:
    cfg = AdversarialTrainingConfig(eps=EPS, epochs=1, pgd_steps=1, batch_size=128, **training)
    return Track(name="tiny", dataset="digits", arch="small_cnn", eps="0.2", training=cfg)


def test_dense_checkpoint_trains_once_then_reuses(tmp_path, monkeypatch):
    track = _tiny_track()
    path, record = dense_checkpoint(track, root=tmp_path)
    folder = tmp_path / "tracks"
    assert path.parent == folder
    assert path.suffix == ".pt" and track.key[:16] in path.name
    meta = path.with_suffix(".json")
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, meta.name])  # no temp files left
    stored = json.loads(meta.read_text())
    assert stored == record
    assert stored["recipe_key"] == track.key
    assert stored["training"] == track.training.to_dict()
    assert len(stored["history"]) == track.training.epochs
    model = load_checkpoint_model(path, "small_cnn", "digits")  # a strict, weights-only load
    assert not model.training
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached checkpoint must be reused, not retrained")

    monkeypatch.setattr(track_module, "adversarial_training", no_training)
    again_path, again_record = dense_checkpoint(track, root=tmp_path)
    assert again_path == path
    assert again_record == record
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, meta.name])


def test_dense_checkpoint_is_reproducible_whatever_the_global_rng(tmp_path):
    track = _tiny_track()
    torch.manual_seed(1)
    first, _ = dense_checkpoint(track, root=tmp_path / "a")
    torch.manual_seed(2)
    second, _ = dense_checkpoint(track, root=tmp_path / "b")
    assert sha256_file(first) == sha256_file(second)


def test_dense_checkpoint_defaults_to_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    path, _ = dense_checkpoint(_tiny_track())
    assert path.parent == tmp_path / "cache" / "tracks"
    assert path.exists() and path.with_suffix(".json").exists()


def test_a_failed_write_leaves_no_files(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(track_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        dense_checkpoint(_tiny_track(), root=tmp_path)
    assert list((tmp_path / "tracks").iterdir()) == []


def test_the_key_follows_the_recipe():
    base = _tiny_track()
    assert _tiny_track().key == base.key
    changed = [
        _tiny_track(lr=0.01),
        _tiny_track(seed=1),
        dataclasses.replace(base, training=dataclasses.replace(base.training, epochs=2)),
        dataclasses.replace(base, training=dataclasses.replace(base.training, pgd_steps=2)),
        dataclasses.replace(base, eps="0.1"),
        dataclasses.replace(base, arch="resnet18"),
        dataclasses.replace(base, name="other"),
    ]
    keys = [t.key for t in changed]
    assert base.key not in keys
    assert len(set(keys)) == len(keys)


def test_the_built_in_digits_track():
    track = TRACKS["digits"]
    assert (track.dataset, track.arch, track.eps) == ("digits", "small_cnn", "0.2")
    assert track.training.eps == pytest.approx(0.2)
    assert track.training.pgd_steps > 0 and track.training.epochs > 0
