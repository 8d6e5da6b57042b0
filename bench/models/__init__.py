"""Architectures: a registry of CIFAR-style networks and the normalising wrapper every model wears.

A model in this project takes inputs in [0, 1] and returns logits. Normalisation is a fixed first layer
(:class:`Normalize`) whose mean and std are *non-persistent* buffers, so a state dict holds only the
network's own weights: ``create_model`` returns a :class:`NormalizedModel` whose keys are ``net.<...>``, and
an author's checkpoint maps onto ``net.`` without any normalisation keys.

Each architecture keeps the attribute names of the reference implementation that published checkpoints
were trained with (kuangliu/pytorch-cifar, akamaster/pytorch_resnet_cifar10, TRADES/RobustBench, and the
pruning methods' own VGG-16s: ``vgg16_bn_hydra``, ``vgg16_mad``, ``vgg16_pwoa``), so their state dicts load
unchanged (``methods.convert`` folds masks and scores in first).

Layout (like ``timm.models``): :mod:`.registry` holds :data:`ARCHS`, ``register_arch``, ``create_model`` and
``build_model`` (an architecture for a dataset, behind its normalisation); :mod:`.normalize` the fixed first
layer and the normalisation as part of a model's identity (``--normalization``, the store's key); one module per
family registers its builders when imported below.
Adding an architecture is one decorated builder in a family module (plus its import here for a new family)::

    @register_arch("resnet18", description="...", paper_url="...")
    def resnet18(num_classes: int) -> nn.Module: ...
"""

from __future__ import annotations

# The family modules register their architectures when imported; the registry sorts names, so order is free.
from bench.models.mobilenet import InvertedResidual, MobileNetV2
from bench.models.normalize import Normalize, NormalizedModel, unwrap
from bench.models.registry import ARCHS, ArchInfo, Builder, build_model, create_model, register_arch
from bench.models.resnet import BasicBlock, CifarBasicBlock, CifarResNet, PadShortcut, ResNet
from bench.models.small_cnn import SmallCNN
from bench.models.vgg import VGG, HydraVGG, MadVGG, PwoaVGG16
from bench.models.wide_resnet import WRN_UNUSED_PREFIXES, NetworkBlock, WideBasicBlock, WideResNet

__all__ = [
    "ARCHS",
    "VGG",
    "WRN_UNUSED_PREFIXES",
    "ArchInfo",
    "BasicBlock",
    "Builder",
    "CifarBasicBlock",
    "CifarResNet",
    "HydraVGG",
    "InvertedResidual",
    "MadVGG",
    "MobileNetV2",
    "NetworkBlock",
    "Normalize",
    "NormalizedModel",
    "PadShortcut",
    "PwoaVGG16",
    "ResNet",
    "SmallCNN",
    "WideBasicBlock",
    "WideResNet",
    "build_model",
    "create_model",
    "register_arch",
    "unwrap",
]
