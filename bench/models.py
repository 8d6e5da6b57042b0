"""Architectures: a registry of CIFAR-style networks and the normalising wrapper every model wears.

A model in this project takes inputs in [0, 1] and returns logits. Normalisation is a fixed first layer
(:class:`Normalize`) whose mean and std are *non-persistent* buffers, so a state dict holds only the
network's own weights: ``create_model`` returns a :class:`NormalizedModel` whose keys are ``net.<...>``, and
an author's checkpoint maps onto ``net.`` without any normalisation keys.

Each architecture keeps the attribute names of the reference implementation that published checkpoints
were trained with (kuangliu/pytorch-cifar, akamaster/pytorch_resnet_cifar10, TRADES/RobustBench, and the
pruning methods' own VGG-16s: ``vgg16_bn_hydra``, ``vgg16_mad``, ``vgg16_pwoa``), so their state dicts load
unchanged (``methods.convert`` folds masks and scores in first). Adding an architecture is one decorated
builder here::

    @register_arch("resnet18", description="...", paper_url="...")
    def resnet18(num_classes: int) -> nn.Module: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.registry import Registry

__all__ = [
    "ARCHS",
    "ArchInfo",
    "Normalize",
    "NormalizedModel",
    "create_model",
    "register_arch",
    "unwrap",
]

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


def unwrap(model: nn.Module) -> nn.Module:
    """The bare architecture inside a :class:`NormalizedModel` (``model`` itself otherwise)."""
    return model.net if isinstance(model, NormalizedModel) else model


# --------------------------------------------------------------------------------------------------------
# small_cnn: the built-in digits dataset's network


class SmallCNN(nn.Module):
    """Three 3x3 convolutions and two linear layers for 8x8 inputs (81,002 parameters for 10 classes).

    The widths (16, 32, 32) and the 128-unit hidden layer were chosen for the CPU budget of the digits track:
    AutoAttack-plus is compute-bound on 8x8 inputs, and these widths cost ~0.5 M multiply-adds per sample
    (the earlier 32/64/64 network cost ~1.9 M) while the PGD-trained model stays clearly robust (README).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 32),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 4 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_arch(
    "small_cnn",
    description="3-conv, 2-linear CNN for 1x8x8 digits (scikit-learn load_digits); trains in seconds on CPU",
    input_shape=(1, 8, 8),
)
def small_cnn(num_classes: int) -> nn.Module:
    return SmallCNN(num_classes)


# --------------------------------------------------------------------------------------------------------
# ResNet-18/34, kuangliu/pytorch-cifar (the variant HYDRA, MAD and APB train): 3x3 stem, no max-pool.


class BasicBlock(nn.Module):
    """kuangliu's BasicBlock: two 3x3 convolutions, 1x1 conv + BN projection when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """kuangliu's CIFAR ResNet: 64-channel 3x3 stem, four stages, global average pool, ``linear``."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # kuangliu uses avg_pool2d(out, 4); identical on 32x32 inputs, and other sizes still work.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


_HE2016 = "https://arxiv.org/abs/1512.03385"


@register_arch(
    "resnet18",
    description="ResNet-18, CIFAR variant (kuangliu/pytorch-cifar; HYDRA, MAD, APB), 11.2M params",
    paper_url=_HE2016,
)
def resnet18(num_classes: int) -> nn.Module:
    return ResNet([2, 2, 2, 2], num_classes)


@register_arch(
    "resnet34",
    description="ResNet-34, CIFAR variant (kuangliu/pytorch-cifar), 21.3M params",
    paper_url=_HE2016,
)
def resnet34(num_classes: int) -> nn.Module:
    return ResNet([3, 4, 6, 3], num_classes)


# --------------------------------------------------------------------------------------------------------
# ResNet-56, He et al. 2016 Sec. 4.2 as implemented by akamaster/pytorch_resnet_cifar10.


class PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016, Sec. 4.2): subsample by 2 and zero-pad the new channels.

    A module rather than akamaster's lambda so the model can be pickled and deep-copied; it has no
    parameters, so state dicts are unchanged.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class CifarBasicBlock(nn.Module):
    """akamaster's BasicBlock with the parameter-free option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet: 16/32/64 channels, ``n`` blocks per stage, ``linear`` head."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)  # akamaster's _weights_init

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_arch(
    "resnet56",
    description="ResNet-56 for CIFAR (He et al. 2016; akamaster), option-A shortcuts, 0.85M params",
    paper_url=_HE2016,
)
def resnet56(num_classes: int) -> nn.Module:
    return CifarResNet(9, num_classes)


# --------------------------------------------------------------------------------------------------------
# VGG-16 with batch norm, kuangliu/pytorch-cifar: conv-BN-ReLU stacks and a single linear classifier.

_VGG16_CFG: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


def _vgg_stack(cfg: Sequence[int | str], *, conv_bias: bool) -> list[nn.Module]:
    """VGG's feature layers: 3x3 conv (padding 1) + BN + ReLU per number in ``cfg``, a 2x2 max-pool per ``"M"``."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [
                nn.Conv2d(in_channels, int(v), 3, padding=1, bias=conv_bias),
                nn.BatchNorm2d(int(v)),
                nn.ReLU(inplace=True),
            ]
            in_channels = int(v)
    return layers


class VGG(nn.Module):
    """kuangliu's CIFAR VGG: ``features`` (indexed as in the original) and ``classifier = Linear(512, k)``."""

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 10) -> None:
        super().__init__()
        # The trailing no-op keeps the Sequential's length and repr as in kuangliu's code.
        self.features = nn.Sequential(*_vgg_stack(cfg, conv_bias=True), nn.AvgPool2d(kernel_size=1, stride=1))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_arch(
    "vgg16_bn",
    description="VGG-16 with batch norm, CIFAR variant (kuangliu/pytorch-cifar; RAP-ADMM, APB RADMM), 14.7M params",
    paper_url="https://arxiv.org/abs/1409.1556",
)
def vgg16_bn(num_classes: int) -> nn.Module:
    return VGG(_VGG16_CFG, num_classes)


# --------------------------------------------------------------------------------------------------------
# The methods' own VGG-16s. Each method's released code (and the Piras et al. Adversarial Pruning Benchmark,
# APB, pralab/AdversarialPruningBenchmark, which hosts their CIFAR-10/SVHN checkpoints) trains a different
# VGG-16, so each is its own architecture with the author's module names; their ResNet-18s are all
# kuangliu's (``resnet18``). All have ``vgg16_bn``'s 13 convolutions (same shapes, same order); they differ
# in conv biases, in what follows the fourth max-pool, and in the classifier.

_VGG16_NO_LAST_POOL = _VGG16_CFG[:-1]


class HydraVGG(nn.Module):
    """HYDRA's ``vgg16_bn`` (inspire-group/hydra ``models/vgg_cifar.py``), built with dense layers.

    ``features`` has bias-free convolutions and no fifth max-pool (so its convolutions sit at the same indices
    as ``vgg16_bn``'s); ``avgpool = AdaptiveAvgPool2d((2, 2))`` (the identity on 32x32 inputs, whose map is
    already 2x2); ``classifier = Linear(2048, 256), ReLU, Linear(256, 256), ReLU, Linear(256, k)``, all with
    bias. HYDRA's ``SubnetConv``/``SubnetLinear`` add only ``popup_scores``, which the converters fold in.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(*_vgg_stack(_VGG16_NO_LAST_POOL, conv_bias=False))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 2 * 2, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_arch(
    "vgg16_bn_hydra",
    description=(
        "VGG-16-BN of HYDRA (inspire-group/hydra models/vgg_cifar.py; APB HYDRA V16): bias-free convs, "
        "no 5th max-pool, AdaptiveAvgPool2d(2), classifier 2048-256-256-k; 15.3M params"
    ),
    paper_url="https://arxiv.org/abs/2002.10509",
)
def vgg16_bn_hydra(num_classes: int) -> nn.Module:
    return HydraVGG(num_classes)


class MadVGG(nn.Module):
    """MAD's VGG-16 (ByungKwanLee/Masking-Adversarial-Damage ``models/vgg_mask.py``, depth 16), unmasked.

    ``feature`` (sic) has bias-free convolutions and no fifth max-pool; the 2x2 map is average-pooled to 1x1
    and ``classifier = Linear(512, k)``. MAD's ``Conv2d_mask``/``Linear_mask`` add only ``mask_weight`` and
    ``mask_bias``, which the converter folds in; its ``(x - mean) / std`` becomes our :class:`Normalize`.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.feature = nn.Sequential(*_vgg_stack(_VGG16_NO_LAST_POOL, conv_bias=False))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # MAD pools with AvgPool2d(2) (CIFAR, SVHN: a 2x2 map) or AvgPool2d(4) (Tiny-ImageNet: 4x4), i.e. the
        # whole map in both cases; adaptive pooling is identical there and accepts other input sizes.
        return self.classifier(F.adaptive_avg_pool2d(self.feature(x), 1).flatten(1))


@register_arch(
    "vgg16_mad",
    description=(
        "VGG-16-BN of MAD (Masking-Adversarial-Damage models/vgg_mask.py; APB MAD V16): keys feature.*, "
        "bias-free convs, no 5th max-pool, global average pool, Linear(512, k); 14.7M params"
    ),
    paper_url="https://arxiv.org/abs/2204.02738",
)
def vgg16_mad(num_classes: int) -> nn.Module:
    return MadVGG(num_classes)


def _pwoa_block(channels: Sequence[int], pool: nn.Module) -> nn.Sequential:
    convs = [
        nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
    ]
    return nn.Sequential(*convs, pool)


class PwoaVGG16(nn.Module):
    """The APB's PwoA ``VGG16`` (pralab/AdversarialPruningBenchmark ``models/pwoa.py``), logits only.

    ``layer1``-``layer5`` are blocks of ``Sequential(Conv2d (with bias), BN, ReLU)`` closed by a 2x2 max-pool,
    except ``layer5``, closed by ``AdaptiveAvgPool2d((2, 2))``; then ``layer6 = Sequential(Linear(2048, 256),
    ReLU)``, ``layer7 = Sequential(Linear(256, 256), ReLU)``, ``layer8 = Linear(256, k)``. PwoA's own repository
    (neu-spiral/PwoA ``source/hsicbt/model/vgg.py``) has the same blocks but a fifth max-pool and
    ``Linear(512, 4096) + BatchNorm1d`` layers; no checkpoint of that network is published, so it is not
    registered. The native ``forward`` may also return the hidden activations; ours returns the logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = _pwoa_block([3, 64, 64], nn.MaxPool2d(kernel_size=2, stride=2))
        self.layer2 = _pwoa_block([64, 128, 128], nn.MaxPool2d(kernel_size=2, stride=2))
        self.layer3 = _pwoa_block([128, 256, 256, 256], nn.MaxPool2d(kernel_size=2, stride=2))
        self.layer4 = _pwoa_block([256, 512, 512, 512], nn.MaxPool2d(kernel_size=2, stride=2))
        self.layer5 = _pwoa_block([512, 512, 512, 512], nn.AdaptiveAvgPool2d((2, 2)))
        self.layer6 = nn.Sequential(nn.Linear(512 * 2 * 2, 256), nn.ReLU())
        self.layer7 = nn.Sequential(nn.Linear(256, 256), nn.ReLU())
        self.layer8 = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.layer8(self.layer7(self.layer6(out.flatten(1))))


@register_arch(
    "vgg16_pwoa",
    description=(
        "VGG-16-BN of the APB's PwoA models (AdversarialPruningBenchmark models/pwoa.py): blocks layer1-5 "
        "(convs with bias), AdaptiveAvgPool2d(2) for the 5th max-pool, layer6-8 2048-256-256-k; 15.3M params"
    ),
    paper_url="https://arxiv.org/abs/2409.01249",
)
def vgg16_pwoa(num_classes: int) -> nn.Module:
    return PwoaVGG16(num_classes)


# --------------------------------------------------------------------------------------------------------
# Wide ResNets, Zagoruyko & Komodakis 2016, as in the TRADES / RobustBench code (pre-activation blocks).


class WideBasicBlock(nn.Module):
    """TRADES's pre-activation block; ``convShortcut`` (1x1) only when the channel count changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None if self.equalInOut else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        # When channels change the shortcut also sees the pre-activated input, exactly as in TRADES.
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return (x if self.convShortcut is None else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    """One WRN stage; the ``layer`` attribute name is kept for checkpoint compatibility."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


# Keys of the ``sub_block1`` that TRADES's WideResNet (RobustBench's, HYDRA's, PwoA's) defines but never calls in
# forward; :class:`WideResNet` leaves it out, so converters drop these keys.
WRN_UNUSED_PREFIXES = ("sub_block1.",)


class WideResNet(nn.Module):
    """WRN-depth-k: ``conv1``, ``block1..3``, ``bn1``, ``fc``.

    TRADES's class also defines an unused ``sub_block1`` (never called in ``forward``); it is left out
    here, so its keys must be dropped when converting such checkpoints.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init with fan_out, as in the TRADES code.
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


_WRN = "https://arxiv.org/abs/1605.07146"


@register_arch(
    "wrn28_4",
    description="WideResNet-28-4 (Zagoruyko & Komodakis; TRADES/RobustBench code), 5.8M params",
    paper_url=_WRN,
)
def wrn28_4(num_classes: int) -> nn.Module:
    return WideResNet(28, 4, num_classes)


@register_arch(
    "wrn28_10",
    description="WideResNet-28-10 (Zagoruyko & Komodakis; TRADES/RobustBench code, e.g. Sehwag2020Hydra), 36.5M params",
    paper_url=_WRN,
)
def wrn28_10(num_classes: int) -> nn.Module:
    return WideResNet(28, 10, num_classes)


@register_arch(
    "wrn34_10",
    description="WideResNet-34-10 (Zagoruyko & Komodakis; TRADES/RobustBench code), 46.2M params",
    paper_url=_WRN,
)
def wrn34_10(num_classes: int) -> nn.Module:
    return WideResNet(34, 10, num_classes)


# --------------------------------------------------------------------------------------------------------
# MobileNetV2, kuangliu/pytorch-cifar: stride-1 stem and second stage for 32x32 inputs.


class InvertedResidual(nn.Module):
    """kuangliu's ``Block``: 1x1 expand, 3x3 depthwise, 1x1 linear projection.

    Unlike the paper, every stride-1 block has a residual: a 1x1 conv + BN projection when the
    channel count changes (this is what kuangliu's checkpoints contain).
    """

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """kuangliu's CIFAR MobileNetV2: ``conv1``, ``bn1``, ``layers``, ``conv2``, ``bn2``, ``linear``."""

    # (expansion, out_planes, num_blocks, stride); the second stage's stride is 1 (paper: 2) for CIFAR.
    cfg = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        in_planes = 32
        for expansion, out_planes, num_blocks, stride in self.cfg:
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_arch(
    "mobilenetv2",
    description="MobileNetV2, CIFAR variant (kuangliu/pytorch-cifar; stride-1 stem), 2.3M params",
    paper_url="https://arxiv.org/abs/1801.04381",
)
def mobilenetv2(num_classes: int) -> nn.Module:
    return MobileNetV2(num_classes)
