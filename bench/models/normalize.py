"""The fixed normalisation layer every model wears, and the wrapper that puts it in front of a network.

A model in this project takes inputs in [0, 1] and returns logits. Normalisation is a fixed first layer
(:class:`Normalize`) whose mean and std are *non-persistent* buffers, so a state dict holds only the
network's own weights: a :class:`NormalizedModel`'s keys are ``net.<...>``, and an author's checkpoint maps onto
``net.`` without any normalisation keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """Fixed per-channel standardisation ``(x - mean) / std``, the first layer of every model.

    The buffers are non-persistent: they are part of the benchmark's input convention, not of the
    network's weights, so they never appear in (or are expected from) a checkpoint.

    Args:
        mean: per-channel mean (one entry per input channel, or one for all).
        std: per-channel standard deviation, same length as ``mean``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or mean_t.numel() == 0:
            raise ValueError(f"mean and std must be non-empty sequences of equal length, got {mean} and {std}")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()):
            raise ValueError(f"mean and std must be finite, got {list(mean)} and {list(std)}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        channels = self.mean.shape[1]
        # Broadcasting would silently turn a 1-channel input into 3 channels and fail later, deep inside.
        if channels != 1 and x.shape[1] != channels:
            raise ValueError(f"input has {x.shape[1]} channels but normalisation has {channels}")
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """``net(normalize(x))``: takes inputs in [0, 1], returns logits; state-dict keys are ``net.<...>``."""

    def __init__(self, normalize: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare architecture inside a :class:`NormalizedModel` (``model`` itself otherwise)."""
    return model.net if isinstance(model, NormalizedModel) else model
