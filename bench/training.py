"""PGD (L∞) and PGD adversarial training: the digits track's dense parent and the method adapters' inner steps.

PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018
(arXiv 1706.06083), eq. 2: x^{t+1} = Π_{B∞(x, ε) ∩ [0,1]}(x^t + α · sign(∇_x L(θ, x^t, y))), started at a
uniformly random point of the ε-ball. Adversarial training minimises the loss at the PGD point (eq. 2.1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks.utils import clip_linf


def uniform_in_box(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A uniform point of B∞(x, ε) ∩ [0, 1]: each coordinate uniform on [max(0, x − ε), min(1, x + ε)].

    Sampling the ball and then clipping to [0, 1] leaves half of the coordinates at a bound exactly where the bound
    is (x = 0 on a digit's blank background): a pixel inside the dead zone of every first-layer unit that reads it
    has a zero gradient there, so sign steps never move it and an attack started there cannot use it.
    """
    low, high = (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)
    return low + (high - low) * torch.rand_like(x)


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    box_start: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """L∞ PGD maximising ``loss_fn`` (cross-entropy by default); the result lies in the ε-ball and [0, 1].

    Args:
        model: the network; its mode (train/eval) is left as the caller set it.
        x, y: clean inputs in [0, 1] and labels (or whatever ``loss_fn`` takes as its second argument).
        eps: L∞ radius.
        steps: iterations; 0 returns ``x`` (or the random start).
        step_size: α; default 2.5 · ε / steps (Madry et al.).
        random_start: start at a uniform point of the ε-ball, clipped to [0, 1] (Madry et al.'s start).
        box_start: with ``random_start``, start at a uniform point of B∞(x, ε) ∩ [0, 1] instead
            (:func:`uniform_in_box`).
        loss_fn: ``loss_fn(logits, y)`` to maximise, summed over the batch.
    """
    if loss_fn is None:

        def loss_fn(logits, target):
            return F.cross_entropy(logits, target, reduction="sum")

    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    x = x.detach()
    if random_start and box_start:
        x_adv = uniform_in_box(x, eps)
    else:
        delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
        x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = clip_linf(x_adv, x, eps)
    return x_adv.detach()


@dataclass(frozen=True)
class AdversarialTrainingConfig:
    """PGD adversarial training schedule (SGD with momentum, cosine learning rate)."""

    eps: float
    epochs: int = 40
    pgd_steps: int = 10
    step_size: float | None = None
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def adversarial_training(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: AdversarialTrainingConfig,
    *,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict:
    """Train ``model`` in place with PGD adversarial training; returns a small log (losses, wall time)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    start = time.perf_counter()
    history = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=gen)
        total, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            xb, yb = x[idx], y[idx]
            # The inner maximisation runs with the model in eval mode so BatchNorm statistics are
            # updated only by the adversarial batch the weights are trained on.
            model.eval()
            x_adv = pgd_linf(model, xb, yb, eps=cfg.eps, steps=cfg.pgd_steps, step_size=cfg.step_size)
            model.train()
            logits = model(x_adv)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        history.append({"epoch": epoch + 1, "adv_loss": total / seen, "adv_train_acc": correct / seen})
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: adversarial loss {total / seen:.3f}, "
            f"adversarial train accuracy {correct / seen:.1%}"
        )
    model.eval()
    return {"history": history, "wall_seconds": time.perf_counter() - start}
