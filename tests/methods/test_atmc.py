"""ATMC adapter (Gui et al., NeurIPS 2019): global l0 projection, 0.5/0.5 loss, k-means ADMM quantisation, factors.

Every run is tiny: a freshly initialised small CNN, a few dozen digits images, one epoch per stage, PGD-2.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import methods.atmc as atmc_module
from bench.checkpoints import load_state_dict, load_weights
from bench.models import build_model, unwrap
from bench.sparsity import measure_sparsity
from methods.atmc import (
    ATMC,
    _Factorised,
    _QuantADMM,
    atmc_loss,
    convert_atmc_checkpoint,
    kmeans_quantize,
    l0_project,
    reconstruct_weight,
)
from methods.base import PruneData, get_method
from methods.common import prunable_layers
from tests.methods import atmc_upstream as upstream

N_TRAIN = 48
EPS = 0.2
SPARSITY = 0.9
TINY = {
    "sparse_epochs": 1,
    "sparse_milestones": (),
    "factor_epochs": 1,
    "factor_milestones": (),
    "quant_epochs": 1,
    "quant_milestones": (),
    "quant_interval": 2,
    "batch_size": 16,
    "pgd_steps": 2,
}


@pytest.fixture(scope="module")
def dense(small_cnn_init):
    return small_cnn_init


@pytest.fixture(scope="module")
def data(digits):
    xtr, ytr, _, _ = digits
    return PruneData(xtr[:N_TRAIN], ytr[:N_TRAIN], eps=EPS)


def _prune(dense, data, seed=0, sparsity=SPARSITY, **overrides):
    method = get_method("atmc")
    return method.prune(copy.deepcopy(dense), sparsity, data, method.config(**{**TINY, **overrides}), seed=seed)


def _weights(model):
    return {name: m.weight for name, m in prunable_layers(unwrap(model))}


def _n_keep(model, sparsity=SPARSITY):
    return int(round(1 - sparsity, 12) * sum(w.numel() for w in _weights(model).values()))


def _nnz(model):
    return sum(int(torch.count_nonzero(w)) for w in _weights(model).values())


@pytest.fixture(scope="module")
def result(dense, data):
    return _prune(dense, data, bits=2)


def test_card_and_defaults_follow_the_released_code():
    method = get_method("atmc")
    assert isinstance(method, ATMC) and method.card.scope == "global" and method.card.criterion == "SOLWM"
    assert "KEPT" in method.card.native_sparsity
    cfg = method.config()
    assert (cfg.sparse_epochs, cfg.sparse_lr, cfg.sparse_milestones) == (200, 0.01, (30, 60, 90, 120))
    assert (cfg.factor_epochs, cfg.factor_lr, cfg.factor_milestones, cfg.factorize) == (
        200,
        0.005,
        (60, 80, 120),
        False,
    )
    assert (cfg.bits, cfg.quant_epochs, cfg.quant_interval, cfg.rho, cfg.kmeans_iters) == (8, 150, 5, 0.1, 20)
    assert (cfg.batch_size, cfg.pgd_steps, cfg.pgd_step_ratio, cfg.random_start, cfg.clean_weight) == (
        128,
        7,
        1.25,
        False,
        0.5,
    )
    assert (cfg.momentum, cfg.weight_decay) == (0.9, 1e-4)
    with pytest.raises(ValueError, match="unknown option"):
        method.config(bitz=4)
    with pytest.raises(ValueError, match="bits"):
        _prune(
            build_model("small_cnn", "digits"), PruneData(torch.zeros(2, 1, 8, 8), torch.zeros(2).long(), 0.1), bits=40
        )


def test_l0_projection_is_global_exact_and_keeps_the_largest(dense):
    net = unwrap(copy.deepcopy(dense))
    weights = _weights(net)
    before = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    n_keep = _n_keep(net)
    masks = l0_project(weights, n_keep)
    assert _nnz(net) == n_keep == sum(int(m.sum()) for m in masks.values())
    kept = torch.cat([m.flatten() for m in masks.values()])
    assert before[kept].min() >= before[~kept].max(), "the zero set is the smallest |w| over all layers"
    # Global, not local: the layers end up with different densities.
    densities = {name: float(m.float().mean()) for name, m in masks.items()}
    assert max(densities.values()) - min(densities.values()) > 0.01
    again = l0_project(weights, n_keep)
    assert all(torch.equal(again[k], masks[k]) for k in masks), "idempotent"


def test_result_has_exact_nonzero_count_and_quantised_layers(result, dense):
    model = result.model
    assert set(model.state_dict()) == set(dense.state_dict())
    n_keep = _n_keep(dense)
    assert _nnz(model) == n_keep == result.native_sparsity["n_keep"]
    assert result.native_sparsity["prune_ratio"] == pytest.approx(0.1) and result.native_sparsity["bits"] == 2
    for name, w in _weights(model).items():
        values = torch.unique(w)
        assert values.numel() <= 2**2 + 1, name
        if (w == 0).any():
            assert (values == 0).any()
    assert {h["phase"] for h in result.history} == {"sparse", "quantise"}
    assert measure_sparsity(model).sparsity == pytest.approx(1 - n_keep / measure_sparsity(model).weight_params)


def test_unquantised_run_keeps_exact_count(dense, data):
    res = _prune(dense, data, bits=None)
    assert _nnz(res.model) == _n_keep(dense)
    assert {h["phase"] for h in res.history} == {"sparse"}
    assert any(torch.unique(w).numel() > 2**8 + 1 for w in _weights(res.model).values()), "not quantised"


def test_factorised_stage_keeps_exact_count(dense, data):
    res = _prune(dense, data, factorize=True, bits=3)
    assert _nnz(res.model) == _n_keep(dense)
    assert [h["phase"] for h in res.history] == ["sparse", "factorised", "quantise"]
    assert all(torch.unique(w).numel() <= 2**3 + 1 for w in _weights(res.model).values())


def test_same_seed_same_mask(dense, data, result):
    again = _prune(dense, data, bits=2)
    for a, b in zip(_weights(result.model).values(), _weights(again.model).values(), strict=True):
        assert torch.equal(a == 0, b == 0)


def test_kmeans_quantize_fixed_zero_centre():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    w[torch.rand_like(w) < 0.7] = 0.0
    for bits in (1, 2, 4):
        q = kmeans_quantize(w, bits)
        assert torch.equal(q != 0, w != 0), "zero pattern preserved, no surviving weight snaps to 0"
        values = torch.unique(q)
        assert values.numel() <= 2**bits + 1 and (values == 0).any()
    # Lloyd's fixed point: each centre is the mean of its members, members are nearest to their centre.
    q = kmeans_quantize(w, 2)
    for c in torch.unique(q[q != 0]):
        assert float(w[q == c].mean()) == pytest.approx(float(c), abs=1e-5)
    # More bits, smaller error.
    err = [float((kmeans_quantize(w, b) - w).norm()) for b in (1, 2, 4)]
    assert err[0] > err[1] > err[2]
    # An explicit support: entries outside become 0.
    support = w.abs() > 1.0
    assert torch.equal(kmeans_quantize(w, 3, support=support) != 0, support)


def test_quant_admm_updates(dense):
    net = unwrap(copy.deepcopy(dense))
    weights = _weights(net)
    l0_project(weights, _n_keep(net))
    admm = _QuantADMM(weights, get_method("atmc").config(bits=2))
    assert all(torch.equal(admm.Z[n], w.detach()) for n, w in weights.items()) and admm.penalty() == 0
    with torch.no_grad():
        for w in weights.values():
            w.mul_(1.1)
    u_old = {k: v.clone() for k, v in admm.U.items()}
    admm.update()
    for name, w in weights.items():
        z = admm.Z[name]
        assert torch.equal(z != 0, w != 0) and torch.unique(z).numel() <= 5
        assert torch.allclose(admm.U[name] - u_old[name], w.detach() - z, atol=1e-6)
    expected = 0.05 * sum((w - admm.Z[n] + admm.U[n]).pow(2).sum() for n, w in weights.items())
    assert float(admm.penalty().detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_loss_is_half_clean_half_adversarial(dense, data):
    model = copy.deepcopy(dense)
    x, y = data.x[:8], data.y[:8]
    torch.manual_seed(0)
    loss, clean, adv = (t.detach() for t in atmc_loss(model, x, y, eps=EPS, steps=2, step_size=1.25 * EPS / 2))
    assert float(clean) == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-6)
    assert float(loss) == pytest.approx(0.5 * float(clean) + 0.5 * float(adv), rel=1e-6)
    # No random start (the code's is a no-op): zero steps give back x itself, so adv CE = clean CE.
    _, clean0, adv0 = (t.detach() for t in atmc_loss(model, x, y, eps=EPS, steps=0, step_size=0.1))
    assert float(adv0) == pytest.approx(float(clean0), rel=1e-6)


def test_training_attacks_stay_in_the_ball(dense, data, monkeypatch):
    seen = []
    real = atmc_module.pgd_linf

    def recording(model, x, y, **kw):
        x_adv = real(model, x, y, **kw)
        seen.append((x.clone(), x_adv.clone(), kw))
        return x_adv

    monkeypatch.setattr(atmc_module, "pgd_linf", recording)
    _prune(dense, data, bits=2, random_start=True)
    assert seen
    for x, x_adv, kw in seen:
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert kw["steps"] == 2 and kw["step_size"] == pytest.approx(1.25 * EPS / 2)


def test_factorised_model_matches_dense_at_init(dense, data):
    model = copy.deepcopy(dense)
    fact = _Factorised(model, "net.", prunable_layers(unwrap(model)))
    with torch.no_grad():
        assert torch.allclose(fact(data.x[:10]), model(data.x[:10]), atol=1e-6)
    # Both branches of the rule: rank = in·k·k for the first conv (9 < 16 filters), rank = out for the others.
    ranks = [(a.shape[0], b.shape[0], a[0].numel()) for a, b in zip(fact.A, fact.B, strict=True)]
    assert any(r == out < m for r, out, m in ranks) and any(r == m < out for r, out, m in ranks)


# ------------------------------------------------------------------------------------------------------
# Files in the authors' factor layout (tests/methods/atmc_upstream.py mirrors their Conv2dsp_v2 / Linearsp_v2).

_FACTOR_KEYS = ("weightA", "weightB", "weightC", "eye_const")


def _upstream_small_cnn(dense_net):
    """small_cnn's module tree with the code's factor layers, built from ``dense_net`` as --abc_special does."""
    ranks = upstream.get_ranks(dense_net)
    (c1, c2, c3), (l1, l2) = (
        [m for m in dense_net.features if isinstance(m, torch.nn.Conv2d)],
        [m for m in dense_net.classifier if isinstance(m, torch.nn.Linear)],
    )

    def conv(m, rank):
        return upstream.Conv2dsp_v2(m.in_channels, m.out_channels, 3, rank, padding=1)

    native = torch.nn.Sequential()
    native.features = torch.nn.Sequential(
        conv(c1, ranks[0]),
        torch.nn.ReLU(),
        conv(c2, ranks[1]),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        conv(c3, ranks[2]),
        torch.nn.ReLU(),
    )
    native.classifier = torch.nn.Sequential(
        torch.nn.Flatten(),
        upstream.Linearsp_v2(l1.in_features, l1.out_features, ranks[3]),
        torch.nn.ReLU(),
        upstream.Linearsp_v2(l2.in_features, l2.out_features, ranks[4]),
    )
    upstream.set_weights(native, upstream.raw_weights(dense_net, ranks))
    native.load_state_dict(dense_net.state_dict(), strict=False)
    return native.eval()


def _move_factors(model, seed=1):
    """Sparse random changes to every A, B and C, as training leaves them (all three nonzero, off the start)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, upstream.FACTOR_LAYERS):
                for p in (m.weightA, m.weightB, m.weightC):
                    keep = torch.rand(p.shape, generator=gen) > 0.5
                    p.add_(0.1 * torch.randn(p.shape, generator=gen) * keep)
    return model


def test_factorised_stage_uses_the_authors_layout_and_start(dense):
    # The factors are the parameters of the code's Conv2dsp_v2/Linearsp_v2 layers, started as raw_weights does.
    net = unwrap(copy.deepcopy(dense))
    fact = _Factorised(net, "", prunable_layers(net))
    native = _upstream_small_cnn(net)
    expected = {k: v for k, v in native.state_dict().items() if k.rpartition(".")[2] in _FACTOR_KEYS}
    ours = fact.factor_state_dict()
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key].shape == value.shape and torch.equal(ours[key], value), key
    # After training moves every factor, the code's layers compute the weights this stage trains through.
    with torch.no_grad():
        for p in [*fact.A, *fact.B, *fact.C]:
            p.add_(0.1 * torch.randn_like(p))
    native.load_state_dict({**native.state_dict(), **fact.factor_state_dict()})
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fact(x), native(x), atol=1e-5, rtol=0)


def test_converter_reproduces_the_authors_forward(dense, data, tmp_path):
    net = unwrap(copy.deepcopy(dense))
    native = _upstream_small_cnn(net)
    x = data.x[:16]
    with torch.no_grad():
        assert torch.equal(native(x), net(x)), "raw_weights start: same function as the dense model"
    _move_factors(native)
    path = tmp_path / "quant_closest_digits_atmc.pth"
    upstream.model_snapshot(native, path)
    converted = convert_atmc_checkpoint(load_state_dict(path))
    assert not any(k.endswith(_FACTOR_KEYS) for k in converted)
    fresh = build_model("small_cnn", "digits").eval()
    load_weights(fresh, converted)
    with torch.no_grad():
        expected = native(x)
        torch.testing.assert_close(fresh.net(x), expected, atol=1e-5, rtol=0)
        assert not torch.allclose(expected, net(x), atol=1e-2), "the factors moved the function"
    # A DataParallel prefix and a {"state_dict": ...} container are removed.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in native.state_dict().items()}, "epoch": 3}
    again = convert_atmc_checkpoint(wrapped)
    assert again.keys() == converted.keys() and all(torch.equal(again[k], converted[k]) for k in converted)
    # Dense checkpoints pass through.
    plain = net.state_dict()
    out = convert_atmc_checkpoint({"state_dict": {f"module.{k}": v for k, v in plain.items()}})
    assert out.keys() == plain.keys() and all(torch.equal(out[k], plain[k]) for k in plain)


_LAYER_CASES = {
    "conv rank = in·k·k < out: B(A + I) + C": lambda: upstream.Conv2dsp_v2(3, 32, 3, 27, padding=1),
    "conv rank = out < in·k·k: (B + I)A + C": lambda: upstream.Conv2dsp_v2(8, 12, 3, 12, padding=1, bias=False),
    "conv rank = in·k·k = out: the code takes B(A + I) + C": lambda: upstream.Conv2dsp_v2(6, 6, 1, 6),
    "linear rank = in < out": lambda: upstream.Linearsp_v2(5, 7, 5),
    "linear rank = out < in": lambda: upstream.Linearsp_v2(9, 4, 4),
    "linear rank = in = out": lambda: upstream.Linearsp_v2(6, 6, 6),
}


@pytest.mark.parametrize("case", list(_LAYER_CASES))
def test_reconstruct_weight_is_the_authors_forward(case):
    torch.manual_seed(0)
    module = _move_factors(_LAYER_CASES[case]())
    sd = module.state_dict()
    w = reconstruct_weight(sd["weightA"], sd["weightB"], sd["weightC"], sd["eye_const"])
    is_conv = isinstance(module, upstream.Conv2dsp_v2)
    x = torch.randn(2, module.in_channels, 5, 5) if is_conv else torch.randn(3, module.in_features)
    with torch.no_grad():
        ours = F.conv2d(x, w, module.bias, padding=module.padding) if is_conv else F.linear(x, w, module.bias)
        torch.testing.assert_close(ours, module(x), atol=1e-5, rtol=0, msg=case)
    # Without the stored buffer the identity is built.
    assert torch.equal(reconstruct_weight(sd["weightA"], sd["weightB"], sd["weightC"]), w)


def test_layouts_the_authors_never_write_are_refused():
    a, b, c = torch.zeros(4, 18), torch.zeros(4, 4), torch.zeros(4, 2, 3, 3)
    # Conv factors flattened to two dimensions (this project's layout before it followed the code).
    flat = {"conv.weightA": a, "conv.weightB": b, "conv.weightC": c, "conv.eye_const": torch.eye(4)}
    with pytest.raises(ValueError, match=r"'conv' has weightA \(4, 18\).*not the authors' factor layout") as err:
        convert_atmc_checkpoint(flat)
    assert "\n" not in str(err.value) and "Conv2dsp_v2" in str(err.value)
    # A rank below min(in·k·k, out): the code's forward cannot add the identity.
    low = {"l.weightA": torch.zeros(3, 6), "l.weightB": torch.zeros(5, 3), "l.weightC": torch.zeros(5, 6)}
    with pytest.raises(ValueError, match=r"rank 3 .* min\(in·k·k, out\) = 5"):
        convert_atmc_checkpoint({**low, "l.eye_const": torch.eye(3)})
    ok = {"l.weightA": torch.zeros(5, 6), "l.weightB": torch.zeros(5, 5), "l.weightC": torch.zeros(5, 6)}
    with pytest.raises(ValueError, match=r"eye_const of shape \(6, 6\), expected the 5×5"):
        convert_atmc_checkpoint({**ok, "l.eye_const": torch.eye(6)})
    with pytest.raises(ValueError, match="lacks 'l.eye_const'"):
        convert_atmc_checkpoint(ok)
    with pytest.raises(ValueError, match="lacks 'l.weightB'"):
        convert_atmc_checkpoint({"l.weightA": torch.zeros(2, 2), "l.weightC": torch.zeros(2, 2)})


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_512_channel_layer_converts_without_a_large_intermediate():
    # ResNet-18's layer4 3x3 conv (rank = out = 512; the former broadcast asked for 512^4 floats, 256 GiB) and its
    # 1x1 projection shortcut (rank = in = 256), as the code saves them.
    torch.manual_seed(0)
    block = torch.nn.Sequential()
    block.conv2 = upstream.Conv2dsp_v2(512, 512, 3, 512, padding=1, bias=False)
    block.shortcut = upstream.Conv2dsp_v2(256, 512, 1, 256, stride=2, bias=False)
    sd = _move_factors(block).state_dict()
    biggest_input = max(t.numel() for t in sd.values())
    start = time.perf_counter()
    with _LargestTensor() as probe:
        converted = convert_atmc_checkpoint(sd)
    elapsed = time.perf_counter() - start
    assert probe.largest <= biggest_input, "no tensor larger than the layer's own weight is built"
    assert elapsed < 10.0, f"{elapsed:.1f} s for two layers (about 0.1 s on one core)"
    x = torch.randn(1, 512, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            F.conv2d(x, converted["conv2.weight"], padding=1), block.conv2(x), atol=1e-4, rtol=1e-5
        )
    xs = torch.randn(1, 256, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(xs, converted["shortcut.weight"], stride=2), block.shortcut(xs))
