"""ATMC's factor-form layers and CIFAR ResNet as the authors' code defines them, for converter tests.

Written after VITA-Group/ATMC (https://github.com/VITA-Group/ATMC, commit ecf61a6f07525c8e259db764513c0820259be319):

- ``super_module/super_class.py``: ``Linearsp_v2``, ``Conv2dsp_v2`` (parameter names, shapes, initial values,
  the ``eye_const`` buffer and the two branches of the forward), ``DeepOriginalModel.get_ranks`` /
  ``raw_weights`` and ``DeepSP_v2Model.set_weights``;
- ``cifar/resnet/resnet_super.py`` / ``resnet_abcv2.py``: the ResNet wiring (module names, which rank of the
  ``get_ranks()`` list each layer takes, ``avg_pool2d(out, 4)``);
- ``utee/misc.py`` ``model_snapshot``: how ``cifar/train_proj_admm_quant.py`` saves every checkpoint (the bare
  module's ``state_dict()``, tensors moved to the CPU, in an ``OrderedDict``).

The ``--abc_special`` path of ``train_proj_admm_quant.py`` builds the factor model from a dense one with
``ranks = dense.get_ranks()``, ``abc.set_weights(dense.raw_weights(ranks))`` and
``abc.load_state_dict(dense.state_dict(), strict=False)``; :func:`factor_model_from_dense` does the same.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair


class Linearsp_v2(nn.Module):  # noqa: N801 - the authors' class name
    """``W = B·(A + I) + C`` when rank = in_features, else ``(B + I)·A + C``; A rank × in, B out × rank."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        assert rank <= min(in_features, out_features)
        self.rank = rank
        self.weightA = nn.Parameter(torch.zeros(rank, in_features))
        self.weightB = nn.Parameter(torch.zeros(out_features, rank))
        self.weightC = nn.Parameter(torch.zeros(out_features, in_features))
        self.eye = torch.eye(rank)
        self.register_buffer("eye_const", self.eye)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Only the bias is drawn; the factors start at zero and are filled by set_weights.
        stdv = 1.0 / math.sqrt(self.weightA.size(1))
        if self.bias is not None:
            self.bias.data.uniform_(-stdv, stdv)

    def forward(self, x: Tensor) -> Tensor:
        if self.rank == self.in_features:
            weight = self.weightB.matmul(self.weightA + self.eye_const) + self.weightC
        else:
            weight = (self.weightB + self.eye_const).matmul(self.weightA) + self.weightC
        return F.linear(x, weight, self.bias)


class Conv2dsp_v2(nn.Module):  # noqa: N801 - the authors' class name
    """A rank × in × kh × kw, B out × rank × 1 × 1, C out × in × kh × kw; the product is taken on flat views."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kernel_size = _pair(kernel_size)
        assert groups == 1, "does not support grouped convolution yet"
        assert rank <= min(in_channels * kernel_size[0] * kernel_size[1], out_channels)
        self.rank = rank
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weightA = nn.Parameter(torch.zeros(rank, in_channels, *kernel_size))
        self.weightB = nn.Parameter(torch.zeros(out_channels, rank, 1, 1))
        self.weightC = nn.Parameter(torch.zeros(out_channels, in_channels, *kernel_size))
        self.eye = torch.eye(rank)
        self.register_buffer("eye_const", self.eye)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        if self.bias is not None:
            self.bias.data.uniform_(-stdv, stdv)

    def forward(self, x: Tensor) -> Tensor:
        weight_a = self.weightA.view(self.rank, -1)
        weight_b = self.weightB.view(self.out_channels, -1)
        if self.rank == self.in_channels * self.kernel_size[0] * self.kernel_size[1]:
            weight = weight_b.matmul(weight_a + self.eye_const).view(self.weightC.size()) + self.weightC
        else:
            weight = (weight_b + self.eye_const).matmul(weight_a).view(self.weightC.size()) + self.weightC
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


FACTOR_LAYERS = (Conv2dsp_v2, Linearsp_v2)


# ------------------------------------------------------------------------------------------------------
# DeepOriginalModel / DeepSP_v2Model helpers (super_class.py), as functions of the models.


def get_ranks(dense: nn.Module) -> list[int]:
    """``DeepOriginalModel.get_ranks``: min(in·kh·kw, out) per ungrouped conv, min(in, out) per linear."""
    ranks = []
    for m in dense.modules():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                continue
            ranks.append(min(m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels))
        elif isinstance(m, nn.Linear):
            ranks.append(min(m.in_features, m.out_features))
    return ranks


def raw_weights(dense: nn.Module, ranks: list[int]) -> list[tuple[Tensor | None, Tensor | None, None]]:
    """``DeepOriginalModel.raw_weights``: the dense weight goes into B when rank = in·kh·kw (in), else into A."""
    weights = []
    layers = [m for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    layers = [m for m in layers if not (isinstance(m, nn.Conv2d) and m.groups != 1)]
    for rank, m in zip(ranks, layers, strict=True):
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            weight = m.weight.data.view(m.out_channels, fan_in)
        else:
            fan_in, weight = m.in_features, m.weight.data
        weights.append((None, weight, None) if rank == fan_in else (weight, None, None))
    return weights


def set_weights(model: nn.Module, weights_list) -> None:
    """``DeepSP_v2Model.set_weights``: copy the given factors in, flat, leaving the others (zeros) alone."""
    layers = [m for m in model.modules() if isinstance(m, FACTOR_LAYERS)]
    for m, (weight_a, weight_b, _) in zip(layers, weights_list, strict=True):
        if weight_a is not None:
            m.weightA.data.view(-1).copy_(weight_a.reshape(-1))
        if weight_b is not None:
            m.weightB.data.view(-1).copy_(weight_b.reshape(-1))


def model_snapshot(model: nn.Module, path: str | Path) -> None:
    """``utee/misc.py`` ``model_snapshot``: unwrap DataParallel, move every tensor to the CPU, ``torch.save``."""
    if isinstance(model, nn.DataParallel):
        model = model.module
    state_dict = OrderedDict()
    for k, v in model.state_dict().items():
        state_dict[k] = v.cpu() if v.is_cuda else v
    torch.save(state_dict, path)


# ------------------------------------------------------------------------------------------------------
# cifar/resnet/resnet_super.py with ConvF = Conv2dsp_v2 / LinF = Linearsp_v2 (resnet_abcv2) or nn.Conv2d /
# nn.Linear (resnet_dense).


class BasicBlockSuper(nn.Module):
    """conv1 takes ranks[0], conv2 ranks[1], the projection shortcut (if any) ranks[2]."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, conv_f, ranks=None, stride: int = 1) -> None:
        super().__init__()
        self.rank_accumulator = 0
        factor = conv_f is not nn.Conv2d

        def conv(c_in, c_out, k, s, p, i):
            if not factor:
                return conv_f(c_in, c_out, kernel_size=k, stride=s, padding=p, bias=False)
            self.rank_accumulator += 1
            return conv_f(c_in, c_out, rank=ranks[i], kernel_size=k, stride=s, padding=p, bias=False)

        self.conv1 = conv(in_planes, planes, 3, stride, 1, 0)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, 1, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                conv(in_planes, self.expansion * planes, 1, stride, 0, 2), nn.BatchNorm2d(self.expansion * planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNetSuper(nn.Module):
    """conv1 takes ranks[0], the blocks the following ranks in order, ``linear`` the last one."""

    def __init__(self, num_blocks, conv_f, lin_f, ranks=None, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.offset = 0
        factor = conv_f is not nn.Conv2d
        if factor:
            self.conv1 = conv_f(3, 64, kernel_size=3, rank=ranks[0], stride=1, padding=1, bias=False)
            self.offset += 1
        else:
            self.conv1 = conv_f(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], conv_f, 1, ranks)
        self.layer2 = self._make_layer(128, num_blocks[1], conv_f, 2, ranks)
        self.layer3 = self._make_layer(256, num_blocks[2], conv_f, 2, ranks)
        self.layer4 = self._make_layer(512, num_blocks[3], conv_f, 2, ranks)
        self.linear = lin_f(512, num_classes, rank=ranks[-1]) if factor else lin_f(512, num_classes)

    def _make_layer(self, planes, num_blocks, conv_f, stride, ranks):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            block = BasicBlockSuper(self.in_planes, planes, conv_f, ranks[self.offset :] if ranks else None, s)
            self.offset += block.rank_accumulator
            layers.append(block)
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def resnet18_dense(num_classes: int = 10) -> ResNetSuper:
    """``resnet_dense.ResNet18``."""
    return ResNetSuper([2, 2, 2, 2], nn.Conv2d, nn.Linear, num_classes=num_classes)


def resnet18_abcv2(ranks: list[int], num_classes: int = 10) -> ResNetSuper:
    """``resnet_abcv2.ResNet18(ranks_up)``."""
    return ResNetSuper([2, 2, 2, 2], Conv2dsp_v2, Linearsp_v2, ranks=ranks, num_classes=num_classes)


def factor_model_from_dense(dense: ResNetSuper) -> ResNetSuper:
    """The ``--abc_special`` start of ``train_proj_admm_quant.py``: same function as ``dense``, factor form."""
    ranks = get_ranks(dense)
    model = resnet18_abcv2(ranks, num_classes=dense.linear.out_features)
    set_weights(model, raw_weights(dense, ranks))
    model.load_state_dict(dense.state_dict(), strict=False)
    return model
