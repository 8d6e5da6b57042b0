"""Checkpoint formats: how a file on disk becomes our plain state dict (``bench evaluate --format``, ``bench formats``).

The core knows one format, ``plain`` (a state dict of our architecture). The native formats of the pruning
methods' authors (HYDRA's popup scores, MAD's ``.t7`` files, ...) need the methods' own code, which sits above the
core, so the methods register them here (``methods/convert.py``) instead of the core importing the methods. A
process that never imported them, e.g. an evaluation task rebuilding a stored author checkpoint
(:func:`bench.store.registration.load_stored_model`), finds them through the ``apbench.checkpoint_formats``
entry point that the installed package declares (``pyproject.toml``): :data:`FORMATS` loads every such entry point
the first time it is read, the way pytest finds its plugins. Another package can add its formats the same way.
:func:`load_converted_model` builds the model a converted file fits, behind its authors' input normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from torch import Tensor

from bench.checkpoints import CheckpointMismatchError, drop_unused_keys, load_state_dict, load_weights
from bench.data import get_dataset_info
from bench.models import NormalizedModel, build_model
from bench.registry import Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "FORMATS",
    "RAW_RGB",
    "CheckpointFormat",
    "MeanStd",
    "converted_provenance",
    "load_converted",
    "load_converted_model",
    "load_plain",
    "native_normalization",
    "register_format",
]

ENTRY_POINT_GROUP = "apbench.checkpoint_formats"

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]
# Raw [0, 1] RGB inputs: what most authors' CIFAR-style code feeds its networks (ToTensor() and nothing else).
RAW_RGB: MeanStd = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint format that ``bench evaluate --format`` reads.

    Attributes:
        name: registry name (``--format``).
        summary: what such a file is.
        load: ``load(path, k=None) -> state dict`` with the authors' module names.
        needs_k: whether the file needs HYDRA's kept fraction ``--k`` (it is not stored in it).
        archs: registered architectures whose module names the authors' files carry (empty: any).
        normalization: per dataset, the ``(mean, std)`` the authors' code standardises inputs with; datasets
            not listed (and every dataset when empty) use the dataset's own constants, as our models do.
    """

    name: str
    summary: str
    load: Callable[..., dict[str, Tensor]]
    needs_k: bool = False
    archs: tuple[str, ...] = ()
    normalization: Mapping[str, MeanStd] = field(default_factory=dict, compare=False)

    @property
    def description(self) -> str:
        """One line for ``bench formats``: the summary, the architectures and the authors' input normalisation."""
        archs = ", ".join(self.archs) if self.archs else "any (bench models)"
        if not self.normalization:
            inputs = "the dataset's mean/std"
        elif all(ms == RAW_RGB for ms in self.normalization.values()):
            inputs = "none, raw [0, 1]"
        else:
            inputs = f"their own mean/std ({', '.join(self.normalization)})"
        return f"{self.summary}; --arch {archs}; authors' input normalisation: {inputs}"


class _FormatRegistry(Registry[CheckpointFormat]):
    """A :class:`Registry` that loads the ``apbench.checkpoint_formats`` entry points before its first read."""

    def __init__(self) -> None:
        super().__init__("checkpoint format", "bench formats")
        self._plugins_loaded = False

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        # Set first: a plugin that reads the registry while it registers must not load itself again.
        self._plugins_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as e:
                raise RuntimeError(
                    f"the checkpoint formats of {ep.value!r} (entry point {ep.name!r} of {ENTRY_POINT_GROUP}) "
                    f"could not be loaded: {e}; reinstall the package that declares it"
                ) from e

    def get(self, name: str) -> CheckpointFormat:
        self._load_plugins()
        return super().get(name)

    def list(self, pattern: str = "*") -> list[str]:
        self._load_plugins()
        return super().list(pattern)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return super().__contains__(name)

    def __len__(self) -> int:
        self._load_plugins()
        return super().__len__()


FORMATS: Registry[CheckpointFormat] = _FormatRegistry()


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    """Add ``fmt`` to :data:`FORMATS` under its name; a name registered twice is an error."""
    return FORMATS.register(fmt.name)(fmt)


def load_plain(path: Path, k: float | None = None) -> dict[str, Tensor]:
    """The ``load`` of a format whose files are plain state dicts (weights-only, any of the checkpoint formats)."""
    return load_state_dict(path)


register_format(
    CheckpointFormat("plain", "a state dict of our architecture (.pt/.pth/.pth.tar/.safetensors)", load_plain)
)


def load_converted(path: str | Path, fmt: str = "plain", *, k: float | None = None) -> dict[str, Tensor]:
    """Read ``path`` in format ``fmt`` and return our plain state dict (the authors' module names).

    Args:
        path: the checkpoint file.
        fmt: a registered format (``bench formats``).
        k: HYDRA's kept fraction, for ``hydra-subnet`` only.

    Returns:
        The state dict, for the architectures the format lists (``FORMATS.get(fmt).archs``).

    Raises:
        ValueError: ``k`` given for a format that has none, or the file does not convert.
    """
    spec = FORMATS.get(fmt)
    if k is not None and not spec.needs_k:
        raise ValueError(f"--k is only used with --format hydra-subnet, not {fmt!r}")
    # TRADES's unused ``sub_block1`` (HYDRA's WRN-28-4, PwoA's WRN-34-10) is dropped as for a plain checkpoint.
    return drop_unused_keys(spec.load(Path(path), k=k))


def native_normalization(fmt: str, dataset: str) -> MeanStd:
    """The ``(mean, std)`` that reproduces the authors' input handling for files in ``fmt`` on ``dataset``.

    Args:
        fmt: a registered format.
        dataset: a registered dataset; one the authors' code never trained on (the digits track) gets its own
            constants, because such a file can only have been written by this project.

    Returns:
        Per-channel mean and std for :func:`bench.models.create_model`.
    """
    spec = FORMATS.get(fmt)
    if dataset in spec.normalization:
        return spec.normalization[dataset]
    info = get_dataset_info(dataset)
    return tuple(info.mean), tuple(info.std)


def converted_provenance(
    fmt: str, dataset: str, k: float | None = None, *, normalization: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What the store records about a converted model, so that it can be rebuilt exactly.

    The authors' own input handling (e.g. HYDRA trains on raw [0, 1] images, MAD with its own mean/std) is the
    model's fixed first layer: ``{"native_format", "normalization": {"mean", "std"}}`` plus ``k`` when given.
    ``normalization`` (``bench evaluate --normalization``) replaces the authors' constants.
    """
    if normalization is None:
        mean, std = native_normalization(fmt, dataset)
    else:
        mean, std = normalization["mean"], normalization["std"]
    return {
        "native_format": fmt,
        "normalization": {"mean": list(mean), "std": list(std)},
        **({"k": k} if k is not None else {}),
    }


def load_converted_model(
    path: str | Path,
    fmt: str,
    arch: str,
    dataset: str,
    *,
    k: float | None = None,
    normalization: Mapping[str, Any] | None = None,
) -> NormalizedModel:
    """Convert ``path`` and load it into ``arch`` behind the authors' input normalisation, in eval mode.

    The result gives the native model's logits on [0, 1] inputs: :func:`bench.formats.load_converted` for the
    weights, :func:`bench.formats.native_normalization` for the fixed first layer.

    Args:
        path: the checkpoint file.
        fmt: a registered format (``bench formats``).
        arch: a registered architecture; the format's ``archs`` are the ones its authors' files fit.
        dataset: a registered dataset (its class count sizes the classifier).
        k: HYDRA's kept fraction, for ``hydra-subnet`` only.
        normalization: ``{"mean", "std"}`` recorded in a stored model's provenance; replaces the format's
            constants, so a stored model is rebuilt as it was registered.

    Returns:
        A :class:`bench.models.NormalizedModel`.

    Raises:
        CheckpointMismatchError: the converted keys do not fit ``arch``; the message names the format's
            architectures.
    """
    spec = FORMATS.get(fmt)
    state_dict = load_converted(path, fmt, k=k)
    model = build_model(arch, dataset, normalization or converted_provenance(fmt, dataset)["normalization"])
    try:
        load_weights(model, state_dict, source=path)
    except CheckpointMismatchError as e:
        if not spec.archs or arch in spec.archs:
            raise
        hint = f"--format {fmt} files fit --arch {' or '.join(spec.archs)}, not {arch!r}"
        raise CheckpointMismatchError(f"{e}\n{hint}", e.missing, e.unexpected, e.mismatched) from None
    return model.eval()
