"""Native checkpoint formats of the methods' authors → our plain state dicts (``bench evaluate --format``).

Every converter reads the file weights-only (``bench.checkpoints.load_state_dict``, or MAD's loader that admits
``argparse.Namespace`` and nothing else) and returns a state dict with the authors' module names;
:func:`bench.checkpoints.load_weights` then checks every key against the architecture it is loaded into.

Each method trains its own VGG-16 (the Piras et al. Adversarial Pruning Benchmark, APB, hosts checkpoints of
each), so a format lists the registered architectures whose module names its files carry:

============  ==========================================================================================
format        architectures (``--arch``)
============  ==========================================================================================
hydra-*       ``resnet18``, ``vgg16_bn_hydra`` (HYDRA's ``vgg16_bn``; the APB's HYDRA files are ``*_dense``)
mad           ``resnet18``, ``vgg16_mad`` (``feature.*`` keys)
pwoa          ``resnet18``, ``vgg16_pwoa`` (the APB's PwoA ``VGG16``, ``layer1``-``layer8``)
admm          ``resnet18``, ``vgg16_bn`` (kuangliu's, as RAP-ADMM and the APB use them)
atmc          ``resnet18``, ``resnet34`` (kuangliu naming in ATMC's ``cifar/resnet``)
============  ==========================================================================================

The authors also normalise inputs their own way, which the fixed :class:`bench.models.Normalize` layer must
reproduce for the logits to be the native ones: HYDRA, PwoA, RAP-ADMM and ATMC feed raw [0, 1] images on
CIFAR/SVHN, MAD standardises with its own constants (its CIFAR-10 std is (0.2023, 0.1994, 0.2010), not the
dataset's). :func:`native_normalization` gives them and :func:`load_converted_model` builds the model with them,
unless ``bench evaluate --normalization`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from bench.catalog import build_model
from bench.checkpoints import CheckpointMismatchError, drop_unused_keys, load_state_dict, load_weights
from bench.data import get_dataset_info
from bench.models import NormalizedModel
from bench.registry import Registry

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]

_RAW_RGB: MeanStd = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
# The datasets the authors' CIFAR-style code trains on, all fed as ToTensor() images in [0, 1].
_RAW_INPUTS: Mapping[str, MeanStd] = {"cifar10": _RAW_RGB, "cifar100": _RAW_RGB, "svhn": _RAW_RGB}
# MAD's utils/mask_network_utils.py (get_mask_network): (x - mean) / std inside the model's forward.
_MAD_INPUTS: Mapping[str, MeanStd] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.43090966, 0.4302428, 0.44634357), (0.19759192, 0.20029082, 0.19811132)),
}


@dataclass(frozen=True)
class CheckpointFormat:
    """A native checkpoint format that ``bench evaluate --format`` reads.

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
        elif all(ms == _RAW_RGB for ms in self.normalization.values()):
            inputs = "none, raw [0, 1]"
        else:
            inputs = f"their own mean/std ({', '.join(self.normalization)})"
        return f"{self.summary}; --arch {archs}; authors' input normalisation: {inputs}"


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


_HYDRA_ARCHS = ("resnet18", "vgg16_bn_hydra")

_register(CheckpointFormat("plain", "a state dict of our architecture (.pt/.pth/.pth.tar/.safetensors)", _plain))
_register(
    CheckpointFormat(
        "hydra-subnet",
        "HYDRA subnet checkpoint with popup_scores (give --k, the kept fraction)",
        _hydra_subnet,
        needs_k=True,
        archs=_HYDRA_ARCHS,
        normalization=_RAW_INPUTS,
    )
)
_register(
    CheckpointFormat(
        "hydra-dense",
        "HYDRA *_dense checkpoint (weights already masked; the APB's HYDRA files)",
        _plain,
        archs=_HYDRA_ARCHS,
        normalization=_RAW_INPUTS,
    )
)
_register(
    CheckpointFormat(
        "admm",
        "RAP-ADMM checkpoint (module.basic_model. keys)",
        _admm,
        archs=("resnet18", "vgg16_bn"),
        normalization=_RAW_INPUTS,
    )
)
_register(
    CheckpointFormat(
        "pwoa",
        "PwoA state dict of a model returning (logits, hiddens)",
        _pwoa,
        archs=("resnet18", "vgg16_pwoa"),
        normalization=_RAW_INPUTS,
    )
)
_register(
    CheckpointFormat(
        "atmc",
        "ATMC factor form (weightA/weightB/weightC with eye_const) or dense",
        _atmc,
        archs=("resnet18", "resnet34"),
        normalization=_RAW_INPUTS,
    )
)
_register(
    CheckpointFormat(
        "mad",
        "MAD .t7 checkpoint ({'net': ..., 'args': Namespace} with soft masks)",
        _mad,
        archs=("resnet18", "vgg16_mad"),
        normalization=_MAD_INPUTS,
    )
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

    The result gives the native model's logits on [0, 1] inputs: :func:`load_converted` for the weights,
    :func:`native_normalization` for the fixed first layer.

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
