"""The built-in digits track: a dense small CNN trained with PGD adversarial training, cached by content.

It is what runs out of the box (no download): ``bench evaluate`` with no checkpoint trains it once, stores
the checkpoint under the cache directory keyed by the hash of its training recipe, registers it in the
store as a dense model and evaluates it under the standard protocol.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.data import get_dataset_info, load_split, parse_eps
from bench.models import build_model
from bench.paths import atomic_write, cache_dir, stable_hash
from bench.provenance import cpu_info
from bench.training import AdversarialTrainingConfig, adversarial_training

# Bump when the training code changes in a way that changes the trained weights.
TRACK_RECIPE_VERSION = 3  # 2: the initial weights are seeded too; 3: small_cnn narrowed to 16/32/32


@dataclass(frozen=True)
class Track:
    """A dataset, an architecture and the adversarial-training recipe of its dense parent."""

    name: str
    dataset: str
    arch: str
    eps: str
    training: AdversarialTrainingConfig

    @property
    def key(self) -> str:
        payload = {
            "track": self.name,
            "dataset": self.dataset,
            "arch": self.arch,
            "eps": self.eps,
            "training": self.training.to_dict(),
            "recipe_version": TRACK_RECIPE_VERSION,
        }
        return stable_hash(payload, compact=False)


# eps = 0.2 on digits (pixels in [0, 1], 17 grey levels): the PGD-trained dense model keeps ~99 % clean and
# stays clearly robust without saturating (README, "The digits track"); 0.1 saturates (>90 % under PGD-50),
# 0.3 collapses clean accuracy to ~74 %.
DIGITS_EPS = get_dataset_info("digits").default_eps
TRACKS = {
    "digits": Track(
        name="digits",
        dataset="digits",
        arch="small_cnn",
        eps=DIGITS_EPS,
        training=AdversarialTrainingConfig(
            eps=parse_eps(DIGITS_EPS),
            epochs=30,
            pgd_steps=10,
            batch_size=64,
            lr=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            seed=0,
        ),
    )
}


def dense_checkpoint(
    track: Track, *, root: Path | None = None, log: Callable[[str], None] = lambda _msg: None
) -> tuple[Path, dict]:
    """The dense parent's checkpoint for ``track``, trained on first use; returns (path, training record)."""
    folder = (root or cache_dir()) / "tracks"
    path = folder / f"{track.name}-dense-{track.key[:16]}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    log(
        f"training the {track.name} track's dense {track.arch} with PGD adversarial training "
        f"(eps {track.eps}, {track.training.epochs} epochs; once, then cached in {folder})"
    )
    x, y = load_split(track.dataset, "train")
    # Seeding the initial weights as well as training makes the checkpoint bytes a function of the recipe, the torch
    # version, the torch thread count and the CPU's float kernels (recorded below): two machines that agree on all
    # of these train the same bytes (checked on this project's machines). A CPU with other vector units (say AVX2
    # instead of AVX-512) rounds some sums differently, and its bytes, though not its accuracy, can differ.
    torch.manual_seed(track.training.seed)
    model = build_model(track.arch, track.dataset)
    record = adversarial_training(model, x, y, track.training, log=log)
    record = {
        "track": track.name,
        "training": track.training.to_dict(),
        "recipe_key": track.key,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_info(),
        **record,
    }
    # Write both files under temporary names and rename: an interrupted run leaves no half checkpoint.
    atomic_write(path, lambda f: torch.save(model.state_dict(), f))
    atomic_write(meta_path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return path, record
