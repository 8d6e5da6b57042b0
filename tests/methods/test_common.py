"""Shared method pieces: TRADES/MART/PGD losses, magnitude masks, masked steps, projections and ADMM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.common import (
    ADMMState,
    apply_masks,
    magnitude_masks,
    mart_adversarial,
    mart_loss,
    mart_objective,
    masked_step,
    masks_from_zeros,
    pgd_ce_loss,
    project_filters,
    project_global,
    project_irregular,
    prunable_layers,
    trades_adversarial,
    trades_loss,
    trades_objective,
)

EPS = 0.1
# Float slack for the ε-ball: x ± ε is rounded in float32.
TOL = 1e-6


class ModeRecorder(nn.Module):
    """Identity that records the train/eval flag of every forward pass."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def tiny_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        ModeRecorder(),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 10),
    )


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 6, 6, generator=gen)
    # Pixels on the box faces, so the [0, 1] clip is exercised.
    x[:, :, 0] = 0.0
    x[:, :, -1] = 1.0
    y = torch.randint(0, 10, (16,), generator=gen)
    return x, y


# --- losses -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["trades", "mart"])
@pytest.mark.parametrize("steps", [0, 5])
def test_adversarial_points_stay_in_the_eps_ball_and_box(batch, attack, steps):
    x, y = batch
    model = tiny_net()
    x_before = x.clone()
    torch.manual_seed(0)
    if attack == "trades":
        x_adv = trades_adversarial(model, x, eps=EPS, steps=steps, step_size=0.03)
    else:
        x_adv = mart_adversarial(model, x, y, eps=EPS, steps=steps, step_size=0.03)
    assert torch.equal(x, x_before)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + TOL
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    if steps:
        assert (x_adv - x).abs().max() >= EPS - TOL  # sign steps reach the faces of the ball


def test_attacks_increase_their_objective(batch):
    x, y = batch
    model = tiny_net().eval()
    torch.manual_seed(0)
    x_trades = trades_adversarial(model, x, eps=EPS, steps=5, step_size=0.03)
    x_mart = mart_adversarial(model, x, y, eps=EPS, steps=5, step_size=0.03)
    with torch.no_grad():
        p_nat = F.softmax(model(x), dim=1)
        kl = F.kl_div(F.log_softmax(model(x_trades), dim=1), p_nat, reduction="sum")
        assert kl > 1e-4
        assert F.cross_entropy(model(x_mart), y) > F.cross_entropy(model(x), y)


@pytest.mark.parametrize("loss_fn", [trades_loss, mart_loss, pgd_ce_loss])
def test_losses_attack_in_eval_mode_and_restore_each_modules_flag(batch, loss_fn):
    x, y = batch
    model = tiny_net().train()
    model[2].eval()  # a caller's frozen BatchNorm must stay frozen
    recorder = model[0]
    loss = loss_fn(model, x, y, eps=EPS, steps=2, step_size=0.03)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model.training and recorder.training and not model[2].training
    # The attack's forwards ran in eval mode, the outer ones in the caller's (train) mode.
    assert recorder.seen[:2] == [False, False] and recorder.seen[-1] is True
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def _logits(seed: int, n: int = 6, k: int = 5):
    gen = torch.Generator().manual_seed(seed)
    nat = (3 * torch.randn(n, k, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = (3 * torch.randn(n, k, generator=gen, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=gen)
    return nat, adv, y


def _trades_by_hand(nat, adv, y, beta):
    n, k = nat.shape
    total = 0.0
    for i in range(n):
        p = torch.exp(nat[i]) / torch.exp(nat[i]).sum()
        q = torch.exp(adv[i]) / torch.exp(adv[i]).sum()
        total = total - torch.log(p[y[i]]) / n
        total = total + beta / n * sum(p[j] * (torch.log(p[j]) - torch.log(q[j])) for j in range(k))
    return total


def _mart_by_hand(nat, adv, y, beta):
    n, k = nat.shape
    total = 0.0
    for i in range(n):
        p = torch.exp(nat[i]) / torch.exp(nat[i]).sum()
        q = torch.exp(adv[i]) / torch.exp(adv[i]).sum()
        wrong = max((j for j in range(k) if j != y[i]), key=lambda j: q[j].item())
        bce = -torch.log(q[y[i]]) - torch.log(1.0001 - q[wrong] + 1e-12)
        kl = sum(p[j] * (torch.log(p[j]) - torch.log(q[j] + 1e-12)) for j in range(k))
        total = total + bce / n + beta / n * kl * (1.0000001 - p[y[i]])
    return total


@pytest.mark.parametrize(
    ("objective", "by_hand", "beta"),
    [
        (trades_objective, _trades_by_hand, 6.0),
        (mart_objective, _mart_by_hand, 6.0),
        (mart_objective, _mart_by_hand, 0.5),
    ],
)
def test_objectives_match_hand_written_formulas_in_value_and_gradient(objective, by_hand, beta):
    for seed in range(3):
        nat, adv, y = _logits(seed)
        value = objective(nat, adv, y, beta)
        g_nat, g_adv = torch.autograd.grad(value, (nat, adv))
        reference = by_hand(nat, adv, y, beta)
        r_nat, r_adv = torch.autograd.grad(reference, (nat, adv))
        assert value.dim() == 0
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
        # The KL target is not detached (released code): the natural logits get the KL's gradient too.
        torch.testing.assert_close(g_nat, r_nat, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_adv, r_adv, rtol=1e-9, atol=1e-12)


def test_objectives_reduce_to_ce_when_adversarial_equals_natural():
    nat, _, y = _logits(0)
    ce = F.cross_entropy(nat, y)
    torch.testing.assert_close(trades_objective(nat, nat, y, 6.0), ce)
    # MART keeps its boosted term even at x' = x; its robust KL term vanishes.
    p = F.softmax(nat, dim=1)
    wrong = p.masked_fill(F.one_hot(y, 5).bool(), -1).max(dim=1).values
    torch.testing.assert_close(mart_objective(nat, nat, y, 6.0), ce - torch.log(1.0001 - wrong + 1e-12).mean())


# --- masks --------------------------------------------------------------------------------------------------------


def _weights(model):
    return {name: m.weight for name, m in prunable_layers(model)}


def test_prunable_layers_lists_convs_and_linears_in_order():
    model = tiny_net()
    assert [n for n, _ in prunable_layers(model)] == ["1", "4", "8"]
    assert [n for n, _ in prunable_layers(model, include_linear=False)] == ["1", "4"]


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.9, 0.99, 1.0])
def test_local_magnitude_masks_have_exact_counts_and_drop_the_smallest(sparsity):
    model = tiny_net()
    masks = magnitude_masks(model, sparsity)
    for name, w in _weights(model).items():
        keep = masks[name]
        assert keep.dtype == torch.bool and keep.shape == w.shape
        assert int((~keep).sum()) == int(sparsity * w.numel())
        if keep.any() and (~keep).any():
            assert w.abs()[~keep].max() <= w.abs()[keep].min()


@pytest.mark.parametrize("sparsity", [0.29, 0.5, 0.9, 0.99])
def test_global_magnitude_masks_rank_all_layers_together(sparsity):
    model = tiny_net()
    masks = magnitude_masks(model, sparsity, scope="global")
    weights = _weights(model)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((~m).sum()) for m in masks.values()) == int(sparsity * total)
    pruned = torch.cat([w.abs()[~masks[n]] for n, w in weights.items()])
    kept = torch.cat([w.abs()[masks[n]] for n, w in weights.items()])
    assert pruned.max() <= kept.min()
    # Global scope gives unequal per-layer sparsity on these differently scaled layers.
    assert len({round(float((~m).float().mean()), 3) for m in masks.values()}) > 1


def test_magnitude_masks_break_ties_by_position_and_accept_layer_subsets():
    model = tiny_net()
    with torch.no_grad():
        model[4].weight.fill_(0.5)
    masks = magnitude_masks(model, 0.5, layers=["4"])
    assert list(masks) == ["4"]
    flat = masks["4"].reshape(-1)
    n = flat.numel()
    assert not flat[: n // 2].any() and flat[n // 2 :].all()
    assert torch.equal(magnitude_masks(model, 0.5, layers=prunable_layers(model)[1:2])["4"], masks["4"])
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks(model, 0.5, scope="layerwise")
    with pytest.raises(ValueError, match="fraction"):
        magnitude_masks(model, 1.5)
    with pytest.raises(KeyError, match="prunable layers"):
        magnitude_masks(model, 0.5, layers=["conv9"])


def test_apply_masks_and_masks_from_zeros_round_trip():
    model = tiny_net()
    masks = magnitude_masks(model, 0.7)
    apply_masks(model, masks)
    for name, w in _weights(model).items():
        assert (w[~masks[name]] == 0).all()
    recovered = masks_from_zeros(model)
    assert set(recovered) == set(masks)
    for name in masks:
        assert torch.equal(recovered[name], masks[name])


def _train_steps(model, optimizer, masks, x, y, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        masked_step(optimizer, model, masks)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=5e-4),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=5e-2, amsgrad=True),
    ],
    ids=["sgd", "sgd-nesterov", "adam", "adamw-amsgrad"],
)
def test_masked_step_keeps_pruned_weights_exactly_zero(batch, make_optimizer):
    x, y = batch
    model = tiny_net().train()
    masks = magnitude_masks(model, 0.6)
    # The linear bias too, by parameter name (MAD prunes the classifier's bias).
    masks["8.bias"] = torch.arange(10) % 2 == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Not applied beforehand: the first masked step must zero the pruned entries itself.
    optimizer = make_optimizer(model.parameters())
    _train_steps(model, optimizer, masks, x, y, steps=3)
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        key = name if name.endswith("bias") else f"{name}.weight"
        p = params[key]
        assert (p[~keep] == 0.0).all(), name
        assert (p[keep] != before[key][keep]).all(), name
        for value in optimizer.state[p].values():
            if value.shape == p.shape:
                assert (value[~keep] == 0.0).all(), name


def test_masked_step_zeroes_the_momentum_that_an_earlier_dense_phase_left(batch):
    x, y = batch
    model = tiny_net().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _train_steps(model, optimizer, {}, x, y, steps=2)  # dense training builds momentum everywhere
    masks = magnitude_masks(model, 0.8)
    apply_masks(model, masks)
    _train_steps(model, optimizer, masks, x, y, steps=2)
    for name, w in _weights(model).items():
        assert (w[~masks[name]] == 0.0).all()
        assert (optimizer.state[w]["momentum_buffer"][~masks[name]] == 0.0).all()


# --- projections --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.9, 1.0])
def test_project_irregular_is_exact_and_idempotent(sparsity):
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    w_before = w.clone()
    p = project_irregular(w, sparsity)
    assert torch.equal(w, w_before)
    assert int((p == 0).sum()) == int(sparsity * w.numel())
    kept = p != 0
    assert torch.equal(p[kept], w[kept])
    if kept.any() and (~kept).any():
        assert w.abs()[~kept].max() <= w.abs()[kept].min()
    assert torch.equal(project_irregular(p, sparsity), p)


def test_project_irregular_counts_exactly_under_ties():
    w = torch.tensor([1.0, -1.0, 1.0, 2.0, 1.0, -1.0, 0.5, 1.0])
    p = project_irregular(w, 0.5)
    assert int((p == 0).sum()) == 4
    assert torch.equal(p, torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0, -1.0, 0.0, 1.0]))
    assert torch.equal(project_irregular(p, 0.5), p)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_project_filters_zeroes_whole_filters_of_least_norm(sparsity):
    w = torch.randn(10, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    p = project_filters(w, sparsity)
    zero_filters = (p.reshape(10, -1) == 0).all(dim=1)
    assert int(zero_filters.sum()) == int(sparsity * 10)
    assert torch.equal(p[~zero_filters], w[~zero_filters])
    norms = w.reshape(10, -1).norm(dim=1)
    assert norms[zero_filters].max() <= norms[~zero_filters].min()
    assert torch.equal(project_filters(p, sparsity), p)
    # A Linear weight's filters are its output rows.
    lin = project_filters(torch.randn(6, 5), 0.5)
    assert int((lin == 0).all(dim=1).sum()) == 3
    with pytest.raises(ValueError, match="output dimension"):
        project_filters(torch.randn(6), 0.5)


@pytest.mark.parametrize("n_keep", [0, 1, 37, 200, 10_000])
def test_project_global_keeps_the_largest_over_all_tensors(n_keep):
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(4, 3, 3, 3, generator=gen), "b": 5 * torch.randn(10, 8, generator=gen)}
    total = sum(w.numel() for w in weights.values())
    p = project_global(weights, n_keep)
    assert list(p) == ["a", "b"] and all(p[k].shape == weights[k].shape for k in p)
    assert sum(int((t != 0).sum()) for t in p.values()) == min(n_keep, total)
    kept = torch.cat([weights[k][p[k] != 0].abs() for k in p])
    pruned = torch.cat([weights[k][p[k] == 0].abs() for k in p])
    if kept.numel() and pruned.numel():
        assert pruned.max() <= kept.min()
    again = project_global(p, n_keep)
    assert all(torch.equal(again[k], p[k]) for k in p)


def test_global_projection_agrees_with_global_magnitude_masks():
    model = tiny_net()
    weights = {n: w.detach() for n, w in _weights(model).items()}
    total = sum(w.numel() for w in weights.values())
    masks = magnitude_masks(model, 0.8, scope="global")
    projected = project_global(weights, total - int(0.8 * total))
    for name, w in weights.items():
        assert torch.equal(projected[name], w * masks[name])


# --- ADMM ---------------------------------------------------------------------------------------------------------


def test_admm_state_initialises_z_to_the_projection_and_u_to_zero():
    model = tiny_net()
    state = ADMMState(model, {"1": 0.5, "4": 0.75, "8.weight": 0.9}, rho=0.01)
    weights = dict(model.named_parameters())
    for name, key in [("1", "1.weight"), ("4", "4.weight"), ("8.weight", "8.weight")]:
        w = weights[key]
        assert torch.equal(state.Z[name], project_irregular(w, state.targets[name]))
        assert torch.equal(state.U[name], torch.zeros_like(w))
        assert not state.Z[name].requires_grad
    squares = [
        (weights[k] - project_irregular(weights[k], s)).pow(2).sum()
        for k, s in [("1.weight", 0.5), ("4.weight", 0.75), ("8.weight", 0.9)]
    ]
    expected = 0.5 * 0.01 * sum(squares)
    torch.testing.assert_close(state.penalty(model), expected)
    with pytest.raises(ValueError, match="projection"):
        ADMMState(model, {"1": 0.5}, rho=1.0, projection="column")


def test_admm_update_algebra_and_penalty_gradient():
    model = tiny_net()
    state = ADMMState(model, {"1": 0.5, "4": 0.5}, rho=0.5)
    with torch.no_grad():
        for _, m in prunable_layers(model):
            m.weight.add_(0.1 * torch.randn_like(m.weight))
    z_old = {k: v.clone() for k, v in state.Z.items()}
    u_old = {k: v.clone() for k, v in state.U.items()}
    dual = state.update(model)
    assert state.updates == 1
    for name in ("1", "4"):
        w = model[int(name)].weight.detach()
        assert torch.equal(state.Z[name], project_irregular(w + u_old[name], 0.5))
        torch.testing.assert_close(state.U[name] - u_old[name], w - state.Z[name])
        assert math.isclose(dual[name], 0.5 * float((state.Z[name] - z_old[name]).norm()), rel_tol=1e-6)
    penalty = state.penalty(model)
    penalty.backward()
    for name in ("1", "4"):
        w = model[int(name)].weight
        torch.testing.assert_close(w.grad, 0.5 * (w.detach() - state.Z[name] + state.U[name]))


def test_admm_reduces_the_primal_residual_on_a_toy_quadratic():
    """min ½‖W − A‖² s.t. W 75 % sparse: W-steps by gradient descent on f + penalty, then Z/U updates."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8, bias=False)
    model = nn.Sequential(layer)
    target = torch.randn(8, 16)
    state = ADMMState(model, {"0": 0.75}, rho=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    residuals = []
    for _ in range(8):
        for _ in range(25):
            optimizer.zero_grad()
            (0.5 * (layer.weight - target).pow(2).sum() + state.penalty(model)).backward()
            optimizer.step()
        state.update(model)
        residuals.append(state.residuals(model)["0"])
    assert residuals[-1] < 0.05 * residuals[0]
    assert all(b <= a + 1e-6 for a, b in zip(residuals, residuals[1:], strict=False))
    masks = state.hard_prune(model)
    assert int((layer.weight == 0).sum()) == int(0.75 * layer.weight.numel())
    # The converged support is the 25 % of A with the largest magnitude.
    assert torch.equal(masks["0"], project_irregular(target, 0.75) != 0)


def _undetached_reference(model, name, u):
    """RAP-ADMM's ``admm_update`` as released: U ← W − Π(W + U) + U with U not detached from W."""
    w = dict(model.named_modules())[name].weight
    new_z = project_irregular((w + u).detach(), 0.5)
    return new_z, w - new_z + u


def test_undetached_u_multiplies_the_penalty_gradient_like_rap_admms_code():
    base = tiny_net()
    textbook_model, buggy_model, reference_model = (copy.deepcopy(base) for _ in range(3))
    targets = {"4": 0.5}
    textbook = ADMMState(textbook_model, targets, rho=0.3)
    buggy = ADMMState(buggy_model, targets, rho=0.3, detach_u=False)
    ref_z, ref_u = textbook.Z["4"].clone(), torch.zeros_like(textbook.U["4"])
    gen = torch.Generator().manual_seed(3)
    for k in (1, 2):
        # A W-step between updates, the same for the three copies.
        step = 0.05 * torch.randn(base[4].weight.shape, generator=gen)
        with torch.no_grad():
            for m in (textbook_model, buggy_model, reference_model):
                m[4].weight.add_(step)
        textbook.update(textbook_model)
        buggy.update(buggy_model)
        ref_z, ref_u = _undetached_reference(reference_model, "4", ref_u)
        assert torch.count_nonzero(textbook.U["4"]) > 0
        grads = {}
        for label, model, penalty in [
            ("textbook", textbook_model, textbook.penalty(textbook_model)),
            ("buggy", buggy_model, buggy.penalty(buggy_model)),
            (
                "reference",
                reference_model,
                0.5 * 0.3 * (reference_model[4].weight - ref_z + ref_u).pow(2).sum(),
            ),
        ]:
            model.zero_grad()
            penalty.backward(retain_graph=True)
            grads[label] = (float(penalty.detach()), model[4].weight.grad.clone())
        # Same value; the gradient w.r.t. W is (1 + k) times the textbook one after k updates.
        assert math.isclose(grads["buggy"][0], grads["textbook"][0], rel_tol=1e-6)
        assert math.isclose(grads["reference"][0], grads["textbook"][0], rel_tol=1e-6)
        torch.testing.assert_close(grads["buggy"][1], (1 + k) * grads["textbook"][1])
        torch.testing.assert_close(grads["reference"][1], grads["buggy"][1])


@pytest.mark.parametrize("projection", ["irregular", "filter"])
def test_hard_prune_gives_the_exact_sparsity_and_masks_for_retraining(batch, projection):
    x, y = batch
    model = tiny_net().train()
    targets = {"1": 0.5, "4": 0.5, "8": 0.9}
    state = ADMMState(model, targets, rho=1e-3, projection=projection)
    masks = state.hard_prune(model)
    for name, sparsity in targets.items():
        w = model[int(name)].weight
        if projection == "irregular":
            assert int((w == 0).sum()) == int(sparsity * w.numel())
        else:
            assert int((w.reshape(w.shape[0], -1) == 0).all(dim=1).sum()) == int(sparsity * w.shape[0])
        assert torch.equal(masks[name], w != 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _train_steps(model, optimizer, masks, x, y, steps=2)
    for name, keep in masks.items():
        assert (model[int(name)].weight[~keep] == 0.0).all()


def test_rho_schedules():
    state = ADMMState(tiny_net(), {"1": 0.5}, rho=0.5)
    assert math.isclose(state.scale_rho(1.35, cap=1.0), 0.675)
    assert math.isclose(state.scale_rho(1.35, cap=1.0), 0.675 * 1.35)
    assert state.scale_rho(1.35, cap=1.0) == 1.0
    state.rho = 1.0
    assert math.isclose(state.scale_rho(1.3), 1.3)
