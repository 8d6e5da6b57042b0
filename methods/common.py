"""Training pieces shared by the method adapters: adversarial losses, magnitude masks, masked steps and ADMM.

Losses (each builds its own adversarial examples with the model in eval mode, then restores the caller's
train/eval flags module by module):

- TRADES: Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019
  (arXiv 1901.08573); the released code's form, which HYDRA (Sehwag et al., NeurIPS 2020) trains with.
- MART: Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified Examples", ICLR 2020;
  the released code's form, which MAD (Lee et al., CVPR 2022) fine-tunes with (β = 0.5 there).
- PGD-AT: Madry et al., ICLR 2018 (arXiv 1706.06083), eq. 2.1, through :func:`bench.training.pgd_linf`.

Masks are ``{name: bool tensor}`` with True = kept. A name is a ``model.named_modules()`` name of a Conv2d or
Linear (its ``weight`` is meant) or a full parameter name (``"classifier.bias"``, for MAD's pruned bias).

ADMM (scaled form; Boyd et al., "Distributed Optimization and Statistical Learning via the Alternating
Direction Method of Multipliers", 2011, §3.1.1, with the nonconvex sparsity set of §9.1) as used for pruning
by Zhang et al. (ECCV 2018, arXiv 1804.03294), RAP-ADMM (Ye et al., ICCV 2019, arXiv 1903.12561) and PwoA
(Jian et al., ICDM 2022); the global l0 projection is ATMC's (Gui et al., NeurIPS 2019).

Every count is exact: a fraction ``s`` of ``n`` entries prunes ``int(s · n)`` of them, and ties are broken by
position (a stable sort; among equal magnitudes the earlier entries are pruned first), so masks are
reproducible across runs and devices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks.utils import clip_linf, eval_mode
from bench.sparsity import weight_layers
from bench.training import pgd_linf, uniform_in_box

# ---------------------------------------------------------------------------------------------------------------
# Adversarial losses
# ---------------------------------------------------------------------------------------------------------------


def _sign_ascent(
    model: nn.Module,
    x: torch.Tensor,
    objective,
    *,
    eps: float,
    steps: int,
    step_size: float,
    random_start: bool = False,
) -> torch.Tensor:
    if random_start:
        # A uniform point of B∞(x, ε) ∩ [0, 1], so a coordinate whose first-layer ReLUs are all off at x (zero
        # gradient, sign 0) starts away from x and is explored (bench.training.uniform_in_box says why not the ball).
        x_adv = uniform_in_box(x, eps)
    else:
        # TRADES and MART both start at x + 0.001·N(0, 1): sign ascent can never move a coordinate whose gradient
        # is exactly 0 there, e.g. a blank pixel inside the dead zone of every first-layer unit that sees it.
        x_adv = x + 0.001 * torch.randn_like(x)
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model(x_adv)), x_adv)
            x_adv = clip_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    # Also covers steps = 0, where the Gaussian start may leave the box.
    return clip_linf(x_adv.detach(), x, eps)


def trades_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float = 2 / 255,
    random_start: bool = False,
) -> torch.Tensor:
    """TRADES inner maximisation: L∞ sign ascent on Σ_i KL(f(x) ‖ f(x'_i)), run in eval mode.

    Starts at ``x + 0.001·N(0, 1)`` (the released code) or, with ``random_start``, at a uniform point of
    B∞(x, ε) ∩ [0, 1]; every step is projected onto the ε-ball and [0, 1]. The natural distribution f(x) is
    computed once (the released code recomputes it every step, to the same values).

    Args:
        model: the network; its train/eval flags are restored on return.
        x: clean inputs in [0, 1].
        eps: L∞ radius.
        steps: sign-gradient steps (10 in HYDRA).
        step_size: α (2/255 in HYDRA for ε = 8/255).
        random_start: start at a uniform point of B∞(x, ε) ∩ [0, 1] instead of TRADES' ``x + 0.001·N(0, 1)``.

    Returns:
        Detached adversarial inputs with ‖x' − x‖∞ ≤ ε and x' ∈ [0, 1].
    """
    x = x.detach()
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
        return _sign_ascent(
            model,
            x,
            lambda logits: F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum"),
            eps=eps,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
        )


def mart_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float = 2 / 255,
    random_start: bool = False,
) -> torch.Tensor:
    """MART inner maximisation: L∞ sign ascent on the cross-entropy, from ``x + 0.001·N(0, 1)``, in eval mode.

    The CE is summed rather than averaged (the released code averages); the sign of the gradient is the same.

    Args:
        model: the network; its train/eval flags are restored on return.
        x, y: clean inputs in [0, 1] and labels.
        eps: L∞ radius.
        steps: sign-gradient steps (10 in MART and MAD).
        step_size: α (MART uses 0.007, MAD 0.03/10·2.3 for ε = 0.03).
        random_start: start at a uniform point of B∞(x, ε) ∩ [0, 1] instead of ``x + 0.001·N(0, 1)``.

    Returns:
        Detached adversarial inputs with ‖x' − x‖∞ ≤ ε and x' ∈ [0, 1].
    """
    x = x.detach()
    with eval_mode(model):
        return _sign_ascent(
            model,
            x,
            lambda logits: F.cross_entropy(logits, y, reduction="sum"),
            eps=eps,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
        )


def trades_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES outer loss given the logits: ``CE(f(x), y) + β · (1/n) Σ_i KL(f(x_i) ‖ f(x'_i))``.

    As in the released code (``KLDivLoss(size_average=False)(log_softmax(adv), softmax(nat)) / n``), the KL is
    summed over the batch and divided by its size, and the gradient also flows through f(x) inside the KL.
    """
    ce = F.cross_entropy(logits_nat, y)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="sum")
    return ce + beta * kl / len(y)


def mart_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART outer loss given the logits: ``BCE(p', y) + β · (1/n) Σ_i KL(p_i ‖ p'_i) · (1 − p_i,y_i)``.

    p = softmax(f(x)), p' = softmax(f(x')). The boosted CE is
    ``−log p'_y − log(1.0001 − max_{k≠y} p'_k)``; the stabilisers of the released code are kept
    (``+1e-12`` inside both logarithms, ``1.0000001 − p_y`` as the misclassification weight). No term is
    detached: the gradient flows through p in the KL and in the weight, as in the code.
    """
    p_adv = F.softmax(logits_adv, dim=1)
    p_nat = F.softmax(logits_nat, dim=1)
    # y' = the most probable wrong class (the code's argsort-top-2 rule; ties give the same p'_{y'}).
    is_true = F.one_hot(y, p_adv.shape[1]).bool()
    y_wrong = p_adv.detach().masked_fill(is_true, float("-inf")).argmax(dim=1)
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), y_wrong)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_nat, reduction="none").sum(dim=1)
    p_true = p_nat.gather(1, y[:, None]).squeeze(1)
    robust = (kl * (1.0000001 - p_true)).sum() / len(y)
    return bce + beta * robust


def trades_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float = 2 / 255,
    beta: float = 6.0,
    random_start: bool = False,
) -> torch.Tensor:
    """TRADES loss (Zhang et al. 2019) as HYDRA trains with it; see :func:`trades_objective`.

    The adversarial point comes from :func:`trades_adversarial` (eval mode; ``random_start`` is passed on);
    the two outer forward passes run in the caller's mode. f(x) is evaluated once (the released code runs it
    twice in train mode, which only updates the BatchNorm running statistics one more time).

    Returns:
        A scalar to minimise.
    """
    x_adv = trades_adversarial(model, x, eps=eps, steps=steps, step_size=step_size, random_start=random_start)
    return trades_objective(model(x), model(x_adv), y, beta)


def mart_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float = 2 / 255,
    beta: float = 6.0,
    random_start: bool = False,
) -> torch.Tensor:
    """MART loss (Wang et al. 2020); β = 6 is MART's default, MAD passes 0.5. See :func:`mart_objective`.

    ``random_start`` is passed on to :func:`mart_adversarial`.

    Returns:
        A scalar to minimise.
    """
    x_adv = mart_adversarial(model, x, y, eps=eps, steps=steps, step_size=step_size, random_start=random_start)
    return mart_objective(model(x), model(x_adv), y, beta)


def pgd_ce_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    box_start: bool = False,
) -> torch.Tensor:
    """Madry et al.'s adversarial cross-entropy (eq. 2.1): ``CE(f(x'), y)`` at the PGD point x'.

    x' comes from :func:`bench.training.pgd_linf` (uniform random start unless ``random_start=False``) run in
    eval mode; the outer forward runs in the caller's mode.

    Args:
        step_size: α; ``None`` gives pgd_linf's 2.5·ε/steps (RAP-ADMM uses 2/255 for ε = 8/255).
        box_start: start uniformly in B∞(x, ε) ∩ [0, 1] rather than in the ball, then clipped.

    Returns:
        A scalar to minimise (batch mean).
    """
    with eval_mode(model):
        x_adv = pgd_linf(
            model, x, y, eps=eps, steps=steps, step_size=step_size, random_start=random_start, box_start=box_start
        )
    return F.cross_entropy(model(x_adv), y)


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


def prunable_layers(model: nn.Module, *, include_linear: bool = True) -> list[tuple[str, nn.Module]]:
    """The Conv2d (and Linear) modules of ``model`` in ``named_modules()`` order, first conv and classifier included."""
    return [(name, m) for name, m in weight_layers(model) if include_linear or isinstance(m, nn.Conv2d)]


def _check_fraction(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity}")


def _pruned_positions(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool mask (flat) of the ``n_prune`` smallest ``scores``; stable sort, so ties go to earlier positions."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        order = torch.sort(scores.reshape(-1), stable=True).indices
        pruned[order[:n_prune]] = True
    return pruned


def _layer_names(model: nn.Module, layers: Iterable[str | tuple[str, nn.Module]] | None) -> list[str]:
    if layers is None:
        return [name for name, _ in prunable_layers(model)]
    return [item if isinstance(item, str) else item[0] for item in layers]


def _parameter(model: nn.Module, name: str, *, params=None, modules=None) -> nn.Parameter:
    """The parameter a mask/target name refers to: a parameter name, or a module name meaning its ``weight``."""
    params = dict(model.named_parameters()) if params is None else params
    if name in params:
        return params[name]
    modules = dict(model.named_modules()) if modules is None else modules
    weight = getattr(modules.get(name), "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    known = ", ".join(n for n, _ in prunable_layers(model))
    raise KeyError(f"{name!r} is neither a layer with a weight nor a parameter of the model; prunable layers: {known}")


def _parameters(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    return [(name, _parameter(model, name, params=params, modules=modules)) for name in names]


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    *,
    scope: Literal["local", "global"] = "local",
    layers: Iterable[str | tuple[str, nn.Module]] | None = None,
) -> dict[str, torch.Tensor]:
    """Least-weight-magnitude (LWM) masks: prune the smallest |w|.

    Args:
        model: the network (left unchanged).
        sparsity: fraction pruned. ``"local"``: ``int(sparsity · numel)`` entries in every layer (HYDRA's rule).
            ``"global"``: ``int(sparsity · Σ numel)`` entries over the listed layers ranked together.
        scope: ``"local"`` or ``"global"``.
        layers: names (or ``(name, module)`` pairs from :func:`prunable_layers`); default every Conv2d/Linear.

    Returns:
        ``{name: bool tensor shaped like the weight}``, True = kept.
    """
    _check_fraction(sparsity)
    weights = _parameters(model, _layer_names(model, layers))
    if scope == "local":
        return {name: ~_pruned_positions(w.abs(), int(sparsity * w.numel())).view_as(w) for name, w in weights}
    if scope == "global":
        scores = torch.cat([w.abs().reshape(-1) for _, w in weights]) if weights else torch.zeros(0)
        kept = ~_pruned_positions(scores, int(sparsity * scores.numel()))
        return dict(zip((name for name, _ in weights), _split_like(kept, [w for _, w in weights]), strict=True))
    raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")


def _split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set the pruned entries (mask False) of each named parameter to exactly 0.0, in place."""
    for (_, p), keep in zip(_parameters(model, masks), masks.values(), strict=True):
        p.masked_fill_(~keep.to(device=p.device, dtype=torch.bool), 0.0)


@torch.no_grad()
def masks_from_zeros(
    model: nn.Module, layers: Iterable[str | tuple[str, nn.Module]] | None = None
) -> dict[str, torch.Tensor]:
    """The current nonzero pattern (True where the weight is not exactly zero); default every Conv2d/Linear."""
    return {name: w != 0 for name, w in _parameters(model, _layer_names(model, layers))}


@torch.no_grad()
def _zero_pruned(p: torch.Tensor, pruned: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    p.masked_fill_(pruned, 0.0)
    # Every per-entry buffer (SGD momentum_buffer, Adam exp_avg/exp_avg_sq/max_exp_avg_sq, RMSprop square_avg,
    # Adagrad sum) has the parameter's shape; zeroing it at pruned positions means the next step moves nothing there.
    for value in optimizer.state.get(p, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            value.masked_fill_(pruned, 0.0)


def masked_step(optimizer: torch.optim.Optimizer, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """``optimizer.step()`` that keeps pruned entries exactly 0.0 under momentum, weight decay and Adam.

    Before the step the gradient is zeroed at pruned positions (MAD and RAP-ADMM multiply the gradient by the
    mask); after it the weights and every per-entry optimizer buffer are re-zeroed there. With the buffers at
    zero, SGD's ``d = g + λw`` and Adam's moments stay zero at pruned positions, so nothing can leak back.

    Args:
        optimizer: any torch optimizer over (a superset of) the masked parameters.
        model: the network the mask names refer to.
        masks: ``{layer or parameter name: bool tensor}``, True = kept.
    """
    entries = [
        (p, ~keep.to(device=p.device, dtype=torch.bool))
        for (_, p), keep in zip(_parameters(model, masks), masks.values(), strict=True)
    ]
    with torch.no_grad():
        for p, pruned in entries:
            if p.grad is not None:
                p.grad.masked_fill_(pruned, 0.0)
    optimizer.step()
    for p, pruned in entries:
        _zero_pruned(p, pruned, optimizer)


# ---------------------------------------------------------------------------------------------------------------
# Projections onto sparsity sets (Euclidean: keep the largest entries / filters, zero the rest)
# ---------------------------------------------------------------------------------------------------------------


def irregular_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of :func:`project_irregular`: all but the ``int(sparsity · numel)`` smallest |w|."""
    _check_fraction(sparsity)
    return ~_pruned_positions(w.detach().abs(), int(sparsity * w.numel())).view_as(w)


def filter_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of :func:`project_filters`: whole output filters (dim 0), the smallest-L2-norm ones dropped."""
    _check_fraction(sparsity)
    if w.dim() < 2:
        raise ValueError(f"filter projection needs a weight with an output dimension, got shape {tuple(w.shape)}")
    norms = w.detach().reshape(w.shape[0], -1).norm(dim=1)
    kept_filters = ~_pruned_positions(norms, int(sparsity * w.shape[0]))
    return kept_filters.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()


def global_masks(weights: Mapping[str, torch.Tensor], n_keep: int) -> dict[str, torch.Tensor]:
    """Keep-masks of :func:`project_global`: the ``n_keep`` largest |w| over all tensors together."""
    tensors = list(weights.values())
    total = sum(t.numel() for t in tensors)
    if n_keep < 0:
        raise ValueError(f"n_keep must be >= 0, got {n_keep}")
    if not tensors:
        return {}
    scores = torch.cat([t.detach().abs().reshape(-1).to(tensors[0].device) for t in tensors])
    kept = ~_pruned_positions(scores, max(total - n_keep, 0))
    return {
        name: chunk.to(t.device) for (name, t), chunk in zip(weights.items(), _split_like(kept, tensors), strict=True)
    }


def project_irregular(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Π onto {≤ numel − int(s·numel) nonzeros}: zero the ``int(sparsity · numel)`` smallest |w| (new tensor).

    Exact count and idempotent (zeros are the smallest magnitudes, so a second pass prunes only zeros). The
    released RAP-ADMM/PwoA code thresholds at ``numpy.percentile`` instead, which lets exact ties survive and can
    differ from this count by one entry.
    """
    return w.masked_fill(~irregular_mask(w, sparsity), 0.0)


def project_filters(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Π onto filter-sparse weights: zero the ``int(sparsity · out_channels)`` output filters of least L2 norm."""
    return w.masked_fill(~filter_mask(w, sparsity), 0.0)


def project_global(weights: Mapping[str, torch.Tensor], n_keep: int) -> dict[str, torch.Tensor]:
    """ATMC's ``l0proj``: keep the ``n_keep`` largest |w| over all tensors together, zero the rest (new tensors).

    ATMC's budget is ``n_keep = int(κ · N)`` with N the entries of all listed tensors; the caller converts.
    """
    masks = global_masks(weights, n_keep)
    return {name: w.masked_fill(~masks[name], 0.0) for name, w in weights.items()}


_MASKS = {"irregular": irregular_mask, "filter": filter_mask}


# ---------------------------------------------------------------------------------------------------------------
# ADMM
# ---------------------------------------------------------------------------------------------------------------


class ADMMState:
    """Auxiliary Z and scaled dual U for ``min f(W) s.t. W_l ∈ S_l`` (Boyd et al. 2011, §3.1.1 scaled form).

    The W-step is ordinary training on ``f(W) + penalty``; every few epochs :meth:`update` runs the Z- and
    U-steps. Z starts at Π(W) and U at 0 (RAP-ADMM's ``admm_initialization``).

    Args:
        model: the network; target weights are looked up by name on every call, so a copy of the model with
            the same names can be passed later.
        targets: ``{layer or parameter name: fraction pruned}`` (RAP-ADMM and PwoA give per-layer ratios).
        rho: penalty weight ρ (one for every layer). Mutable: ``state.rho`` or :meth:`scale_rho`.
        projection: ``"irregular"`` (entries) or ``"filter"`` (whole output filters).
        detach_u: True is the textbook algorithm (and PwoA's code). False reproduces RAP-ADMM's released
            ``admm_update``, where ``U ← W − Z + U`` keeps an autograd path to W: after k updates dU/dW = k·I, so
            the penalty's gradient with respect to W is ``(1 + k) · ρ(W − Z + U)`` (twice the textbook one after
            the first update), while its value is unchanged.

    Attributes:
        Z, U: ``{name: tensor}``, detached.
        updates: how many times :meth:`update` has run.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Mapping[str, float],
        *,
        rho: float,
        projection: Literal["irregular", "filter"] = "irregular",
        detach_u: bool = True,
    ) -> None:
        if projection not in _MASKS:
            raise ValueError(f"projection must be one of {', '.join(_MASKS)}, got {projection!r}")
        for sparsity in targets.values():
            _check_fraction(sparsity)
        self.targets = dict(targets)
        self.rho = float(rho)
        self.projection = projection
        self.detach_u = detach_u
        self.updates = 0
        with torch.no_grad():
            weights = self._weights(model)
            self.Z = {name: self.project(name, w) for name, w in weights}
            self.U = {name: torch.zeros_like(w) for name, w in weights}

    def _weights(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return _parameters(model, self.targets)

    def mask(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Keep-mask of Π for target ``name`` applied to ``w``."""
        return _MASKS[self.projection](w, self.targets[name])

    def project(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Π_{S_name}(w), detached."""
        w = w.detach()
        return w.masked_fill(~self.mask(name, w), 0.0)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``Σ_l (ρ/2) ‖W_l − Z_l + U_l‖²`` (Frobenius), differentiable in W only (see ``detach_u``)."""
        total = None
        for name, w in self._weights(model):
            u = self.U[name]
            if not self.detach_u and self.updates:
                # Same value as U; adds the k·I Jacobian that RAP-ADMM's undetached U chain carries.
                u = u + self.updates * (w - w.detach())
            term = (w - self.Z[name] + u).pow(2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.rho * total

    @torch.no_grad()
    def update(self, model: nn.Module) -> dict[str, float]:
        """Z ← Π(W + U), then U ← U + W − Z.

        Returns:
            The dual residual ρ‖Z_new − Z_old‖ per layer (Boyd et al. §3.3).
        """
        dual = {}
        for name, w in self._weights(model):
            z = self.project(name, w + self.U[name])
            dual[name] = self.rho * float((z - self.Z[name]).norm())
            self.Z[name] = z
            self.U[name] = self.U[name] + w - z
        self.updates += 1
        return dual

    @torch.no_grad()
    def reset_z(self, model: nn.Module) -> None:
        """Z ← Π(W), U kept (PwoA's ``admm_initialization`` at the start of every epoch)."""
        for name, w in self._weights(model):
            self.Z[name] = self.project(name, w)

    def scale_rho(self, factor: float, *, cap: float | None = None) -> float:
        """ρ ← factor·ρ (RAP-ADMM: 1.3, uncapped; PwoA: 1.35, capped at 1); returns the new ρ."""
        self.rho *= factor
        if cap is not None:
            self.rho = min(self.rho, cap)
        return self.rho

    @torch.no_grad()
    def residuals(self, model: nn.Module) -> dict[str, float]:
        """Primal residual ‖W − Z‖ (Frobenius) per layer."""
        return {name: float((w - self.Z[name]).norm()) for name, w in self._weights(model)}

    @torch.no_grad()
    def hard_prune(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """W ← Π(W) for every target, in place; returns the keep-masks (for :func:`masked_step` in retraining).

        The masks are the projection's support, so each layer keeps exactly ``numel − int(s·numel)`` entries
        (or filters) even when a kept weight happens to be zero.
        """
        masks = {}
        for name, w in self._weights(model):
            keep = self.mask(name, w)
            w.masked_fill_(~keep, 0.0)
            masks[name] = keep
        return masks


def sparsity_of_layers(model: nn.Module, layers: Iterable[str]) -> float:
    """Fraction of exactly-zero weights over the named Conv2d/Linear layers (bare names, as in
    :func:`bench.sparsity.measure_sparsity`): the sparsity by a local method's own rule."""
    from bench.sparsity import measure_sparsity

    per_layer = measure_sparsity(model).per_layer
    layers = list(layers)
    numel = sum(per_layer[name][0] for name in layers)
    return sum(per_layer[name][1] for name in layers) / numel if numel else 0.0
