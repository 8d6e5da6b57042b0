"""MobileNetV2, kuangliu/pytorch-cifar: stride-1 stem and second stage for 32x32 inputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.registry import register_arch


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
