"""Datasets: the built-in digits track and CIFAR-10/100 read from their official python archives.

Every dataset returns its splits as float32 NCHW tensors in [0, 1] with int64 labels, in a fixed canonical
order. ``sample_id`` (protocol section 1) is the index of a sample in the canonical *test* split, so two
evaluations on the first N samples see exactly the same images. Normalisation is not applied here: the
``mean``/``std`` of a :class:`DatasetInfo` are the constants of the fixed normalisation layer inside models.

Layout: :mod:`.registry` holds :class:`DatasetInfo`, the registry and the errors; :mod:`.digits` and :mod:`.cifar`
register their datasets when imported below (CIFAR's safe reader, checksums and download live in :mod:`.cifar`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.data.cifar import _CIFAR_CACHE, CIFAR_ARCHIVES, CifarArchive, UnsafePickleError
from bench.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_SIZE, _digits_split
from bench.data.registry import (
    DATASETS,
    SPLITS,
    DatasetChecksumError,
    DatasetFormatError,
    DatasetInfo,
    DatasetNotFoundError,
    Loader,
    get_dataset_info,
    parse_eps,
    register_dataset,
)
from bench.paths import DEFAULT_DATA_DIR, ENV_DATA_DIR, default_data_dir

__all__ = [
    "CIFAR_ARCHIVES",
    "DATASETS",
    "DEFAULT_DATA_DIR",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_SIZE",
    "ENV_DATA_DIR",
    "SPLITS",
    "CifarArchive",
    "DatasetChecksumError",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "Loader",
    "UnsafePickleError",
    "clear_cache",
    "default_data_dir",
    "get_dataset_info",
    "load_split",
    "parse_eps",
    "register_dataset",
]


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a registered dataset in its canonical order.

    Args:
        name: registered dataset name (``bench datasets`` lists them).
        split: ``"train"`` or ``"test"``.
        data_dir: folder holding downloaded archives; default :func:`default_data_dir`. Ignored by datasets
            that need no files (digits).
        download: fetch a missing archive from its canonical URL; with ``False`` a missing archive raises.

    Returns:
        ``(images, labels)``: float32 ``(N, C, H, W)`` in [0, 1] and int64 ``(N,)``. Fresh tensors on every
        call, safe to modify. Row ``i`` of the test split is ``sample_id`` ``i``.

    Raises:
        UnknownNameError: ``name`` is not registered.
        ValueError: ``split`` is neither ``"train"`` nor ``"test"``.
        DatasetNotFoundError: the files are missing and were not downloaded.
        DatasetChecksumError: a download did not match the published md5.
        DatasetFormatError: the files exist but are not the expected format.
    """
    info = get_dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; expected 'train' or 'test'")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    images, labels = info.loader(split, root, download)
    # A loader bug here would silently shift every sample_id, so check the contract where it is cheap.
    if images.dtype != torch.float32 or tuple(images.shape[1:]) != info.input_shape:
        raise DatasetFormatError(
            f"{name} {split}: expected float32 images of shape (N, {', '.join(map(str, info.input_shape))}), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise DatasetFormatError(
            f"{name} {split}: want {images.shape[0]} int64 labels, got {labels.dtype} {tuple(labels.shape)}"
        )
    return images, labels


def clear_cache() -> None:
    """Forget the in-process copies of decoded datasets (the next load reads the files again)."""
    _digits_split.cache_clear()
    _CIFAR_CACHE.clear()
