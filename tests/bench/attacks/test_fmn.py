"""Tests for the FMN attack (Pintor et al., NeurIPS 2021) on models with a known answer.

For a linear classifier z = Wx + b the minimal perturbation that makes class j beat the true class y
is closed-form: with w = w_y - w_j and m = w·x + b_y - b_j > 0, it is m / ‖w‖₂ in ℓ2 and m / ‖w‖₁ in ℓ∞
(the dual norms). The minimal distance is the smallest of these over j ≠ y, provided the [0, 1] box
does not bind, which the fixtures make sure of.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.attacks import FMNResult, NotAdversarialError, fmn, minimum_norm

torch.set_num_threads(1)


def _linear_problem(seed: int = 0, n: int = 64, d: int = 20, c: int = 4):
    """A linear classifier on 1x4x5 inputs near 0.5, with biases centring the logits there."""
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d, c)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(c, d, generator=gen))
        linear.bias.copy_(-0.5 * linear.weight.sum(1) + 0.1 * torch.randn(c, generator=gen))
    model = nn.Sequential(nn.Flatten(), linear).eval()
    x = 0.5 + 0.1 * (2 * torch.rand(n, 1, 4, 5, generator=gen) - 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, linear, x, y


def _closed_form_distance(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    """Minimal ℓp distance from each x to the region where its class y stops winning."""
    W, b = linear.weight.detach(), linear.bias.detach()
    w = W[y][:, None, :] - W[None]  # (N, C, d): w_y - w_j
    m = torch.einsum("ncd,nd->nc", w, x.flatten(1)) + b[y][:, None] - b[None]
    dual = 1.0 if p == math.inf else 2.0
    distance = m / torch.linalg.vector_norm(w, ord=dual, dim=-1)
    distance[torch.arange(len(y)), y] = math.inf
    return distance.min(dim=1).values


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_binary_linear_model_distances_match_closed_form(norm):
    model, linear, x, y = _linear_problem(c=2)
    optimum = _closed_form_distance(linear, x, y, norm)
    # The box never binds: the optimal perturbation moves no coordinate by more than the optimum
    # itself (ℓ∞) or its ℓ2 norm, and every coordinate is at least 0.4 from the bounds.
    assert optimum.max() < 0.4

    result = minimum_norm(model, x, y, norm=norm, steps=100)

    ok = result.success
    assert torch.all(result.distance[ok] >= optimum[ok] * (1 - 1e-3)), "below the optimum beyond rounding"
    assert torch.all(result.distance[ok] <= optimum[ok] * 1.05)
    # On an exactly linear model the linear boundary estimate of the ε-step is exact, so before the
    # first adversarial the ε-ball is tangent to the boundary and the projected step lands on it, where
    # z_y = z_j: in exact arithmetic the attack never crosses (argmax breaks the tie towards the lower
    # index, so mostly samples with y = 0 stay). Rounding lets most samples cross. foolbox's
    # LInfFMNAttack behaves the same; deep ReLU networks do not (test_linf_matches_foolbox, where every
    # sample succeeds).
    assert ok.float().mean() >= 0.7


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_multiclass_linear_model_reaches_the_boundary_it_crosses(norm):
    """With several classes FMN follows the strongest competitor, not always the nearest one, so it
    finds the closed-form optimum for the class it ends in, and the global one for most samples."""
    model, linear, x, y = _linear_problem(c=4)
    optimum = _closed_form_distance(linear, x, y, norm)
    result = minimum_norm(model, x, y, norm=norm, steps=100)
    ok = result.success
    assert ok.float().mean() >= 0.7

    W, b = linear.weight.detach(), linear.bias.detach()
    w = W[y] - W[result.adv_pred]
    m = (w * x.flatten(1)).sum(1) + b[y] - b[result.adv_pred]
    dual = 1.0 if norm == math.inf else 2.0
    optimum_for_reached_class = m / torch.linalg.vector_norm(w, ord=dual, dim=1)
    assert torch.all(result.distance[ok] <= optimum_for_reached_class[ok] * 1.05)
    assert torch.all(result.distance[ok] >= optimum[ok] * (1 - 1e-3))
    assert (result.distance[ok] / optimum[ok]).median() <= 1.05


class _Normalize(nn.Module):
    """Fixed first layer mapping [0, 1] to [-2, 2], as the project's models normalise their inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) / 0.25


def _random_cnn(seed: int = 0) -> nn.Module:
    """A small ReLU CNN on 3x8x8 with fixed He-initialised weights and zero biases, so that random
    inputs spread over several predicted classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        _Normalize(),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model.eval()


def test_linf_matches_foolbox():
    fb = pytest.importorskip("foolbox")
    model = _random_cnn()
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)

    ours = minimum_norm(model, x, y, norm=math.inf, steps=100)
    _, adv, fb_success = fb.attacks.LInfFMNAttack(steps=100)(fb.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None)
    fb_distance = (adv - x).flatten(1).abs().amax(dim=1)

    both = ours.success & fb_success
    assert both.sum() >= 28
    assert abs(int(ours.success.sum()) - int(fb_success.sum())) <= 1
    ratio = ours.distance[both].median() / fb_distance[both].median()
    assert abs(ratio - 1) <= 0.02


class _ConstantModel(nn.Module):
    """Predicts class 0 whatever the input.

    ``mode``: "zero-grad" keeps x in the graph with a zero gradient; "input-unused" returns a parameter,
    so the loss has a graph that does not reach x; "no-graph" returns a tensor without any graph.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.logits = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits.expand(len(x), -1)
        if self.mode == "zero-grad":
            return out + 0 * x.flatten(1).sum(1, keepdim=True)
        return out if self.mode == "input-unused" else out.detach()


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
@pytest.mark.parametrize("mode", ["zero-grad", "input-unused", "no-graph"])
def test_failure_reports_inf_not_zero(norm, mode):
    x = torch.rand(5, 1, 4, 4)
    model = _ConstantModel(mode)
    result = minimum_norm(model, x, torch.zeros(5, dtype=torch.long), norm=norm, steps=10)
    assert isinstance(result, FMNResult)
    assert not result.success.any()
    assert torch.isinf(result.distance).all()
    assert torch.equal(result.adv_pred, torch.zeros(5, dtype=torch.long))
    assert model.logits.grad is None


def test_misclassified_samples_have_distance_zero():
    model, _, x, y = _linear_problem(n=16)
    wrong = (y + 1) % 4
    wrong[8:] = y[8:]
    result = minimum_norm(model, x, wrong, norm=math.inf, steps=20)
    assert result.success[:8].all()
    assert torch.all(result.distance[:8] == 0)
    assert torch.equal(result.adv_pred[:8], y[:8])
    assert torch.all(result.distance[8:][result.success[8:]] > 0)


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_adversarials_stay_in_the_box(norm):
    model = _random_cnn()
    x = torch.rand(8, 3, 8, 8)
    x[:4] = x[:4].round()  # pixels on the bounds, where the box constraint binds
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = fmn(model, x, y, norm=norm, steps=30)
    assert adv.shape == x.shape
    assert adv.min() >= 0 and adv.max() <= 1


def test_targeted_reaches_the_target():
    model = _random_cnn()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = model(x).topk(2, dim=1).indices[:, 1]  # the runner-up class
    result = minimum_norm(model, x, target, norm=math.inf, steps=100, targeted=True)
    assert result.success.float().mean() >= 0.75
    assert torch.equal(result.adv_pred[result.success], target[result.success])


def test_starting_points_are_refined():
    model = _random_cnn()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    first = minimum_norm(model, x, y, norm=math.inf, steps=10)
    keep = first.success
    start = fmn(model, x[keep], y[keep], norm=math.inf, steps=10)
    refined = minimum_norm(model, x[keep], y[keep], norm=math.inf, steps=20, starting_points=start)
    assert refined.success.all()
    assert torch.all(refined.distance <= first.distance[keep] + 1e-6)


def _far_starts(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor, norm: float, factor: float):
    """Binary linear model: points ``factor`` times the optimal distance beyond x, straight across the boundary.

    In ℓ2 along -w/‖w‖₂ (w = w_y - w_other); in ℓ∞ along -sign(w), the direction of the ℓ∞-optimal perturbation.
    Both stay inside [0, 1] for the fixtures' inputs (checked by the caller).
    """
    W = linear.weight.detach()
    w = W[y] - W[1 - y]
    optimum = _closed_form_distance(linear, x, y, norm)
    direction = -w / torch.linalg.vector_norm(w, dim=1, keepdim=True) if norm == 2.0 else -w.sign()
    return x + (factor * optimum[:, None] * direction).view_as(x), optimum


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_warm_start_search_alone_lands_on_the_closed_form_boundary(norm):
    """With no FMN step, a warm start returns the boundary point of its binary search: on a linear model the
    segment crosses the boundary where the closed form says, and the search brackets it within 2^-10 (of the
    segment in ℓ2, of the absolute radius in ℓ∞, the geometry of the authors' mid-points)."""
    model, linear, x, y = _linear_problem(c=2)
    start, optimum = _far_starts(linear, x, y, norm, factor=1.5)
    assert start.min() >= 0 and start.max() <= 1
    result = minimum_norm(model, x, y, norm=norm, steps=0, starting_points=start)
    assert result.success.all()
    start_distance = torch.linalg.vector_norm((start - x).flatten(1), ord=norm, dim=1)
    resolution = 2**-10 * (start_distance if norm == 2.0 else 1.0)
    assert torch.all(result.distance >= optimum * (1 - 1e-4))
    assert torch.all(result.distance <= optimum + resolution + 1e-6)


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
def test_warm_start_refines_to_the_closed_form_optimum(norm):
    model, linear, x, y = _linear_problem(c=2)
    start, optimum = _far_starts(linear, x, y, norm, factor=1.8)
    result = minimum_norm(model, x, y, norm=norm, steps=100, starting_points=start)
    # Every sample starts adversarial, so every one ends adversarial (plain FMN loses some on this model:
    # test_binary_linear_model_distances_match_closed_form).
    assert result.success.all()
    assert torch.all(result.distance >= optimum * (1 - 1e-3))
    assert torch.all(result.distance <= optimum * 1.05)


class _Threshold(nn.Module):
    """Class 1 exactly when the first pixel exceeds 0.7, through a step: no gradient anywhere, so FMN's steps
    cannot move δ and only the warm start's search and the ε projection act."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.flatten(1)[:, :1]
        score = (first.detach() > 0.7).to(x.dtype) + 0 * first
        return torch.cat([1 - score, score], dim=1)


@pytest.mark.parametrize("norm", [math.inf, 2.0], ids=["linf", "l2"])
@pytest.mark.parametrize("steps", [0, 1, 10, 100])
def test_warm_start_never_returns_a_point_farther_than_its_start(norm, steps):
    gen = torch.Generator().manual_seed(5)
    # A model with no gradient, and a ReLU CNN with random adversarial starting points.
    x = 0.6 * torch.rand(16, 1, 4, 4, generator=gen)
    start = x.clone()
    start.view(16, -1)[:, 0] = 0.75 + 0.25 * torch.rand(16, generator=gen)
    start = (start + 0.3 * torch.rand(start.shape, generator=gen)).clamp(0, 1)
    cases = [(_Threshold(), x, torch.zeros(16, dtype=torch.long), start)]
    cnn = _random_cnn()
    xc = torch.rand(64, 3, 8, 8, generator=gen)
    others = torch.rand(64, 3, 8, 8, generator=gen)
    with torch.no_grad():
        yc, yo = cnn(xc).argmax(1), cnn(others).argmax(1)
    keep = yc != yo
    cases.append((cnn, xc[keep], yc[keep], others[keep]))
    for model, inputs, labels, starts in cases:
        result = minimum_norm(model, inputs, labels, norm=norm, steps=steps, starting_points=starts)
        start_distance = torch.linalg.vector_norm((starts - inputs).flatten(1), ord=norm, dim=1)
        assert result.success.all()
        # Exact, no tolerance: the guarantee holds in the norm as minimum_norm measures it.
        assert torch.all(result.distance <= start_distance)
    # The step model's closed form: the least perturbation moves the first pixel alone up to 0.7.
    result = minimum_norm(
        _Threshold(), x, torch.zeros(16, dtype=torch.long), norm=norm, steps=steps, starting_points=start
    )
    assert torch.all(result.distance >= 0.7 - x.flatten(1)[:, 0])


def test_no_gradient_leak_and_training_flags_restored():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    running_mean = model[1].running_mean.clone()
    requires_grad = [p.requires_grad for p in model.parameters()]
    x = torch.rand(8, 3, 8, 8)
    y = torch.zeros(8, dtype=torch.long)

    minimum_norm(model, x, y, norm=math.inf, steps=5)

    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]
    assert torch.equal(model[1].running_mean, running_mean)

    model.train()
    minimum_norm(model, x, y, norm=2, steps=5)
    assert all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, running_mean), "the attack ran the model in training mode"


def test_invalid_arguments_are_rejected():
    model, _, x, y = _linear_problem(n=4)
    with pytest.raises(ValueError, match="norm"):
        fmn(model, x, y, norm=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fmn(model, x + 1, y, norm=math.inf)
    with pytest.raises(ValueError, match="labels"):
        fmn(model, x, y[:2], norm=math.inf)
    with pytest.raises(NotAdversarialError, match="starting point"):
        fmn(model, x, y, norm=math.inf, starting_points=x)
    with pytest.raises(ValueError, match="starting_points must have the inputs' shape"):
        fmn(model, x, y, norm=math.inf, starting_points=x[:2])
