"""The fixed normalisation layer every model wears, the wrapper that puts it in front of a network, and the
normalisation as part of a model's identity.

A model in this project takes inputs in [0, 1] and returns logits. Normalisation is a fixed first layer
(:class:`Normalize`) whose mean and std are *non-persistent* buffers, so a state dict holds only the
network's own weights: a :class:`NormalizedModel`'s keys are ``net.<...>``, and an author's checkpoint maps onto
``net.`` without any normalisation keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.data import get_dataset_info


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


# The key of a model that standardises its inputs with its dataset's own constants (bench datasets).
DATASET_NORMALIZATION = "dataset"
NORMALIZATION_SYNTAX = "dataset, none or MEAN/STD (e.g. 0.4914,0.4822,0.4465/0.2471,0.2435,0.2616)"


def parse_normalization(text: str, dataset: str) -> dict[str, list[float]]:
    """Read ``bench evaluate --normalization`` for ``dataset``.

    Args:
        text: ``dataset`` (its mean/std, bench datasets), ``none`` (raw [0, 1] inputs: mean 0, std 1), or
            ``MEAN/STD`` with one comma-separated value per input channel in each.
        dataset: a registered dataset; its channel count is the number of values expected.

    Returns:
        ``{"mean": [...], "std": [...]}``, as provenance records it.

    Raises:
        ValueError: a one-line message naming what is wrong and the accepted forms.
    """
    channels = get_dataset_info(dataset).input_shape[0]
    word = text.strip().lower()
    if word == DATASET_NORMALIZATION:
        return resolve_normalization(dataset, None)
    if word == "none":
        return {"mean": [0.0] * channels, "std": [1.0] * channels}
    where = f"--normalization {text!r}"
    parts = text.split("/")
    if len(parts) != 2:
        raise ValueError(f"{where} is not {NORMALIZATION_SYNTAX}")
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in parts)
    except ValueError:
        raise ValueError(f"{where}: MEAN and STD must be comma-separated numbers; use {NORMALIZATION_SYNTAX}") from None
    return resolve_normalization(dataset, {"mean": mean, "std": std}, where=where)


def resolve_normalization(
    dataset: str, normalization: Mapping[str, Any] | None, *, where: str = "normalization"
) -> dict[str, list[float]]:
    """``normalization`` checked against ``dataset``, or the dataset's own constants when it is ``None``.

    Raises:
        ValueError: not one finite mean and one positive, finite std per input channel of ``dataset``.
    """
    info = get_dataset_info(dataset)
    if normalization is None:
        return {"mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std]}
    mean, std = [float(v) for v in normalization["mean"]], [float(v) for v in normalization["std"]]
    channels = info.input_shape[0]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"{where} has {len(mean)} mean and {len(std)} std values, but {dataset} images have {channels} "
            f"channel{'s' if channels > 1 else ''}; give one of each per channel"
        )
    # The layer holds float32: 1e39 is infinite there and 1e-46 is zero.
    with np.errstate(over="ignore", under="ignore"):
        in_layer = np.asarray(mean + std, dtype=np.float32)
    if not (all(map(math.isfinite, mean + std)) and np.isfinite(in_layer).all()):
        raise ValueError(f"{where} has a value that is not a finite (float32) number; give finite means and stds")
    if min(std) <= 0 or in_layer[channels:].min() <= 0:
        raise ValueError(f"{where} has a std that is not positive ({min(std)}); every std must be > 0")
    return {"mean": mean, "std": std}


def _float32_text(values: list[float]) -> str:
    # The layer holds float32 (Normalize), so values that round to the same float32 are the same model; +0.0 turns
    # -0.0 into 0.0. str() of a numpy float32 is its shortest round-tripping decimal.
    return ",".join(str(np.float32(v) + np.float32(0.0)) for v in values)


def normalization_key(dataset: str, normalization: Mapping[str, Any] | None) -> str:
    """The store's ``models.normalization``: part of a model's identity with its checkpoint's sha256.

    ``"dataset"`` when the layer equals the one the dataset's constants build (``None`` included), else
    ``MEAN/STD`` as float32 decimals (``0.0,0.0,0.0/1.0,1.0,1.0`` for raw inputs), so two spellings of one layer
    are one model.
    """

    def text(ms: dict[str, list[float]]) -> str:
        return f"{_float32_text(ms['mean'])}/{_float32_text(ms['std'])}"

    ours = text(resolve_normalization(dataset, normalization))
    return DATASET_NORMALIZATION if ours == text(resolve_normalization(dataset, None)) else ours


def normalization_label(key: str | None) -> str:
    """A stored model's ``normalization`` as ``--normalization`` spells it: ``dataset``, ``none`` or ``MEAN/STD``."""
    if key in (None, "", DATASET_NORMALIZATION):
        return DATASET_NORMALIZATION
    mean, _, std = key.partition("/")
    if all(float(v) == 0.0 for v in mean.split(",")) and all(float(v) == 1.0 for v in std.split(",")):
        return "none"
    return key


def describe_normalization(key: str | None) -> str | None:
    """A stored model's input normalisation in words, or ``None`` for the dataset's own (the default)."""
    label = normalization_label(key)
    if label == DATASET_NORMALIZATION:
        return None
    return "none (raw [0, 1] inputs)" if label == "none" else f"mean/std {label}"
