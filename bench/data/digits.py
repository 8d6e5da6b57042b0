"""digits: scikit-learn's bundled 8x8 handwritten digits, no download."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np
import torch

from bench.data.registry import DatasetInfo, register_dataset

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
# sha256 of the int64 little-endian test-row indices (into ``load_digits()``) that train_test_split returned
# when the track was defined (scikit-learn 1.9). sample_ids of stored results refer to this order, so a
# library change that reshuffles the split must fail loudly instead of silently re-keying every result.
_DIGITS_TEST_INDEX_SHA256 = "d9101e2e97e19974905f1336a8ef53c03166d6af2c53833be35ff03a33e7e0cd"


@cache
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    rows = np.arange(len(digits.target))
    train_rows, test_rows = train_test_split(
        rows, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=digits.target
    )
    got = hashlib.sha256(np.asarray(test_rows, dtype="<i8").tobytes()).hexdigest()
    if got != _DIGITS_TEST_INDEX_SHA256:
        import sklearn

        raise RuntimeError(
            f"scikit-learn {sklearn.__version__} produced a different digits test split than the one the "
            "benchmark's sample_ids refer to (train_test_split(test_size=360, random_state=0, stratify=y)); "
            "results would not be comparable. Use the scikit-learn version the results were made with."
        )
    images = digits.images.astype(np.float32)  # integers 0..16, exact in float32
    labels = digits.target.astype(np.int64)
    return images[train_rows], labels[train_rows], images[test_rows], labels[test_rows]


def _load_digits(split: str, data_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    del data_dir, download  # the data ships inside scikit-learn
    train_x, train_y, test_x, test_y = _digits_split()
    x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
    # torch.tensor copies, so callers can never modify the cached arrays.
    images = torch.tensor(x).div_(16.0).unsqueeze(1)
    return images, torch.tensor(y)


register_dataset(
    DatasetInfo(
        name="digits",
        num_classes=10,
        input_shape=(1, 8, 8),
        # Mean and std of all pixels of the train split after /16 (0.305383, 0.376119), rounded; they are the
        # constants of the models' normalisation layer, so they must not change once models are trained.
        mean=(0.3054,),
        std=(0.3761,),
        # Chosen on the PGD-trained dense small CNN (bench/track.py): clearly robust, not saturated.
        default_eps="0.2",
        default_n=None,
        test_size=DIGITS_TEST_SIZE,
        # Two chunks of 180, one per core. On 8x8 inputs AutoAttack's per-iteration overhead dominates
        # (Square's 5000 queries and FAB's iterations run once per batch), so fewer, larger chunks are faster.
        default_batch_size=180,
        description=(
            "scikit-learn's 8x8 handwritten digits (UCI optdigits, 1797 images), values /16; built in. "
            "Split: train_test_split(test_size=360, random_state=0, stratify=y) -> 1437 train / 360 test, "
            "both in the order train_test_split returns them"
        ),
        url="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        loader=_load_digits,
    )
)
