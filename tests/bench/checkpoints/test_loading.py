"""Checkpoint loading (weights-only, containers, prefixes, formats) and the efficiency figures."""

from __future__ import annotations

import collections
import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bench.checkpoints import (
    SUPPORTED_EXTENSIONS,
    CheckpointMismatchError,
    NotACheckpointError,
    UnsafeCheckpointError,
    drop_unused_keys,
    load_state_dict,
    load_weights,
    sha256_file,
)
from bench.models import Normalize, NormalizedModel, create_model, unwrap

torch.set_num_threads(1)


def _small(num_classes: int = 10, seed: int = 0) -> NormalizedModel:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=num_classes, mean=[0.3], std=[0.2]).eval()


@pytest.fixture
def trained() -> NormalizedModel:
    return _small(seed=1)


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def _author_keys(model: NormalizedModel) -> dict[str, torch.Tensor]:
    """The bare network's state dict, as an author's training script would save it."""
    return {k: v.clone() for k, v in unwrap(model).state_dict().items()}


def _save_plain(model: NormalizedModel, path: Path) -> None:
    torch.save(model.state_dict(), path)


def _save_container(model: NormalizedModel, path: Path) -> None:
    torch.save({"epoch": 7, "arch": "small_cnn", "best_prec1": 91.5, "state_dict": _author_keys(model)}, path)


def _save_data_parallel(model: NormalizedModel, path: Path) -> None:
    # kuangliu's ckpt.t7: {'net': DataParallel state dict, 'acc': ..., 'epoch': ...}
    state = {"module." + k: v for k, v in _author_keys(model).items()}
    torch.save({"net": state, "acc": 93.0, "epoch": 199}, path)


def _save_optimizer_container(model: NormalizedModel, path: Path) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model_state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)


def _save_safetensors(model: NormalizedModel, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in _author_keys(model).items()}, str(path))


@pytest.mark.parametrize(
    ("filename", "save"),
    [
        ("plain.pt", _save_plain),
        ("container.pth.tar", _save_container),
        ("ckpt.t7", _save_data_parallel),
        ("opt.pth", _save_optimizer_container),
        ("weights.safetensors", _save_safetensors),
    ],
)
def test_round_trip_gives_identical_logits(tmp_path: Path, trained, inputs, filename: str, save) -> None:
    path = tmp_path / filename
    save(trained, path)
    fresh = _small(seed=99)
    with torch.no_grad():
        assert not torch.equal(fresh(inputs), trained(inputs))
        load_weights(fresh, load_state_dict(path))
        assert torch.equal(fresh(inputs), trained(inputs))


def test_container_drops_non_tensors_and_strips_module_prefix(tmp_path: Path, trained) -> None:
    path = tmp_path / "ckpt.t7"
    _save_data_parallel(trained, path)
    state = load_state_dict(path)
    assert set(state) == set(_author_keys(trained))
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000  # spans several read chunks
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


class _Payload:
    """Unpickling this creates ``path``: stands in for arbitrary code in a malicious checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


class _Custom:
    """A harmless but non-tensor class, like an ``argparse.Namespace`` saved next to the weights."""


@pytest.mark.parametrize("kind", ["payload", "custom_in_ordered_dict"])
def test_pickled_objects_are_refused_without_running_them(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    if kind == "payload":
        torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _Payload(marker)}, path)
    else:
        torch.save({"state_dict": collections.OrderedDict(w=torch.ones(2), args=_Custom())}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights-only") as info:
        load_state_dict(path)
    message = str(info.value)
    assert "pickled Python objects beyond tensors" in message
    assert "torch.save(model.state_dict(), path)" in message and "safetensors" in message
    assert not marker.exists()
    assert isinstance(info.value, ValueError)


def test_payload_would_run_under_a_full_unpickle(tmp_path: Path) -> None:
    # The check above means something only if the payload really executes when fully unpickled.
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"extra": _Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict(tmp_path / "nope.pt")
    odd = tmp_path / "weights.ckpt"
    odd.write_bytes(b"")
    with pytest.raises(ValueError, match="supported extensions") as info:
        load_state_dict(odd)
    assert all(ext in str(info.value) for ext in SUPPORTED_EXTENSIONS)


def test_corrupt_file_is_not_called_unsafe(tmp_path: Path) -> None:
    # A torch.save zip cut short: recognised as a checkpoint by its first bytes, unreadable after them.
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.arange(1000.0)}, whole)
    path = tmp_path / "broken.pt"
    path.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(ValueError, match="could not read") as info:
        load_state_dict(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    # Bytes that are no checkpoint format at all are refused by their first bytes, not as a corrupt archive.
    path.write_bytes(bytes(range(100)))
    with pytest.raises(NotACheckpointError, match="is not a checkpoint") as info:
        load_state_dict(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "acc": 0.5}, path)
    with pytest.raises(ValueError, match="no tensors"):
        load_state_dict(path)


def test_missing_and_unexpected_keys_are_named(trained) -> None:
    state = _author_keys(trained)
    del state["classifier.3.bias"]
    state["features.0.popup_scores"] = torch.zeros(32, 1, 3, 3)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(_small(), state)
    message = str(info.value)
    assert "net.classifier.3.bias" in message and "net.features.0.popup_scores" in message
    assert "missing (1)" in message and "unexpected (1)" in message and "--format" in message
    assert info.value.missing == ["net.classifier.3.bias"]
    assert info.value.unexpected == ["net.features.0.popup_scores"]


def test_non_strict_tolerates_keys_but_not_shapes(trained) -> None:
    state = _author_keys(trained)
    del state["classifier.3.bias"]
    result = load_weights(_small(), state, strict=False)
    assert result.missing_keys == ["net.classifier.3.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"net.classifier.3.weight checkpoint \[100, 128\]"):
        load_weights(_small(), _author_keys(_small(num_classes=100)), strict=False)


def test_many_missing_keys_are_summarised() -> None:
    big = create_model("resnet56", num_classes=10, mean=[0.5] * 3, std=[0.2] * 3)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\): .*more\)"):
        load_weights(big, {"conv1.weight": big.net.conv1.weight.detach().clone()})


def test_old_checkpoint_without_num_batches_tracked_loads() -> None:
    def make() -> NormalizedModel:
        return NormalizedModel(Normalize([0.5], [0.2]), nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))

    source = make()
    state = {k: v for k, v in unwrap(source).state_dict().items() if not k.endswith("num_batches_tracked")}
    load_weights(make(), state)


def _trades_wrn_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A WRN-28-4 state dict as TRADES's class saves it: with the ``sub_block1`` its forward never calls."""
    torch.manual_seed(0)
    net = create_model("wrn28_4", num_classes=10, mean=[0.5] * 3, std=[0.25] * 3).net.eval()
    state = dict(net.state_dict())
    block1 = {k.removeprefix("block1."): v for k, v in state.items() if k.startswith("block1.")}
    state |= {f"sub_block1.{k}": torch.randn_like(v) if v.is_floating_point() else v for k, v in block1.items()}
    path = tmp_path / "trades_wrn.pt"
    torch.save(state, path)
    return path, net


def test_plain_and_converter_paths_drop_trades_sub_block1_alike(tmp_path: Path) -> None:
    from bench.checkpoints import load_checkpoint_model
    from bench.formats import load_converted_model

    path, net = _trades_wrn_file(tmp_path)
    plain = load_checkpoint_model(path, "wrn28_4", "cifar10")  # was refused: 'unexpected sub_block1.*'
    converted = load_converted_model(path, "hydra-dense", "wrn28_4", "cifar10")
    assert not any("sub_block1" in k for k in plain.state_dict())
    for key, value in converted.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(plain.net(x), net(x), atol=1e-6, rtol=0)


def test_only_the_unused_module_is_dropped() -> None:
    # A model that does have a sub_block1 gets its weights; any other unknown key is still refused.
    class WithSubBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sub_block1 = nn.Linear(2, 2)

    source = WithSubBlock()
    target = WithSubBlock()
    load_weights(target, source.state_dict())
    assert torch.equal(target.sub_block1.weight, source.sub_block1.weight)
    state = {**_author_keys(_small()), "sub_block1.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(_small(), state)
    assert info.value.unexpected == ["net.extra.weight"]
    assert drop_unused_keys({"sub_block1.w": torch.zeros(1), "net.sub_block1.w": torch.zeros(1)}) == {}


def test_legacy_format_loads_and_its_declared_sizes_are_checked(tmp_path: Path) -> None:
    sd = collections.OrderedDict(a=torch.arange(1000.0), b=torch.ones(10, dtype=torch.int64))
    path = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": sd, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    loaded = load_state_dict(path)  # the pre-1.6 format many released checkpoints use still loads
    assert torch.equal(loaded["a"], sd["a"]) and torch.equal(loaded["b"], sd["b"])
    # The same header with the raw storages cut off: it declares 4,080 bytes of tensors it does not hold,
    # which torch.load would allocate before noticing. Refused before torch.load runs.
    data = path.read_bytes()
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(data[: len(data) - 4000])
    with pytest.raises(UnsafeCheckpointError, match="declares 4,080 bytes of tensors"):
        load_state_dict(cut)


def test_compressed_zip_entries_are_refused(tmp_path: Path) -> None:
    # torch.save never compresses; a deflated entry can unpack to far more than the file's size (a memory bomb
    # under any size cap on downloads), and torch.load would inflate it.
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(100_000)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < plain.stat().st_size / 10
    assert torch.load(bomb, weights_only=True)["w"].numel() == 100_000  # torch itself would inflate it
    with pytest.raises(UnsafeCheckpointError, match="compressed entries"):
        load_state_dict(bomb)
    assert set(load_state_dict(plain)) == {"w"}
