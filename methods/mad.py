"""MAD: Masking Adversarial Damage, pruning by second-order adversarial saliency.

Lee, Kim, Ro, "Masking Adversarial Damage: Finding Adversarial Saliency for Robust and Sparse Network",
CVPR 2022 (arXiv 2204.02738); reference code ByungKwanLee/Masking-Adversarial-Damage (``compute_saliency.py``,
``pruner/kfac_MAD_pruner.py``, ``utils/kfac_utils.py``, ``main_mad_pretrain.py``). Equation numbers below are
those of the paper's supplementary material (K-FAC, eqs. 19–26).

Starting from a PGD-adversarially-trained dense network, MAD

1. **optimises a mask** on adversarial examples: every Conv2d/Linear weight (and bias) ``w`` is used as
   ``w ⊙ softplus(m)``; per training batch the masks are reset to ``softplus⁻¹(1)`` (so ``w ⊙ softplus(m) = w``),
   Adam minimises the cross-entropy of the PGD examples over ``m`` only, and ``m`` is clamped to
   ``[softplus⁻¹(1e-4), softplus⁻¹(1)]`` after every step, so masks can only shrink;
2. measures the **adversarial saliency** of every entry, the second-order loss change of moving from the masked
   weights back to ``w`` (eq. 18): with ``ΔW = W − W ⊙ softplus(M)`` (weights as an ``out × in′`` matrix, the bias
   as its last column) and the block-wise K-FAC Fisher ``F ≈ diag(G) ⊗ A`` (eq. 21),
   ``ΔL = Σ_i ½ G_ii ΔW_i A ΔW_iᵀ`` (eqs. 25–26). Entry ``(i, j)`` gets ``S_ij = ½ G_ii ΔW_ij (ΔW_i A)_j``, the
   diagonal of the block ``½ G_ii ΔW_iᵀ (ΔW_i A)`` (eq. 24), so each row sums to its ``½ G_ii ΔW_i A ΔW_iᵀ ≥ 0``
   while single entries may be negative. The saliency is averaged over one pass of the training set;
3. **prunes once**, globally: the entries of every layer but the last are ranked together and the lowest are
   zeroed; the last (linear) layer is pruned row by row (supplementary D: every output node loses the same
   fraction), its bias column included;
4. **fine-tunes adversarially** with the MART loss (β = 0.5 in the code; the paper and the Piras et al. taxonomy
   call it PGD AT), keeping pruned entries exactly zero.

Masks are never modules here: the unchanged network is run through :func:`torch.func.functional_call` with
``weight ← w ⊙ softplus(m)``, and the returned model is a copy of the input with the same state-dict keys.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import pickle
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bench.checkpoints import UnsafeCheckpointError, check_torch_archive
from bench.training import pgd_linf
from methods.base import MethodCard, PruneData, PruneResult, PruningMethod, config_dict, register_method
from methods.common import mart_loss, masked_step, prunable_layers

__all__ = [
    "MAD",
    "MASK_MAX",
    "MASK_MIN",
    "adversarial_saliency",
    "adversarial_saliency_loop",
    "convert_mad_checkpoint",
    "finetune",
    "input_covariance",
    "kfac_factors",
    "load_mad_checkpoint",
    "mad_pruning_masks",
    "optimise_masks",
    "output_gradient_covariance",
    "prune_by_saliency",
    "saliency_pass",
    "softplus_inverse",
    "weight_matrix",
]


def softplus_inverse(value: float) -> float:
    """``softplus⁻¹(v) = log(exp(v) − 1)``; MAD's ``f_inv`` (which maps 0 to 1e-4 first)."""
    return math.log(math.expm1(value))


# Masks start at the upper bound (softplus = 1, the weight unchanged) and may shrink to softplus = 1e-4.
MASK_MAX = softplus_inverse(1.0)
MASK_MIN = softplus_inverse(1e-4)

_DATA_PARALLEL_PREFIX = "module."
_MASK_WEIGHT = "mask_weight"
_MASK_BIAS = "mask_bias"


# --------------------------------------------------------------------------------------------------------
# Block-wise K-FAC adversarial saliency (supplementary E, eqs. 19–26)


def weight_matrix(layer: nn.Module, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """A Conv2d/Linear layer's parameters as the ``out × in′`` matrix ``[W | b]`` of K-FAC (eq. 23).

    A convolution's kernel is flattened per output channel in ``(c_in, k_h, k_w)`` order, the order of its
    unfolded input patches; the bias, when the layer has one, is the last column.

    Args:
        layer: the Conv2d or Linear layer.
        weight, bias: tensors to arrange instead of the layer's own (e.g. masks of the same shapes).
    """
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is None else bias
    mat = weight.reshape(weight.shape[0], -1)
    if layer.bias is not None:
        mat = torch.cat([mat, bias.reshape(-1, 1)], dim=1)
    return mat


def _split_weight_matrix(mat: Tensor, layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    if layer.bias is None:
        return mat.reshape(layer.weight.shape), None
    return mat[:, :-1].reshape(layer.weight.shape), mat[:, -1]


def _check_layer(layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or not isinstance(layer.padding, tuple) or layer.padding_mode != "zeros":
            raise NotImplementedError(
                f"MAD's K-FAC statistics need an ungrouped, zero-padded convolution with numeric padding; got {layer}"
            )
    elif not isinstance(layer, nn.Linear):
        raise TypeError(f"MAD prunes Conv2d and Linear layers, not {type(layer).__name__}")


def input_covariance(a: Tensor, layer: nn.Module) -> Tensor:
    """K-FAC's input factor ``A`` of one batch (eq. 19), with the reference code's scaling.

    Linear: ``A = Σ_b ã_b ã_bᵀ / B``. Conv2d: the input is unfolded into the ``B·S`` patches the kernel sees
    (``S`` output positions) and ``A = Σ ã ãᵀ / (B·S²)``. ``ã`` is ``a`` with a constant 1 appended when the layer
    has a bias. The constants matter because pruning ranks layers against each other.

    Args:
        a: the layer's input, ``(B, in)`` or ``(B, C, H, W)``.
        layer: the Conv2d or Linear layer.

    Returns:
        The ``in′ × in′`` matrix (``in′ = in`` or ``C·k_h·k_w``, plus one for a bias).
    """
    _check_layer(layer)
    batch = a.shape[0]
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        spatial = patches.shape[-1]
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        if a.dim() != 2:
            raise NotImplementedError(
                f"MAD's K-FAC statistics need a (batch, features) Linear input, got {tuple(a.shape)}"
            )
        spatial = 1
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    a = a / spatial
    return a.t() @ (a / batch)


def output_gradient_covariance(g: Tensor, layer: nn.Module) -> Tensor:
    """K-FAC's output-gradient factor ``G`` (the paper's ``Z``, eq. 19) of one batch, scaled as in the code.

    ``g`` is the gradient of the batch-*mean* loss with respect to the layer's output. Linear:
    ``G = B · Σ_b g_b g_bᵀ``; Conv2d: ``G = B·S · Σ_{b,s} g_{b,s} g_{b,s}ᵀ`` over the ``S`` output positions.

    Args:
        g: ``(B, out)`` or ``(B, out, H, W)``.
        layer: the Conv2d or Linear layer.

    Returns:
        The ``out × out`` matrix.
    """
    _check_layer(layer)
    batch = g.shape[0]
    if isinstance(layer, nn.Conv2d):
        spatial = g.shape[2] * g.shape[3]
        g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    else:
        spatial = 1
    return (batch * spatial) * (g.t() @ g)


def adversarial_saliency(delta_w: Tensor, A: Tensor, G: Tensor) -> Tensor:
    """Per-entry adversarial saliency under the block-wise K-FAC Fisher, vectorised (eqs. 24–26).

    ``S_ij = ½ G_ii ΔW_ij (ΔW_i A)_j``, i.e. ``½ · diag(G)[:, None] · ΔW · (ΔW A)``. Row ``i`` sums to
    ``½ G_ii ΔW_i A ΔW_iᵀ = ½ G_ii tr(ΔW_iᵀ ΔW_i A)``, the ``i``-th diagonal block of eq. 24, which is ≥ 0 because
    ``A`` and ``G`` are covariance matrices; the layer's total is eq. 25. Only ``G``'s diagonal is used
    (``Z_ij = 0`` for ``i ≠ j``, eq. 21). The cost is one ``out × in′ × in′`` product, against the reference
    loop's ``out`` outer products of size ``in′ × in′`` (:func:`adversarial_saliency_loop`).

    Args:
        delta_w: ``ΔW = W − W ⊙ softplus(M)``, ``out × in′`` (:func:`weight_matrix` layout).
        A: the input factor, ``in′ × in′`` (:func:`input_covariance`).
        G: the output-gradient factor, ``out × out`` (:func:`output_gradient_covariance`).

    Returns:
        ``S`` with the shape of ``delta_w``.
    """
    return 0.5 * G.diagonal()[:, None] * delta_w * (delta_w @ A)


def adversarial_saliency_loop(delta_w: Tensor, A: Tensor, G: Tensor) -> Tensor:
    """The reference code's row loop for :func:`adversarial_saliency` (``KFACMADPruner._compute_delta_L``).

    For each output row ``i`` it forms the block ``B_ii = (½ G_ii ΔW_iᵀ)(ΔW_i A)`` of eq. 24 as a full
    ``in′ × in′`` matrix and keeps its diagonal. Kept for tests; quadratic memory in ``in′`` per row.
    """
    saliency = torch.empty_like(delta_w)
    for i in range(delta_w.shape[0]):
        block = (0.5 * G[i, i] * delta_w[i].reshape(-1, 1)) @ (delta_w[i].reshape(1, -1) @ A)
        saliency[i] = block.diagonal()
    return saliency


# --------------------------------------------------------------------------------------------------------
# One-shot pruning by saliency (KFACMADPruner._global_remove_weight)


def mad_pruning_masks(
    saliencies: Sequence[Tensor],
    percnt: float,
    *,
    bias_columns: Sequence[bool] | None = None,
    global_weight_count: int | None = None,
) -> list[Tensor]:
    """Which entries MAD removes, given every layer's saliency in :func:`weight_matrix` layout.

    The reference code splits the layer list into "all but the last" and "the last" (``list_to_concat``):

    - every layer but the last: all entries (bias columns included) are ranked together, ascending, and the
      lowest ``int(percnt · N)`` are removed (global scope);
    - the last layer (the classifier): each output row ``[W_i | b_i]`` is ranked on its own and its lowest
      ``int(percnt · in′)`` entries are removed (supplementary D).

    Ties keep the sort order stable (by position). ``global_weight_count`` replaces the global rule: the
    shortest prefix of the ranking holding exactly that many *weight* entries is removed (bias entries met on
    the way go too), which lets an adapter hit a canonical sparsity counted over weights only.

    Args:
        saliencies: per layer, ``out × in′`` saliency (``in′`` counts the bias column when there is one).
        percnt: MAD's ``--percnt``, the fraction of entries pruned.
        bias_columns: per layer, whether its last column is a bias (needed only with ``global_weight_count``).
        global_weight_count: exact number of weights to remove from the global pool, or None for the code's rule.

    Returns:
        Per layer, a boolean matrix of the saliency's shape, True where the entry is pruned.
    """
    if not 0.0 <= percnt < 1.0:
        raise ValueError(f"percnt is the fraction pruned and must be in [0, 1), got {percnt}")
    if not saliencies:
        raise ValueError("no layers to prune")
    *pool, last = saliencies
    out: list[Tensor] = []
    if pool:
        flat = torch.cat([s.flatten() for s in pool])
        order = torch.sort(flat, stable=True).indices
        if global_weight_count is None:
            n_removed = int(percnt * flat.numel())
        else:
            if bias_columns is None:
                raise ValueError("global_weight_count needs bias_columns")
            is_weight = torch.cat(
                [_weight_entries(s, has_bias) for s, has_bias in zip(pool, bias_columns, strict=True)]
            )
            weights_in_order = torch.cumsum(is_weight[order].long(), 0)
            available = int(weights_in_order[-1])
            if not 0 <= global_weight_count <= available:
                raise ValueError(f"cannot prune {global_weight_count} weights from a pool of {available}")
            # Index of the entry that brings the count to the target (0 entries when the target is 0).
            n_removed = int(torch.searchsorted(weights_in_order, global_weight_count)) + 1 if global_weight_count else 0
        removed = torch.zeros_like(flat, dtype=torch.bool)
        removed[order[:n_removed]] = True
        start = 0
        for s in pool:
            out.append(removed[start : start + s.numel()].view_as(s))
            start += s.numel()
    per_row = int(percnt * last.shape[1])
    row_order = torch.sort(last, dim=1, stable=True).indices
    removed_last = torch.zeros_like(last, dtype=torch.bool)
    removed_last.scatter_(1, row_order[:, :per_row], True)
    out.append(removed_last)
    return out


def _weight_entries(saliency: Tensor, has_bias: bool) -> Tensor:
    is_weight = torch.ones_like(saliency, dtype=torch.bool)
    if has_bias:
        is_weight[:, -1] = False
    return is_weight.flatten()


# --------------------------------------------------------------------------------------------------------
# Mask optimisation and saliency pass (compute_saliency.py, KFACMADPruner._optimize_mask)


def _masked_forward(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], masks: Mapping[str, Tensor], x: Tensor):
    """``model(x)`` with every layer's ``[W | b]`` replaced by ``[W | b] ⊙ softplus(M)``; gradients reach M only."""
    params = {}
    for name, layer in layers:
        effective = weight_matrix(layer).detach() * F.softplus(masks[name])
        weight, bias = _split_weight_matrix(effective, layer)
        params[f"{name}.weight"] = weight
        if bias is not None:
            params[f"{name}.bias"] = bias
    return functional_call(model, params, (x,), strict=False)


def optimise_masks(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    x_adv: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    mask_floor: float = 1e-4,
) -> dict[str, Tensor]:
    """MAD's mask optimisation on one batch of adversarial examples (main paper eq. 5).

    Masks start at ``softplus⁻¹(1)``; a fresh Adam optimiser takes ``steps`` steps on
    ``CE(f_{w ⊙ softplus(m)}(x_adv), y)`` over the masks alone, clamping them after each step to
    ``[softplus⁻¹(mask_floor), softplus⁻¹(1)]`` (the code's ``f_inv(0)`` maps 0 to 1e-4). Run the model in eval
    mode (as the code does) so BatchNorm statistics do not move.

    Returns:
        Per layer name, the optimised mask ``M`` in :func:`weight_matrix` layout (detached).
    """
    lower = softplus_inverse(mask_floor)
    masks = {name: torch.full_like(weight_matrix(layer), MASK_MAX, requires_grad=True) for name, layer in layers}
    optimizer = torch.optim.Adam(masks.values(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(_masked_forward(model, layers, masks, x_adv), y)
        grads = torch.autograd.grad(loss, list(masks.values()))
        for mask, grad in zip(masks.values(), grads, strict=True):
            mask.grad = grad
        optimizer.step()
        with torch.no_grad():
            for mask in masks.values():
                mask.clamp_(lower, MASK_MAX)
    return {name: mask.detach() for name, mask in masks.items()}


def kfac_factors(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    masks: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """``A`` and ``G`` of every layer from one forward/backward pass of ``CE(f_{w⊙softplus(m)}(x), y)``.

    The true labels are used (the code's ``fisher_type=False``), with the optimised masks in place. The output
    gradient is taken before any in-place activation that follows the layer.

    Returns:
        ``(A, G, loss)``: per layer name, the factors (:func:`input_covariance`, :func:`output_gradient_covariance`),
        and the batch's cross-entropy.
    """
    inputs: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    handles = []

    def hook_for(name: str):
        def store_grad(grad: Tensor) -> None:
            grads[name] = grad.detach()

        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs[name] = args[0].detach()
            # A tensor hook registered now sees the gradient of this value even if a later ReLU works in place.
            output.register_hook(store_grad)

        return forward_hook

    leaves = {name: mask.clone().requires_grad_(True) for name, mask in masks.items()}
    try:
        for name, layer in layers:
            handles.append(layer.register_forward_hook(hook_for(name)))
        loss = F.cross_entropy(_masked_forward(model, layers, leaves, x), y)
        torch.autograd.grad(loss, list(leaves.values()))
    finally:
        for handle in handles:
            handle.remove()
    layer_of = dict(layers)
    A = {name: input_covariance(inputs[name], layer_of[name]) for name in inputs}
    G = {name: output_gradient_covariance(grads[name], layer_of[name]) for name in grads}
    return A, G, float(loss.detach())


def saliency_pass(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    data: PruneData,
    config: MAD.Config,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], dict]:
    """The adversarial saliency of every entry, averaged over one pass of the training set (compute_saliency.py).

    Per batch: PGD examples on the unmasked model, mask optimisation (:func:`optimise_masks`), K-FAC factors with
    the optimised masks (:func:`kfac_factors`) and :func:`adversarial_saliency` of ``ΔW = W − W ⊙ softplus(M)``;
    the result is the mean over batches. The model is in eval mode throughout.

    Returns:
        Per layer name, the saliency in :func:`weight_matrix` layout, and a log entry.
    """
    model.eval()
    n_batches = math.ceil(len(data.y) / config.saliency_batch_size)
    step_size = config.pgd_step_factor * data.eps / max(config.saliency_pgd_steps, 1)
    saliency = {name: torch.zeros_like(weight_matrix(layer)) for name, layer in layers}
    start = time.perf_counter()
    ce_adv = ce_masked = 0.0
    correct_masked = 0
    for xb, yb in data.batches(config.saliency_batch_size, generator):
        x_adv = pgd_linf(model, xb, yb, eps=data.eps, steps=config.saliency_pgd_steps, step_size=step_size)
        with torch.no_grad():
            ce_adv += F.cross_entropy(model(x_adv), yb, reduction="sum").item()
        masks = optimise_masks(
            model,
            layers,
            x_adv,
            yb,
            steps=config.mask_steps,
            lr=config.mask_lr,
            mask_floor=config.mask_floor,
        )
        A, G, loss = kfac_factors(model, layers, masks, x_adv, yb)
        ce_masked += loss * len(yb)
        with torch.no_grad():
            correct_masked += int((_masked_forward(model, layers, masks, x_adv).argmax(1) == yb).sum())
        for name, layer in layers:
            w = weight_matrix(layer).detach()
            delta_w = w - w * F.softplus(masks[name])
            a, g = A[name], G[name]
            if config.kfac_damping:
                a = a + config.kfac_damping * torch.eye(len(a), dtype=a.dtype, device=a.device)
                g = g + config.kfac_damping * torch.eye(len(g), dtype=g.dtype, device=g.device)
            saliency[name] += adversarial_saliency(delta_w, a, g) / n_batches
    n = len(data.y)
    log = {
        "phase": "saliency",
        "batches": n_batches,
        "adv_ce_unmasked": ce_adv / n,
        "adv_ce_masked": ce_masked / n,
        "adv_acc_masked": correct_masked / n,
        "wall_seconds": time.perf_counter() - start,
    }
    return saliency, log


# --------------------------------------------------------------------------------------------------------
# The adapter


def _preset_lr(lr: float, epoch: int, epochs: int, milestones: Sequence[float], gamma: float) -> float:
    # main_mad_pretrain.py: {0: lr, int(0.5·E): 0.1·lr, int(0.75·E): 0.01·lr}, looked up per epoch.
    return lr * gamma ** sum(epoch >= int(epochs * m) for m in milestones)


@register_method("mad")
class MAD(PruningMethod):
    """MAD (Lee, Kim, Ro, CVPR 2022): adversarial saliency from optimised masks and block-wise K-FAC."""

    card = MethodCard(
        key="mad",
        display_name="MAD",
        ap_key="MAD_Lee2022Masking",
        paper_title="Masking Adversarial Damage: Finding Adversarial Saliency for Robust and Sparse Network",
        paper_url="https://arxiv.org/abs/2204.02738",
        venue="CVPR",
        year=2022,
        pipeline="A",
        training={"pretraining": "AT-PGD", "finetuning": "AT (MART-style loss in code)", "1S/IT": "1S"},
        structure="US",
        scope="global",
        criterion="LIS",
        losses=("PGD-CE (mask optimisation, saliency)", "MART (fine-tuning)"),
        native_sparsity=(
            "percnt = fraction pruned: global over all layers but the last (convs incl. first and shortcuts), "
            "and per output row of the last linear (bias column included)"
        ),
    )

    @dataclass(frozen=True)
    class Config:
        """MAD's schedule (reference code defaults for CIFAR-10; PGD step sizes relative to eps).

        Attributes:
            saliency_batch_size: batch size of the saliency pass (one pass over the training set).
            saliency_pgd_steps: PGD steps of the adversarial examples the masks are optimised on (torchattacks
                PGD, uniform random start).
            mask_steps: Adam steps of mask optimisation per batch.
            mask_lr: Adam learning rate of the masks.
            mask_floor: lower clamp of ``softplus(m)`` (the code's ``f_inv(0)`` maps 0 to 1e-4).
            kfac_damping: λ added to the diagonals of ``A`` and ``G``; the code uses none (the saliency needs no
                inverse), so the default 0 reproduces it.
            finetune_epochs: epochs of adversarial fine-tuning.
            lr: initial SGD learning rate of fine-tuning.
            lr_milestones: fractions of ``finetune_epochs`` where the learning rate is multiplied by ``lr_gamma``.
            lr_gamma: the step factor.
            momentum: SGD momentum.
            weight_decay: SGD weight decay.
            batch_size: fine-tuning minibatch size.
            pgd_steps: PGD steps inside the MART loss.
            pgd_step_factor: PGD step size as ``factor · eps / steps`` (2.3, i.e. 0.0069 at eps 0.03 and 10 steps),
                for both the saliency pass and fine-tuning.
            mart_beta: β of the MART loss (0.5 in ``KFACMADPruner``; MART's own default is 6).
        """

        saliency_batch_size: int = 128
        saliency_pgd_steps: int = 10
        mask_steps: int = 20
        mask_lr: float = 0.1
        mask_floor: float = 1e-4
        kfac_damping: float = 0.0
        finetune_epochs: int = 60
        lr: float = 0.1
        lr_milestones: tuple[float, ...] = (0.5, 0.75)
        lr_gamma: float = 0.1
        momentum: float = 0.9
        weight_decay: float = 2e-4
        batch_size: int = 128
        pgd_steps: int = 10
        pgd_step_factor: float = 2.3
        mart_beta: float = 0.5

    def digits_config(self, **overrides):
        """CPU-sized schedule of the digits track (small_cnn, eps 0.2): batch 64, PGD-5, 2 mask steps, 5 epochs.

        Otherwise the code's (Adam lr 0.1 on the masks, SGD with the ×0.1 steps at 50 % and 75 % of the epochs,
        MART β 0.5). Measured figures: ``docs/figures/track_stability.md`` (``benchmarks/track_stability.py``).

        Fine-tuning starts at SGD lr 0.05, the dense parent's training rate, not the code's 0.1. The code's
        VGG-16 and ResNet-18 batch-normalise every convolution, which re-centres each channel's pre-activations
        after any step; small_cnn has no BatchNorm. MART's boosted term ``−log(1.0001 − max_{k≠y} p'_k)`` has a
        gradient that grows as ``1/(1.0001 − p')`` when an adversarial example is confidently wrong, so an early
        fine-tuning batch can bring a gradient an order of magnitude above the usual; at lr 0.1 with momentum 0.9
        such a step switched off all but one of the 128 hidden units on one pruning seed of the stability run,
        and a network of dead ReLUs has no gradient left: it stayed at chance on every input. At 0.05 no seed
        died (``benchmarks/track_stability.py --methods mad --set lr=0.1 --out …`` reruns the code's rate).

        Only 2 mask steps: the saliency degrades as the masks move further (with the code's 20, the steps fit
        each 64-image batch's adversarial loss almost to zero, the entries with the most negative saliency then
        include large weights, and the network right after pruning is far worse than with 1 or 2 steps).

        At sparsity 0.99 MAD's rule leaves small_cnn almost disconnected on every seed (near-chance accuracy
        right after pruning, before any fine-tuning): its global ranking puts the 128-unit hidden layer, 81 % of
        the weights, in one pool with the convolutions, and what survives is about a dozen hidden units that
        reach the outputs and 5 or 6 first-layer weights. The code ranks convolutions only and meets a single
        (final) linear layer; the digits row at 0.99 is reported, not tuned.
        """
        defaults = {
            "saliency_batch_size": 64,
            "saliency_pgd_steps": 5,
            "mask_steps": 2,
            "finetune_epochs": 5,
            "batch_size": 64,
            "pgd_steps": 5,
            "lr": 0.05,
        }
        return self.config(**{**defaults, **overrides})

    def prune(
        self, model: nn.Module, sparsity: float, data: PruneData, config: Config, *, seed: int = 0
    ) -> PruneResult:
        """Prune ``model`` to canonical ``sparsity`` with MAD's saliency, then fine-tune it with MART.

        MAD prunes every Conv2d/Linear layer, so the canonical sparsity and MAD's native ``percnt`` are over the
        same weights; ``percnt = sparsity`` sets the last layer's per-row count (``int(percnt · (in + 1))`` of
        ``[W_i | b_i]``), and the global pool removes exactly as many weights as bring the total number of zero
        weights to ``round(sparsity · N)`` (biases met in the ranking are removed too, but are not counted, since
        canonical sparsity excludes biases; the code's own count is ``int(percnt · N_pool)`` entries).

        Args:
            model: the dense (adversarially pretrained) network; it is not modified. Its last Conv2d/Linear
                in module order must be the Linear classifier.
            sparsity: fraction of Conv2d/Linear weights to zero.
            data: training images in [0, 1], labels and the L∞ eps.
            config: a :class:`MAD.Config`.
            seed: seeds batch order and the PGD starts.

        Returns:
            A copy of ``model`` with pruned weights (and biases) exactly zero, the same state-dict keys, and the
            native pruning counts.
        """
        self.check_sparsity(sparsity)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        work = copy.deepcopy(model)
        layers = list(prunable_layers(work))
        if not layers or not isinstance(layers[-1][1], nn.Linear):
            last = type(layers[-1][1]).__name__ if layers else "nothing"
            raise ValueError(f"MAD prunes the last layer per output row and needs it to be a Linear; found {last}")
        for _, layer in layers:
            _check_layer(layer)
        saliency, log = saliency_pass(work, layers, data, config, gen)
        removed, native = prune_by_saliency(layers, [saliency[name] for name, _ in layers], sparsity)
        history = [log]
        history += finetune(work, layers, removed, data, config, gen)
        return PruneResult(model=work.eval(), native_sparsity=native, config=config_dict(config), history=history)


def prune_by_saliency(
    layers: Sequence[tuple[str, nn.Module]], saliencies: Sequence[Tensor], sparsity: float
) -> tuple[list[Tensor], dict]:
    """Zero MAD's lowest-saliency entries in place so that exactly ``round(sparsity · N)`` weights are zero.

    Args:
        layers: the pruned layers in module order; the last is pruned per row.
        saliencies: their saliency, :func:`weight_matrix` layout.
        sparsity: canonical target, used as MAD's ``percnt``.

    Returns:
        Per layer the boolean "removed" matrix (:func:`weight_matrix` layout), and the native counts.
    """
    total = sum(layer.weight.numel() for _, layer in layers)
    target = round(sparsity * total)
    last_layer = layers[-1][1]
    per_row = int(sparsity * saliencies[-1].shape[1])
    # Weights the per-row rule removes from the last layer (its bias column does not count).
    last_removed = mad_pruning_masks(saliencies[-1:], sparsity)[0]
    last_weights = int(last_removed[:, : last_layer.weight[0].numel()].sum())
    global_count = target - last_weights
    removed = mad_pruning_masks(
        saliencies,
        sparsity,
        bias_columns=[layer.bias is not None for _, layer in layers[:-1]],
        global_weight_count=global_count,
    )
    with torch.no_grad():
        for (_, layer), gone in zip(layers, removed, strict=True):
            weight, bias = _split_weight_matrix((~gone).to(layer.weight.dtype), layer)
            layer.weight.mul_(weight)
            if bias is not None:
                layer.bias.mul_(bias)
    pool = sum(s.numel() for s in saliencies[:-1])
    native = {
        "percnt": sparsity,
        "global_pool_entries": pool,
        "global_removed_entries": int(sum(int(r.sum()) for r in removed[:-1])),
        "global_removed_weights": global_count,
        "code_rule_global_removed_entries": int(sparsity * pool),
        "last_layer": layers[-1][0],
        "last_layer_removed_per_row": per_row,
        "zero_weights_target": target,
    }
    return removed, native


def finetune(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    removed: Sequence[Tensor],
    data: PruneData,
    config: MAD.Config,
    generator: torch.Generator,
) -> list[dict]:
    """MAD's adversarial fine-tuning (``KFACMADPruner._optimize_weight_with_delta_L``) with pruned entries fixed at 0.

    SGD (momentum, weight decay) on every parameter, the MART loss at PGD examples with β = ``config.mart_beta``
    and a step learning-rate schedule per epoch. Pruned weights and biases are held at exactly zero by
    :func:`methods.common.masked_step` (the code multiplies their gradient and value by the mask before each step).
    """
    keep = {}
    for (name, layer), gone in zip(layers, removed, strict=True):
        weight, bias = _split_weight_matrix(~gone, layer)
        keep[name] = weight
        if bias is not None:
            keep[f"{name}.bias"] = bias
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    step_size = config.pgd_step_factor * data.eps / max(config.pgd_steps, 1)
    history = []
    for epoch in range(config.finetune_epochs):
        lr = _preset_lr(config.lr, epoch, config.finetune_epochs, config.lr_milestones, config.lr_gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        total, seen = 0.0, 0
        for xb, yb in data.batches(config.batch_size, generator):
            model.train()
            loss = mart_loss(
                model, xb, yb, eps=data.eps, steps=config.pgd_steps, step_size=step_size, beta=config.mart_beta
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            masked_step(optimizer, model, keep)
            total += loss.item() * len(yb)
            seen += len(yb)
        history.append(
            {
                "phase": "finetune",
                "epoch": epoch + 1,
                "lr": lr,
                "mart_loss": total / seen,
                "wall_seconds": time.perf_counter() - start,
            }
        )
    model.eval()
    return history


# --------------------------------------------------------------------------------------------------------
# Checkpoints


def load_mad_checkpoint(path: str | os.PathLike[str]) -> dict:
    """Read a MAD ``.t7`` file: ``{'net': state_dict, 'acc', 'epoch', 'loss', 'args'}``.

    ``args`` is an :class:`argparse.Namespace`, which a weights-only load refuses, so
    :func:`bench.checkpoints.load_state_dict` rejects these files. This loader is still weights-only: it allows
    ``argparse.Namespace`` and nothing else (``torch.serialization.safe_globals``), so any other pickled object
    is refused rather than executed.

    Args:
        path: the ``.t7`` file.

    Returns:
        The loaded mapping (pass it to :func:`convert_mad_checkpoint`).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file pickles something other than tensors, containers and a Namespace.
        ValueError: the file is not a readable ``torch.save`` mapping.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MAD checkpoint not found: {path}")
    check_torch_archive(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", str(e), flags=re.IGNORECASE)
        if refused is None:
            raise ValueError(f"could not read {path} as a torch.save checkpoint (corrupt or truncated?)") from None
        raise UnsafeCheckpointError(
            f"MAD checkpoint {path} pickles objects beyond tensors and argparse.Namespace (first refused: "
            f"{refused.group(1)}), so it was not unpickled. Fix: re-save its weights alone, "
            "torch.save(ckpt['net'], path)."
        ) from None
    except (RuntimeError, EOFError, KeyError) as e:
        raise ValueError(f"could not read {path} as a torch.save checkpoint: {e!r}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"MAD checkpoint {path} holds a {type(obj).__name__}, not a mapping")
    return dict(obj)


def convert_mad_checkpoint(obj: Mapping) -> dict[str, Tensor]:
    """A MAD checkpoint as a plain state dict: ``W ← W ⊙ softplus(mask_weight)``, ``b ← b ⊙ softplus(mask_bias)``.

    Mask keys are dropped and a ``module.`` prefix is stripped. After MAD's pruning the masks are reset to
    ``softplus⁻¹(1)`` (softplus = 1.0 exactly in float32), so this is the identity on released files, but it
    also converts a checkpoint saved mid-optimisation correctly.

    Key names are kept. MAD's ResNet-18 (``models/resnet_mask.py``) is kuangliu's CIFAR ResNet-18, so its keys
    are exactly those of our ``resnet18`` (a pure renaming: the identity); its ``(x − mean)/std`` lives in
    ``forward`` as plain attributes, which our :class:`bench.models.Normalize` replaces (CIFAR-10 mean
    (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)). MAD's VGG-16 (``models/vgg_mask.py``) is *not* a
    renaming of our ``vgg16_bn``: besides ``feature.`` vs ``features.``, its convolutions have no bias and it has
    no final max-pool (it average-pools the 2×2 map instead), so it computes a different function: it is
    registered as ``vgg16_mad``, with MAD's key names, and the keys are left as they are.

    Args:
        obj: the mapping from :func:`load_mad_checkpoint` (its ``net`` is used) or a bare state dict.

    Returns:
        The converted state dict; :func:`bench.checkpoints.load_weights` maps it onto a ``NormalizedModel``.

    Raises:
        ValueError: a mask has no parameter of the same shape.
    """
    net = obj.get("net", obj) if isinstance(obj.get("net"), Mapping) else obj
    sd = {str(k).removeprefix(_DATA_PARALLEL_PREFIX): v for k, v in net.items() if isinstance(v, Tensor)}
    out = {k: v for k, v in sd.items() if not k.endswith((_MASK_WEIGHT, _MASK_BIAS))}
    for key, mask in sd.items():
        for mask_name, param_name in ((_MASK_WEIGHT, "weight"), (_MASK_BIAS, "bias")):
            if key == mask_name or key.endswith("." + mask_name):
                target = key[: -len(mask_name)] + param_name
                param = sd.get(target)
                if param is None or param.shape != mask.shape:
                    found = "missing" if param is None else f"of shape {tuple(param.shape)}"
                    raise ValueError(
                        f"{key} of shape {tuple(mask.shape)} needs {target} of the same shape, but it is {found}; "
                        "is this a MAD checkpoint?"
                    )
                out[target] = param * F.softplus(mask.to(param.dtype))
    return out
