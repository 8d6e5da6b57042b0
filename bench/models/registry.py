"""The architecture registry: ``@register_arch`` fills :data:`ARCHS`, ``create_model`` builds from it (timm style)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from bench.data import get_dataset_info
from bench.models.normalize import Normalize, NormalizedModel
from bench.registry import Registry

Builder = Callable[[int], nn.Module]


@dataclass(frozen=True)
class ArchInfo:
    """A registered architecture.

    Attributes:
        name: registry name (``resnet18``).
        builder: ``builder(num_classes) -> nn.Module``, the bare network without normalisation.
        description: one line shown by ``bench models``.
        paper_url: the paper that introduced the architecture.
        input_shape: the (C, H, W) input the architecture is built for.
    """

    name: str
    builder: Builder
    description: str
    paper_url: str = ""
    input_shape: tuple[int, int, int] = (3, 32, 32)


ARCHS: Registry[ArchInfo] = Registry("architecture", "bench models")


def register_arch(
    name: str,
    *,
    description: str,
    paper_url: str = "",
    input_shape: tuple[int, int, int] = (3, 32, 32),
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes) -> nn.Module`` as architecture ``name``.

    Args:
        name: registry name; registering it twice raises ``ValueError``.
        description: one line for ``bench models``.
        paper_url: the paper that introduced the architecture.
        input_shape: the (C, H, W) input the architecture is built for.

    Returns:
        The decorator, which returns the builder unchanged.
    """

    def decorator(builder: Builder) -> Builder:
        ARCHS.register(name)(ArchInfo(name, builder, description, paper_url, tuple(input_shape)))
        return builder

    return decorator


def create_model(arch: str, *, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> NormalizedModel:
    """Build registered architecture ``arch`` behind a fixed normalisation layer.

    Args:
        arch: registry name (``bench models`` lists them); unknown names raise ``UnknownNameError``.
        num_classes: number of output logits.
        mean: per-channel mean of the dataset the network was trained on.
        std: per-channel standard deviation of that dataset.

    Returns:
        A :class:`NormalizedModel` in training mode with freshly initialised weights.
    """
    info = ARCHS.get(arch)
    return NormalizedModel(Normalize(mean, std), info.builder(num_classes))


def build_model(arch: str, dataset: str, normalization: Mapping[str, Any] | None = None) -> nn.Module:
    """The registered architecture with the dataset's class count and normalisation layer.

    ``normalization`` (``{"mean": [...], "std": [...]}``, as recorded in a model's provenance) replaces the
    dataset's constants: an author checkpoint keeps its authors' input handling.
    """
    info = get_dataset_info(dataset)
    mean, std = (normalization["mean"], normalization["std"]) if normalization else (info.mean, info.std)
    return create_model(arch, num_classes=info.num_classes, mean=tuple(mean), std=tuple(std))
