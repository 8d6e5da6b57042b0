"""ATMC adapter (Gui et al., NeurIPS 2019): global l0 projection, 0.5/0.5 loss, k-means ADMM quantisation, factors.

Every run is tiny: a freshly initialised small CNN, a few dozen digits images, one epoch per stage, PGD-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import methods.atmc as atmc_module
from bench.catalog import build_model
from bench.checkpoints import load_weights, measure_sparsity
from bench.models import unwrap
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
    # Both branches of the rule: rank = in·k·k for the first conv (9 < 32 filters), rank = out for the others.
    ranks = [(a.shape[0], b.shape[0], a.shape[1]) for a, b in zip(fact.A, fact.B, strict=True)]
    assert any(r == out for r, out, _ in ranks) and any(r == m for r, _, m in ranks)


def test_reconstruct_weight_matches_manual_matmul():
    torch.manual_seed(0)
    # rank = out = 4 < in·k·k = 18
    a, b, c = torch.randn(4, 18), torch.randn(4, 4), torch.randn(4, 2, 3, 3)
    manual = ((b + torch.eye(4)) @ a).reshape(4, 2, 3, 3) + c
    assert torch.allclose(reconstruct_weight(a, b, c, torch.eye(4)), manual)
    # rank = in = 5 < out = 7 (linear)
    a, b, c = torch.randn(5, 5), torch.randn(7, 5), torch.randn(7, 5)
    assert torch.allclose(reconstruct_weight(a, b, c), b @ (a + torch.eye(5)) + c)


def _factor_checkpoint(model):
    """A synthetic ATMC factor-form state dict whose reconstruction is loaded into ``model`` (returned)."""
    torch.manual_seed(1)
    net = unwrap(model)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for name, module in prunable_layers(net):
            w = module.weight
            out, m = w.shape[0], w[0].numel()
            rank = min(out, m)
            a = 0.1 * torch.randn(rank, m) * (torch.rand(rank, m) > 0.5)
            b = 0.1 * torch.randn(out, rank) * (torch.rand(out, rank) > 0.5)
            c = 0.1 * torch.randn_like(w) * (torch.rand_like(w) > 0.8)
            eye = torch.eye(rank)
            flat = (b + eye) @ a if rank == out else b @ (a + eye)
            w.copy_(flat.reshape(w.shape) + c)
            del sd[f"{name}.weight"]
            sd.update(
                {
                    f"module.{name}.weightA": a,
                    f"module.{name}.weightB": b,
                    f"module.{name}.weightC": c,
                    f"module.{name}.eye_const": eye,
                }
            )
    sd = {(k if k.startswith("module.") else f"module.{k}"): v for k, v in sd.items()}
    return sd


def test_converter_reproduces_logits(dense, data):
    native = copy.deepcopy(dense)
    ckpt = _factor_checkpoint(native)
    converted = convert_atmc_checkpoint(ckpt)
    assert not any(k.endswith(("weightA", "weightB", "weightC", "eye_const")) for k in converted)
    fresh = build_model("small_cnn", "digits").eval()
    load_weights(fresh, converted)
    with torch.no_grad():
        assert torch.allclose(fresh(data.x[:16]), native(data.x[:16]), atol=1e-5)
    # Dense checkpoints pass through (prefix and container removed).
    plain = unwrap(dense).state_dict()
    out = convert_atmc_checkpoint({"state_dict": {f"module.{k}": v for k, v in plain.items()}})
    assert out.keys() == plain.keys() and all(torch.equal(out[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="lacks factor"):
        convert_atmc_checkpoint({"l.weightA": torch.zeros(2, 2), "l.weightC": torch.zeros(2, 2)})
