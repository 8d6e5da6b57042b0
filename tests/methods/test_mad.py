"""MAD (Lee, Kim, Ro, CVPR 2022): K-FAC adversarial saliency, one-shot pruning, MART fine-tuning, .t7 files."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import methods.common as common
import methods.mad as mad
from bench.checkpoints import UnsafeCheckpointError, load_state_dict, load_weights
from bench.models import Normalize, NormalizedModel, build_model
from bench.sparsity import measure_sparsity
from methods.base import PruneData, get_method
from methods.common import prunable_layers
from methods.mad import (
    MASK_MAX,
    MASK_MIN,
    adversarial_saliency,
    adversarial_saliency_loop,
    convert_mad_checkpoint,
    input_covariance,
    kfac_factors,
    load_mad_checkpoint,
    mad_pruning_masks,
    optimise_masks,
    output_gradient_covariance,
    prune_by_saliency,
    weight_matrix,
)

EPS = 0.2
TOL = 1e-6  # float32 rounding of x ± eps


class _TinyNet(nn.Module):
    """Conv with bias + BN + in-place ReLU, a strided conv beside a 1×1 shortcut, and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.shortcut = nn.Conv2d(4, 8, 1, stride=2, bias=False)
        self.linear = nn.Linear(8, 10)

    def forward(self, x):
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = F.relu(self.conv2(out) + self.shortcut(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _tiny_model(seed: int = 0) -> NormalizedModel:
    torch.manual_seed(seed)
    return NormalizedModel(Normalize([0.3], [0.3]), _TinyNet()).eval()


def _tiny_config(**overrides):
    schedule = {
        "saliency_batch_size": 16,
        "saliency_pgd_steps": 2,
        "mask_steps": 2,
        "finetune_epochs": 2,
        "batch_size": 16,
        "pgd_steps": 2,
    }
    return get_method("mad").config(**{**schedule, **overrides})


def _random_masks(layer: nn.Module, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    shape = weight_matrix(layer).shape
    return MASK_MIN + (MASK_MAX - MASK_MIN) * torch.rand(shape, generator=generator, dtype=dtype)


# ------------------------------------------------------------------------------------------------------
# Saliency


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_vectorised_saliency_equals_the_loop_and_row_sums_are_the_block_quadratic_form(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "conv":
        layer = nn.Conv2d(3, 5, 3, padding=1).double()
        x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    else:
        layer = nn.Linear(7, 6).double()
        x = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    out = layer(x)
    (g,) = torch.autograd.grad(F.cross_entropy(out.flatten(1)[:, :5], torch.zeros(len(x), dtype=torch.long)), out)
    A, G = input_covariance(x, layer), output_gradient_covariance(g, layer)
    w = weight_matrix(layer).detach()
    delta_w = w - w * F.softplus(_random_masks(layer, gen))

    saliency = adversarial_saliency(delta_w, A, G)
    torch.testing.assert_close(saliency, adversarial_saliency_loop(delta_w, A, G), rtol=1e-5, atol=0)
    # Eq. 25: row i sums to ½ G_ii ΔW_i A ΔW_iᵀ ≥ 0, while single entries can be negative.
    quadratic = 0.5 * G.diagonal() * torch.einsum("ij,jk,ik->i", delta_w, A, delta_w)
    torch.testing.assert_close(saliency.sum(1), quadratic, rtol=1e-10, atol=1e-14)
    assert (saliency.sum(1) >= 0).all()
    assert (saliency < 0).any()
    # Masks left at softplus⁻¹(1) change nothing: ΔW = 0 and no saliency.
    unchanged = w - w * F.softplus(torch.full_like(w, MASK_MAX))
    assert adversarial_saliency(unchanged, A, G).abs().max() < 1e-12


def test_kfac_factors_match_a_direct_computation_and_see_the_gradient_before_an_inplace_relu():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(2, 2, 2, 2), torch.tensor([1, 3])
    layers = prunable_layers(model)
    masks = {name: torch.full_like(weight_matrix(layer), MASK_MAX) for name, layer in layers}
    A, G, _ = kfac_factors(model, layers, masks, x, y)

    # Reference A: the 3×3 patches of the zero-padded 2×2 input, (c, kh, kw) order, a 1 for the bias; S = 4.
    padded = F.pad(x, (1, 1, 1, 1))
    patches = torch.stack(
        [
            torch.cat([padded[b, :, i : i + 3, j : j + 3].flatten(), torch.ones(1)])
            for b in range(2)
            for i in range(2)
            for j in range(2)
        ]
    )
    torch.testing.assert_close(A["0"], patches.t() @ patches / (2 * 4**2))
    # Reference G: B·S·Σ g gᵀ of the batch-mean loss's gradient at the conv output (pre-ReLU).
    z = conv(x)
    logits = model[3](F.relu(z).flatten(1))
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y), z)
    g_rows = g.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(G["0"], 2 * 4 * g_rows.t() @ g_rows)
    features = F.relu(z).flatten(1).detach()
    a_lin = torch.cat([features, torch.ones(2, 1)], 1)
    torch.testing.assert_close(A["3"], a_lin.t() @ a_lin / 2)


def test_mask_optimisation_stays_in_the_clamp_and_lowers_the_adversarial_loss(digits):
    xtr, ytr, _, _ = digits
    model = _tiny_model()
    layers = prunable_layers(model)
    x, y = xtr[:32], ytr[:32]
    with torch.no_grad():
        before = F.cross_entropy(model(x), y)
    masks = optimise_masks(model, layers, x, y, steps=5, lr=0.1)
    after = F.cross_entropy(mad._masked_forward(model, layers, masks, x), y)
    assert after < before
    for m in masks.values():
        assert m.min() >= MASK_MIN - 1e-6 and m.max() <= MASK_MAX + 1e-6
        assert (F.softplus(m) <= 1 + 1e-6).all()
    assert all(p.grad is None for p in model.parameters()), "only the masks are optimised"


# ------------------------------------------------------------------------------------------------------
# Pruning


def test_code_rule_prunes_int_percnt_globally_and_per_row_in_the_last_layer():
    gen = torch.Generator().manual_seed(0)
    saliencies = [torch.randn(4, 10, generator=gen), torch.randn(6, 5, generator=gen), torch.randn(3, 9, generator=gen)]
    percnt = 0.7
    removed = mad_pruning_masks(saliencies, percnt)
    pool = torch.cat([s.flatten() for s in saliencies[:2]])
    pool_removed = torch.cat([r.flatten() for r in removed[:2]])
    assert int(pool_removed.sum()) == int(percnt * pool.numel())
    assert pool[pool_removed].max() <= pool[~pool_removed].min()  # the lowest saliencies, negatives first
    last, last_removed = saliencies[-1], removed[-1]
    assert (last_removed.sum(1) == int(percnt * last.shape[1])).all()
    for row, gone in zip(last, last_removed, strict=True):
        assert row[gone].max() <= row[~gone].min()


def test_global_weight_count_is_exact_with_bias_columns():
    gen = torch.Generator().manual_seed(1)
    saliencies = [torch.randn(4, 10, generator=gen), torch.randn(6, 5, generator=gen), torch.randn(3, 9, generator=gen)]
    removed = mad_pruning_masks(saliencies, 0.5, bias_columns=[True, False], global_weight_count=31)
    weights_removed = int(removed[0][:, :-1].sum()) + int(removed[1].sum())
    assert weights_removed == 31
    pool = torch.cat([s.flatten() for s in saliencies[:2]])
    pool_removed = torch.cat([r.flatten() for r in removed[:2]])
    assert pool[pool_removed].max() <= pool[~pool_removed].min()


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_one_shot_pruning_hits_the_canonical_count_and_prunes_the_last_linear_per_row(sparsity):
    model = _tiny_model()
    layers = prunable_layers(model)
    gen = torch.Generator().manual_seed(0)
    saliencies = [torch.randn(weight_matrix(layer).shape, generator=gen) for _, layer in layers]
    removed, native = prune_by_saliency(layers, saliencies, sparsity)
    report = measure_sparsity(model)
    assert report.zero_weights == round(sparsity * report.weight_params) == native["zero_weights_target"]
    linear = model.net.linear
    per_row = (weight_matrix(linear) == 0).sum(1)  # [W_i | b_i]: the bias column can be pruned
    assert (per_row == int(sparsity * (linear.in_features + 1))).all()
    assert native["last_layer"] == "net.linear" and native["percnt"] == sparsity
    for (_, layer), gone in zip(layers, removed, strict=True):
        assert (weight_matrix(layer)[gone] == 0).all()


def test_the_last_layer_must_be_linear():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 1))
    data = PruneData(torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), eps=EPS)
    with pytest.raises(ValueError, match="Linear"):
        get_method("mad").prune(model, 0.5, data, _tiny_config())


def test_finetuning_keeps_pruned_weights_and_biases_exactly_zero(digits):
    xtr, ytr, _, _ = digits
    model = _tiny_model()
    layers = prunable_layers(model)
    gen = torch.Generator().manual_seed(0)
    saliencies = [torch.randn(weight_matrix(layer).shape, generator=gen) for _, layer in layers]
    removed, _ = prune_by_saliency(layers, saliencies, 0.6)
    assert any(gone[:, -1].any() for (_, layer), gone in zip(layers, removed, strict=True) if layer.bias is not None)
    before = {name: weight_matrix(layer).detach().clone() for name, layer in layers}
    # Two epochs of two batches: four SGD steps with momentum 0.9 and weight decay 2e-4.
    data = PruneData(xtr[:32], ytr[:32], eps=EPS)
    mad.finetune(model, layers, removed, data, _tiny_config(), torch.Generator().manual_seed(0))
    for (name, layer), gone in zip(layers, removed, strict=True):
        after = weight_matrix(layer).detach()
        assert (after[gone] == 0).all(), f"{name}: a pruned entry moved"
        assert not torch.equal(after[~gone], before[name][~gone]), f"{name}: kept entries did not train"


# ------------------------------------------------------------------------------------------------------
# The adapter end to end


@pytest.fixture(scope="module")
def pruned_twice(digits):
    """Two runs with the same seed on 32 digits images, recording every training attack's output."""
    xtr, ytr, _, _ = digits
    data = PruneData(xtr[:32], ytr[:32], eps=EPS)
    dense = _tiny_model()
    attacks = []
    pgd, mart_adv = mad.pgd_linf, common.mart_adversarial

    def spy_pgd(model, x, y, **kw):
        out = pgd(model, x, y, **kw)
        attacks.append((x, out, kw["eps"]))
        return out

    def spy_mart(model, x, y, **kw):
        out = mart_adv(model, x, y, **kw)
        attacks.append((x, out, kw["eps"]))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mad, "pgd_linf", spy_pgd)
        mp.setattr(common, "mart_adversarial", spy_mart)
        method = get_method("mad")
        first = method.prune(copy.deepcopy(dense), 0.8, data, _tiny_config(), seed=3)
        second = method.prune(copy.deepcopy(dense), 0.8, data, _tiny_config(), seed=3)
    return dense, first, second, attacks


def test_result_is_a_plain_module_with_the_input_keys_at_the_exact_sparsity(pruned_twice, digits):
    dense, result, _, _ = pruned_twice
    model = result.model
    assert isinstance(model, NormalizedModel) and isinstance(model.net, _TinyNet)
    assert list(model.state_dict()) == list(dense.state_dict())
    assert not any("mask" in name for name, _ in model.named_parameters())
    report = measure_sparsity(model)
    assert report.zero_weights == round(0.8 * report.weight_params)
    _, _, xte, _ = digits
    with torch.no_grad():
        assert torch.isfinite(model(xte[:4])).all()
    phases = [h["phase"] for h in result.history]
    assert phases == ["saliency", "finetune", "finetune"]
    assert result.config["mart_beta"] == 0.5 and result.native_sparsity["percnt"] == 0.8


def test_same_seed_same_mask(pruned_twice):
    _, first, second, _ = pruned_twice
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a == 0, b == 0), name
        assert torch.equal(a, b), name


def test_training_attacks_stay_in_the_eps_ball_and_the_image_box(pruned_twice):
    *_, attacks = pruned_twice
    # Per run: 2 saliency batches (PGD on the unmasked model) + 2 epochs × 2 batches of MART.
    assert len(attacks) == 2 * (2 + 4)
    for x, x_adv, eps in attacks:
        assert eps == EPS
        assert (x_adv - x).abs().max() <= eps + TOL
        assert x_adv.min() >= 0 and x_adv.max() <= 1


# ------------------------------------------------------------------------------------------------------
# Checkpoints


class _NotAllowed:
    """An arbitrary pickled object: the loader must refuse it without constructing it."""

    constructed = False

    def __setstate__(self, state):
        type(self).constructed = True


def _mad_state_dict(model: NormalizedModel, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """MAD's ``net``: the architecture's own keys plus ``mask_weight``/``mask_bias`` per Conv2d/Linear."""
    sd = dict(model.net.state_dict())
    for name, layer in prunable_layers(model.net):
        sd[f"{name}.mask_weight"] = MASK_MIN + (MASK_MAX - MASK_MIN) * torch.rand(layer.weight.shape, generator=gen)
        if layer.bias is not None:
            sd[f"{name}.mask_bias"] = MASK_MIN + (MASK_MAX - MASK_MIN) * torch.rand(layer.bias.shape, generator=gen)
    return sd


def test_converted_mad_checkpoint_reproduces_the_masked_model(tmp_path, digits):
    _, _, xte, _ = digits
    torch.manual_seed(0)
    model = build_model("small_cnn", "digits").eval()
    sd = _mad_state_dict(model, torch.Generator().manual_seed(0))
    path = tmp_path / "True_el_digits_mad90_small_cnn_best.t7"
    args = argparse.Namespace(dataset="digits", network="small_cnn", percnt=0.9, pruning_mode="element")
    torch.save({"net": sd, "acc": 97.5, "epoch": 3, "loss": torch.tensor(0.25), "args": args}, path)

    # Weights-only loading refuses the Namespace, so the generic loader cannot read MAD files.
    with pytest.raises(UnsafeCheckpointError, match="Namespace"):
        load_state_dict(path)
    loaded = load_mad_checkpoint(path)
    assert loaded["args"].percnt == 0.9 and loaded["epoch"] == 3

    effective = {}
    for name, layer in prunable_layers(model.net):
        effective[f"net.{name}.weight"] = layer.weight * F.softplus(sd[f"{name}.mask_weight"])
        if layer.bias is not None:
            effective[f"net.{name}.bias"] = layer.bias * F.softplus(sd[f"{name}.mask_bias"])
    with torch.no_grad():
        expected = functional_call(model, effective, (xte[:16],), strict=False)

    plain = build_model("small_cnn", "digits").eval()
    load_weights(plain, convert_mad_checkpoint(loaded))
    with torch.no_grad():
        torch.testing.assert_close(plain(xte[:16]), expected, atol=1e-5, rtol=0)


def test_masks_at_the_upper_bound_convert_to_the_same_weights():
    model = _tiny_model()
    sd = {f"module.{k}": v for k, v in model.net.state_dict().items()}
    for name, _ in prunable_layers(model.net):
        sd[f"module.{name}.mask_weight"] = torch.full_like(sd[f"module.{name}.weight"], MASK_MAX)
    sd["module.linear.mask_bias"] = torch.full_like(sd["module.linear.bias"], MASK_MAX)
    sd["module.conv1.mask_bias"] = torch.full_like(sd["module.conv1.bias"], MASK_MAX)
    converted = convert_mad_checkpoint({"net": sd, "acc": 50.0})
    assert converted.keys() == model.net.state_dict().keys()
    for key, value in model.net.state_dict().items():
        assert torch.equal(converted[key], value), key


def test_a_checkpoint_with_any_other_object_is_refused(tmp_path):
    path = tmp_path / "evil.t7"
    torch.save({"net": {"linear.weight": torch.ones(2, 2)}, "args": argparse.Namespace(), "extra": _NotAllowed()}, path)
    with pytest.raises(UnsafeCheckpointError, match="_NotAllowed"):
        load_mad_checkpoint(path)
    assert not _NotAllowed.constructed
    corrupt = tmp_path / "corrupt.t7"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt") as info:
        load_mad_checkpoint(corrupt)
    assert not isinstance(info.value, UnsafeCheckpointError)
    with pytest.raises(FileNotFoundError):
        load_mad_checkpoint(tmp_path / "missing.t7")


def test_mad_resnet18_keys_are_ours():
    # MAD's models/resnet_mask.py is kuangliu's ResNet-18 with Conv2d_mask/Linear_mask in place of the layers.
    expected = {
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.bias",
        "layer4.1.bn2.weight",
        "linear.weight",
        "linear.bias",
    }
    ours = set(build_model("resnet18", "cifar10").net.state_dict())
    assert expected <= ours


def test_code_defaults_kept_and_the_digits_finetuning_rate_is_the_dense_parents():
    """The code's lr 0.1 (for BatchNorm networks) killed one of five digits seeds at sparsity 0.5; see digits_config."""
    from bench.track import TRACKS

    method = get_method("mad")
    cfg = method.config()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.mart_beta, cfg.mask_steps) == (0.1, 0.9, 2e-4, 0.5, 20)
    digits = method.digits_config()
    assert digits.lr == TRACKS["digits"].training.lr < cfg.lr
    assert method.digits_config(lr=0.1).lr == 0.1
