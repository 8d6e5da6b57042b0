"""CIFAR-10 / CIFAR-100, python version, read from the official archives with a restricted unpickler.

The archives are the ones published at https://www.cs.toronto.edu/~kriz/cifar.html. They are read straight from
the ``.tar.gz`` (or from an already-extracted folder) with a restricted unpickler, because the batches are Python
pickles and a tampered archive must not be able to run code. A file found on disk is checked against the
published md5 like a download.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from bench.data.registry import (
    DatasetChecksumError,
    DatasetFormatError,
    DatasetInfo,
    DatasetNotFoundError,
    Loader,
    register_dataset,
)
from bench.download import DownloadTooSlowError, TransferGuard
from bench.paths import ENV_DATA_DIR

log = logging.getLogger(__name__)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global that the CIFAR format never needs; it was refused before any call."""


@dataclass(frozen=True)
class CifarArchive:
    """Where a CIFAR archive comes from and what it contains.

    Attributes:
        title: human name for messages.
        filename: archive file name inside the data folder.
        url: canonical download URL.
        md5: published md5 of the archive.
        folder: top-level folder inside the archive (and of an extracted copy).
        train_members: batch file names of the train split, in canonical order.
        test_members: batch file names of the test split, in canonical order.
        label_key: pickle key holding the labels (CIFAR-100 uses its 100 fine labels).
        num_classes: label range, checked on load.
        member_md5: published md5 of each batch file (an extracted folder is checked against them).
        split_sizes: images in the train and the test split, checked on load.
    """

    title: str
    filename: str
    url: str
    md5: str
    folder: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    label_key: bytes
    num_classes: int
    member_md5: tuple[tuple[str, str], ...]
    split_sizes: tuple[int, int]

    def members(self, split: str) -> tuple[str, ...]:
        return self.train_members if split == "train" else self.test_members

    def split_size(self, split: str) -> int:
        return self.split_sizes[0] if split == "train" else self.split_sizes[1]


CIFAR_ARCHIVES: dict[str, CifarArchive] = {
    "cifar10": CifarArchive(
        title="CIFAR-10",
        filename="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        # The batch files' md5s as torchvision's CIFAR10 lists them.
        member_md5=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ("test_batch", "40351d587109b95175f43aff81a1287e"),
        ),
        split_sizes=(50000, 10000),
    ),
    "cifar100": CifarArchive(
        title="CIFAR-100",
        filename="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_members=("train",),
        test_members=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        member_md5=(("train", "16019d7e3df5f24257cddd939b257f8d"), ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")),
        split_sizes=(50000, 10000),
    ),
}

_CIFAR_PIXELS = 3 * 32 * 32
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


def _numpy_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs.

    The batches were written by Python 2 ``cPickle`` (protocol 2): a dict of ``str`` keys, Python lists and
    ints, and numpy arrays. The arrays reduce to ``numpy.core.multiarray._reconstruct(numpy.ndarray, ...)``
    with a ``numpy.dtype``; nothing else is ever looked up. Any other global (``os.system``,
    ``builtins.eval``, ...) is refused before it could be called. Read with ``encoding="bytes"``, Python 2
    strings stay bytes, hence the ``b"data"`` keys.
    """

    def find_class(self, module: str, name: str) -> Any:
        multiarray = _numpy_multiarray()
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a CIFAR batch only contains numpy arrays, "
                "lists, ints and strings"
            ) from None


def _unpickle_batch(stream: BinaryIO, where: str, spec: CifarArchive) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(stream, encoding="bytes").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{where}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DatasetFormatError(f"cannot read {where} as a CIFAR batch pickle: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or spec.label_key not in batch:
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFormatError(f"{where}: expected a dict with keys b'data' and {spec.label_key!r}, got {keys}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetFormatError(f"{where}: b'data' must be a 2-D uint8 array")
    if data.shape[1] != _CIFAR_PIXELS:
        raise DatasetFormatError(f"{where}: rows of b'data' must have {_CIFAR_PIXELS} bytes, got {data.shape[1]}")
    try:
        labels = np.asarray(batch[spec.label_key], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DatasetFormatError(f"{where}: {spec.label_key!r} is not a list of ints") from error
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(f"{where}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetFormatError(f"{where}: labels outside 0..{spec.num_classes - 1}")
    # Each row is 1024 red, then 1024 green, then 1024 blue bytes, each plane row-major 32x32: that is CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _missing_message(spec: CifarArchive, root: Path, reason: str | None = None) -> str:
    """Where the archive is expected and how to provide it, in words for the command line and for Python callers."""
    lines = [f"{spec.title} not found in {root}" + (f" (downloading it failed: {reason})." if reason else ".")]
    lines.append(
        f"Put {spec.filename} (md5 {spec.md5}, from {spec.url}) or its extracted folder {spec.folder}/ there, or "
        f"point --data-dir (${ENV_DATA_DIR}; data_dir= in Python) at the folder that holds it."
    )
    return "\n".join(lines)


def _download(spec: CifarArchive, root: Path) -> Path:
    """Fetch ``spec.url`` into ``root/spec.filename``, verifying the md5 before the file appears there.

    The transfer has a total deadline and a minimum average rate (:mod:`bench.download`): a stalled or dripping
    server ends it with a message, not a download that never finishes.
    """
    target = root / spec.filename
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetNotFoundError(_missing_message(spec, root, f"cannot create {root}: {error}")) from error
    log.info("downloading %s from %s to %s", spec.title, spec.url, target)
    guard = TransferGuard(spec.url, fix=f"put {spec.filename} (md5 {spec.md5}) into {root} by hand")
    # The partial file lives next to the target so the final rename is atomic (same file system).
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{spec.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    kept = False
    try:
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(spec.url, timeout=guard.socket_timeout(_DOWNLOAD_TIMEOUT_S)) as resp,
            ):
                # read1 returns what has arrived (at most a chunk), so a dripping server is judged as it drips.
                while chunk := resp.read1(_CHUNK):
                    md5.update(chunk)
                    out.write(chunk)
                    guard.update(len(chunk))
        except DownloadTooSlowError as error:
            raise DatasetNotFoundError(str(error)) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            if isinstance(error, urllib.error.HTTPError):
                reason = f"HTTP {error.code} {error.reason}"
            else:
                reason = getattr(error, "reason", None) or error
            raise DatasetNotFoundError(_missing_message(spec, root, f"{spec.url}: {reason}")) from error
        got = md5.hexdigest()
        if got != spec.md5:
            raise DatasetChecksumError(
                f"{spec.title} download from {spec.url} has md5 {got}, expected {spec.md5}; "
                "the partial file was deleted. Try again, or fetch the file by hand and check its md5."
            )
        os.replace(tmp, target)
        _VERIFIED.add(_file_key(target))
        kept = True
    finally:
        if not kept:
            tmp.unlink(missing_ok=True)
    return target


# Files whose md5 was checked in this process, by (path, size, mtime): hashing 170 MB once per process is enough.
_VERIFIED: set[tuple] = set()


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _md5_file(path: Path) -> str:
    md5 = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
    return md5.hexdigest()


def _verify_checksums(spec: CifarArchive, source: Path, split: str) -> None:
    """The archive (or the split's batch files of an extracted folder) must have the published md5.

    A file found on disk is checked like a download: a truncated, tampered or look-alike archive (say 100 random
    images named cifar-10-python.tar.gz) would otherwise be evaluated and stored as CIFAR.
    """
    expected = dict(spec.member_md5)
    files = [(source, spec.md5)] if source.is_file() else [(source / n, expected.get(n)) for n in spec.members(split)]
    for path, md5 in files:
        if md5 is None or not path.is_file():
            continue  # a missing batch file is reported by the reader, with the names it expects
        key = _file_key(path)
        if key in _VERIFIED:
            continue
        got = _md5_file(path)
        if got != md5:
            what = f"the official {spec.title} archive" if path == source else f"{spec.title}'s {path.name}"
            raise DatasetChecksumError(
                f"{path} has md5 {got}, but {what} has {md5}: it is not the published file (truncated, tampered "
                f"or another file). Delete it and put the archive from {spec.url} there (or let bench download it)"
            )
        _VERIFIED.add(key)


def _locate(spec: CifarArchive, root: Path, download: bool) -> Path:
    """An extracted folder holding the batch files, or the archive; downloads it if allowed."""
    # Accept data_dir pointing at the folder that holds the extracted folder, or at the extracted folder.
    for folder in (root / spec.folder, root):
        if folder.name == spec.folder and folder.is_dir():
            return folder
    archive = root / spec.filename
    if archive.is_file():
        return archive
    if not download:
        raise DatasetNotFoundError(_missing_message(spec, root))
    return _download(spec, root)


def _read_cifar(spec: CifarArchive, source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = spec.members(split)
    if source.is_dir():
        batches = []
        for name in names:
            path = source / name
            if not path.is_file():
                raise DatasetFormatError(f"{spec.title}: {path} is missing (expected {', '.join(names)})")
            with path.open("rb") as stream:
                batches.append(_unpickle_batch(stream, str(path), spec))
    else:
        wanted = {f"{spec.folder}/{name}": name for name in names}
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        try:
            # One sequential pass: seeking backwards in a .gz would decompress it again.
            with tarfile.open(source, "r:gz") as archive:
                for member in archive:
                    name = wanted.get(member.name.removeprefix("./"))
                    if name is None or not member.isfile():
                        continue
                    stream = archive.extractfile(member)
                    assert stream is not None  # isfile() was checked
                    found[name] = _unpickle_batch(stream, f"{source}:{member.name}", spec)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            raise DatasetFormatError(
                f"cannot read {source} as a tar.gz archive ({error}); delete it and download {spec.url} "
                f"again (md5 {spec.md5})"
            ) from error
        missing = [f"{spec.folder}/{name}" for name in names if name not in found]
        if missing:
            raise DatasetFormatError(f"{source} lacks {', '.join(missing)}; is it {spec.filename}?")
        batches = [found[name] for name in names]
    images = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
    return images, labels


# Decoded uint8 arrays (a quarter the size of float32), keyed by what identifies the file's content well
# enough for a cache: path, sizes and modification times. Two entries cover one dataset's train and test.
_CIFAR_CACHE: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_CIFAR_CACHE_SIZE = 2


def _load_cifar(key: str, split: str, root: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    spec = CIFAR_ARCHIVES[key]
    source = _locate(spec, root, download).resolve()
    # A folder's own mtime does not change when a file in it is rewritten, so stat the batch files.
    files = [source / name for name in spec.members(split)] if source.is_dir() else [source]
    stats = tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else None for f in files)
    cache_key = (spec, str(source), stats, split)
    if cache_key in _CIFAR_CACHE:
        _CIFAR_CACHE.move_to_end(cache_key)
        raw = _CIFAR_CACHE[cache_key]
    else:
        _verify_checksums(spec, source, split)
        raw = _read_cifar(spec, source, split)
        if len(raw[1]) != spec.split_size(split):
            raise DatasetFormatError(
                f"{source}: the {split} split has {len(raw[1])} images, but {spec.title}'s has "
                f"{spec.split_size(split)}; delete it and put the archive from {spec.url} there"
            )
        _CIFAR_CACHE[cache_key] = raw
        while len(_CIFAR_CACHE) > _CIFAR_CACHE_SIZE:
            _CIFAR_CACHE.popitem(last=False)
    images, labels = raw
    return torch.from_numpy(images).to(torch.float32).div_(255.0), torch.from_numpy(labels).clone()


def _cifar_loader(key: str) -> Loader:
    def loader(split: str, data_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _load_cifar(key, split, data_dir, download)

    loader.__name__ = f"load_{key}"
    return loader


register_dataset(
    DatasetInfo(
        name="cifar10",
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2471, 0.2435, 0.2616),
        default_eps="8/255",
        default_n=10000,
        test_size=CIFAR_ARCHIVES["cifar10"].split_size("test"),
        description="CIFAR-10, 32x32 colour images, 10 classes; 50000 train (data_batch_1..5) / 10000 test",
        url=CIFAR_ARCHIVES["cifar10"].url,
        loader=_cifar_loader("cifar10"),
    )
)
register_dataset(
    DatasetInfo(
        name="cifar100",
        num_classes=100,
        input_shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        default_eps="8/255",
        default_n=10000,
        test_size=CIFAR_ARCHIVES["cifar100"].split_size("test"),
        description="CIFAR-100, 32x32 colour images, 100 fine classes; 50000 train / 10000 test",
        url=CIFAR_ARCHIVES["cifar100"].url,
        loader=_cifar_loader("cifar100"),
    )
)
