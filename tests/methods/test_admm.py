"""RAP-ADMM adapter (Ye et al., ICCV 2019): projections, schedule, masks, the undetached-U switch, the converter.

Every run is tiny: a freshly initialised small CNN, a few dozen digits images, one epoch per phase, PGD-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import methods.admm as admm_module
import methods.common as common_module
from bench.checkpoints import load_weights
from bench.models import NormalizedModel, build_model, unwrap
from bench.sparsity import measure_sparsity
from methods.admm import RAPADMM, admm_learning_rate, build_admm_state, convert_admm_checkpoint
from methods.base import PruneData, get_method

N_TRAIN = 48
EPS = 0.2
RATIO = 0.9
TINY = {
    "admm_epochs": 1,
    "admm_interval": 1,
    "retrain_epochs": 1,
    "retrain_milestones": (),
    "batch_size": 16,
    "pgd_steps": 2,
}
CONVS = ["features.0", "features.2", "features.5"]
LINEARS = ["classifier.1", "classifier.3"]


@pytest.fixture(scope="module")
def dense(small_cnn_init):
    return small_cnn_init


@pytest.fixture(scope="module")
def data(digits):
    xtr, ytr, _, _ = digits
    return PruneData(xtr[:N_TRAIN], ytr[:N_TRAIN], eps=EPS)


def _prune(dense, data, seed=0, sparsity=RATIO, **overrides):
    method = get_method("admm")
    cfg = method.config(**{**TINY, **overrides})
    return method.prune(copy.deepcopy(dense), sparsity, data, cfg, seed=seed)


def _zero_masks(model):
    return {name: w == 0 for name, w in unwrap(model).state_dict().items() if name.endswith("weight") and w.dim() > 1}


@pytest.fixture(scope="module")
def result(dense, data):
    return _prune(dense, data)


def test_card_and_defaults_follow_the_released_code():
    method = get_method("admm")
    assert isinstance(method, RAPADMM) and method.card.key == "admm" and method.card.criterion == "SOLWM"
    assert method.card.training == {"pretraining": "AT-PGD", "finetuning": "AT-PGD", "1S/IT": "1S"}
    cfg = method.config()
    assert (cfg.admm_epochs, cfg.admm_interval, cfg.rho, cfg.multi_rho, cfg.rho_growth) == (200, 20, 1e-3, True, 1.3)
    assert (cfg.admm_lr, cfg.retrain_epochs, cfg.retrain_lr, cfg.retrain_milestones) == (0.01, 200, 0.01, (80, 150))
    assert (cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.pgd_steps, cfg.pgd_step_ratio) == (
        0.9,
        1e-4,
        128,
        10,
        0.25,
    )
    assert cfg.projection == "irregular" and not cfg.prune_linear and cfg.detach_u
    # The released attack starts in the ball, clipped; the digits track starts it in the box (digits_config says why).
    assert not cfg.box_start and method.digits_config().box_start
    assert not method.digits_config(box_start=False).box_start
    assert method.pruned_layers(build_model("small_cnn", "digits")) == CONVS
    assert method.pruned_layers(build_model("resnet18", "cifar10"))[0] == "conv1"
    assert len(method.pruned_layers(build_model("resnet18", "cifar10"))) == 20  # shortcuts included, no FC
    with pytest.raises(ValueError, match="unknown option"):
        method.config(rhoo=1.0)


def test_admm_learning_rate_is_cyclic():
    # Interval 20: reset at every cycle, /10 after 7 epochs, /100 after 14 (admm_adjust_learning_rate).
    rates = [admm_learning_rate(e, 0.01, 20) for e in range(41)]
    assert rates[0] == rates[6] == rates[20] == rates[40] == 0.01
    assert rates[7] == rates[13] == rates[27] == pytest.approx(1e-3)
    assert rates[14] == rates[19] == pytest.approx(1e-4)


@pytest.mark.parametrize("projection", ["irregular", "filter"])
def test_projection_is_exact_and_idempotent(dense, projection):
    net = unwrap(copy.deepcopy(dense))
    cfg = get_method("admm").config(projection=projection)
    state = build_admm_state(net, CONVS, RATIO, cfg)
    modules = dict(net.named_modules())
    for name in CONVS:
        w, z = modules[name].weight, state.Z[name]
        if projection == "irregular":
            assert int((z == 0).sum()) == int(RATIO * w.numel())
        else:
            zero_filters = (z.flatten(1) == 0).all(dim=1)
            assert int(zero_filters.sum()) == int(RATIO * w.shape[0])
            assert torch.equal(z.flatten(1) == 0, zero_filters[:, None].expand(-1, z[0].numel()))
        assert torch.equal(z[z != 0], w.detach()[z != 0]), "Π keeps the surviving entries unchanged"
        assert torch.equal(state.project(name, z), z), "Π(Π(W)) = Π(W)"
        assert torch.equal(state.U[name], torch.zeros_like(w))


def test_z_and_u_updates(dense):
    net = unwrap(copy.deepcopy(dense))
    state = build_admm_state(net, CONVS, RATIO, get_method("admm").config())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u_old = {k: v.clone() for k, v in state.U.items()}
    state.update(net)
    modules = dict(net.named_modules())
    for name in CONVS:
        w = modules[name].weight.detach()
        assert torch.equal(state.Z[name], state.project(name, w + u_old[name]))
        assert torch.allclose(state.U[name], u_old[name] + w - state.Z[name])


def test_undetached_u_doubles_the_penalty_gradient():
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    grads = {}
    for detach_u in (True, False):
        model = copy.deepcopy(tiny)
        cfg = get_method("admm").config(detach_u=detach_u, rho=0.5)
        state = build_admm_state(model, ["0"], 0.5, cfg)
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
        state.update(model)
        assert state.U["0"].abs().sum() > 0
        model.zero_grad()
        state.penalty(model).backward()
        w = model[0].weight
        textbook = 0.5 * (w - state.Z["0"] + state.U["0"]).detach()
        grads[detach_u] = (w.grad.clone(), textbook)
    (g_true, textbook_true), (g_false, textbook_false) = grads[True], grads[False]
    assert torch.allclose(g_true, textbook_true)
    assert torch.allclose(g_false, 2 * textbook_false)
    assert not torch.allclose(g_true, g_false)


def test_pipeline_prunes_exactly_the_ratio_and_leaves_linear_dense(dense, result):
    model = result.model
    assert isinstance(model, NormalizedModel) and not model.training
    assert list(model.state_dict()) == list(dense.state_dict())
    report = measure_sparsity(model)
    for name in CONVS:
        numel, zeros, _ = report.per_layer[name]
        assert zeros == int(RATIO * numel), name
    for name in LINEARS:
        assert report.per_layer[name][1] == 0, f"{name} must stay dense"
    native = result.native_sparsity
    assert native["prune_ratio"] == RATIO and native["layers"] == CONVS and native["excluded_layers"] == LINEARS
    assert native["canonical_sparsity"] == pytest.approx(report.sparsity) and report.sparsity < 0.3
    assert abs(native["sparsity_of_pruned_layers"] - RATIO) < 1e-3
    assert [h["phase"] for h in result.history] == ["admm", "retrain"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 1, 8, 8))).all()


def test_prune_linear_and_filter_options(dense, data):
    res = _prune(dense, data, prune_linear=True, retrain_epochs=0)
    report = measure_sparsity(res.model)
    assert all(report.per_layer[n][1] == int(RATIO * report.per_layer[n][0]) for n in CONVS + LINEARS)
    assert report.sparsity == pytest.approx(RATIO, abs=1e-3)
    res = _prune(dense, data, sparsity=0.5, projection="filter", retrain_epochs=0)
    for name in CONVS:
        w = dict(unwrap(res.model).named_modules())[name].weight
        assert int((w.flatten(1) == 0).all(dim=1).sum()) == int(0.5 * w.shape[0])
    with pytest.raises(ValueError, match="projection"):
        _prune(dense, data, projection="column")


def test_retraining_keeps_pruned_weights_exactly_zero(dense, data):
    # Same seed: the ADMM phase and the hard prune are identical, so the 0-epoch run gives the mask.
    pruned = _prune(dense, data, retrain_epochs=0, weight_decay=0.05)
    retrained = _prune(dense, data, retrain_epochs=2, weight_decay=0.05)  # 6 steps, momentum 0.9
    before, after = _zero_masks(pruned.model), _zero_masks(retrained.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    w0 = unwrap(pruned.model).features[2].weight
    w1 = unwrap(retrained.model).features[2].weight
    assert not torch.equal(w0, w1), "retraining must move the kept weights"


def test_rho_grows_at_every_update(dense, data):
    res = _prune(dense, data, admm_epochs=3, retrain_epochs=0)
    admm = [h for h in res.history if h["phase"] == "admm"]
    assert [h["admm_updates"] for h in admm] == [0, 1, 2]
    assert [h["rho"] for h in admm] == pytest.approx([1e-3, 1.3e-3, 1.69e-3])


def test_same_seed_same_masks(dense, data, result):
    again = _prune(dense, data)
    a, b = _zero_masks(result.model), _zero_masks(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(unwrap(result.model).features[0].weight, unwrap(again.model).features[0].weight)


@pytest.mark.parametrize(
    ("attack_train_mode", "box_start"), [(True, False), (False, False), (True, True), (False, True)]
)
def test_training_attacks_stay_in_the_eps_ball_and_box(dense, data, monkeypatch, attack_train_mode, box_start):
    real = admm_module.pgd_linf
    calls = []

    def recording(model, x, y, **kw):
        x_adv = real(model, x, y, **kw)
        calls.append((x, x_adv, kw, model.training))
        return x_adv

    monkeypatch.setattr(admm_module, "pgd_linf", recording)
    monkeypatch.setattr(common_module, "pgd_linf", recording)
    _prune(dense, data, attack_train_mode=attack_train_mode, box_start=box_start)
    assert len(calls) == 2 * (N_TRAIN // TINY["batch_size"])  # every training step of both phases
    for x, x_adv, kw, training in calls:
        assert kw["eps"] == EPS and kw["step_size"] == pytest.approx(0.25 * EPS) and kw["steps"] == 2
        assert kw["box_start"] is box_start
        assert training == attack_train_mode
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("wrap", ["module.basic_model.", "basic_model.", "module.", "nested"])
def test_converter_reproduces_the_logits(wrap):
    torch.manual_seed(0)
    model = build_model("small_cnn", "digits").eval()
    raw = unwrap(model).state_dict()  # the author's keys, no "net."
    prefix = "module.basic_model." if wrap == "nested" else wrap
    native = {prefix + k: v.clone() for k, v in raw.items()}
    if wrap == "module.basic_model.":
        native["module.attack_steps"] = torch.tensor(10)  # outside the wrapped model: dropped
    if wrap == "nested":
        native = {"state_dict": native, "epoch": 3}
    converted = convert_admm_checkpoint(native)
    assert set(converted) == set(raw)
    fresh = build_model("small_cnn", "digits").eval()
    load_weights(fresh, converted)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=0)


def test_converter_rejects_a_file_without_weights():
    with pytest.raises(ValueError, match="no weight tensors"):
        convert_admm_checkpoint({"epoch": 3, "acc": 0.5})
