"""PwoA adapter (Jian et al., ICDM 2022): HSIC estimators, KD, no adversarial examples, masks, converter.

Every run is tiny: a freshly initialised small CNN, a few dozen digits images, one epoch per phase.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench.training as training_module
import methods.common as common_module
import methods.pwoa as pwoa_module
from bench.models import build_model, unwrap
from bench.sparsity import measure_sparsity
from methods.base import PruneData, get_method
from methods.pwoa import (
    PwoA,
    admm_cycle_lr,
    convert_pwoa_checkpoint,
    hsic_biased,
    hsic_normalized,
    kd_loss,
)

N_TRAIN = 48
RATIO = 0.9
TINY = {"admm_epochs": 1, "retrain_epochs": 1, "batch_size": 16, "prune_linear": True}
LAYERS = ["features.0", "features.2", "features.5", "classifier.1", "classifier.3"]


@pytest.fixture(scope="module")
def dense(small_cnn_init):
    return small_cnn_init


@pytest.fixture(scope="module")
def data(digits):
    xtr, ytr, _, _ = digits
    return PruneData(xtr[:N_TRAIN], ytr[:N_TRAIN], eps=0.2)


def _prune(dense, data, seed=0, **overrides):
    method = get_method("pwoa")
    return method.prune(copy.deepcopy(dense), RATIO, data, method.config(**{**TINY, **overrides}), seed=seed)


# --------------------------------------------------------------------------------------------- card and config


def test_card_and_defaults_follow_the_released_code():
    method = get_method("pwoa")
    assert isinstance(method, PwoA) and method.card.criterion == "SOLWM" and method.card.scope == "local"
    assert method.card.pipeline == "A" and method.card.training["1S/IT"] == "1S"
    cfg = method.config()
    assert (cfg.temperature, cfg.kd_weight, cfg.xentropy_weight) == (30.0, 10.0, 0.0)
    assert (cfg.admm_epochs, cfg.admm_lr, cfg.lr_cycle, cfg.rho, cfg.rho_growth, cfg.rho_cap) == (
        50,
        0.01,
        3,
        0.01,
        1.35,
        1.0,
    )
    assert (cfg.retrain_epochs, cfg.retrain_lr, cfg.retrain_lambda_x, cfg.retrain_lambda_y) == (100, 0.005, 2e-5, 1e-4)
    assert (cfg.lambda_x, cfg.lambda_y, cfg.mix_ratio, cfg.hsic_sigma) == (0.0, 0.0, 0.0, 5.0)
    # The code's rule: convolutions (shortcuts included) plus names containing fc.weight; ResNet's `linear` stays.
    assert method.pruned_layers(build_model("small_cnn", "digits")) == LAYERS[:3]
    r18 = method.pruned_layers(build_model("resnet18", "cifar10"))
    assert len(r18) == 20 and "linear" not in r18
    assert method.pruned_layers(build_model("small_cnn", "digits"), method.digits_config()) == LAYERS
    with pytest.raises(ValueError, match="unknown option"):
        method.config(temperatur=1.0)


def test_admm_lr_cycle():
    assert [admm_cycle_lr(e, 0.01) for e in (1, 4, 7)] == [0.01] * 3
    assert admm_cycle_lr(2, 0.01) == pytest.approx(1e-3) and admm_cycle_lr(6, 0.01) == pytest.approx(1e-4)


# --------------------------------------------------------------------------------------------- HSIC and KD


def _samples(seed=0, m=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 7, generator=g)
    y = torch.tanh(x @ torch.randn(7, 5, generator=g)) + 0.1 * torch.randn(m, 5, generator=g)
    return x, y, g


def test_biased_hsic_is_nonnegative_symmetric_and_permutation_invariant():
    for seed in range(3):
        x, y, g = _samples(seed)
        value = hsic_biased(x, y, 5.0)
        assert value >= 0
        assert torch.allclose(value, hsic_biased(y, x, 5.0), atol=1e-7)
        perm = torch.randperm(len(x), generator=g)
        assert torch.allclose(value, hsic_biased(x[perm], y[perm], 5.0), atol=1e-7)
        # Independent noise scores lower than a dependent pair.
        assert hsic_biased(x, torch.randn(len(x), 5, generator=g), 5.0) < value


def test_normalized_hsic_properties():
    x, y, g = _samples(1)
    value = hsic_normalized(x, y, 5.0)
    assert torch.allclose(value, hsic_normalized(y, x, 5.0), rtol=1e-4)
    perm = torch.randperm(len(x), generator=g)
    # (K̃ + εmI)^{-1} is ill-conditioned (ε = 1e-5) in float32: permutation-invariant up to rounding.
    assert torch.allclose(value, hsic_normalized(x[perm], y[perm], 5.0), rtol=1e-2)
    # nHSIC(Y, Y) with a linear kernel on one-hot labels ≈ rank of the centred label kernel = C − 1 (spec §9: 8.997).
    labels = torch.arange(64) % 10
    onehot = F.one_hot(labels, 10).float()
    yy = hsic_normalized(onehot, onehot, 5.0, kernel_x="linear", kernel_y="linear")
    assert yy == pytest.approx(9.0, abs=0.05)
    assert hsic_normalized(x, onehot[: len(x)], 5.0, kernel_y="linear") < yy


def test_kd_loss_is_zero_for_identical_logits_and_matches_the_code_scaling():
    s = torch.randn(8, 10, requires_grad=True)
    zero = kd_loss(s, s.detach().clone(), temperature=30.0, weight=10.0)
    zero.backward()
    assert zero.abs() < 1e-7 and s.grad.abs().max() < 1e-5
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    p_t = F.softmax(t / 30, 1)
    kl = (p_t * (F.log_softmax(t / 30, 1) - F.log_softmax(s / 30, 1))).sum()
    assert kd_loss(s, t, temperature=30.0, weight=10.0) == pytest.approx(float(10 * 900 * kl / 80), rel=1e-4)


# --------------------------------------------------------------------------------------------- no adversarial examples


def _forbid_attacks(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("an adversarial example was generated")

    monkeypatch.setattr(training_module, "pgd_linf", boom)
    monkeypatch.setattr(pwoa_module, "pgd_linf", boom)
    for name in ("trades_adversarial", "mart_adversarial", "pgd_ce_loss", "trades_loss", "mart_loss", "_sign_ascent"):
        monkeypatch.setattr(common_module, name, boom)


def test_no_adversarial_example_is_ever_generated(dense, data, monkeypatch):
    _forbid_attacks(monkeypatch)
    seen: list[torch.Tensor] = []
    model = copy.deepcopy(dense)
    # Deep copies (teacher and student) keep the hook: every forward of either records its input.
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    method = get_method("pwoa")
    cfg = method.config(**TINY, retrain_lambda_x=1e-3, retrain_lambda_y=1e-3)
    result = method.prune(model, RATIO, data, cfg, seed=0)
    assert all(h["adversarial_batches"] == 0 for h in result.history)
    # 2 phases × 3 batches, teacher and student each.
    assert len(seen) == 2 * 3 * 2
    rows = data.x.reshape(len(data.x), -1)
    for batch in seen:
        flat = batch.reshape(len(batch), -1)
        # every input row is bit-identical to a training image, each used once per batch
        match = (flat[:, None, :] == rows[None, :, :]).all(dim=2)
        assert match.any(dim=1).all(), "the model saw an input that is not a clean training image"
        assert len(set(match.float().argmax(dim=1).tolist())) == len(batch)


def test_mix_ratio_variant_runs_and_uses_the_attack(dense, data, monkeypatch):
    result = _prune(dense, data, mix_ratio=1.0, mix_steps=2)
    assert all(h["adversarial_batches"] == 3 for h in result.history)
    assert measure_sparsity(result.model).per_layer["features.2"][1] == int(RATIO * 32 * 16 * 9)
    _forbid_attacks(monkeypatch)  # the patch point is the one the mix variant uses
    with pytest.raises(AssertionError, match="adversarial example"):
        _prune(dense, data, mix_ratio=1.0, mix_steps=2)


# --------------------------------------------------------------------------------------------- masks


def test_exact_per_layer_sparsity_and_dense_rest(dense, data):
    for prune_linear, layers in ((True, LAYERS), (False, LAYERS[:3])):
        result = _prune(dense, data, prune_linear=prune_linear, hsic_estimator="biased")
        report = measure_sparsity(result.model)
        for name, (numel, zeros, _) in report.per_layer.items():
            assert zeros == (int(RATIO * numel) if name in layers else 0), name
        assert result.native_sparsity["prune_ratio"] == RATIO
        assert set(result.model.state_dict()) == set(dense.state_dict())


def test_pruned_weights_stay_zero_through_retraining_with_momentum_and_weight_decay(dense, data):
    result = _prune(dense, data, retrain_epochs=2, weight_decay=5e-3, momentum=0.9, retrain_lr=0.05)
    assert len([h for h in result.history if h["phase"] == "retrain"]) == 2  # 6 masked steps
    after_admm = measure_sparsity(result.model)
    for name in LAYERS:
        numel, zeros, _ = after_admm.per_layer[name]
        assert zeros == int(RATIO * numel)
    # and the weights that survive did move during retraining (the test is not vacuous)
    hard = _prune(dense, data, retrain_epochs=0)
    w_a = unwrap(result.model).features[2].weight
    w_b = unwrap(hard.model).features[2].weight
    assert torch.equal(w_a == 0, w_b == 0) and not torch.equal(w_a, w_b)


def test_same_seed_same_mask(dense, data):
    a, b = _prune(dense, data, seed=3), _prune(dense, data, seed=3)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), name


# --------------------------------------------------------------------------------------------- converter


class _NativeTiny(nn.Module):
    """How PwoA's models look: forward returns (logits, hidden representations)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(h.flatten(1)), [h]


class _PlainTiny(_NativeTiny):
    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("wrap", ["", "module.", "module.model."])
def test_converter_gives_the_native_logits(wrap):
    torch.manual_seed(0)
    native = _NativeTiny()
    with torch.no_grad():
        native.conv.weight[0].zero_()
        native.bn.running_mean.uniform_(-0.2, 0.2)
    native.eval()
    sd = {wrap + k: v for k, v in native.state_dict().items()}
    plain = _PlainTiny()
    plain.load_state_dict(convert_pwoa_checkpoint(sd))
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(native(x)[0], plain.eval()(x), atol=1e-5)
    assert set(convert_pwoa_checkpoint({"state_dict": sd})) == set(native.state_dict())
    with pytest.raises(ValueError, match="no weight tensors"):
        convert_pwoa_checkpoint({"epoch": 3})
