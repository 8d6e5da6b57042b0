"""bench evaluate --format: author checkpoints are converted on the way in and the plain model is stored."""

from __future__ import annotations

import argparse
import json
import math
import os
import sqlite3
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import bench.formats as formats_module
from bench.checkpoints import CheckpointMismatchError
from bench.cli import main
from bench.data import get_dataset_info
from bench.formats import (
    ENTRY_POINT_GROUP,
    FORMATS,
    CheckpointFormat,
    converted_provenance,
    load_converted,
    load_converted_model,
    native_normalization,
    register_format,
)
from bench.models import ARCHS, build_model
from methods.hydra import hydra_mask
from tests.paths import REPO_ROOT


def _hydra_subnet_file(tmp_path):
    torch.manual_seed(0)
    net = build_model("small_cnn", "digits").net
    sd = {}
    for key, value in net.state_dict().items():
        sd[key] = value
        if key.endswith("weight") and value.dim() > 1:
            sd[key.removesuffix("weight") + "popup_scores"] = torch.randn_like(value)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 20, "arch": "small_cnn", "state_dict": sd, "best_prec1": 51.2}, path)
    return path, sd


def test_every_format_is_listed():
    result = CliRunner().invoke(main, ["formats"])
    assert result.exit_code == 0
    for name in FORMATS.list():
        assert name in result.output


def test_hydra_subnet_through_the_cli(tmp_path):
    path, sd = _hydra_subnet_file(tmp_path)
    db = tmp_path / "r.db"
    args = [
        "evaluate",
        "--checkpoint",
        str(path),
        "--format",
        "hydra-subnet",
        "--arch",
        "small_cnn",
        "--dataset",
        "digits",
        "--n-samples",
        "6",
        "--version",
        "standard",
        "--fmn-steps",
        "5",
        "--workers",
        "1",
        "--db",
        f"sqlite:///{db}",
        "--no-progress",
    ]
    missing_k = CliRunner().invoke(main, args)
    assert missing_k.exit_code != 0 and "--k" in missing_k.output and "not stored" in missing_k.output
    ok = CliRunner().invoke(main, [*args, "--k", "0.1"])
    assert ok.exit_code == 0, ok.output
    con = sqlite3.connect(db)
    sparsity, provenance = con.execute("SELECT measured_sparsity, provenance FROM models").fetchone()
    con.close()
    # HYDRA's rule per layer: int((1 - k) * numel) removed, from |popup_scores|.
    expected_zero = sum(int(0.9 * v.numel()) for k, v in sd.items() if k.endswith("popup_scores"))
    total = sum(v.numel() for k, v in sd.items() if k.endswith("popup_scores"))
    assert sparsity == pytest.approx(expected_zero / total, abs=1e-6)
    assert '"native_format": "hydra-subnet"' in provenance
    # The input normalisation the model was built with is recorded (digits: the dataset's own constants).
    info = get_dataset_info("digits")
    recorded = json.loads(provenance)["normalization"]
    assert recorded == {"mean": list(info.mean), "std": list(info.std)}


def test_converted_weights_are_the_masked_weights(tmp_path):
    path, sd = _hydra_subnet_file(tmp_path)
    converted = load_converted(path, "hydra-subnet", k=0.1)
    for key, w in converted.items():
        if key.endswith("weight") and w.dim() > 1:
            mask = hydra_mask(sd[key.removesuffix("weight") + "popup_scores"], 0.1)
            assert torch.equal(w, sd[key] * mask)
    assert not any(key.endswith("popup_scores") for key in converted)


def test_k_with_a_format_that_has_no_k_is_refused(tmp_path):
    path, _ = _hydra_subnet_file(tmp_path)
    with pytest.raises(ValueError, match="only used with --format hydra-subnet"):
        load_converted(path, "admm", k=0.1)


# ------------------------------------------------------------------------------------------------------
# The methods' own VGG-16s (the APB hosts a checkpoint of each): native modules written here after the
# authors' code, saved the way the authors save them, converted, and compared logit for logit.

_VGG16_NATIVE_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_MAD_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # MAD's utils/mask_network_utils.py


def _softplus_inv_one() -> float:
    return math.log(math.e - 1.0)


class _MaskedConv(nn.Conv2d):
    """MAD's ``Conv2d_mask``: the effective weight is ``weight * softplus(mask_weight)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_weight = nn.Parameter(torch.full_like(self.weight, _softplus_inv_one()))
        self.mask_bias = None if self.bias is None else nn.Parameter(torch.full_like(self.bias, _softplus_inv_one()))

    def forward(self, x):
        bias = None if self.bias is None else self.bias * F.softplus(self.mask_bias)
        return F.conv2d(x, self.weight * F.softplus(self.mask_weight), bias, self.stride, self.padding)


class _MaskedLinear(nn.Linear):
    """MAD's ``Linear_mask``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_weight = nn.Parameter(torch.full_like(self.weight, _softplus_inv_one()))
        self.mask_bias = nn.Parameter(torch.full_like(self.bias, _softplus_inv_one()))

    def forward(self, x):
        return F.linear(x, self.weight * F.softplus(self.mask_weight), self.bias * F.softplus(self.mask_bias))


def _top_k_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """HYDRA's ``GetSubnet`` on ``|scores|``: the ``int((1 - k) * n)`` smallest are dropped (scores without ties)."""
    magnitude = scores.abs()
    removed = int((1 - k) * magnitude.numel())
    if removed == 0:
        return torch.ones_like(scores)
    return (magnitude > magnitude.flatten().kthvalue(removed).values).to(scores.dtype)


def _distinct_scores(weight: torch.Tensor) -> torch.Tensor:
    """Scores with distinct magnitudes, so the top-k set does not depend on how a sort breaks ties."""
    n = weight.numel()
    step = 1_000_003  # a prime: i -> i * step mod n is a permutation (cheaper than randperm on 2.4M entries)
    assert math.gcd(step, n) == 1
    index = torch.arange(n)
    signs = 1 - 2 * (index % 2)
    return ((index * step % n + 1) * signs).float().view_as(weight) / n


class _SubnetConv(nn.Conv2d):
    """HYDRA's ``SubnetConv``: ``popup_scores`` beside the weight, forward with the top-k mask of |scores|."""

    k: float

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.popup_scores = nn.Parameter(_distinct_scores(self.weight))

    def forward(self, x):
        w = self.weight * _top_k_mask(self.popup_scores, self.k)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _SubnetLinear(nn.Linear):
    """HYDRA's ``SubnetLinear`` (always with a bias)."""

    k: float

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.popup_scores = nn.Parameter(_distinct_scores(self.weight))

    def forward(self, x):
        return F.linear(x, self.weight * _top_k_mask(self.popup_scores, self.k), self.bias)


def _conv_bn_relu(cfg, conv) -> list[nn.Module]:
    layers, c_in = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [conv(c_in, v, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c_in = v
    return layers


class _NativeMadVGG(nn.Module):
    """MAD's ``models/vgg_mask.py`` VGG at depth 16: normalisation in forward, ``feature``, AvgPool2d(2)."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)  # plain attributes, not in the state dict
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.feature = nn.Sequential(*_conv_bn_relu(_VGG16_NATIVE_CFG, _MaskedConv))
        self.classifier = _MaskedLinear(512, 10)

    def forward(self, x, pop=False, inter=False):
        x = self.feature((x - self.mean) / self.std)
        return self.classifier(nn.AvgPool2d(2)(x).view(x.size(0), -1))


class _NativeHydraVGG(nn.Module):
    """HYDRA's ``models/vgg_cifar.py`` ``vgg16_bn(conv_layer, linear_layer)``."""

    def __init__(self, k: float):
        super().__init__()
        self.features = nn.Sequential(*_conv_bn_relu(_VGG16_NATIVE_CFG, _SubnetConv))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            _SubnetLinear(2048, 256), nn.ReLU(True), _SubnetLinear(256, 256), nn.ReLU(True), _SubnetLinear(256, 10)
        )
        for m in self.modules():
            if isinstance(m, (_SubnetConv, _SubnetLinear)):
                m.k = k  # HYDRA's set_prune_rate

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _pwoa_block(c_in, widths, pool):
    layers = []
    for c_out in widths:
        layers.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()))
        c_in = c_out
    return nn.Sequential(*layers, pool)


class _NativeApbPwoaVGG16(nn.Module):
    """The APB's ``models/pwoa.py`` ``VGG16``, returning ``(logits, hiddens)`` as PwoA's training code does."""

    def __init__(self):
        super().__init__()
        self.layer1 = _pwoa_block(3, [64, 64], nn.MaxPool2d(2, 2))
        self.layer2 = _pwoa_block(64, [128, 128], nn.MaxPool2d(2, 2))
        self.layer3 = _pwoa_block(128, [256, 256, 256], nn.MaxPool2d(2, 2))
        self.layer4 = _pwoa_block(256, [512, 512, 512], nn.MaxPool2d(2, 2))
        self.layer5 = _pwoa_block(512, [512, 512, 512], nn.AdaptiveAvgPool2d((2, 2)))
        self.layer6 = nn.Sequential(nn.Linear(2048, 256), nn.ReLU())
        self.layer7 = nn.Sequential(nn.Linear(256, 256), nn.ReLU())
        self.layer8 = nn.Linear(256, 10)

    def forward(self, x):
        hiddens = []
        for block in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = block(x)
            hiddens.append(x)
        out = self.layer5(x).view(x.size(0), -1)
        for fc in (self.layer6, self.layer7):
            out = fc(out)
            hiddens.append(out)
        return self.layer8(out), hiddens


def _perturb(model: nn.Module) -> nn.Module:
    """Exact zeros in about half of each weight, soft masks below 1, a He-initialised head, calibrated BN.

    With default initialisation and arbitrary running statistics a 13-conv stack's logits barely depend on its
    input (the last biases dominate) and matching them would prove little; running statistics from the model's
    own activations (then eval mode) and a head that passes the features on make every layer count.
    """
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mask_" in name:
                p.uniform_(math.log(math.expm1(1e-4)), _softplus_inv_one())
            elif name.endswith("weight") and p.dim() > 1:
                p.mul_(torch.rand_like(p) > 0.5)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                # He initialisation and small biases, so the head passes on (rather than drowns) the features.
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.mul_(torch.rand_like(m.weight) > 0.5)
                nn.init.uniform_(m.bias, -0.01, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: one batch sets the statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.train()(torch.rand(8, 3, 32, 32))
    return model.eval()


def _assert_native_logits(converted: torch.Tensor, native: torch.Tensor) -> None:
    torch.testing.assert_close(converted, native, atol=1e-5, rtol=0)
    # The two images get different logits: the comparison covers the whole network, not just a last bias.
    assert (native[0] - native[1]).abs().max() > 1e-3


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_mad_vgg16_t7_converts_to_vgg16_mad(tmp_path, images):
    torch.manual_seed(0)
    native = _perturb(_NativeMadVGG(*_MAD_CIFAR10))
    path = tmp_path / "True_el_cifar10_mad90_vgg16_best.t7"
    args = argparse.Namespace(dataset="cifar10", network="vgg", depth=16, percnt=0.9, pruning_mode="element")
    torch.save({"net": native.state_dict(), "acc": 81.2, "epoch": 41, "loss": torch.tensor(1.3), "args": args}, path)

    model = load_converted_model(path, "mad", "vgg16_mad", "cifar10")
    with torch.no_grad():
        _assert_native_logits(model(images), native(images))
    assert model.normalize.std.flatten().tolist() == pytest.approx(_MAD_CIFAR10[1])


def test_hydra_vgg16_bn_subnet_and_dense_files_convert_to_vgg16_bn_hydra(tmp_path, images):
    k, prefix = 0.05, "module."  # saved from a DataParallel model, as HYDRA's multi-GPU runs do
    torch.manual_seed(0)
    native = _perturb(_NativeHydraVGG(k))
    sd = {prefix + name: t for name, t in native.state_dict().items()}
    ckpt = {"epoch": 20, "arch": "vgg16_bn", "state_dict": sd, "best_prec1": 48.1, "optimizer": {"state": {}}}
    subnet_path = tmp_path / "model_best.pth.tar"
    torch.save(ckpt, subnet_path)
    # HYDRA's --save-dense: masked weights, scores dropped, the rest of the file as it was.
    dense = {n: t for n, t in sd.items() if not n.endswith("popup_scores")}
    for n, t in sd.items():
        if n.endswith("popup_scores"):
            weight = n.removesuffix("popup_scores") + "weight"
            dense[weight] = sd[weight] * _top_k_mask(t, k)
    dense_path = tmp_path / "model_best_dense.pth.tar"
    torch.save({**ckpt, "state_dict": dense}, dense_path)

    with torch.no_grad():
        expected = native(images)
        from_subnet = load_converted_model(subnet_path, "hydra-subnet", "vgg16_bn_hydra", "cifar10", k=k)
        _assert_native_logits(from_subnet(images), expected)
        from_dense = load_converted_model(dense_path, "hydra-dense", "vgg16_bn_hydra", "cifar10")
        _assert_native_logits(from_dense(images), expected)
    assert from_subnet.normalize.std.flatten().tolist() == [1.0, 1.0, 1.0]
    # HYDRA's 16 scored layers (13 convs, 3 linears), each weight masked by the top-k of its own scores.
    converted = from_subnet.net.state_dict()
    scored = [n.removeprefix(prefix).removesuffix("popup_scores") for n in sd if n.endswith("popup_scores")]
    assert len(scored) == 16
    for layer in scored:
        mask = _top_k_mask(sd[f"{prefix}{layer}popup_scores"], k)
        assert torch.equal(converted[f"{layer}weight"], sd[f"{prefix}{layer}weight"] * mask)


def test_apb_pwoa_vgg16_converts_to_vgg16_pwoa(tmp_path, images):
    torch.manual_seed(0)
    native = _perturb(_NativeApbPwoaVGG16())
    path = tmp_path / "PwoA_Jian2022Pruning_V16_CIFAR10_US_90.pt"
    torch.save(native.state_dict(), path)
    model = load_converted_model(path, "pwoa", "vgg16_pwoa", "cifar10")
    with torch.no_grad():
        _assert_native_logits(model(images), native(images)[0])


def test_atmc_resnet18_factor_file_converts_to_resnet18(tmp_path, images):
    # ATMC's --abc_special stage (cifar/train_proj_admm_quant.py): the dense ResNet-18 becomes resnet_abcv2's
    # Conv2dsp_v2/Linearsp_v2 model, training moves all factors, model_snapshot saves it
    # (tests/methods/atmc_upstream.py).
    from tests.methods import atmc_upstream as upstream

    torch.manual_seed(0)
    dense = upstream.resnet18_dense().eval()
    native = upstream.factor_model_from_dense(dense).eval()
    with torch.no_grad():
        torch.testing.assert_close(native(images), dense(images), atol=1e-5, rtol=0)
    layers = [m for m in native.modules() if isinstance(m, upstream.FACTOR_LAYERS)]
    # Both of the forward's cases occur: rank = in·k·k (stem 27 < 64, 1x1 shortcuts) and rank = out (the rest).
    fan_in = [m.weightA[0].numel() for m in layers]
    assert {m.rank == f for m, f in zip(layers, fan_in, strict=True)} == {True, False}
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in layers:
            for p in (m.weightA, m.weightB, m.weightC):
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) > 0.5))
    native = _perturb(native)
    path = tmp_path / "quant_closest_cifar10_pgd_4_atmc_0.005_8bit.pth"
    upstream.model_snapshot(native, path)

    model = load_converted_model(path, "atmc", "resnet18", "cifar10")
    with torch.no_grad():
        _assert_native_logits(model(images), native(images))
    assert model.normalize.std.flatten().tolist() == [1.0, 1.0, 1.0]


def test_a_format_names_its_architectures_when_the_arch_is_wrong(tmp_path):
    path = tmp_path / "mad.t7"
    first_conv = {"feature.0.weight": torch.ones(64, 3, 3, 3), "feature.0.mask_weight": torch.zeros(64, 3, 3, 3)}
    torch.save({"net": first_conv, "args": argparse.Namespace()}, path)
    with pytest.raises(CheckpointMismatchError, match="--format mad files fit --arch resnet18 or vgg16_mad"):
        load_converted_model(path, "mad", "vgg16_bn", "cifar10")


def test_every_format_lists_registered_architectures_and_normalisation():
    output = CliRunner().invoke(main, ["formats"]).output
    for name, fmt in FORMATS.items():
        assert all(arch in ARCHS for arch in fmt.archs), name
        line = next(line for line in output.splitlines() if line.split()[0] == name)
        assert all(arch in line for arch in fmt.archs)
    assert {"vgg16_bn_hydra", "vgg16_mad", "vgg16_pwoa"} <= {a for _, f in FORMATS.items() for a in f.archs}
    assert native_normalization("mad", "cifar10") == _MAD_CIFAR10
    assert native_normalization("hydra-dense", "cifar10") == ((0.0,) * 3, (1.0,) * 3)
    # Datasets the authors never used (the digits track) keep the dataset's own constants, as does plain.
    digits = get_dataset_info("digits")
    assert native_normalization("mad", "digits") == native_normalization("plain", "digits") == (digits.mean, digits.std)


def test_a_stored_converted_model_is_rebuilt_with_its_format_and_normalisation(tmp_path):
    from bench.store import Store
    from bench.store.registration import load_stored_model, register_model

    path, _ = _hydra_subnet_file(tmp_path)
    normalization = {"mean": [0.5], "std": [0.25]}  # not the dataset's: must come back from provenance
    model = load_converted_model(path, "hydra-subnet", "small_cnn", "digits", k=0.1, normalization=normalization)
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    row = register_model(
        store,
        path,
        model,
        arch="small_cnn",
        dataset="digits",
        provenance={"native_format": "hydra-subnet", "k": 0.1, "normalization": normalization},
    )
    rebuilt = load_stored_model(row)
    assert rebuilt.normalize.mean.flatten().tolist() == [0.5] and rebuilt.normalize.std.flatten().tolist() == [0.25]
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rebuilt.net(x), model.net(x), atol=1e-6)
    moved = tmp_path / "other.pth.tar"
    moved.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ValueError, match="changed since it was registered"):
        load_stored_model(row, moved)
    with pytest.raises(FileNotFoundError, match="pass its current path"):
        load_stored_model(row, tmp_path / "missing.pt")


def test_trades_wrn_sub_block1_is_dropped(tmp_path):
    # TRADES's WideResNet (HYDRA's WRN-28-4 releases) saves an unused sub_block1 next to block1..3.
    from bench.models import WideResNet

    torch.manual_seed(0)
    net = WideResNet(10, 1).eval()  # WRN-10-1: the same construction, small
    unused = {"sub_block1.layer.0.conv1.weight": torch.randn(16, 16, 3, 3)}
    sd = {**{f"module.{k}": v for k, v in net.state_dict().items()}, **{f"module.{k}": v for k, v in unused.items()}}
    path = tmp_path / "model_best_dense.pth.tar"
    torch.save({"epoch": 1, "state_dict": sd}, path)
    state = load_converted(path, "hydra-dense")
    assert not any(k.startswith("sub_block1.") for k in state) and "block1.layer.0.conv1.weight" in state
    ours = WideResNet(10, 1).eval()
    ours.load_state_dict(state)  # strict: nothing missing, nothing unexpected
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), net(x), atol=1e-6)


# ------------------------------------------------------------------------------ the core's registry, filled from above


def _fresh(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_core_imports_no_method_module(tmp_path):
    # Loading, training, attacking, evaluating and sharding need nothing from methods/ at import time.
    code = (
        "import sys\n"
        "import bench.store.registration, bench.formats, bench.track, bench.training, bench.evaluate, bench.executors\n"
        "print(sorted(m for m in sys.modules if m == 'methods' or m.startswith('methods.')))\n"
    )
    run = _fresh(code, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_authors_formats_are_declared_as_an_entry_point():
    declared = {ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert "methods.convert" in declared, "reinstall the package (pip install -e .) to declare its entry points"
    assert {"plain", "hydra-subnet", "hydra-dense", "admm", "mad", "pwoa", "atmc"} <= set(FORMATS.list())


def test_a_fresh_process_rebuilds_a_stored_author_checkpoint(tmp_path):
    # An evaluation task (bench.executors.run_shard) imports only the core, yet rebuilds HYDRA's own file.
    from bench.store import Store
    from bench.store.registration import register_model

    path, _ = _hydra_subnet_file(tmp_path)
    model = load_converted_model(path, "hydra-subnet", "small_cnn", "digits", k=0.1)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    provenance = converted_provenance("hydra-subnet", "digits", 0.1)
    row = register_model(Store(url), path, model, arch="small_cnn", dataset="digits", provenance=provenance)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from bench.store.registration import load_stored_model\n"
        "from bench.store import Model, Store\n"
        f"store = Store({url!r})\n"
        f"with store.session() as s:\n    row = s.get(Model, {row.id})\n"
        "assert 'methods.convert' not in sys.modules\n"
        "model = load_stored_model(row)\n"
        "assert 'methods.convert' in sys.modules  # loaded through the entry point\n"
        "with torch.no_grad():\n    torch.save(model(torch.load('x.pt')), 'logits.pt')\n"
    )
    run = _fresh(code, tmp_path)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(x))


def test_a_format_is_registered_once_and_a_broken_plugin_says_which(monkeypatch):
    with pytest.raises(ValueError, match="already registered"):
        register_format(CheckpointFormat("mad", "again", FORMATS.get("plain").load))
    with pytest.raises(KeyError, match="did you mean 'hydra-dense'"):
        FORMATS.get("hydra-dens")

    class Broken:
        name, value = "broken", "no_such_package.formats"

        def load(self):
            raise ModuleNotFoundError("No module named 'no_such_package'")

    monkeypatch.setattr(formats_module, "entry_points", lambda group: [Broken()])
    with pytest.raises(RuntimeError, match="'no_such_package.formats' .*could not be loaded.*reinstall"):
        formats_module._FormatRegistry().get("plain")
