"""Fast Minimum-Norm (FMN) attack.

Pintor, Roli, Brendel and Biggio, "Fast Minimum-norm Adversarial Attacks through Adaptive Norm
Constraints", NeurIPS 2021 (arXiv:2102.12827).

FMN looks for the smallest perturbation δ, in an ℓp norm, that makes the model misclassify x + δ
(the minimum-norm problem, Eqs. (1)-(3) of the paper: minimise ‖δ‖_p subject to L(x + δ, y) < 0 and
x + δ ∈ [0, 1]^d, with the logit-difference loss L of Eq. (4)). Algorithm 1 solves it by alternating
two steps:

* the **ε-step** adapts the radius ε of an ℓp-ball: it shrinks ε towards the best norm found while the
  current point is adversarial, grows it while it is not, and, before any adversarial has been found,
  sets it to a linear estimate of the distance to the decision boundary;
* the **δ-step** takes a gradient step on L, normalised in ℓ2 (for every norm, ℓ∞ included, as in the
  authors' code), projects δ onto the ε-ball and clips x + δ to the box [0, 1].

Both step sizes (α for δ, γ for ε) follow a cosine annealing schedule. The attack returns the
smallest adversarial found for each sample, and the input itself where none was found, so success
must be checked separately; :func:`minimum_norm` does that and reports per-sample distances.

Unlike foolbox 3.3.4, whose ``L2FMNAttack.project`` never shrinks δ (``factor = min(1, n / n)``), the
ℓ2 projection here rescales δ onto the ε-ball.

**Warm start** (the paper's initialisation from an adversarial point; ``starting_points`` in the authors' code,
foolbox and adv-lib). A binary search along the segment from x to the adversarial starting point x₁ (in the
geometry of the norm: the convex combination in ℓ2, x₁ - x clamped to [-t, t] in ℓ∞) finds the boundary, and δ
starts at the adversarial end of the final bracket, as in the authors' code and foolbox (adv-lib takes the last
mid-point, which may be on the wrong side). ε starts at +∞ as there, so the first step, adversarial, sets it to
‖δ‖. One deliberate addition: the best adversarial starts as the adversarial end of that bracket (checked by the
search's own forward passes) instead of the clean input, and is kept at the end if rounding in x + δ put the
loop's best a unit in the last place beyond it. A warm-started run therefore never returns a point farther than
its starting point (in the norm as :func:`minimum_norm` measures it), even with no step at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.attacks.utils import batch_view, eval_mode, logit_difference, project_linf_

__all__ = ["FMNResult", "NotAdversarialError", "fmn", "minimum_norm"]

# ℓp norm → its dual ℓq norm (1/p + 1/q = 1), used by the linear boundary estimate of the ε-step.
_DUAL = {2.0: 2.0, math.inf: 1.0}


class NotAdversarialError(ValueError):
    """A starting point given to :func:`fmn` is not adversarial for the model (as the attack's own forward pass
    classifies it)."""


@dataclass(frozen=True)
class FMNResult:
    """Per-sample outcome of :func:`minimum_norm`.

    Attributes:
        distance: Float tensor ``(N,)``, the ℓp norm of the best adversarial perturbation; ``0`` for samples
            that are already adversarial at the input, ``inf`` where the attack failed (never 0).
        success: Bool tensor ``(N,)``, whether the returned point is adversarial (checked with a fresh
            forward pass, not taken from the attack's own bookkeeping).
        adv_pred: Long tensor ``(N,)``, the model's prediction on the returned point.
    """

    distance: Tensor
    success: Tensor
    adv_pred: Tensor


def _lp_norm(delta: Tensor, p: float) -> Tensor:
    """ℓp norm of each sample of a batch, over all non-batch dimensions."""
    return torch.linalg.vector_norm(delta.flatten(1), ord=p, dim=1)


def _project_l2_(delta: Tensor, epsilon: Tensor) -> Tensor:
    """In-place Euclidean projection onto the ℓ2 ball of radius ε: δ ← δ · min(1, ε / ‖δ‖₂)."""
    scale = (epsilon / _lp_norm(delta, 2.0).clamp(min=1e-12)).clamp(max=1.0)
    return delta.mul_(batch_view(scale, delta))


def _mid_point_linf(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """Point between x0 (t = 0) and x1 (t = 1) for the ℓ∞ binary search: x1 - x0 clamped to [-t, t]."""
    return x0 + project_linf_(x1 - x0, t)


def _mid_point_l2(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """Point between x0 (t = 0) and x1 (t = 1) for the ℓ2 binary search: the convex combination."""
    t = batch_view(t, x0)
    return (1 - t) * x0 + t * x1


_PROJECTION: dict[float, Callable[[Tensor, Tensor], Tensor]] = {2.0: _project_l2_, math.inf: project_linf_}
_MID_POINT: dict[float, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    2.0: _mid_point_l2,
    math.inf: _mid_point_linf,
}


def _is_adversarial(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    pred = logits.argmax(dim=1)
    return pred == labels if targeted else pred != labels


def _check_norm(norm: float) -> float:
    norm = float(norm)
    if norm not in _DUAL:
        raise ValueError(f"unsupported norm {norm!r} for FMN; use float('inf') or 2")
    return norm


def fmn(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    norm: float,
    targeted: bool = False,
    steps: int = 100,
    alpha_init: float = 1.0,
    alpha_final: float | None = None,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
    starting_points: Tensor | None = None,
    binary_search_steps: int = 10,
) -> Tensor:
    """Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021, Algorithm 1), ℓ∞ and ℓ2.

    At step k of K, with the cosine schedule c_k = (1 + cos(πk/K)) / 2, α_k = α_K + (α_0 - α_K) c_k and
    γ_k = γ_K + (γ_0 - γ_K) c_k:

    1. L = L(x + δ, y) (Eq. 4) and g = ∇_δ L; if x + δ is adversarial and ‖δ‖_p is the smallest so far,
       it becomes the best adversarial δ*.
    2. ε-step: ε ← min(ε(1 - γ_k), ‖δ*‖_p) if x + δ is adversarial; else ε ← ε(1 + γ_k) if an adversarial
       was found before; else ε ← ‖δ‖_p + |L| / ‖g‖_q (linear estimate of the boundary, q the dual
       norm). Then ε ≤ ‖max(x, 1 - x)‖_p, the largest perturbation the box allows.
    3. δ-step: δ ← δ - α_k g / ‖g‖₂, then projection onto {‖δ‖_p ≤ ε}, then x + δ clipped to [0, 1].

    The function is pure: the model is run in eval mode (each submodule's flag is restored afterwards)
    and gradients are taken with respect to δ only, so no ``.grad`` is left on the model's parameters.

    Args:
        model: Classifier taking inputs in [0, 1] and returning logits ``(N, C)``.
        inputs: Clean inputs ``(N, ...)`` in [0, 1].
        labels: True classes ``(N,)`` if untargeted, target classes if ``targeted``.
        norm: The ℓp norm to minimise, ``float('inf')`` or ``2``.
        targeted: Whether to push the prediction to ``labels`` rather than away from them.
        steps: Number of iterations K.
        alpha_init: Initial δ step size α_0 (the step is along the ℓ2-normalised gradient).
        alpha_final: Final δ step size α_K; ``alpha_init / 100`` when None, as in the paper.
        gamma_init: Initial ε step size γ_0.
        gamma_final: Final ε step size γ_K.
        starting_points: Optional adversarial points to start from; a binary search along the segment
            (in the geometry of ``norm``) from ``inputs`` finds the boundary and δ starts there. The result is
            then never farther from ``inputs`` than the starting point (module docstring).
        binary_search_steps: Number of bisections for ``starting_points``.

    Returns:
        The adversarial inputs of smallest norm found, shape of ``inputs``; for samples that never became
        adversarial, the input itself (never with ``starting_points``).

    Raises:
        ValueError: If ``norm`` is unsupported, inputs leave [0, 1] or shapes disagree;
            :class:`NotAdversarialError` if a starting point is not adversarial.
    """
    p = _check_norm(norm)
    q = _DUAL[p]
    project_, mid_point = _PROJECTION[p], _MID_POINT[p]
    x = inputs.detach()
    n = len(x)
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("FMN inputs must lie in [0, 1]; put normalisation inside the model")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    labels = labels.to(device=x.device, dtype=torch.long)
    if alpha_final is None:
        alpha_final = alpha_init / 100

    worst_norm = _lp_norm(torch.maximum(x, 1 - x), p)
    with eval_mode(model):
        if starting_points is not None:
            x1 = starting_points.detach().to(device=x.device, dtype=x.dtype)
            if x1.shape != x.shape:
                raise ValueError(f"starting_points must have the inputs' shape {tuple(x.shape)}, got {tuple(x1.shape)}")
            with torch.no_grad():
                if not _is_adversarial(model(x1), labels, targeted).all():
                    raise NotAdversarialError("every starting point must be adversarial; drop or replace the others")
                lower = torch.zeros(n, dtype=x.dtype, device=x.device)
                upper = torch.ones(n, dtype=x.dtype, device=x.device)
                # The adversarial end of the bracket as the very point the forward pass classified (x1 until a
                # mid-point is adversarial). A mid-point replaces it only if not farther: in ℓ∞, x + (x1 - x) can
                # round a unit in the last place beyond x1.
                start = x1.clone()
                start_norm = _lp_norm(start - x, p)
                for _ in range(binary_search_steps):
                    t = (lower + upper) / 2
                    mid = mid_point(x, x1, t)
                    is_adv = _is_adversarial(model(mid), labels, targeted)
                    lower = torch.where(is_adv, lower, t)
                    upper = torch.where(is_adv, t, upper)
                    mid_norm = _lp_norm(mid - x, p)
                    take = is_adv & (mid_norm <= start_norm)
                    start = torch.where(batch_view(take, x), mid, start)
                    start_norm = torch.where(take, mid_norm, start_norm)
            delta = start - x
            best_adv = start
            best_norm = _lp_norm(delta, p)
        else:
            delta = torch.zeros_like(x)
            best_adv = x.clone()
            best_norm = worst_norm.clone()

        epsilon = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        adv_found = torch.zeros(n, dtype=torch.bool, device=x.device)

        for k in range(steps):
            cosine = (1 + math.cos(math.pi * k / steps)) / 2
            alpha = alpha_final + (alpha_init - alpha_final) * cosine
            gamma = gamma_final + (gamma_init - gamma_final) * cosine

            delta.requires_grad_(True)
            x_adv = x + delta
            logits = model(x_adv)
            loss = logit_difference(logits, labels, targeted)
            if loss.requires_grad:
                (g,) = torch.autograd.grad(loss.sum(), delta, allow_unused=True)
            else:
                g = None
            g = torch.zeros_like(x) if g is None else g
            delta = delta.detach()
            loss = loss.detach()

            delta_norm = _lp_norm(delta, p)
            is_adv = _is_adversarial(logits.detach(), labels, targeted)
            is_best = is_adv & (delta_norm <= best_norm)
            adv_found |= is_adv
            best_norm = torch.where(is_best, delta_norm, best_norm)
            best_adv = torch.where(batch_view(is_best, x), x_adv.detach(), best_adv)

            # ε-step.
            distance_to_boundary = loss.abs() / _lp_norm(g, q).clamp(min=1e-12)
            epsilon = torch.where(
                is_adv,
                torch.minimum(epsilon * (1 - gamma), best_norm),
                torch.where(adv_found, epsilon * (1 + gamma), delta_norm + distance_to_boundary),
            )
            epsilon = torch.minimum(epsilon, worst_norm)

            # δ-step: descend L along its ℓ2-normalised gradient, project onto the ε-ball, clip to the box.
            g_norm = _lp_norm(g, 2.0).clamp(min=1e-12)
            delta.sub_(alpha * g / batch_view(g_norm, g))
            project_(delta, epsilon)
            delta.add_(x).clamp_(0.0, 1.0).sub_(x)

    if starting_points is not None:
        # The loop ranks points by ‖δ‖, but x + δ rounds: its best can lie a unit in the last place beyond the
        # point it started from (a tie at the first step). The starting point is then the better answer.
        farther = _lp_norm(best_adv - x, p) > start_norm
        best_adv = torch.where(batch_view(farther, x), start, best_adv)
    return best_adv


def minimum_norm(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    norm: float,
    steps: int = 100,
    **hp,
) -> FMNResult:
    """Per-sample minimum adversarial distance found by FMN (Pintor et al., NeurIPS 2021).

    Runs :func:`fmn`, then checks success with a separate forward pass on the returned points (FMN returns
    the input itself where it failed, so its output alone cannot tell a failure from a sample that was
    already adversarial). Samples adversarial at the input get distance 0 and success True; failures get
    distance ``inf``.

    Args:
        model: Classifier taking inputs in [0, 1] and returning logits.
        inputs: Clean inputs ``(N, ...)`` in [0, 1].
        labels: Classes to move away from (targets if ``targeted=True`` is passed in ``hp``). To measure
            how far a misclassified sample is from leaving its predicted class, pass the prediction.
        norm: ``float('inf')`` or ``2``; distances are measured in this norm over all non-batch dims.
        steps: Number of FMN iterations.
        **hp: Further keyword arguments of :func:`fmn` (``targeted``, ``alpha_init``, ``gamma_init``, ...).

    Returns:
        An :class:`FMNResult` with ``distance``, ``success`` and ``adv_pred`` per sample.
    """
    p = _check_norm(norm)
    adv = fmn(model, inputs, labels, norm=p, steps=steps, **hp)
    with torch.no_grad(), eval_mode(model):
        adv_pred = model(adv).argmax(dim=1)
    success = adv_pred == labels if hp.get("targeted", False) else adv_pred != labels
    distance = _lp_norm(adv - inputs.detach(), p).float()
    distance = torch.where(success, distance, torch.full_like(distance, math.inf))
    return FMNResult(distance=distance, success=success, adv_pred=adv_pred)
