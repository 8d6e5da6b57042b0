"""Wide ResNets, Zagoruyko & Komodakis 2016, as in the TRADES / RobustBench code (pre-activation blocks)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from bench.models.registry import register_arch


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
