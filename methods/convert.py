"""Native checkpoint formats of the methods' authors → our plain state dicts (``bench evaluate --format``).

Every converter reads the file weights-only (``bench.checkpoints.load_state_dict``, or MAD's loader that admits
``argparse.Namespace`` and nothing else) and returns a state dict for the matching architecture in
``bench.models``; :func:`bench.checkpoints.load_weights` then checks every key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from bench.checkpoints import load_state_dict
from bench.registry import Registry


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    description: str
    load: Callable[..., dict[str, Tensor]]
    needs_k: bool = False


FORMATS: Registry[CheckpointFormat] = Registry("checkpoint format", "bench formats")


def _register(fmt: CheckpointFormat) -> None:
    FORMATS.register(fmt.name)(fmt)


def _plain(path: Path, k: float | None = None) -> dict[str, Tensor]:
    return load_state_dict(path)


def _hydra_subnet(path: Path, k: float | None = None) -> dict[str, Tensor]:
    from methods.hydra import convert_hydra_checkpoint

    return convert_hydra_checkpoint(load_state_dict(path), k=k)


def _admm(path: Path, k: float | None = None) -> dict[str, Tensor]:
    from methods.admm import convert_admm_checkpoint

    return convert_admm_checkpoint(load_state_dict(path))


def _mad(path: Path, k: float | None = None) -> dict[str, Tensor]:
    from methods.mad import convert_mad_checkpoint, load_mad_checkpoint

    return convert_mad_checkpoint(load_mad_checkpoint(path))


def _pwoa(path: Path, k: float | None = None) -> dict[str, Tensor]:
    from methods.pwoa import convert_pwoa_checkpoint

    return convert_pwoa_checkpoint(load_state_dict(path))


def _atmc(path: Path, k: float | None = None) -> dict[str, Tensor]:
    from methods.atmc import convert_atmc_checkpoint

    return convert_atmc_checkpoint(load_state_dict(path))


_register(CheckpointFormat("plain", "a state dict of our architecture (.pt/.pth/.pth.tar/.safetensors)", _plain))
_register(
    CheckpointFormat(
        "hydra-subnet",
        "HYDRA subnet checkpoint with popup_scores (give --k, the kept fraction)",
        _hydra_subnet,
        needs_k=True,
    )
)
_register(CheckpointFormat("hydra-dense", "HYDRA *_dense checkpoint (weights already masked)", _plain))
_register(CheckpointFormat("admm", "RAP-ADMM checkpoint (module.basic_model. keys)", _admm))
_register(CheckpointFormat("pwoa", "PwoA state dict of a model returning (logits, hiddens)", _pwoa))
_register(CheckpointFormat("atmc", "ATMC factor form (weightA/weightB/weightC with eye_const) or dense", _atmc))
_register(CheckpointFormat("mad", "MAD .t7 checkpoint ({'net': ..., 'args': Namespace} with soft masks)", _mad))


def load_converted(path: str | Path, fmt: str = "plain", *, k: float | None = None) -> dict[str, Tensor]:
    """Read ``path`` in format ``fmt`` and return our plain state dict."""
    spec = FORMATS.get(fmt)
    if k is not None and not spec.needs_k:
        raise ValueError(f"--k is only used with --format hydra-subnet, not {fmt!r}")
    return spec.load(Path(path), k=k)
