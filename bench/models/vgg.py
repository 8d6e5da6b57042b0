"""VGG-16s: kuangliu/pytorch-cifar's VGG-16-BN and the pruning methods' own VGG-16s."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.registry import register_arch

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
