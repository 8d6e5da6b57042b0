"""bench.attacks.utils: the eval-mode context, the difference of logits and the ℓ∞ projections every attack shares."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from torch import nn

import bench.evaluation.chunk as chunk_module
import bench.training as training_module
import methods.common as common_module
from bench.attacks.utils import clip_linf, eval_mode, logit_difference, project_linf_

# bench.attacks exports the function fmn under the submodule's name.
fmn_module = importlib.import_module("bench.attacks.fmn")


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))


# --------------------------------------------------------------------------------------------------------- eval_mode


def test_eval_mode_yields_the_model_in_eval_mode_and_restores_each_flag():
    model = _net().train()
    model[1].eval()  # a caller's frozen BatchNorm must stay frozen
    with eval_mode(model) as inside:
        assert inside is model
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


def test_eval_mode_restores_on_error():
    model = _net().train()
    model[1].eval()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training
        raise RuntimeError
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True]


# -------------------------------------------------------------------------------------------------- logit_difference


def test_logit_difference_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    assert logit_difference(logits, torch.tensor([0, 1])).tolist() == [2.0, -3.0]
    # Targeted at those classes: the same magnitudes, negative where the target is already the prediction.
    assert logit_difference(logits, torch.tensor([0, 1]), targeted=True).tolist() == [-2.0, 3.0]


def test_logit_difference_matches_the_top_two_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=gen)
    labels = torch.randint(0, 10, (200,), generator=gen)
    z = logits.numpy().astype(np.float64)
    best_other = np.array([np.max(np.delete(row, y)) for row, y in zip(z, labels.tolist(), strict=True)])
    expected = z[np.arange(200), labels.numpy()] - best_other
    got = logit_difference(logits, labels)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    # Negative exactly where the prediction is not the label (no ties among random logits).
    assert torch.equal(got < 0, logits.argmax(1) != labels)
    assert torch.equal(logit_difference(logits, labels, targeted=True), -got)


def test_logit_difference_keeps_the_gradient_of_both_logits():
    logits = torch.tensor([[1.0, 4.0, 2.0]], requires_grad=True)
    logit_difference(logits, torch.tensor([0])).sum().backward()
    assert logits.grad.tolist() == [[1.0, -1.0, 0.0]]


# ------------------------------------------------------------------------------------------------------ projections


def test_clip_linf_lands_in_the_ball_and_the_box_and_keeps_what_is_inside():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    eps = 0.1
    x_adv = x + 0.5 * torch.randn(x.shape, generator=gen)
    out = clip_linf(x_adv, x, eps)
    expected = np.clip(np.clip(x_adv.numpy(), x.numpy() - eps, x.numpy() + eps), 0.0, 1.0)
    assert np.array_equal(out.numpy(), expected)
    assert (out - x).abs().max() <= eps + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert torch.equal(clip_linf(out, x, eps), out)  # a projection: applying it twice changes nothing


def test_project_linf_clamps_each_sample_to_its_own_radius_in_place():
    delta = torch.tensor([[[0.5, -0.5, 0.05]], [[0.5, -0.5, 0.05]]])
    epsilon = torch.tensor([0.1, 0.3])
    out = project_linf_(delta, epsilon)
    assert out is delta
    assert torch.allclose(delta, torch.tensor([[[0.1, -0.1, 0.05]], [[0.3, -0.3, 0.05]]]))
    inf = project_linf_(torch.tensor([[2.0, -2.0]]), torch.tensor([math.inf]))
    assert inf.tolist() == [[2.0, -2.0]]


# ------------------------------------------------------------------------------------------------------- one home


def test_every_attack_and_loss_uses_the_one_definition():
    # The evaluator's logit margin, FMN's loss, PGD's and TRADES/MART's projection, FMN's and the losses' eval mode.
    assert chunk_module.logit_difference is logit_difference
    assert fmn_module.logit_difference is logit_difference and fmn_module.eval_mode is eval_mode
    assert fmn_module.project_linf_ is project_linf_
    assert training_module.clip_linf is clip_linf
    assert common_module.clip_linf is clip_linf and common_module.eval_mode is eval_mode
