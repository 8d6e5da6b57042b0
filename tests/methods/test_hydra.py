"""HYDRA adapter (Sehwag et al., NeurIPS 2020): the invariants of methods.md §2 on tiny digits schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bench.checkpoints import load_weights
from bench.models import BasicBlock, Normalize, NormalizedModel, build_model
from bench.sparsity import measure_sparsity
from methods.base import PruneData, get_method
from methods.common import magnitude_masks, prunable_layers, trades_adversarial
from methods.hydra import (
    SCORES,
    Hydra,
    _Subnet,
    _train,
    attach_scores,
    convert_hydra_checkpoint,
    hydra_mask,
    set_phase,
)

K = 0.3
SPARSITY = 0.7


class TinyResNet(nn.Module):
    """Stem conv + BN, one residual block with a 1x1 projection shortcut, linear head (1x8x8 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 16, stride=2)
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def tiny_resnet(seed: int = 0) -> NormalizedModel:
    torch.manual_seed(seed)
    return NormalizedModel(Normalize([0.3], [0.3]), TinyResNet())


@pytest.fixture
def small(digits):
    xtr, ytr, _, _ = digits
    return PruneData(xtr[:32], ytr[:32], eps=0.2)


def tiny_config(**kw):
    base = {"prune_epochs": 1, "finetune_epochs": 1, "batch_size": 16, "pgd_steps": 2}
    return get_method("hydra").config(**{**base, **kw})


def expected_zeros(model: nn.Module, k: float) -> int:
    return sum(int((1 - k) * layer.weight.numel()) for _, layer in prunable_layers(model))


def test_card_and_paper_defaults():
    method = get_method("hydra")
    assert isinstance(method, Hydra)
    assert method.card.taxonomy == {
        "pipeline": "A",
        "pretraining": "AT-TRADES",
        "finetuning": "AT-TRADES",
        "1S/IT": "1S",
        "structure": "US",
        "scope": "local",
        "criterion": "LIS",
        "losses": ["TRADES"],
    }
    cfg = method.config()
    assert (cfg.prune_epochs, cfg.finetune_epochs, cfg.batch_size, cfg.pgd_steps) == (20, 100, 128, 10)
    assert (cfg.lr_prune, cfg.lr_finetune, cfg.momentum, cfg.weight_decay, cfg.beta) == (0.1, 0.01, 0.9, 1e-4, 6.0)
    assert cfg.step_size_ratio * 8 / 255 == pytest.approx(2 / 255)
    assert cfg.scaled_score_init
    assert not cfg.random_start  # TRADES' own x + 0.001·N(0, I) start
    assert method.digits_config().prune_epochs < cfg.prune_epochs
    with pytest.raises(ValueError, match="unknown option"):
        method.config(k=0.1)


def test_hydra_mask_matches_reference_rule():
    torch.manual_seed(0)
    for shape, k in [((16, 8, 3, 3), 0.05), ((10, 16), 0.3), ((7,), 0.5), ((33, 3), 1.0)]:
        s = torch.randn(shape)
        removed = int((1 - k) * s.numel())
        # The reference GetSubnet: ascending sort of |s|, zero the first int((1 − k)·numel) positions.
        ref = torch.ones(s.numel())
        ref[s.abs().flatten().sort().indices[:removed]] = 0
        mask = hydra_mask(s, k)
        assert mask.dtype == torch.bool and mask.shape == s.shape
        assert torch.equal(mask.flatten().float(), ref)
        assert int(mask.sum()) == s.numel() - removed >= math.ceil(k * s.numel() - 1e-9)


def test_scaled_init_gives_the_magnitude_mask_and_kaiming_bound():
    model = tiny_resnet()
    subnet = attach_scores(model, K)
    masks = subnet.masks()
    assert set(masks) == {name for name, _ in prunable_layers(model)}
    for name, layer in prunable_layers(model):
        s = getattr(layer, SCORES)
        fan_in = layer.weight[0].numel()
        assert float(s.detach().abs().max()) == pytest.approx(math.sqrt(6 / fan_in), rel=1e-6)
        assert torch.equal(hydra_mask(s, K), hydra_mask(layer.weight, K))
        assert int(masks[name].sum()) == layer.weight.numel() - int((1 - K) * layer.weight.numel())


def test_prune_step_trains_scores_and_bn_only(small):
    model = tiny_resnet()
    subnet = attach_scores(model, K)
    set_phase(model, "prune")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_batch = PruneData(small.x[:16], small.y[:16], eps=small.eps)
    _train(subnet, one_batch, tiny_config(), torch.Generator().manual_seed(0), phase="prune", epochs=1, lr=0.1)
    after = dict(model.named_parameters())
    for name, layer in prunable_layers(model):
        assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])
        if layer.bias is not None:
            assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"])
        assert not torch.equal(after[f"{name}.{SCORES}"], before[f"{name}.{SCORES}"])
    bn_params = [n for n in before if ".bn" in n or n.startswith("net.bn")]
    assert bn_params and all(not torch.equal(after[n], before[n]) for n in bn_params)


def test_finetune_step_trains_weights_and_freezes_scores(small):
    model = tiny_resnet()
    subnet = attach_scores(model, K)
    set_phase(model, "finetune")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_batch = PruneData(small.x[:16], small.y[:16], eps=small.eps)
    masks = subnet.masks()
    _train(
        subnet,
        one_batch,
        tiny_config(),
        torch.Generator().manual_seed(0),
        phase="finetune",
        epochs=1,
        lr=0.01,
        masks=masks,
    )
    after = dict(model.named_parameters())
    for name, _ in prunable_layers(model):
        assert torch.equal(after[f"{name}.{SCORES}"], before[f"{name}.{SCORES}"])
        assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])


def test_straight_through_score_gradient(small):
    model = tiny_resnet().eval()
    subnet = attach_scores(model, K, scaled=False)
    set_phase(model, "prune")
    x, y = small.x[:8], small.y[:8]
    F.cross_entropy(subnet(x), y).backward()
    # ∂L/∂w_eff from the same network run with the masked weights as leaves.
    masks = subnet.masks()
    layers = dict(prunable_layers(model))
    w_eff = {f"{n}.weight": (layers[n].weight * masks[n]).detach().requires_grad_() for n in layers}
    grads = torch.autograd.grad(F.cross_entropy(functional_call(model, w_eff, (x,)), y), list(w_eff.values()))
    for layer, g in zip(layers.values(), grads, strict=True):
        s = getattr(layer, SCORES)
        torch.testing.assert_close(s.grad, s.sign() * layer.weight * g, rtol=1e-5, atol=1e-8)
        assert layer.weight.grad is None


def test_pruned_weights_stay_exactly_zero_through_finetuning(small):
    model = tiny_resnet()
    subnet = attach_scores(model, K, scaled=False)
    set_phase(model, "finetune")
    masks = subnet.masks()
    from methods.common import apply_masks

    apply_masks(model, masks)
    # Two epochs of two batches: momentum and weight decay both act on the pruned entries.
    _train(
        subnet,
        small,
        tiny_config(weight_decay=5e-2),
        torch.Generator().manual_seed(0),
        phase="finetune",
        epochs=2,
        lr=0.05,
        masks=masks,
    )
    for name, layer in prunable_layers(model):
        assert torch.all(layer.weight[~masks[name]] == 0)
        assert torch.count_nonzero(layer.weight[masks[name]]) == int(masks[name].sum())


def test_prune_returns_plain_model_at_floor_rule_sparsity(small):
    model = tiny_resnet()
    keys = list(model.state_dict())
    result = get_method("hydra").prune(model, SPARSITY, small, tiny_config(), seed=0)
    pruned = result.model
    assert type(pruned) is NormalizedModel and type(pruned.net) is TinyResNet
    assert list(pruned.state_dict()) == keys
    assert not any(SCORES in n for n, _ in pruned.named_parameters())
    assert result.native_sparsity == {"k": K}
    assert [h["phase"] for h in result.history] == ["prune", "finetune"]
    report = measure_sparsity(pruned)
    assert report.zero_weights == expected_zeros(model, K)
    for name, layer in prunable_layers(pruned.net):
        numel = layer.weight.numel()
        assert report.per_layer[name][1] == int((1 - K) * numel)
    # The input is untouched; BN and biases are not pruned.
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_resnet().state_dict().values(), strict=True)
    )
    assert torch.count_nonzero(pruned.net.bn1.weight) == pruned.net.bn1.weight.numel()
    assert pruned(small.x[:4]).shape == (4, 10)


def test_zero_prune_epochs_is_lwm(small):
    model = tiny_resnet()
    cfg = tiny_config(prune_epochs=0, finetune_epochs=1)
    result = get_method("hydra").prune(model, SPARSITY, small, cfg, seed=0)
    lwm = magnitude_masks(model, SPARSITY, scope="local")
    kept = {name: layer.weight != 0 for name, layer in prunable_layers(result.model)}
    assert set(kept) == set(lwm)
    for name in kept:
        assert torch.equal(kept[name], lwm[name])
    assert [h["phase"] for h in result.history] == ["finetune"]


def test_same_seed_same_mask(small):
    model = build_model("small_cnn", "digits")
    method = get_method("hydra")
    cfg = tiny_config(finetune_epochs=0)
    a = method.prune(model, SPARSITY, small, cfg, seed=3).model.state_dict()
    b = method.prune(model, SPARSITY, small, cfg, seed=3).model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    # The scores moved away from the magnitude mask in at least one layer.
    lwm = magnitude_masks(model, SPARSITY, scope="local")
    assert any(not torch.equal(a[f"{n}.weight"] != 0, m) for n, m in lwm.items())


@pytest.mark.parametrize("prefix", ["", "module."])
def test_converter_reproduces_subnet_logits(digits, prefix):
    xte = digits[2][:16]
    wrapped = build_model("small_cnn", "digits").eval()
    # A HYDRA subnet checkpoint: the bare architecture's keys (no "net."), weights plus popup_scores.
    subnet = attach_scores(wrapped.net, 0.1, scaled=False)
    native = {prefix + n: t for n, t in wrapped.net.state_dict().items()}
    assert any(n.endswith(f".{SCORES}") for n in native)
    converted = convert_hydra_checkpoint(native, k=0.1)
    assert not any(SCORES in n for n in converted)
    plain = build_model("small_cnn", "digits").eval()
    load_weights(plain, converted)
    with torch.no_grad():
        torch.testing.assert_close(plain(xte), subnet(wrapped.normalize(xte)), atol=1e-5, rtol=0)
    assert measure_sparsity(plain).zero_weights == expected_zeros(plain.net, 0.1)


def test_converter_needs_k_and_passes_dense_files_through():
    net = build_model("small_cnn", "digits").net
    dense = net.state_dict()
    assert convert_hydra_checkpoint(dense, k=None).keys() == dense.keys()
    assert all(torch.equal(convert_hydra_checkpoint(dense, k=None)[n], t) for n, t in dense.items())
    attach_scores(net, 0.05)
    with pytest.raises(ValueError, match="not stored in HYDRA checkpoints.*--k.*k-0.05"):
        convert_hydra_checkpoint(net.state_dict(), k=None)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        convert_hydra_checkpoint(net.state_dict(), k=5)
    broken = {n: t for n, t in net.state_dict().items() if n != "features.0.weight"}
    with pytest.raises(ValueError, match="features.0.popup_scores"):
        convert_hydra_checkpoint(broken, k=0.05)


def test_subnet_forward_uses_masked_weights():
    model = tiny_resnet().eval()
    subnet = attach_scores(model, K, scaled=False)
    assert isinstance(subnet, _Subnet)
    x = torch.rand(4, 1, 8, 8)
    masked = tiny_resnet().eval()
    masked.load_state_dict(convert_hydra_checkpoint(model.state_dict(), k=K))
    with torch.no_grad():
        torch.testing.assert_close(subnet(x), masked(x), atol=1e-6, rtol=0)


class _BlankThreshold(nn.Module):
    """What HYDRA at k = 0.05 makes of small_cnn's first conv: one tap per channel, ``relu(x − 0.1)`` per pixel.

    A blank pixel (exactly 0) is inside the dead zone, so its input gradient is exactly 0, yet raising it above
    0.1 (well inside ε = 0.2) changes the logits through a fixed random readout.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.readout = nn.Linear(64, 10)

    def forward(self, x):
        return self.readout(F.relu(x - 0.1).flatten(1))


def test_digits_trades_start_reaches_blank_pixels_that_sign_ascent_cannot_move(digits):
    """Regression: with TRADES' own start HYDRA 95 % collapsed on some digits-track seeds (gradient masking).

    Sign ascent from x + 0.001·N(0, I) leaves every blank pixel where it started (its gradient is exactly 0), so
    TRADES never trains against a perturbed background; the digits schedule starts uniformly in B∞(x, ε) ∩ [0, 1].
    """
    x = digits[0][:128]
    blank = x == 0
    assert blank.float().mean() > 0.3
    model = _BlankThreshold()
    cfg = get_method("hydra").digits_config()
    step_size = cfg.step_size_ratio * 0.2
    torch.manual_seed(0)
    paper = trades_adversarial(model, x, eps=0.2, steps=cfg.pgd_steps, step_size=step_size, random_start=False)
    torch.manual_seed(0)
    track = trades_adversarial(
        model, x, eps=0.2, steps=cfg.pgd_steps, step_size=step_size, random_start=cfg.random_start
    )
    for x_adv in (paper, track):
        assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    # The paper's start: blank pixels stay within the 0.001-scale start noise, below the 0.1 kink.
    assert float(paper[blank].max()) < 0.01
    # The digits schedule: about half of the blank pixels start past the kink, where they have a gradient, and
    # sign ascent takes many of them on to ε (those it moves down, or that start below 0.1, stay dead).
    assert float((track[blank] > 0.1).float().mean()) > 0.2
    assert float((track[blank] >= 0.2 - 1e-6).float().mean()) > 0.2
    # Pixels past the kink at x have a gradient, and both starts move them up to ε.
    strokes = x > 0.1 + 0.2
    for x_adv in (paper, track):
        assert float(((x_adv - x).abs()[strokes] >= 0.2 - 1e-6).float().mean()) > 0.5


def test_random_start_is_uniform_on_the_ball_inside_the_image_box(digits):
    """No start coordinate is pinned to the box: clipping a ball sample would leave half the blank pixels at 0."""
    x = digits[0][:256]
    torch.manual_seed(0)
    start = trades_adversarial(_BlankThreshold(), x, eps=0.2, steps=0, random_start=True)
    low, high = (x - 0.2).clamp(0, 1), (x + 0.2).clamp(0, 1)
    assert bool(((start >= low) & (start <= high)).all())
    u = (start - low) / (high - low)  # uniform on [0, 1] for every coordinate
    assert float((start[x == 0] == 0).float().mean()) < 1e-3
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    for part in (x == 0, x == 1, (x > 0.2) & (x < 0.8)):
        assert abs(float(u[part].mean()) - 0.5) < 0.03


def test_training_passes_the_configured_start_to_trades(small, monkeypatch):
    import methods.hydra as hydra_module

    seen = []
    real = hydra_module.trades_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["random_start"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hydra_module, "trades_loss", spy)
    model = tiny_resnet()
    subnet = attach_scores(model, K)
    set_phase(model, "prune")
    one_batch = PruneData(small.x[:16], small.y[:16], eps=small.eps)
    for start in (True, False):
        cfg = tiny_config(random_start=start)
        _train(subnet, one_batch, cfg, torch.Generator().manual_seed(0), phase="prune", epochs=1, lr=0.1)
        assert seen and set(seen) == {start}
        seen.clear()
    assert get_method("hydra").digits_config().random_start
