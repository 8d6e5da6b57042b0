"""bench.sparsity: the one enumeration of Conv2d/Linear weight layers, the sparsity report and the MAC count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.models import Normalize, NormalizedModel, create_model, unwrap
from bench.sparsity import count_flops, measure_sparsity, weight_layers

torch.set_num_threads(1)


def _tiny() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),  # weight 2*1*3*3 = 18, bias 2
        nn.BatchNorm2d(2),  # weight 2, bias 2 (excluded from sparsity)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),  # weight 96, bias 3
    )


def test_measure_sparsity_exact() -> None:
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model[0].weight[0].zero_()  # 9 of 18
        model[4].weight[:, :8].zero_()  # 24 of 96
        model[0].bias.zero_()  # biases never count towards sparsity, only towards non-zero parameters
    report = measure_sparsity(model)
    assert report.weight_params == 18 + 96
    assert report.zero_weights == 9 + 24
    assert report.sparsity == pytest.approx(33 / 114, abs=0)
    assert report.per_layer == {"0": (18, 9, 0.5), "4": (96, 24, 0.25)}
    assert report.total_params == 18 + 2 + 2 + 2 + 96 + 3
    assert report.nonzero_params == report.total_params - 9 - 24 - 2


def test_measure_sparsity_uses_architecture_names() -> None:
    model = create_model("small_cnn", num_classes=10, mean=[0.5], std=[0.2])
    report = measure_sparsity(model)
    assert list(report.per_layer) == [
        "features.0",
        "features.2",
        "features.5",
        "classifier.1",
        "classifier.3",
    ]
    assert report.total_params == 81_002


def test_count_flops_by_hand() -> None:
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    conv, linear = 18 * 4 * 4, 96
    assert count_flops(model, (1, 4, 4)) == {"dense_flops": conv + linear, "nonzero_flops": conv + linear}
    with torch.no_grad():
        model[0].weight[1].zero_()
    assert count_flops(model, (1, 4, 4)) == {
        "dense_flops": conv + linear,
        "nonzero_flops": conv // 2 + linear,
    }
    with torch.no_grad():
        model[4].weight[:, 16:].zero_()
    assert count_flops(model, (1, 1, 4, 4))["nonzero_flops"] == conv // 2 + linear // 2


def test_count_flops_grouped_strided_and_wrapped() -> None:
    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),  # depthwise: weight 4*1*3*3, output 4x4
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 8, 1),  # pointwise: weight 32, output 4x4
    )
    model = NormalizedModel(Normalize([0.5] * 4, [0.2] * 4), net)
    model.train()
    running_mean = net[1].running_mean.clone()
    flops = count_flops(model, (4, 8, 8))
    assert flops["dense_flops"] == 36 * 16 + 32 * 16
    assert model.training and torch.equal(net[1].running_mean, running_mean)
    # A caller's frozen BatchNorm stays frozen: each module gets its own flag back, not the model's.
    net[1].eval()
    count_flops(model, (4, 8, 8))
    assert [m.training for m in net] == [True, False, True] and model.training


def test_count_flops_resnet56_matches_literature() -> None:
    # Pruning papers quote 125.49M FLOPs (multiply-accumulates) for CIFAR ResNet-56.
    model = create_model("resnet56", num_classes=10, mean=[0.5] * 3, std=[0.2] * 3)
    assert count_flops(model, (3, 32, 32))["dense_flops"] == 125_485_696


def test_weight_layers_are_the_conv_and_linear_layers_in_order() -> None:
    model = create_model("resnet18", num_classes=10, mean=[0.5] * 3, std=[0.2] * 3)
    names = [name for name, _ in weight_layers(unwrap(model))]
    # 1 stem conv, 8 blocks of 2 convs, 3 projection shortcuts, the classifier; BatchNorm is never listed.
    assert len(names) == 1 + 16 + 3 + 1
    assert names[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"] and names[-1] == "linear"
    assert "layer2.0.shortcut.0" in names and not any("bn" in n for n in names)
    # Names are relative to the module passed in: the wrapper adds its net. prefix and nothing else.
    assert [name for name, _ in weight_layers(model)] == [f"net.{n}" for n in names]
    assert list(measure_sparsity(model).per_layer) == names


def test_pruning_methods_walk_the_same_layers() -> None:
    from methods.base import get_method
    from methods.common import prunable_layers

    net = unwrap(create_model("vgg16_bn_hydra", num_classes=10, mean=[0.5] * 3, std=[0.2] * 3))
    layers = weight_layers(net)
    assert prunable_layers(net) == layers
    assert prunable_layers(net, include_linear=False) == [(n, m) for n, m in layers if isinstance(m, nn.Conv2d)]
    assert get_method("hydra").pruned_layers(net) == [n for n, _ in layers]
