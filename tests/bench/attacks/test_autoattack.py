"""Our stage-by-stage AutoAttack equals a bare pyautoattack run on the same model, samples, seed and chunks."""

from __future__ import annotations

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from bench.attacks.autoattack import AA_FLAGS, run_autoattack, square_check_flags
from bench.spec import AA_ATTACKS

EPS = 0.1  # on the clean-trained MLP this leaves some samples robust and breaks most


@pytest.mark.parametrize("version", ["plus", "standard"])
def test_matches_bare_pyautoattack_per_sample(digits, digits_mlp, version):
    _, _, xte, yte = digits
    x, y = xte[:48], yte[:48]
    ours_robust, bare_robust = [], []
    for start in (0, 24):
        xc, yc = x[start : start + 24], y[start : start + 24]
        ours = run_autoattack(digits_mlp, xc, yc, norm="Linf", eps=EPS, version=version, seed=0)
        bare = AutoAttack(digits_mlp, norm="Linf", eps=EPS, version=version, seed=0)
        x_adv, y_adv = bare.run_standard_evaluation(xc, yc, batch_size=24)
        assert torch.equal(ours.robust, y_adv == yc)
        assert torch.equal(ours.adv_pred, y_adv)
        # The adversarial inputs too: FMN's warm start begins from them.
        assert torch.equal(ours.x_adv, x_adv)
        ours_robust.append(ours.robust)
        bare_robust.append(y_adv == yc)
        # Bookkeeping: exactly the broken correct samples name a stage, in the version's stage list.
        correct = ours.clean_pred == yc
        for i, stage in enumerate(ours.broken_by):
            assert (stage is not None) == bool(correct[i] and not ours.robust[i])
            assert stage is None or stage in AA_ATTACKS[version]
        assert set(ours.seconds) == set(AA_ATTACKS[version])
    robust = torch.cat(ours_robust).float().mean()
    assert robust == torch.cat(bare_robust).float().mean()
    # The comparison means something only if some samples survive and some are broken.
    assert 0 < robust < (digits_mlp(x).argmax(1) == y).float().mean()


def test_caller_rng_state_is_restored(digits, digits_mlp):
    _, _, xte, yte = digits
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_autoattack(digits_mlp, xte[:8], yte[:8], norm="Linf", eps=EPS, version="standard", seed=0)
    assert torch.equal(torch.rand(3), expected)


class SoftmaxOut(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(1)


class Noisy(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) + 0.5 * torch.randn(x.shape[0], 10)


@pytest.mark.parametrize(("wrap", "flag"), [(SoftmaxOut, "softmax_output"), (Noisy, "randomized_defense")])
def test_sanity_checks_become_flags(digits, digits_mlp, wrap, flag):
    _, _, xte, yte = digits
    out = run_autoattack(wrap(digits_mlp), xte[:6], yte[:6], norm="Linf", eps=EPS, version="standard", seed=0)
    assert flag in out.flags
    assert out.flags <= AA_FLAGS


def test_clean_model_raises_no_flag(digits, digits_mlp):
    _, _, xte, yte = digits
    out = run_autoattack(digits_mlp, xte[:6], yte[:6], norm="Linf", eps=EPS, version="standard", seed=0)
    assert out.flags == set()


def test_square_check_on_whole_run_figures():
    # Standard version: Square runs last; it breaking 5 % more than the white-box stages is suspicious.
    accs = {"clean": 0.9, "apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.45, "square": 0.40}
    assert square_check_flags(accs) == {"square_beat_white_box"}
    assert square_check_flags({**accs, "square": 0.45}) == set()
