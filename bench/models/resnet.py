"""ResNets for 32x32 inputs (He et al. 2016): kuangliu's ResNet-18/34 and akamaster's ResNet-56."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.registry import register_arch

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
