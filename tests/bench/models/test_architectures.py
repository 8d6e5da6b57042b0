"""Generic invariants over every registered architecture (timm-style), plus published parameter counts."""

from __future__ import annotations

import pkgutil

import pytest
import torch
from torch import nn

from bench.models import (
    ARCHS,
    CifarResNet,
    Normalize,
    NormalizedModel,
    WideResNet,
    create_model,
    register_arch,
    unwrap,
)
from bench.registry import UnknownNameError

torch.set_num_threads(1)

# Parameter counts for num_classes=10 of the reference implementations (kuangliu/pytorch-cifar,
# akamaster/pytorch_resnet_cifar10, TRADES/RobustBench WideResNet without the unused sub_block1).
PUBLISHED_PARAMS = {
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "resnet56": 853_018,
    "vgg16_bn": 14_728_266,
    # Sometimes quoted as 5,848,026: that is 16*64 short, i.e. without block1's 1x1 convShortcut (16 -> 64
    # channels), which the TRADES code has. 36,479,194 for WRN-28-10 confirms the same construction.
    "wrn28_4": 5_849_050,
    "wrn28_10": 36_479_194,
    "wrn34_10": 46_160_474,
    "mobilenetv2": 2_296_922,
    # The methods' own VGG-16s, counted on the official modules (HYDRA models/vgg_cifar.py vgg16_bn with
    # nn.Conv2d/nn.Linear; MAD models/vgg_mask.py depth 16 without its mask parameters; the APB's
    # models/pwoa.py VGG16) and derived from the layer shapes in test_vgg16_variant_counts_by_hand.
    "vgg16_bn_hydra": 15_311_818,
    "vgg16_mad": 14_724_042,
    "vgg16_pwoa": 15_316_042,
}


def _model(name: str, num_classes: int = 10) -> NormalizedModel:
    channels = ARCHS.get(name).input_shape[0]
    return create_model(name, num_classes=num_classes, mean=[0.5] * channels, std=[0.25] * channels)


@pytest.fixture(scope="module")
def models() -> dict[str, NormalizedModel]:
    # Building wrn34_10 takes a while (46M parameters); build each architecture once per module.
    torch.manual_seed(0)
    return {name: _model(name).eval() for name in ARCHS.list()}


@pytest.mark.parametrize("name", ARCHS.list())
def test_forward_gives_finite_logits(name: str, models: dict[str, NormalizedModel]) -> None:
    x = torch.rand(2, *ARCHS.get(name).input_shape)
    with torch.no_grad():
        y = models[name](x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ARCHS.list())
def test_state_dict_holds_only_the_network(name: str, models: dict[str, NormalizedModel]) -> None:
    keys = list(models[name].state_dict())
    assert keys and all(k.startswith("net.") for k in keys)
    assert not any("normalize" in k or k.endswith((".mean", ".std")) for k in keys)
    assert unwrap(models[name]) is models[name].net


@pytest.mark.parametrize("name", ARCHS.list())
def test_registry_entry_is_described(name: str) -> None:
    info = ARCHS.get(name)
    assert info.name == name
    assert info.description and "\n" not in info.description
    assert len(info.input_shape) == 3


@pytest.mark.parametrize("name", ARCHS.list())
def test_hundred_classes(name: str) -> None:
    model = _model(name, num_classes=100).eval()
    with torch.no_grad():
        y = model(torch.rand(1, *ARCHS.get(name).input_shape))
    assert y.shape == (1, 100)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_reference(name: str, models: dict[str, NormalizedModel]) -> None:
    assert sum(p.numel() for p in models[name].parameters()) == PUBLISHED_PARAMS[name]


def test_reference_attribute_names(models: dict[str, NormalizedModel]) -> None:
    # Author checkpoints load unchanged only if these names match the reference code.
    keys = {name: set(m.net.state_dict()) for name, m in models.items()}
    assert {
        "conv1.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.1.bn2.running_mean",
        "linear.weight",
    } <= keys["resnet18"]
    assert "layer4.1.shortcut.0.weight" not in keys["resnet18"]
    assert {"layer3.8.conv2.weight", "linear.weight"} <= keys["resnet56"]
    assert not any("shortcut" in k for k in keys["resnet56"])  # option A has no parameters
    assert {"features.0.weight", "features.41.running_var", "classifier.weight"} <= keys["vgg16_bn"]
    assert {
        "block1.layer.0.convShortcut.weight",
        "block3.layer.4.conv2.weight",
        "bn1.weight",
        "fc.weight",
    } <= keys["wrn34_10"]
    assert {"layers.16.conv3.weight", "layers.1.shortcut.0.weight", "conv2.weight", "linear.weight"} <= keys[
        "mobilenetv2"
    ]
    assert {"features.0.weight", "features.41.running_var", "classifier.0.weight", "classifier.4.bias"} <= keys[
        "vgg16_bn_hydra"
    ]
    assert {"feature.0.weight", "feature.41.running_var", "classifier.weight", "classifier.bias"} <= keys["vgg16_mad"]
    assert not any(k.endswith(".bias") and k.startswith(("features.0.", "feature.0.")) for k in keys["vgg16_bn_hydra"])
    assert "feature.0.bias" not in keys["vgg16_mad"]
    assert {
        "layer1.0.0.bias",
        "layer1.0.1.running_mean",
        "layer5.2.0.weight",
        "layer6.0.weight",
        "layer7.0.bias",
        "layer8.weight",
    } <= keys["vgg16_pwoa"]


def test_vgg16_variant_counts_by_hand() -> None:
    # The 13 3x3 convolutions every VGG-16 here shares, as (in, out) channels.
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512)]
    convs += [(512, 512)] * 5
    conv_weights = sum(9 * c_in * c_out for c_in, c_out in convs)  # 14,710,464
    channels = sum(c_out for _, c_out in convs)  # 4,224: one conv bias, or one BN weight and bias, each
    batch_norm = 2 * channels
    linear_512 = 512 * 10 + 10
    head_2048 = (2048 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)  # 2x2x512 features, 256, 256, 10
    by_hand = {
        "vgg16_bn": conv_weights + channels + batch_norm + linear_512,  # convs with bias
        "vgg16_bn_hydra": conv_weights + batch_norm + head_2048,  # bias-free convs
        "vgg16_mad": conv_weights + batch_norm + linear_512,  # bias-free convs
        "vgg16_pwoa": conv_weights + channels + batch_norm + head_2048,  # convs with bias
    }
    assert by_hand == {name: PUBLISHED_PARAMS[name] for name in by_hand}


def test_vgg16_variants_share_the_convolutions(models: dict[str, NormalizedModel]) -> None:
    # Same 13 conv shapes in the same order: only biases, pooling after the 4th block and the head differ.
    def conv_shapes(name: str) -> list[tuple[int, ...]]:
        return [tuple(m.weight.shape) for m in models[name].modules() if isinstance(m, nn.Conv2d)]

    reference = conv_shapes("vgg16_bn")
    assert len(reference) == 13
    for name in ("vgg16_bn_hydra", "vgg16_mad", "vgg16_pwoa"):
        assert conv_shapes(name) == reference, name
    # HYDRA's and MAD's feature stacks drop only the last max-pool, so their convolutions keep our indices.
    ours = {k for k in models["vgg16_bn"].net.state_dict() if k.endswith(".weight")}
    hydra = {k for k in models["vgg16_bn_hydra"].net.state_dict() if k.startswith("features.")}
    mad = {"features." + k.removeprefix("feature.") for k in models["vgg16_mad"].net.state_dict() if "feature." in k}
    assert {k for k in hydra if k.endswith(".weight")} <= ours
    assert hydra == mad


def test_resnet56_is_56_layers(models: dict[str, NormalizedModel]) -> None:
    layers = [m for m in models["resnet56"].modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 56


def test_normalize_is_first_layer() -> None:
    model = create_model("small_cnn", num_classes=10, mean=[0.5], std=[0.25]).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model.net((x - 0.5) / 0.25))


def test_normalize_rejects_wrong_channel_count() -> None:
    norm = Normalize([0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="1 channels"):
        norm(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError):
        Normalize([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.1], [0.0])


def test_unknown_architecture_suggests() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        create_model("resnet81", num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)


def test_duplicate_registration_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_arch("resnet18", description="again")(lambda num_classes: nn.Linear(1, num_classes))


def test_every_family_module_is_imported_and_registers() -> None:
    # Registration happens on import, so a family module that bench/models/__init__.py forgot would register
    # nothing and its architectures would silently be unknown.
    import bench.models

    infrastructure = {"registry", "normalize"}
    families = {m.name for m in pkgutil.iter_modules(bench.models.__path__)} - infrastructure
    modules = {info.builder.__module__ for _, info in ARCHS.items()}
    registered_by = {m.removeprefix("bench.models.") for m in modules if m.startswith("bench.models.")}
    assert {"small_cnn", "resnet", "vgg", "wide_resnet", "mobilenet"} <= families
    assert registered_by == families


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        # Other published members of the same families pin the construction, not just the one size.
        (lambda: CifarResNet(3), 269_722),  # ResNet-20, akamaster README: 0.27M
        (lambda: CifarResNet(18), 1_727_962),  # ResNet-110: 1.7M
        (lambda: WideResNet(28, 10), 36_479_194),  # WRN-28-10
    ],
    ids=["resnet20", "resnet110", "wrn28_10"],
)
def test_family_parameter_counts(build, expected: int) -> None:
    assert sum(p.numel() for p in build().parameters()) == expected
