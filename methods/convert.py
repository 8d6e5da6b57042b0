"""Native checkpoint formats of the methods' authors → our plain state dicts (``bench evaluate --format``).

The formats are registered in the core's :data:`bench.formats.FORMATS` when this module is imported; the package
declares it as an ``apbench.checkpoint_formats`` entry point, so that a process which never imported the methods
(an evaluation task rebuilding a stored author checkpoint) finds them too. Loading goes through the core:
:func:`bench.formats.load_converted` and :func:`bench.formats.load_converted_model`.

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
dataset's). :func:`bench.formats.native_normalization` gives them and :func:`bench.formats.load_converted_model`
builds the model with them, unless ``bench evaluate --normalization`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from bench.checkpoints import load_state_dict
from bench.formats import RAW_RGB, CheckpointFormat, MeanStd, load_plain, register_format
from methods.admm import convert_admm_checkpoint
from methods.atmc import convert_atmc_checkpoint
from methods.hydra import convert_hydra_checkpoint
from methods.mad import convert_mad_checkpoint, load_mad_checkpoint
from methods.pwoa import convert_pwoa_checkpoint

# The datasets the authors' CIFAR-style code trains on, all fed as ToTensor() images in [0, 1].
_RAW_INPUTS: Mapping[str, MeanStd] = {"cifar10": RAW_RGB, "cifar100": RAW_RGB, "svhn": RAW_RGB}
# MAD's utils/mask_network_utils.py (get_mask_network): (x - mean) / std inside the model's forward.
_MAD_INPUTS: Mapping[str, MeanStd] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "svhn": ((0.43090966, 0.4302428, 0.44634357), (0.19759192, 0.20029082, 0.19811132)),
}


def _hydra_subnet(path: Path, k: float | None = None) -> dict[str, Tensor]:
    return convert_hydra_checkpoint(load_state_dict(path), k=k)


def _admm(path: Path, k: float | None = None) -> dict[str, Tensor]:
    return convert_admm_checkpoint(load_state_dict(path))


def _mad(path: Path, k: float | None = None) -> dict[str, Tensor]:
    return convert_mad_checkpoint(load_mad_checkpoint(path))


def _pwoa(path: Path, k: float | None = None) -> dict[str, Tensor]:
    return convert_pwoa_checkpoint(load_state_dict(path))


def _atmc(path: Path, k: float | None = None) -> dict[str, Tensor]:
    return convert_atmc_checkpoint(load_state_dict(path))


_HYDRA_ARCHS = ("resnet18", "vgg16_bn_hydra")

register_format(
    CheckpointFormat(
        "hydra-subnet",
        "HYDRA subnet checkpoint with popup_scores (give --k, the kept fraction)",
        _hydra_subnet,
        needs_k=True,
        archs=_HYDRA_ARCHS,
        normalization=_RAW_INPUTS,
    )
)
register_format(
    CheckpointFormat(
        "hydra-dense",
        "HYDRA *_dense checkpoint (weights already masked; the APB's HYDRA files)",
        load_plain,
        archs=_HYDRA_ARCHS,
        normalization=_RAW_INPUTS,
    )
)
register_format(
    CheckpointFormat(
        "admm",
        "RAP-ADMM checkpoint (module.basic_model. keys)",
        _admm,
        archs=("resnet18", "vgg16_bn"),
        normalization=_RAW_INPUTS,
    )
)
register_format(
    CheckpointFormat(
        "pwoa",
        "PwoA state dict of a model returning (logits, hiddens)",
        _pwoa,
        archs=("resnet18", "vgg16_pwoa"),
        normalization=_RAW_INPUTS,
    )
)
register_format(
    CheckpointFormat(
        "atmc",
        "ATMC factor form (weightA/weightB/weightC with eye_const) or dense",
        _atmc,
        archs=("resnet18", "resnet34"),
        normalization=_RAW_INPUTS,
    )
)
register_format(
    CheckpointFormat(
        "mad",
        "MAD .t7 checkpoint ({'net': ..., 'args': Namespace} with soft masks)",
        _mad,
        archs=("resnet18", "vgg16_mad"),
        normalization=_MAD_INPUTS,
    )
)
