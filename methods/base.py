"""The method-adapter contract and registry (``@register_method("hydra")``, timm style).

An adapter turns a dense model into a pruned one with its paper's losses, schedule and defaults:

    method = get_method("hydra")
    result = method.prune(dense_model, sparsity=0.95, data=PruneData(x, y, eps=8 / 255), config=method.config())

``sparsity`` is always the canonical one (exactly-zero entries over Conv2d/Linear weights, or for structured
methods the fraction of parameters removed); each adapter converts it to its native knob (HYDRA's kept
fraction k, ATMC's budget) at this boundary and records the native value in :class:`PruneResult`.

An adapter is found by its registration alone: its module applies ``@register_method`` on import, and
``methods/__init__.py`` imports every adapter module (timm's ``timm/models/__init__.py`` does the same for
models), so importing anything from ``methods`` fills :data:`METHODS`. Adding a method touches its own file plus
one import line there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from bench.models import unwrap
from bench.registry import Registry
from bench.sparsity import weight_layers


@dataclass(frozen=True)
class MethodCard:
    """What the benchmark shows about a method: paper, taxonomy (Piras et al. 2024), native sparsity.

    Attributes:
        key: registry name (``"hydra"``).
        display_name: as in the paper (``"HYDRA"``).
        ap_key: RobustBench/APB style key (``"HYDRA_Sehwag2020Hydra"``).
        paper_title, paper_url, venue, year: the paper.
        pipeline: "A" (after training), "B" (before) or "D" (during), with its training types
            (``{"pretraining": "AT-TRADES", "finetuning": "AT-TRADES", "1S/IT": "1S"}``).
        structure: "US" (weights) or "S" (filters, layers).
        scope: "local" or "global".
        criterion: LWM, SOLWM, RELWM, LIS, HGM or BCS.
        losses: the training losses the adapter uses.
        native_sparsity: what the method's own sparsity knob means.
    """

    key: str
    display_name: str
    ap_key: str
    paper_title: str
    paper_url: str
    venue: str
    year: int
    pipeline: str
    training: dict[str, str]
    structure: str
    scope: str
    criterion: str
    losses: tuple[str, ...]
    native_sparsity: str

    @property
    def taxonomy(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            **self.training,
            "structure": self.structure,
            "scope": self.scope,
            "criterion": self.criterion,
            "losses": list(self.losses),
        }


@dataclass
class PruneData:
    """The data a method trains on: training images in [0, 1] (NCHW), labels, and the training eps (L∞)."""

    x: torch.Tensor
    y: torch.Tensor
    eps: float

    def batches(self, batch_size: int, generator: torch.Generator):
        """Shuffled minibatches of one epoch."""
        perm = torch.randperm(len(self.y), generator=generator)
        for idx in perm.split(batch_size):
            yield self.x[idx], self.y[idx]


@dataclass
class PruneResult:
    """A pruned plain module (inputs in [0, 1], logits out) and how it was made.

    Attributes:
        model: the pruned network with the dense architecture's keys; pruned weights are exactly zero.
        native_sparsity: the method's own knob as passed to its code (``{"k": 0.05}``).
        config: the resolved method config (every schedule parameter).
        history: per-phase training log (losses, accuracies).
        compact: for structured methods, the physically smaller network (same function as ``model``); the
            pipeline writes it next to the masked checkpoint and records its real parameter count.
    """

    model: nn.Module
    native_sparsity: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    compact: nn.Module | None = None


class PruningMethod:
    """Base class of method adapters. Subclasses set ``card`` and ``Config`` and implement :meth:`prune`.

    ``Config`` is a frozen dataclass whose defaults are the paper's; :meth:`digits_config` returns the
    CPU-sized schedule of the built-in digits track (documented in the README).
    """

    card: ClassVar[MethodCard]
    Config: ClassVar[type]
    # Sparsities at which the method is defined (structured methods only take their grid).
    sparsities: ClassVar[tuple[float, ...] | None] = None
    # Structured methods remove whole filters/blocks, so they can only approach the target: the largest
    # allowed |measured - target| of the canonical sparsity over `pruned_layers` (None: per-layer rounding only).
    sparsity_tolerance: ClassVar[float | None] = None

    def config(self, **overrides: Any):
        """The paper's defaults, with ``overrides`` (unknown names are an error naming the valid ones)."""
        return _with_overrides(self.Config(), overrides, self.card.key)

    def digits_config(self, **overrides: Any):
        return self.config(**overrides)

    def pruned_layers(self, model: nn.Module, config: Any = None) -> list[str]:
        """Names (inside the normalisation wrapper) of the Conv2d/Linear layers the method prunes (default: all).

        The generic tests check that the canonical sparsity over these layers matches the target and that
        every other layer stays dense.
        """
        net = unwrap(model)  # bare layer names, as bench.sparsity.measure_sparsity reports them
        return [name for name, _ in weight_layers(net)]

    def prune(self, model: nn.Module, sparsity: float, data: PruneData, config: Any, *, seed: int = 0) -> PruneResult:
        raise NotImplementedError  # pragma: no cover - abstract

    def check_sparsity(self, sparsity: float) -> None:
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"--sparsity must be in (0, 1), got {sparsity}")
        if self.sparsities is not None and not any(abs(sparsity - s) < 1e-9 for s in self.sparsities):
            raise ValueError(
                f"{self.card.key} is defined at sparsities {', '.join(map(str, self.sparsities))}; got {sparsity}"
            )


def _with_overrides(cfg: Any, overrides: dict[str, Any], key: str):
    names = {f.name for f in fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        valid = ", ".join(sorted(names))
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {key!r}; valid: {valid}")
    return replace(cfg, **overrides)


def config_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


METHODS: Registry[type[PruningMethod]] = Registry("method", "bench methods")


def register_method(key: str):
    """Class decorator registering an adapter under ``key`` (its card's key must agree)."""

    def decorator(cls: type[PruningMethod]) -> type[PruningMethod]:
        if cls.card.key != key:
            raise ValueError(f"method registered as {key!r} but its card says {cls.card.key!r}")
        return METHODS.register(key)(cls)

    return decorator


def get_method(key: str) -> PruningMethod:
    """An instance of the adapter registered as ``key`` (did-you-mean on unknown names)."""
    return METHODS.get(key)()


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method keys matching a shell-style wildcard, sorted."""
    return METHODS.list(pattern)
