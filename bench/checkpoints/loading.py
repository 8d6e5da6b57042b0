"""Reading a checkpoint into a model: weights-only, with every mismatch explained.

Checkpoints are untrusted files from the internet, so they are only ever loaded weights-only
(``torch.load(..., weights_only=True)`` or safetensors): a file that needs arbitrary unpickling is refused
with :class:`UnsafeCheckpointError`, never executed. The checks before and after reading (the file's type and
format, a torch archive's declared sizes, finite weights) are :mod:`bench.checkpoints.safety`'s.
Sparsity and compute of the loaded model are measured in :mod:`bench.sparsity`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.checkpoints.safety import UnsafeCheckpointError, check_finite, check_torch_archive, checkpoint_format
from bench.models import WRN_UNUSED_PREFIXES, NormalizedModel, build_model

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CheckpointMismatchError",
    "drop_unused_keys",
    "load_checkpoint_model",
    "load_state_dict",
    "load_weights",
    "sha256_file",
]

_TORCH_EXTENSIONS = (".pth.tar", ".pt", ".pth", ".tar", ".t7", ".bin")
SUPPORTED_EXTENSIONS = (*_TORCH_EXTENSIONS, ".safetensors")

# Keys under which training scripts commonly nest the model's weights, in order of preference.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "net", "model")
_DATA_PARALLEL_PREFIX = "module."
_NET_PREFIX = "net."
_SHOWN_KEYS = 10


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model.

    Attributes:
        missing: keys the model expects that the checkpoint lacks.
        unexpected: keys in the checkpoint the model does not have.
        mismatched: ``(key, checkpoint_shape, model_shape)`` for keys present in both with different shapes.
    """

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-gigabyte checkpoints need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _extension(path: Path) -> str | None:
    name = path.name.lower()
    # Longest first, so "x.pth.tar" is ".pth.tar" rather than ".tar".
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint weights-only and return a flat ``name -> tensor`` state dict.

    Containers written by training scripts are unwrapped: the weights are taken from the first of
    ``state_dict``, ``model_state_dict``, ``net``, ``model`` that holds tensors (repeatedly, for nested
    containers), non-tensor entries (epoch, accuracy, ...) are dropped, and a ``module.`` prefix left by
    ``DataParallel`` is stripped.

    Args:
        path: a ``.pt``, ``.pth``, ``.pth.tar``, ``.tar``, ``.t7``, ``.bin`` (``torch.save``) or
            ``.safetensors`` file.

    Returns:
        The state dict, tensors on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a symlink to nothing).
        NotACheckpointError: ``path`` is not a regular file with content, or holds none of the accepted formats
            (:func:`check_input_file`, :func:`checkpoint_format`); nothing was read beyond its first bytes.
        NonFiniteWeightsError: a floating-point tensor holds NaN or Inf (:func:`check_finite`).
        ValueError: unsupported extension, an unreadable (corrupt) file, or no tensors in the file.
        UnsafeCheckpointError: the file needs arbitrary unpickling (it is not executed).
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ext = _extension(path)
    if ext is None:
        raise ValueError(
            f"unsupported checkpoint file {path.name!r}; supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    # The content decides how the file is read, not its name: a safetensors file saved as .pt loads too.
    if checkpoint_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
            raise ValueError(f"could not read {path} as a safetensors file: {e}") from None
    else:
        check_torch_archive(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", str(e), flags=re.IGNORECASE)
            if refused:
                raise UnsafeCheckpointError(_unsafe_message(path, refused.group(1))) from None
            raise ValueError(f"could not read {path} as a checkpoint: {_unpickler_detail(e)}") from None
        except (RuntimeError, KeyError, EOFError) as e:
            raise ValueError(
                f"could not read {path} as a checkpoint (corrupt, truncated, or not written by torch.save): {e!r}"
            ) from None
    state_dict = _extract_state_dict(obj, path)
    # Every tensor the file gives, not only those a model will take: NaN scores in a HYDRA file are as corrupt.
    check_finite(state_dict, source=path)
    return state_dict


def _unpickler_detail(error: Exception) -> str:
    # torch wraps the one informative line in paragraphs of advice that do not apply to untrusted files.
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), flags=re.DOTALL)
    return found.group(1) if found else str(error).splitlines()[0]


def _unsafe_message(path: Path, refused: str) -> str:
    what = f" (first refused: {refused})"
    return (
        f"checkpoint {path} contains pickled Python objects beyond tensors{what}. Checkpoints are untrusted "
        "and are loaded weights-only, so it was not unpickled. Fix: re-save just the weights, "
        "torch.save(model.state_dict(), path), or save them as safetensors "
        "(safetensors.torch.save_file(model.state_dict(), path))."
    )


def _tensor_items(obj: Mapping) -> dict[str, Tensor]:
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _extract_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    for _ in range(4):  # a bound on nesting, e.g. {"model": {"state_dict": ...}}
        inner = next(
            (obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping) and _has_tensors(obj[k])),
            None,
        )
        if inner is None:
            break
        obj = inner
    tensors = _tensor_items(obj)
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:_SHOWN_KEYS]))
        raise ValueError(f"checkpoint {path} holds no tensors (top-level keys: {keys or 'none'})")
    return {k.removeprefix(_DATA_PARALLEL_PREFIX): v for k, v in tensors.items()}


def _has_tensors(obj: Mapping) -> bool:
    return any(isinstance(v, Tensor) for v in obj.values()) or any(
        isinstance(v, Mapping) and _has_tensors(v) for v in obj.values()
    )


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return shown + more


def drop_unused_keys(state_dict: Mapping[str, Tensor], expected: Collection[str] = ()) -> dict[str, Tensor]:
    """``state_dict`` without the weights of modules that their authors' forward never calls.

    TRADES's WideResNet (RobustBench's, HYDRA's WRN-28-4, PwoA's WRN-34-10) defines a ``sub_block1`` that its
    forward never calls, and saves it; our :class:`bench.models.WideResNet` leaves it out. Every loading path (a
    plain checkpoint, a converted author file, a stored model) goes through here, so one file loads the same way
    whichever path reads it. Keys in ``expected`` are kept: a model that does have such a module gets its weights.
    """
    keep = set(expected)
    return {
        k: v
        for k, v in state_dict.items()
        if k in keep or not k.removeprefix(_NET_PREFIX).startswith(WRN_UNUSED_PREFIXES)
    }


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    source: str | os.PathLike[str] | None = None,
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load ``state_dict`` into ``model``, explaining any mismatch.

    An architecture's own keys (``conv1.weight``) are accepted for a :class:`NormalizedModel`, whose keys
    are ``net.conv1.weight``. A missing BatchNorm ``num_batches_tracked`` counter is not an error
    (checkpoints from before PyTorch 0.4 lack it; PyTorch fills it in), and the weights of modules the authors'
    forward never calls are dropped (:func:`drop_unused_keys`).

    Args:
        model: the model to load into.
        state_dict: the weights, e.g. from :func:`load_state_dict`.
        strict: whether missing or unexpected keys are an error. Shape mismatches always are.
        source: the file the weights came from, named if they are refused as non-finite.

    Returns:
        The missing and unexpected keys, as ``nn.Module.load_state_dict`` returns them.

    Raises:
        CheckpointMismatchError: keys or shapes do not match, naming them.
        NonFiniteWeightsError: a tensor to be loaded holds NaN or Inf (:func:`check_finite`); the model is untouched.
    """
    sd = dict(state_dict)
    if isinstance(model, NormalizedModel) and not any(k.startswith(_NET_PREFIX) for k in sd):
        sd = {_NET_PREFIX + k: v for k, v in sd.items()}
    expected = model.state_dict()
    sd = drop_unused_keys(sd, expected)
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(
            _mismatch_message(missing, unexpected, mismatched), missing, unexpected, mismatched
        )
    # Again here, on exactly what the model takes: every path ends here, including converters whose arithmetic
    # (MAD's softplus masks) or loaders (MAD's own, RobustBench's) bypass load_state_dict.
    check_finite({k: v for k, v in sd.items() if k in expected}, source=source)
    return model.load_state_dict(sd, strict=strict)


def _mismatch_message(
    missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> str:
    lines = [
        f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mismatched)} shape-mismatched keys"
    ]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_preview(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        shapes = [f"{k} checkpoint {list(c)} vs model {list(m)}" for k, c, m in mismatched]
        lines.append(f"  shape mismatch ({len(mismatched)}): {_preview(shapes)}")
    lines.append(
        "hint: is --arch (or the number of classes) right? (bench models lists architectures) "
        "A checkpoint in a method's native format (extra keys such as popup_scores or masks, "
        "or other names) needs --format."
    )
    return "\n".join(lines)


def load_checkpoint_model(
    path: str | Path,
    arch: str,
    dataset: str,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    normalization: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build ``arch`` for ``dataset`` and load the checkpoint's weights (weights-only, strict), in eval mode.

    ``state_dict`` replaces reading ``path`` (a converted author checkpoint); ``normalization``
    (:func:`bench.models.normalize.parse_normalization`) replaces the dataset's mean/std in front of the network.
    """
    model = build_model(arch, dataset, normalization)
    load_weights(model, state_dict if state_dict is not None else load_state_dict(path))
    return model.eval()
