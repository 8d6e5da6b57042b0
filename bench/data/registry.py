"""What every dataset shares: :class:`DatasetInfo`, the registry filled by :func:`register_dataset`, the errors
a loader raises, and :func:`parse_eps` for the budgets datasets declare."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.registry import Registry

SPLITS = ("train", "test")

Loader = Callable[[str, Path, bool], tuple[torch.Tensor, torch.Tensor]]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are absent and could not (or may not) be downloaded; the message says what to do."""


class DatasetChecksumError(ValueError):
    """A downloaded archive does not have the published md5; nothing was kept."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format (truncated, tampered or a different file)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the benchmark knows about a dataset.

    Attributes:
        name: registry name (``"cifar10"``).
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: ``(C, H, W)`` of one image.
        mean: per-channel mean of the fixed normalisation layer inside models.
        std: per-channel standard deviation of that layer.
        default_eps: default L∞ budget as a fraction string (``"8/255"``); see :func:`parse_eps`.
        default_n: default number of test samples evaluated (the first N); ``None`` means the whole split.
        test_size: images in the test split: the largest N an evaluation can ask for, known without loading it.
        default_batch_size: default samples per evaluation chunk (attack batch and unit of resumption).
        description: one line for listings.
        url: where the data comes from.
        loader: ``loader(split, data_dir, download) -> (images, labels)``; use :func:`load_split` instead.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: str
    default_n: int | None
    test_size: int
    description: str
    url: str
    loader: Loader = field(repr=False, compare=False)
    default_batch_size: int = 250

    @property
    def default_eps_value(self) -> float:
        """``default_eps`` as a float."""
        return parse_eps(self.default_eps)


DATASETS: Registry[DatasetInfo] = Registry("dataset", "bench datasets")


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Register ``info`` under ``info.name``; registering a name twice raises ``ValueError``."""
    return DATASETS.register(info.name)(info)


def get_dataset_info(name: str) -> DatasetInfo:
    """The registered :class:`DatasetInfo` called ``name``; unknown names raise ``UnknownNameError``."""
    return DATASETS.get(name)


def parse_eps(text: str) -> float:
    """Parse a perturbation budget written as a fraction or a decimal.

    Args:
        text: ``"8/255"``, ``"0.031"``, ``"0.5"``, ``"1e-2"``; surrounding spaces are allowed.

    Returns:
        The budget as a float (``"8/255"`` gives ``8 / 255``).

    Raises:
        ValueError: the text is not a number or a fraction of two numbers, or the value is not a finite
            positive number.
    """
    hint = "expected a positive number or fraction such as '8/255', '0.031' or '0.5'"
    if not isinstance(text, str):
        raise ValueError(f"invalid eps {text!r}: give it as a string; {hint}")
    parts = [_float_or_none(part) for part in text.split("/")]
    if len(parts) > 2 or None in parts:
        raise ValueError(f"invalid eps {text!r}: {hint}")
    if len(parts) == 2 and parts[1] == 0:
        raise ValueError(f"invalid eps {text!r}: division by zero; {hint}")
    value = parts[0] / parts[1] if len(parts) == 2 else parts[0]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid eps {text!r}: must be finite and > 0; {hint}")
    return value


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)  # float() itself ignores surrounding whitespace
    except ValueError:
        return None
