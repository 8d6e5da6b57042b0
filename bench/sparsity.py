"""Sparsity as the project defines it, and the compute a pruned model still spends.

Sparsity means one thing everywhere: the fraction of exactly-zero entries over all Conv2d/Linear weights, biases
and BatchNorm excluded (:func:`measure_sparsity`). :func:`weight_layers` is the one enumeration of those layers;
pruning methods, the sparsity report and the compute count all walk the model through it. Compute is counted in
multiply-accumulates (:func:`count_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bench.attacks.utils import eval_mode
from bench.models import unwrap

__all__ = ["WEIGHT_LAYER_TYPES", "SparsityReport", "count_flops", "measure_sparsity", "weight_layers"]

# The layers whose weights sparsity is measured over (and pruning methods prune).
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv2d/Linear layer of ``model``, in ``named_modules()`` order.

    Names are relative to ``model``: pass the bare architecture (:func:`bench.models.unwrap`) for the names
    checkpoints and sparsity reports use (``layer1.0.conv1``), the wrapped model for ``net.``-prefixed ones.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYER_TYPES)]


@dataclass(frozen=True)
class SparsityReport:
    """Sparsity as defined project-wide, plus parameter counts.

    Attributes:
        sparsity: exactly-zero entries over all Conv2d/Linear weights (biases and BatchNorm excluded).
        weight_params: number of Conv2d/Linear weight entries.
        zero_weights: how many of those are exactly zero.
        total_params: all parameters of the model.
        nonzero_params: parameters (of any kind) that are not exactly zero.
        per_layer: layer name (as in the bare architecture, e.g. ``layer1.0.conv1``) ->
            ``(numel, zeros, sparsity)`` of its weight.
    """

    sparsity: float
    weight_params: int
    zero_weights: int
    total_params: int
    nonzero_params: int
    per_layer: dict[str, tuple[int, int, float]] = field(default_factory=dict)


@torch.no_grad()
def measure_sparsity(model: nn.Module) -> SparsityReport:
    """Measure the fraction of exactly-zero Conv2d/Linear weights, overall and per layer.

    Args:
        model: a model (a :class:`NormalizedModel` is measured through its bare architecture, so layer
            names match the architecture's and the author's keys).

    Returns:
        A :class:`SparsityReport`; ``sparsity`` is 0.0 for a model without Conv2d/Linear layers.
    """
    net = unwrap(model)
    per_layer: dict[str, tuple[int, int, float]] = {}
    numel_total = zeros_total = 0
    for name, module in weight_layers(net):
        weight = module.weight
        numel = weight.numel()
        zeros = numel - int(torch.count_nonzero(weight))
        per_layer[name] = (numel, zeros, zeros / numel if numel else 0.0)
        numel_total += numel
        zeros_total += zeros
    params = list(model.parameters())
    return SparsityReport(
        sparsity=zeros_total / numel_total if numel_total else 0.0,
        weight_params=numel_total,
        zero_weights=zeros_total,
        total_params=sum(p.numel() for p in params),
        nonzero_params=sum(int(torch.count_nonzero(p)) for p in params),
        per_layer=per_layer,
    )


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Count the multiply-accumulates (MACs) of one forward pass, dense and over non-zero weights only.

    Only Conv2d and Linear layers are counted (they dominate; biases, BatchNorm, activations and pooling
    are not). A convolution costs ``weight.numel() * H_out * W_out`` MACs, of which
    ``nonzero(weight) * H_out * W_out`` survive pruning; the weight's shape already reflects groups. A
    Linear layer costs ``weight.numel()`` per input row. Figures are per sample: a zero batch of one is run
    through the model in eval mode (every module's train/eval flag is restored afterwards).

    Args:
        model: the model.
        input_shape: one sample's shape, ``(C, H, W)`` (a leading batch dimension is also accepted).

    Returns:
        ``{"dense_flops": ..., "nonzero_flops": ...}``, both in MACs.
    """
    totals = {"dense_flops": 0, "nonzero_flops": 0}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        weight = module.weight
        if isinstance(module, nn.Conv2d):
            positions = output.shape[-2] * output.shape[-1]
        else:
            # Every input row (all dimensions but batch and features) is one matrix-vector product.
            positions = inputs[0][0].numel() // module.in_features
        totals["dense_flops"] += weight.numel() * positions
        totals["nonzero_flops"] += int(torch.count_nonzero(weight)) * positions

    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    param = next(model.parameters(), None)
    if param is None or not param.is_floating_point():
        x = torch.zeros(shape)
    else:
        x = torch.zeros(shape, device=param.device, dtype=param.dtype)
    handles = [m.register_forward_hook(hook) for _, m in weight_layers(model)]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return totals
