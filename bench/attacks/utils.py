"""Pieces every attack and every adversarial loss shares, written once (adv-lib keeps them in ``adv_lib/utils``).

* :func:`eval_mode`: run a block with the model in eval mode and give every submodule its own flag back;
* :func:`logit_difference`: z_y − max_{j≠y} z_j, the margin of a classification (FMN's loss, Eq. (4) of Pintor et
  al., NeurIPS 2021; adv-lib's ``difference_of_logits``), negative exactly when the sample is misclassified;
* the ℓ∞ projections: :func:`clip_linf` puts points back into B∞(x, ε) ∩ [0, 1] (PGD, TRADES, MART), and
  :func:`project_linf_` projects perturbations δ onto the ball of a per-sample radius, in place (FMN).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["batch_view", "clip_linf", "eval_mode", "logit_difference", "project_linf_"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own train/eval flag.

    Restoring per module (not ``model.train(was_training)``) keeps a caller's frozen BatchNorm in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def logit_difference(logits: Tensor, labels: Tensor, targeted: bool = False) -> Tensor:
    """The difference of logits per sample, negative exactly when the sample is adversarial.

    Untargeted: z_y − max_{j≠y} z_j (the logit margin: positive when ``labels`` is the predicted class).
    Targeted (``labels`` are the targets t): max_{j≠t} z_j − z_t.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)`` class indices.
        targeted: whether ``labels`` are targets.
    """
    z_label = logits.gather(1, labels[:, None]).squeeze(1)
    z_other = logits.scatter(1, labels[:, None], -math.inf).amax(dim=1)
    return z_other - z_label if targeted else z_label - z_other


def batch_view(t: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``(N,)`` tensor viewed as ``(N, 1, ..., 1)`` to broadcast against ``like``."""
    return t.view(-1, *([1] * (like.ndim - 1)))


def clip_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Projection of ``x_adv`` onto B∞(x, ε) ∩ [0, 1]: each coordinate clamped to [x − ε, x + ε], then to [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def project_linf_(delta: Tensor, epsilon: Tensor) -> Tensor:
    """In-place Euclidean projection of perturbations onto the ℓ∞ ball of radius ε (per sample): clamp to [-ε, ε].

    Args:
        delta: ``(N, ...)`` perturbations, modified in place and returned.
        epsilon: ``(N,)`` radii.
    """
    epsilon = batch_view(epsilon, delta)
    return torch.maximum(torch.minimum(delta, epsilon, out=delta), -epsilon, out=delta)
