"""``fast_model`` leaves the attacks' per-sample outcomes as they are with the plain model.

Frozen parameters change no arithmetic on the path to the input gradient: outcomes are bitwise equal. channels_last
runs the convolutions with other oneDNN kernels, which add their products in another order: logits and gradients
move by a few float32 units in the last place. The discrete outcomes (robust flags, the stage that broke a sample,
adversarial predictions, FMN's success) are asserted equal; FMN's distances, which follow those gradients through
100 steps, to a relative 1e-5. Measured on the 24 samples below: 9 ℓ∞ and 2 ℓ2 distances of 24 differ, each by one
unit in the last place (1.2e-7).
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from pyautoattack.fab_pt import FABAttack_PT
from torch import nn

from bench.attacks.autoattack import run_autoattack
from bench.attacks.fmn import minimum_norm
from bench.performance import (
    ChannelsLastInputs,
    exact_float_backends,
    execution_settings,
    fast_model,
    prefers_channels_last,
)

EPS = 0.1  # on the briefly trained small_cnn: 7 of 24 samples survive AutoAttack, the others fall


def _hooks(model: nn.Module) -> list:
    return [h for h in model._forward_pre_hooks.values() if isinstance(h, ChannelsLastInputs)]


def _fmn(model, x, y, norm):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return minimum_norm(model, x, y, norm=norm, steps=100)


class _ThreeChannelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        out = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(out.mean((2, 3)))


class _ViewsFeatureMap(nn.Module):
    """Calls ``.view`` on a 4-D feature map: valid only for the standard layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        out = self.conv(x)
        return self.fc(out.view(out.shape[0], -1))


def test_autoattack_and_fmn_outcomes_equal_plain_model(digits, digits_cnn):
    _, _, xte, yte = digits
    x, y = xte[:24], yte[:24]
    plain = copy.deepcopy(digits_cnn)
    fast = fast_model(digits_cnn, "cpu")
    assert execution_settings(fast)["channels_last"]

    a = run_autoattack(plain, x, y, norm="Linf", eps=EPS, version="standard", seed=0)
    b = run_autoattack(fast, x, y, norm="Linf", eps=EPS, version="standard", seed=0)
    assert torch.equal(a.clean_pred, b.clean_pred)
    assert torch.equal(a.robust, b.robust)
    assert a.broken_by == b.broken_by
    assert torch.equal(a.adv_pred, b.adv_pred)
    # Some samples survive and some fall, so the comparison covers both outcomes.
    assert 0 < int(a.robust.sum()) < int((a.clean_pred == y).sum())

    for norm in (math.inf, 2.0):
        fa, fb = _fmn(plain, x, y, norm), _fmn(fast, x, y, norm)
        assert torch.equal(fa.success, fb.success)
        assert torch.equal(fa.adv_pred, fb.adv_pred)
        torch.testing.assert_close(fb.distance, fa.distance, rtol=1e-5, atol=0.0)


def test_frozen_parameters_alone_are_bitwise_equal(digits, digits_cnn):
    _, _, xte, yte = digits
    x, y = xte[:24], yte[:24]
    plain = copy.deepcopy(digits_cnn)
    frozen = fast_model(digits_cnn, "cpu", channels_last=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    for norm in (math.inf, 2.0):
        fa, fb = _fmn(plain, x, y, norm), _fmn(frozen, x, y, norm)
        assert torch.equal(fa.distance, fb.distance)
        assert torch.equal(fa.adv_pred, fb.adv_pred)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fab_per_class_gradients(digits, digits_cnn, channels_last):
    """FAB's untargeted step calls backward once per class; with trainable parameters every call also built the
    weights' gradients. The input gradients do not depend on it."""
    _, _, xte, yte = digits
    x, y = xte[:16], yte[:16]
    plain = copy.deepcopy(digits_cnn)
    fast = fast_model(digits_cnn, "cpu", channels_last=channels_last)
    df_a, dg_a = FABAttack_PT(plain, device="cpu").get_diff_logits_grads_batch(x, y)
    df_b, dg_b = FABAttack_PT(fast, device="cpu").get_diff_logits_grads_batch(x, y)
    # The plain model's parameters collected gradients as a side effect; the prepared model's cannot.
    assert all(p.grad is not None for p in plain.parameters())
    assert all(p.grad is None for p in fast.parameters())
    if channels_last:
        torch.testing.assert_close(df_b, df_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dg_b, dg_a, rtol=1e-4, atol=1e-6)
    else:
        assert torch.equal(df_a, df_b)
        assert torch.equal(dg_a, dg_b)


def test_input_gradient_keeps_the_standard_layout():
    torch.manual_seed(0)
    model = fast_model(_ThreeChannelNet().eval(), "cpu")
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 6, 6, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    # The attacks reduce over and .view() this gradient; it must look like the plain model's.
    assert g.is_contiguous()
    g.view(4, -1)


def test_the_callers_model_is_left_alone():
    torch.manual_seed(0)
    plain = _ThreeChannelNet().eval()
    fast = fast_model(plain, "cpu")
    assert fast is not plain and execution_settings(fast)["channels_last"]
    # A model evaluated and then trained or pruned must still train.
    assert all(p.requires_grad for p in plain.parameters())
    assert plain.conv1.weight.is_contiguous() and not _hooks(plain) and execution_settings(plain) is None
    inplace = fast_model(plain, "cpu", inplace=True)
    assert inplace is plain and not any(p.requires_grad for p in plain.parameters())


def test_class_keys_and_pickling_are_unchanged():
    torch.manual_seed(0)
    plain = _ThreeChannelNet().eval()
    keys = list(plain.state_dict())
    model = fast_model(copy.deepcopy(plain), "cpu")
    assert type(model) is _ThreeChannelNet and list(model.state_dict()) == keys
    # Calling it again re-prepares without stacking a second input hook.
    model = fast_model(model, "cpu")
    assert len(_hooks(model)) == 1
    # The evaluator's worker processes receive the model pickled.
    clone = pickle.loads(pickle.dumps(model))
    x = torch.rand(5, 3, 6, 6)
    assert len(_hooks(clone)) == 1
    assert torch.equal(clone(x), model(x))
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    assert execution_settings(clone) == execution_settings(model)
    assert execution_settings(plain) is None


def test_layouts_by_architecture():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    assert not prefers_channels_last(mlp, "cpu")
    assert not execution_settings(fast_model(mlp, "cpu"))["channels_last"]
    assert prefers_channels_last(_ThreeChannelNet(), "cpu")
    # Forcing the layout off on a convolution network undoes the conversion and the hook.
    model = fast_model(_ThreeChannelNet().eval(), "cpu")
    model = fast_model(model, "cpu", channels_last=False)
    assert not _hooks(model) and model.conv1.weight.is_contiguous()


def test_a_model_that_views_feature_maps_falls_back():
    torch.manual_seed(0)
    sample = torch.rand(2, 3, 6, 6)
    model = fast_model(_ViewsFeatureMap().eval(), "cpu", sample=sample)
    settings = execution_settings(model)
    assert not settings["channels_last"] and settings["frozen_parameters"]
    assert not _hooks(model)
    model(sample)  # still runs, in the standard layout


def test_exact_float_backends():
    assert exact_float_backends("cpu") is None
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        assert exact_float_backends("cuda") is True
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic,
        ) = saved
