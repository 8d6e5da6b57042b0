"""Tests for bench.data: the digits split, CIFAR read from tiny archives in the real format, downloads."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data
from bench.data import digits as digits_data
from bench.registry import UnknownNameError

# --------------------------------------------------------------------------------------------------------
# Writing CIFAR archives the way the originals were written.


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler that writes what Python 2 ``cPickle`` wrote for the CIFAR batches.

    Python 3 pickles ``bytes`` under protocol 2 as ``_codecs.encode(...)`` calls and numpy 2 names its module
    ``numpy._core``; the original files instead hold Python 2 ``str`` objects (``SHORT_BINSTRING`` /
    ``BINSTRING``), also for numpy's own dtype and buffer arguments, and ``numpy.core.multiarray``. Writing
    the same opcodes checks the reader against the real format rather than a Python 3 look-alike.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar10_batch(images: np.ndarray, labels: list[int], label: str) -> dict:
    return {
        b"batch_label": label.encode(),
        b"labels": labels,
        b"data": images,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def cifar100_batch(images: np.ndarray, fine: list[int], coarse: list[int], label: str) -> dict:
    return {
        b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
        b"batch_label": label.encode(),
        b"fine_labels": fine,
        b"coarse_labels": coarse,
        b"data": images,
    }


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        # filter= exists from Python 3.10.12 / 3.11.4 on; the archive is our own, so older ones may skip it.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, **kwargs)


def rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_tiny(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """A cifar-10-python.tar.gz with batches of 2, 3, 1, 2, 2 train and 4 test images."""
    rng = np.random.default_rng(10)
    sizes = [2, 3, 1, 2, 2]
    train = [(rows(rng, n), rng.integers(0, 10, n).tolist()) for n in sizes]
    test = (rows(rng, 4), [3, 0, 9, 7])
    members = {"cifar-10-batches-py/batches.meta": py2_pickle({b"label_names": [b"airplane"] * 10})}
    for i, (x, y) in enumerate(train, start=1):
        batch = cifar10_batch(x, y, f"training batch {i} of 5")
        members[f"cifar-10-batches-py/data_batch_{i}"] = py2_pickle(batch)
    members["cifar-10-batches-py/test_batch"] = py2_pickle(cifar10_batch(*test, "testing batch 1 of 1"))
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    root = tmp_path / "data"
    root.mkdir()
    archive = write_tar_gz(root / "cifar-10-python.tar.gz", members)
    trust(monkeypatch, "cifar10", archive, (10, 4))
    expected = {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": (test[0], np.array(test[1])),
    }
    return archive, expected


@pytest.fixture
def cifar100_tiny(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    rng = np.random.default_rng(100)
    train = (rows(rng, 5), [99, 0, 42, 7, 13], [19, 0, 4, 1, 2])
    test = (rows(rng, 3), [55, 1, 98], [3, 3, 3])
    members = {
        "cifar-100-python/meta": py2_pickle({b"fine_label_names": [b"x"] * 100}),
        "cifar-100-python/test": py2_pickle(cifar100_batch(*test, "testing batch 1 of 1")),
        "cifar-100-python/train": py2_pickle(cifar100_batch(*train, "training batch 1 of 1")),
    }
    root = tmp_path / "data"
    root.mkdir()
    archive = write_tar_gz(root / "cifar-100-python.tar.gz", members)
    trust(monkeypatch, "cifar100", archive, (5, 3))
    expected = {"train": (train[0], np.array(train[1])), "test": (test[0], np.array(test[1]))}
    return archive, expected


@pytest.fixture(autouse=True)
def _fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def trust(monkeypatch, key: str, source: Path, sizes: tuple[int, int]) -> None:
    """Make the registered spec describe this tiny archive (or extracted folder): its md5s and split sizes.

    The tiny files are in the real format but are not the published ones, so without this every load would
    (rightly) stop at the checksum; with it, a test exercises the reader's other checks. The checksum and size
    checks themselves are tested below against the real specs.
    """
    spec = data.CIFAR_ARCHIVES[key]
    if source.is_file():
        with tarfile.open(source) as tar:
            members = {Path(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}
        archive_md5 = md5_of(source)
    else:
        folder = source / spec.folder if (source / spec.folder).is_dir() else source
        members = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
        archive_md5 = spec.md5
    member_md5 = tuple((name, hashlib.md5(raw).hexdigest()) for name, raw in sorted(members.items()))
    described = dataclasses.replace(spec, md5=archive_md5, member_md5=member_md5, split_sizes=sizes)
    monkeypatch.setitem(data.CIFAR_ARCHIVES, key, described)


# --------------------------------------------------------------------------------------------------------
# Registry and DatasetInfo


def test_registered_datasets():
    assert data.DATASETS.list() == ["cifar10", "cifar100", "digits"]
    cifar = data.get_dataset_info("cifar10")
    assert cifar.input_shape == (3, 32, 32) and cifar.num_classes == 10
    assert cifar.default_eps == "8/255" and cifar.default_eps_value == pytest.approx(8 / 255)
    assert cifar.default_n == 10000
    assert data.get_dataset_info("cifar100").num_classes == 100
    digits = data.get_dataset_info("digits")
    assert digits.default_n is None and len(digits.mean) == len(digits.std) == 1


def test_unknown_dataset_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'cifar10'"):
        data.load_split("cifar01", "test")


def test_unknown_split():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        data.load_split("digits", "val")


# --------------------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_ranges_and_sizes():
    x_train, y_train = data.load_split("digits", "train")
    x_test, y_test = data.load_split("digits", "test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    for x in (x_train, x_test):
        assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
        # /16 of integer intensities: every value is an exact multiple of 1/16.
        assert torch.equal(x * 16, torch.round(x * 16))
    assert set(y_test.tolist()) == set(range(10))


def test_digits_split_is_a_stratified_partition():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_train, y_train = data.load_split("digits", "train")
    x_test, y_test = data.load_split("digits", "test")
    # Together the splits are exactly the 1797 images, each once.
    ours = np.concatenate([x_train.reshape(-1, 64).numpy(), x_test.reshape(-1, 64).numpy()]) * 16
    pairs = sorted(map(tuple, np.column_stack([ours, np.concatenate([y_train, y_test])]).tolist()))
    original = sorted(map(tuple, np.column_stack([digits.data, digits.target]).tolist()))
    assert pairs == original
    # Stratified: each class's share of the test split matches its share of the whole within one image.
    whole = np.bincount(digits.target, minlength=10) / len(digits.target)
    counts = np.bincount(y_test.numpy(), minlength=10)
    assert np.all(np.abs(counts - whole * 360) <= 1)


def test_digits_order_is_train_test_split_order():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    _, test_images, _, test_labels = train_test_split(
        digits.images, digits.target, test_size=360, random_state=0, stratify=digits.target
    )
    x_test, y_test = data.load_split("digits", "test")
    assert torch.equal(x_test[:, 0] * 16, torch.tensor(test_images, dtype=torch.float32))
    assert torch.equal(y_test, torch.tensor(test_labels))
    # The labels of sample_id 0..9, pinned: a reordered split must show up here, not only in the fingerprint.
    assert y_test[:10].tolist() == [7, 6, 3, 7, 7, 3, 2, 8, 9, 3]


def test_digits_deterministic_cached_and_fresh(monkeypatch):
    first = data.load_split("digits", "test")
    import sklearn.datasets

    def fail():
        raise AssertionError("load_digits called again: the cache did not work")

    monkeypatch.setattr(sklearn.datasets, "load_digits", fail)
    second = data.load_split("digits", "test", data_dir="/nonexistent", download=False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Callers get their own tensors: modifying one load must not leak into the next.
    second[0].zero_()
    second[1].fill_(-1)
    third = data.load_split("digits", "test")
    assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])


def test_digits_mean_std_constants_match_train_split():
    x_train, _ = data.load_split("digits", "train")
    info = data.get_dataset_info("digits")
    assert info.mean[0] == pytest.approx(x_train.mean().item(), abs=1e-4)
    assert info.std[0] == pytest.approx(x_train.std(unbiased=False).item(), abs=1e-4)


def test_digits_split_change_fails_loudly(monkeypatch):
    monkeypatch.setattr(digits_data, "_DIGITS_TEST_INDEX_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="different digits test split"):
        data.load_split("digits", "test")


# --------------------------------------------------------------------------------------------------------
# CIFAR from archives in the real format


def check_cifar(x: torch.Tensor, y: torch.Tensor, expected_rows: np.ndarray, expected_labels: np.ndarray):
    n = len(expected_labels)
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == expected_labels.tolist()
    # One pixel per channel, by the format's definition: a row is the R plane, then G, then B, each 32x32
    # row-major. Pixel (h, w) = (5, 7) of the last image.
    row = expected_rows[-1]
    for channel in range(3):
        assert x[-1, channel, 5, 7].item() == pytest.approx(row[channel * 1024 + 5 * 32 + 7] / 255)
    assert torch.equal(x, torch.from_numpy(expected_rows.reshape(n, 3, 32, 32)).float() / 255)
    assert x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_from_archive(cifar10_tiny, split):
    archive, expected = cifar10_tiny
    x, y = data.load_split("cifar10", split, data_dir=archive.parent, download=False)
    check_cifar(x, y, *expected[split])


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_from_archive_uses_fine_labels(cifar100_tiny, split):
    archive, expected = cifar100_tiny
    x, y = data.load_split("cifar100", split, data_dir=archive.parent, download=False)
    check_cifar(x, y, *expected[split])


def test_cifar_from_extracted_folder(cifar10_tiny, tmp_path):
    archive, expected = cifar10_tiny
    extracted = tmp_path / "extracted"
    extract(archive, extracted)
    for data_dir in (extracted, extracted / "cifar-10-batches-py"):
        x, y = data.load_split("cifar10", "train", data_dir=data_dir, download=False)
        check_cifar(x, y, *expected["train"])


def test_cifar_data_dir_from_environment(cifar10_tiny, monkeypatch):
    archive, expected = cifar10_tiny
    monkeypatch.setenv("BENCH_DATA_DIR", str(archive.parent))
    x, y = data.load_split("cifar10", "test", download=False)
    check_cifar(x, y, *expected["test"])


def test_cifar_cache_sees_a_rewritten_batch_file(cifar10_tiny, tmp_path, monkeypatch):
    archive, expected = cifar10_tiny
    extract(archive, tmp_path / "x")
    folder = tmp_path / "x" / "cifar-10-batches-py"
    assert data.load_split("cifar10", "test", data_dir=folder)[1].tolist() == expected["test"][1].tolist()
    batch = py2_pickle(cifar10_batch(rows(np.random.default_rng(1), 1), [5], "testing batch 1 of 1"))
    (folder / "test_batch").write_bytes(batch)
    # The rewritten file is checked again (its md5 no longer matches), not served from the cache.
    with pytest.raises(data.DatasetChecksumError, match="test_batch"):
        data.load_split("cifar10", "test", data_dir=folder)
    trust(monkeypatch, "cifar10", folder, (10, 1))
    assert data.load_split("cifar10", "test", data_dir=folder)[1].tolist() == [5]


def test_cifar_repeated_loads_are_independent(cifar10_tiny):
    archive, expected = cifar10_tiny
    x1, y1 = data.load_split("cifar10", "test", data_dir=archive.parent)
    x1.fill_(0.5)
    y1.fill_(0)
    x2, y2 = data.load_split("cifar10", "test", data_dir=archive.parent)
    check_cifar(x2, y2, *expected["test"])


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as raised:
        data.load_split("cifar10", "test", data_dir=tmp_path, download=False)
    message = str(raised.value)
    assert "cifar-10-python.tar.gz" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "c58f30108f718f92721af3b95e74349a" in message
    assert str(tmp_path) in message
    assert isinstance(raised.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_cifar_corrupt_archive_is_reported(cifar100_tiny, damage, monkeypatch):
    archive, _ = cifar100_tiny
    whole = archive.read_bytes()
    archive.write_bytes(b"\x1f\x8b\x08 not really gzip" if damage == "garbage" else whole[: len(whole) // 2])
    with pytest.raises(data.DatasetChecksumError, match="cifar-100-python.tar.gz"):
        data.load_split("cifar100", "train", data_dir=archive.parent, download=False)
    # Even with a checksum that matches it, the reader names the file it cannot read.
    monkeypatch.setitem(
        data.CIFAR_ARCHIVES, "cifar100", dataclasses.replace(data.CIFAR_ARCHIVES["cifar100"], md5=md5_of(archive))
    )
    with pytest.raises(data.DatasetFormatError, match="cifar-100-python.tar.gz"):
        data.load_split("cifar100", "train", data_dir=archive.parent, download=False)


def test_cifar_archive_missing_a_batch(tmp_path, monkeypatch):
    batch = py2_pickle(cifar10_batch(rows(np.random.default_rng(0), 1), [1], "testing batch 1 of 1"))
    trust(
        monkeypatch,
        "cifar10",
        write_tar_gz(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": batch}),
        (1, 1),
    )
    assert data.load_split("cifar10", "test", data_dir=tmp_path)[1].tolist() == [1]
    with pytest.raises(data.DatasetFormatError, match="data_batch_1"):
        data.load_split("cifar10", "train", data_dir=tmp_path, download=False)


def test_cifar_label_out_of_range(tmp_path, monkeypatch):
    batch = py2_pickle(cifar10_batch(rows(np.random.default_rng(0), 2), [1, 10], "testing batch 1 of 1"))
    trust(
        monkeypatch,
        "cifar10",
        write_tar_gz(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": batch}),
        (0, 2),
    )
    with pytest.raises(data.DatasetFormatError, match="labels outside"):
        data.load_split("cifar10", "test", data_dir=tmp_path)


def test_python3_written_pickle_is_not_the_cifar_format(tmp_path, monkeypatch):
    # A Python 3 protocol-2 pickle of bytes needs _codecs.encode, which the real files never reference.
    batch = pickle.dumps(cifar10_batch(rows(np.random.default_rng(0), 1), [1], "b"), protocol=2)
    assert b"_codecs" in batch
    trust(
        monkeypatch,
        "cifar10",
        write_tar_gz(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": batch}),
        (0, 1),
    )
    with pytest.raises(data.UnsafePickleError, match="_codecs.encode"):
        data.load_split("cifar10", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------------
# Malicious pickles are refused without running anything


class _RunsOnLoad:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_payloads(marker: Path) -> dict[str, bytes]:
    return {
        "os.system": pickle.dumps({b"data": _RunsOnLoad(os.system, f"touch {marker}")}, protocol=2),
        "builtins.open": pickle.dumps(_RunsOnLoad(open, str(marker), "w"), protocol=2),
        "numpy.save": py2_pickle(_RunsOnLoad(np.save, str(marker), np.zeros(1))),
        "builtins.exec": pickle.dumps(_RunsOnLoad(exec, f"open({str(marker)!r}, 'w')"), protocol=0),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "numpy.save", "builtins.exec"])
@pytest.mark.parametrize("layout", ["archive", "extracted"])
def test_malicious_pickle_is_refused(tmp_path, kind, layout, monkeypatch):
    marker = tmp_path / "pwned.npy"  # np.save would append .npy to any other name
    payload = _evil_payloads(marker)[kind]
    root = tmp_path / "data"
    if layout == "archive":
        root.mkdir()
        write_tar_gz(root / "cifar-10-python.tar.gz", {"cifar-10-batches-py/test_batch": payload})
    else:
        (root / "cifar-10-batches-py").mkdir(parents=True)
        (root / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    # Matching checksums, so the unpickler's own refusal is what stops it.
    trust(monkeypatch, "cifar10", root / "cifar-10-python.tar.gz" if layout == "archive" else root, (0, 1))
    with pytest.raises(data.UnsafePickleError, match="refusing to load global") as raised:
        data.load_split("cifar10", "test", data_dir=root, download=False)
    assert "test_batch" in str(raised.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------
# Downloads from a local HTTP server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


@pytest.fixture
def http_root(tmp_path):
    """Serve ``tmp_path / 'served'`` on 127.0.0.1; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve_archive(archive: Path, served: Path) -> str:
    (served / archive.name).write_bytes(archive.read_bytes())
    return md5_of(archive)


def test_download_from_local_server(cifar10_tiny, http_root, tmp_path, monkeypatch):
    archive, expected = cifar10_tiny
    served, base = http_root
    md5 = serve_archive(archive, served)
    spec = dataclasses.replace(data.CIFAR_ARCHIVES["cifar10"], url=f"{base}/{archive.name}", md5=md5)
    monkeypatch.setitem(data.CIFAR_ARCHIVES, "cifar10", spec)
    dest = tmp_path / "fresh" / "nested"
    x, y = data.load_split("cifar10", "train", data_dir=dest)
    check_cifar(x, y, *expected["train"])
    assert [p.name for p in dest.iterdir()] == ["cifar-10-python.tar.gz"]
    assert md5_of(dest / "cifar-10-python.tar.gz") == md5
    # Present now: the next load reads it without the server.
    (served / archive.name).unlink()
    data.clear_cache()
    x, y = data.load_split("cifar10", "test", data_dir=dest)
    check_cifar(x, y, *expected["test"])


def test_download_wrong_md5_keeps_nothing(cifar100_tiny, http_root, tmp_path, monkeypatch):
    archive, _ = cifar100_tiny
    served, base = http_root
    got = serve_archive(archive, served)
    wrong = "0123456789abcdef0123456789abcdef"
    spec = dataclasses.replace(data.CIFAR_ARCHIVES["cifar100"], url=f"{base}/{archive.name}", md5=wrong)
    monkeypatch.setitem(data.CIFAR_ARCHIVES, "cifar100", spec)
    dest = tmp_path / "dest"
    with pytest.raises(data.DatasetChecksumError) as raised:
        data.load_split("cifar100", "test", data_dir=dest)
    assert wrong in str(raised.value) and got in str(raised.value)
    assert list(dest.iterdir()) == []


def test_download_http_error_is_not_found(http_root, tmp_path, monkeypatch):
    _, base = http_root
    url = f"{base}/cifar-10-python.tar.gz"  # nothing served: 404
    monkeypatch.setitem(data.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(data.CIFAR_ARCHIVES["cifar10"], url=url))
    dest = tmp_path / "dest"
    with pytest.raises(data.DatasetNotFoundError) as raised:
        data.load_split("cifar10", "test", data_dir=dest)
    message = str(raised.value)
    assert "downloading it failed" in message and "404" in message and "--data-dir" in message
    assert url in message and "cifar-10-python.tar.gz" in message
    assert list(dest.iterdir()) == []


def test_download_network_failure_is_not_found(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"
    spec = dataclasses.replace(data.CIFAR_ARCHIVES["cifar100"], url=url)
    monkeypatch.setitem(data.CIFAR_ARCHIVES, "cifar100", spec)
    with pytest.raises(data.DatasetNotFoundError, match="cifar-100-python.tar.gz") as raised:
        data.load_split("cifar100", "train", data_dir=tmp_path / "dest")
    assert url in str(raised.value)
    assert list((tmp_path / "dest").iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# parse_eps


@pytest.mark.parametrize(
    ("text", "value"),
    [("8/255", 8 / 255), ("0.031", 0.031), ("0.5", 0.5), (" 4 / 255 ", 4 / 255), ("1e-2", 0.01), ("2", 2.0)],
)
def test_parse_eps_valid(text, value):
    assert data.parse_eps(text) == value


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "positive number or fraction"),
        ("abc", "positive number or fraction"),
        ("8/255/2", "positive number or fraction"),
        ("8/", "positive number or fraction"),
        ("/255", "positive number or fraction"),
        ("8/0", "division by zero"),
        ("0", "> 0"),
        ("-0.1", "> 0"),
        ("-8/255", "> 0"),
        ("nan", "finite"),
        ("inf", "finite"),
        (0.1, "string"),
    ],
)
def test_parse_eps_invalid(text, why):
    with pytest.raises(ValueError, match="invalid eps") as raised:
        data.parse_eps(text)
    assert why in str(raised.value)


# --------------------------------------------------------------------------------------------------------
# Archives found on disk are checked like downloads: checksum, then the split's size


def _fake_cifar10(root: Path, n_test: int = 100) -> Path:
    """A cifar-10-python.tar.gz in the real format holding ``n_test`` random test images (and one per batch)."""
    rng = np.random.default_rng(7)
    members = {
        f"cifar-10-batches-py/data_batch_{i}": py2_pickle(cifar10_batch(rows(rng, 1), [0], f"batch {i}"))
        for i in range(1, 6)
    }
    labels = rng.integers(0, 10, n_test).tolist()
    members["cifar-10-batches-py/test_batch"] = py2_pickle(cifar10_batch(rows(rng, n_test), labels, "test"))
    root.mkdir(parents=True, exist_ok=True)
    return write_tar_gz(root / "cifar-10-python.tar.gz", members)


def test_a_look_alike_archive_on_disk_is_refused_by_checksum(tmp_path):
    archive = _fake_cifar10(tmp_path / "data")
    with pytest.raises(data.DatasetChecksumError) as raised:
        data.load_split("cifar10", "test", data_dir=archive.parent, download=False)
    message = str(raised.value)
    assert "\n" not in message
    assert str(archive) in message and "c58f30108f718f92721af3b95e74349a" in message and md5_of(archive) in message
    assert "Delete it" in message and data.CIFAR_ARCHIVES["cifar10"].url in message


def test_an_extracted_folder_is_checked_batch_by_batch(tmp_path):
    archive = _fake_cifar10(tmp_path / "data")
    extract(archive, tmp_path / "x")
    with pytest.raises(data.DatasetChecksumError, match="test_batch has md5") as raised:
        data.load_split("cifar10", "test", data_dir=tmp_path / "x", download=False)
    assert "40351d587109b95175f43aff81a1287e" in str(raised.value)


def test_an_archive_with_the_wrong_number_of_images_is_refused(tmp_path, monkeypatch):
    # Checksums that match (as a tampered spec or a hash collision would give): the split's size still must.
    archive = _fake_cifar10(tmp_path / "data")
    trust(monkeypatch, "cifar10", archive, data.CIFAR_ARCHIVES["cifar10"].split_sizes)
    with pytest.raises(data.DatasetFormatError, match="the test split has 100 images, but CIFAR-10's has 10000"):
        data.load_split("cifar10", "test", data_dir=archive.parent, download=False)


def test_the_real_specs_list_every_batch_and_both_split_sizes():
    for spec in data.CIFAR_ARCHIVES.values():
        assert {name for name, _ in spec.member_md5} == set(spec.train_members + spec.test_members)
        assert all(len(md5) == 32 for _, md5 in spec.member_md5)
        assert spec.split_sizes == (50000, 10000)


# --------------------------------------------------------------------------------------------------------
# Downloads have a deadline and a minimum rate


class _DripHandler(http.server.BaseHTTPRequestHandler):
    """Announces a large file, then sends one byte every 0.2 s."""

    def do_GET(self):  # noqa: N802 - the base class's name
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            for _ in range(200):
                self.wfile.write(b"x")
                self.wfile.flush()
                threading.Event().wait(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.fixture
def drip_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DripHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
    finally:
        server.shutdown()
        server.server_close()


def test_a_dripping_download_is_stopped_by_the_minimum_rate(drip_url, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("BENCH_DOWNLOAD_GRACE_S", "1")
    monkeypatch.setenv("BENCH_DOWNLOAD_MIN_RATE", "1024")
    monkeypatch.setitem(
        data.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(data.CIFAR_ARCHIVES["cifar10"], url=drip_url)
    )
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as raised:
        data.load_split("cifar10", "test", data_dir=tmp_path / "dest")
    assert time.monotonic() - start < 10
    message = str(raised.value)
    assert "too slow" in message and drip_url in message and "BENCH_DOWNLOAD_MIN_RATE" in message
    assert "\n" not in message
    assert list((tmp_path / "dest").iterdir()) == []  # no partial file left behind


def test_a_download_past_its_deadline_is_stopped(drip_url, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DOWNLOAD_DEADLINE_S", "1.5")
    monkeypatch.setitem(
        data.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(data.CIFAR_ARCHIVES["cifar10"], url=drip_url)
    )
    with pytest.raises(data.DatasetNotFoundError, match="deadline"):
        data.load_split("cifar10", "test", data_dir=tmp_path / "dest")
