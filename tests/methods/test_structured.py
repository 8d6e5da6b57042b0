"""Structured pruning (Jordao & Pedrini, ICCV-W 2021): criteria, physical rebuild, masks, targets, clean data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bench.training
import methods.common
from bench.models import CifarResNet, Normalize, NormalizedModel
from methods.base import PruneData, get_method
from methods.structured import (
    CRITERIA,
    _filter_scores,
    _plan,
    _State,
    expected_abs_scores,
    hrank_scores,
    kl_scores,
    l1_scores,
    rebuild,
)

N = 96


@pytest.fixture(scope="module")
def dense(digits_cnn):
    return digits_cnn


def _resnet(blocks: int = 3) -> NormalizedModel:
    torch.manual_seed(0)
    model = NormalizedModel(Normalize([0.5] * 3, [0.25] * 3), CifarResNet(blocks, 10))
    # Non-trivial BN statistics and affine parameters, so that zeroing a channel is really tested.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _data(digits, n=N):
    xtr, ytr, _, _ = digits
    return PruneData(xtr[:n], ytr[:n], eps=0.2)


def test_l1_matches_hand_computation():
    w = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]], [[[-0.5, 0.5], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    assert torch.equal(l1_scores(w), torch.tensor([6.0, 1.0]))


def test_activation_criteria_hand_cases():
    u = torch.arange(1.0, 5.0)
    rank1 = torch.outer(u, u)
    act = torch.stack([rank1, torch.eye(4), torch.zeros(4, 4)])[None]  # (1, 3, 4, 4)
    assert torch.equal(hrank_scores(act), torch.tensor([1.0, 4.0, 0.0]))
    assert torch.allclose(expected_abs_scores(act), torch.tensor([rank1.mean(), 0.25, 0.0]))


def test_kl_is_zero_for_a_filter_whose_output_is_already_zero():
    base = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])

    def logits(f):
        return base if f in (None, 0) else base + torch.tensor([f * 1.0, 0.0, 0.0])

    s = kl_scores(logits, 3)
    assert s[0] == 0 and (s[1:] > 0).all()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_each_criterion_scores_every_filter_deterministically(criterion, dense, digits):
    cfg = get_method("structured").digits_config(criterion=criterion)
    data = _data(digits)
    net = dense.net
    state = _State(net, *_plan(net))
    a = _filter_scores(dense, state, cfg, data.x, data.y)
    b = _filter_scores(dense, state, cfg, data.x, data.y)
    assert set(a) == {"features.0", "features.2"}
    assert a["features.0"].shape == (16,) and a["features.2"].shape == (32,)
    for k in a:
        assert torch.isfinite(a[k]).all() and torch.equal(a[k], b[k])
    if criterion == "l1":
        assert torch.allclose(a["features.0"], net.features[0].weight.abs().sum(dim=(1, 2, 3)))


def _masked_and_rebuilt(model, keep, removed_blocks=()):
    net = model.net
    state = _State(net, *_plan(net))
    for conv, idx in keep.items():
        state.alive[conv][:] = False
        state.alive[conv][idx] = True
    state.removed_blocks = list(removed_blocks)
    state._rebuild_masks()
    masked = copy.deepcopy(model)
    state.apply(masked.net)
    return masked, rebuild(model, keep, removed_blocks), state


def _weights(module):
    return [(n, m.weight) for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_rebuilt_small_cnn_equals_masked(dense, digits):
    keep = {"features.0": [0, 3, 5, 7, 15], "features.2": list(range(0, 32, 3))}
    masked, small, state = _masked_and_rebuilt(dense, keep)
    x = digits[0][:32]
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert small.net.features[0].out_channels == 5 and small.net.features[2].in_channels == 5
    assert small.net.features[5].in_channels == len(keep["features.2"])
    # Real parameter count == non-zeros of the masked network over the affected layers (+ untouched layers).
    affected = set(state.layers)
    nonzero = sum(int((w != 0).sum()) if n in affected else w.numel() for n, w in _weights(masked.net))
    assert sum(w.numel() for _, w in _weights(small.net)) == nonzero


def test_rebuilt_resnet_with_removed_blocks_equals_masked():
    model = _resnet(3)
    net = model.net
    groups, blocks = _plan(net)
    keep = {g.conv: list(range(0, net.get_submodule(g.conv).out_channels, 2)) for g in groups}
    masked, small, state = _masked_and_rebuilt(model, keep, ["layer1.1", "layer3.2"])
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert isinstance(small.net.layer1[1], nn.Identity)
    assert small.net.layer2[0].conv1.out_channels == 16 and small.net.layer2[0].conv2.in_channels == 16
    affected = set(state.layers)
    nonzero = sum(int((w != 0).sum()) if n in affected else w.numel() for n, w in _weights(masked.net))
    assert sum(w.numel() for _, w in _weights(small.net)) == nonzero
    # Downsampling blocks (first of stages 2 and 3) are not removable.
    assert {b.name for b in blocks} == {
        "layer1.0",
        "layer1.1",
        "layer1.2",
        "layer2.1",
        "layer2.2",
        "layer3.1",
        "layer3.2",
    }


def test_removed_structures_stay_exactly_zero_after_finetuning(dense, digits):
    method = get_method("structured")
    cfg = method.digits_config(
        criterion="l1", finetune_epochs=2, batch_size=16, momentum=0.9, weight_decay=1e-2, lr=0.05
    )
    result = method.prune(copy.deepcopy(dense), 0.75, _data(digits), cfg)
    net = result.model.net
    removed1 = (net.features[0].weight.flatten(1) == 0).all(dim=1)
    removed2 = (net.features[2].weight.flatten(1) == 0).all(dim=1)
    w = result.native_sparsity["widths"]
    assert int((~removed1).sum()) == w["features.0"] and int((~removed2).sum()) == w["features.2"]
    assert (net.features[0].bias[removed1] == 0).all() and (net.features[2].bias[removed2] == 0).all()
    assert (net.features[2].weight[:, removed1] == 0).all() and (net.features[5].weight[:, removed2] == 0).all()
    # Steps really happened (kept weights moved away from the dense ones).
    assert not torch.equal(net.features[5].weight[:, ~removed2], dense.net.features[5].weight[:, ~removed2])
    assert result.history and all(h["finetune_loss"] for h in result.history)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_parameters_removed_reach_the_target(sparsity, dense, digits):
    method = get_method("structured")
    cfg = method.digits_config(criterion="l1", finetune_epochs=0)
    result = method.prune(copy.deepcopy(dense), sparsity, _data(digits), cfg)
    layers = method.pruned_layers(dense)
    zeros = sum(int((dict(result.model.net.named_modules())[n].weight == 0).sum()) for n in layers)
    numel = sum(dict(dense.net.named_modules())[n].weight.numel() for n in layers)
    assert abs(zeros / numel - sparsity) <= method.sparsity_tolerance
    assert sparsity <= result.native_sparsity["params_removed"] <= sparsity + method.sparsity_tolerance
    rebuilt = rebuild(
        result.model,
        {
            k: (v != 0).flatten(1).any(1).nonzero().flatten()
            for k, v in [
                ("features.0", result.model.net.features[0].weight),
                ("features.2", result.model.net.features[2].weight),
            ]
        },
    )
    assert result.native_sparsity["rebuilt_params"] == sum(p.numel() for p in rebuilt.parameters())


def test_layers_mode_on_resnet_keeps_two_blocks_per_stage(digits):
    method = get_method("structured")
    model = _resnet(3)
    torch.manual_seed(0)
    data = PruneData(torch.rand(24, 3, 32, 32), torch.arange(24) % 10, eps=8 / 255)
    cfg = method.config(criterion="expected_abs", mode="layers", finetune_epochs=0, n_samples=16, batch_size=8)
    result = method.prune(model, 0.5, data, cfg)
    removed = result.native_sparsity["removed_blocks"]
    assert removed and all(name not in ("layer2.0", "layer3.0") for name in removed)
    for stage in ("layer1", "layer2", "layer3"):
        assert 3 - sum(name.startswith(stage + ".") for name in removed) >= 2
    for name in removed:
        block = result.model.net.get_submodule(name)
        assert (block.conv1.weight == 0).all() and (block.bn2.weight == 0).all() and (block.bn2.bias == 0).all()
    # Only 3 of 9 blocks can go (≈ 1/3 of the affected weights): the target is not reached, and that is reported.
    assert result.native_sparsity["params_removed"] < 0.5


def test_sparsities_outside_the_grid_are_refused(dense, digits):
    method = get_method("structured")
    with pytest.raises(ValueError, match="defined at sparsities"):
        method.prune(dense, 0.8, _data(digits), method.digits_config())
    with pytest.raises(ValueError, match="residual blocks"):
        method.prune(dense, 0.5, _data(digits), method.digits_config(mode="layers"))
    with pytest.raises(ValueError, match="criterion"):
        method.prune(dense, 0.5, _data(digits), method.digits_config(criterion="cka"))


def test_only_clean_training_images_are_seen(dense, digits, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("structured pruning must not build adversarial examples")

    for mod in (methods.common, bench.training):
        for name in ("pgd_linf", "trades_adversarial", "mart_adversarial"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, forbidden)
    data = _data(digits, 48)
    model = copy.deepcopy(dense)
    seen = []
    model.normalize.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    method = get_method("structured")
    method.prune(model, 0.5, data, method.digits_config(criterion="kl", finetune_epochs=1))
    assert seen
    flat = data.x.flatten(1)
    for batch in seen:
        assert (torch.cdist(batch.flatten(1), flat).min(dim=1).values == 0).all()


def test_both_mode_on_resnet_hits_the_target_and_keeps_zeros():
    method = get_method("structured")
    model = _resnet(3)
    torch.manual_seed(0)
    data = PruneData(torch.rand(16, 3, 32, 32), torch.arange(16) % 10, eps=8 / 255)
    cfg = method.config(
        criterion="l1",
        mode="both",
        p_filter=0.5,
        max_iterations=3,
        finetune_epochs=1,
        n_samples=8,
        batch_size=8,
        weight_decay=1e-2,
    )
    result = method.prune(model, 0.75, data, cfg, seed=1)
    ns = result.native_sparsity
    assert abs(ns["params_removed"] - 0.75) <= method.sparsity_tolerance
    net = result.model.net
    for g in _plan(net)[0]:
        conv, bn = net.get_submodule(g.conv), net.get_submodule(g.bn)
        gone = (conv.weight.flatten(1) == 0).all(dim=1)
        assert (bn.weight[gone] == 0).all() and (bn.bias[gone] == 0).all()
        assert (net.get_submodule(g.consumer).weight[:, gone] == 0).all()
    for name in ns["removed_blocks"]:
        assert (net.get_submodule(name).bn2.weight == 0).all()
    keep = {k: (net.get_submodule(k).weight != 0).flatten(1).any(1).nonzero().flatten() for k in ns["widths"]}
    small = rebuild(result.model, keep, ns["removed_blocks"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), result.model(x), atol=1e-5)
    assert ns["rebuilt_params"] == sum(p.numel() for p in small.parameters())
