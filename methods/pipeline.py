"""Dense checkpoint → method adapter → pruned checkpoint registered in the store with its dense parent.

The pruned checkpoint is cached by content: the key hashes the dense checkpoint's sha256, the method, the
canonical target sparsity, the seed and the resolved method config, so running the same pruning twice
reuses the first result (the built-in track prunes once per method and sparsity).

Nothing is written to the store until the pruned checkpoint exists: the dense parent (when not stored yet) and
the child are registered together in one transaction, so a run that fails (no training data, a bad option, an
interrupted training) leaves no model behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.checkpoints import load_checkpoint_model, sha256_file
from bench.data import load_split
from bench.paths import atomic_write, cache_dir, stable_hash
from bench.provenance import environment
from bench.store import Model, Store
from bench.store.registration import register_model
from methods.base import PruneData, config_dict, get_method

# Hex digits of the setting hash in a model name: 8 make an accidental clash between two settings of one
# method, sparsity and seed on the same architecture and dataset (1 in 4 billion) negligible.
CONFIG_TAG_LENGTH = 8


@dataclass
class PrunedModel:
    row: Model
    path: Path
    reused: bool
    parent: Model | None = None


@dataclass(frozen=True)
class DenseParent:
    """A dense checkpoint to prune that the store may not hold yet; it is registered together with the child.

    ``name`` is the name it gets when new (``digits-dense``); when another checkpoint already holds that name,
    it gets ``<name>-<sha256[:8]>`` instead. None: the file stem and hash.
    """

    path: Path
    arch: str
    dataset: str
    name: str | None = None
    source: str = "local"
    provenance: dict[str, Any] | None = None


def config_tag(config: dict[str, Any], eps: float, dense_sha256: str) -> str:
    """Short hash of what, beside method, sparsity and seed, makes a pruned model distinct: the resolved method
    config, the training eps and the dense parent's checkpoint."""
    payload = {"config": config, "eps": eps, "dense": dense_sha256}
    return stable_hash(payload, compact=False, default=str)[:CONFIG_TAG_LENGTH]


def model_name(card, arch: str, dataset: str, sparsity: float, seed: int, tag: str | None = None) -> str:
    """``<ShortName>_<Author><Year><Word>_<arch>_<dataset>_<US|S>_<sparsity %>[_c<tag>]_s<seed>`` (RobustBench /
    APB style ids; locally pruned models add the seed, and the config tag when the config is not the default)."""
    pct = f"{sparsity * 100:g}".replace(".", "p")
    config = f"_c{tag}" if tag else ""
    return f"{card.ap_key}_{arch}_{dataset}_{card.structure}_{pct}{config}_s{seed}"


def name_holder(session: Session, name: str) -> Model | None:
    """The stored model called ``name``, if any."""
    return session.scalars(select(Model).where(Model.name == name)).one_or_none()


def is_same_model(holder: Model, sha256: str, normalization: str = "dataset") -> bool:
    """Whether a stored row is the model of these checkpoint bytes behind this input normalisation (the store's
    ``normalization`` key, ``"dataset"`` for the dataset's own constants; a store without the column has only
    those)."""
    return holder.checkpoint_sha256 == sha256 and (getattr(holder, "normalization", None) or "dataset") == normalization


def available_name(session: Session, candidates: Sequence[str], sha256: str, normalization: str = "dataset") -> str:
    """The first candidate name that is free or already this model's (:func:`is_same_model`), else the last one
    with the checkpoint's hash appended: a distinct model never takes another's name."""
    for name in candidates:
        holder = name_holder(session, name)
        if holder is None or is_same_model(holder, sha256, normalization):
            return name
    base = f"{candidates[-1]}-{sha256[:8]}"
    name, k = base, 1
    while (holder := name_holder(session, name)) is not None and not is_same_model(holder, sha256, normalization):
        k += 1
        name = f"{base}-{k}"
    return name


def taken_name_error(option: str, name: str, holder: Model) -> ValueError:
    """The one-line refusal of a user-chosen name that another model already holds."""
    normalization = getattr(holder, "normalization", None)
    behind = f", normalisation {normalization}" if normalization not in (None, "dataset") else ""
    return ValueError(
        f"{option} {name!r} is already model #{holder.id}, a different model (checkpoint sha256 "
        f"{holder.checkpoint_sha256[:12]}…{behind}, {holder.checkpoint_path or 'no path'}); choose another "
        f"{option}, or omit it to get a unique name"
    )


class _OneSession:
    """``register_model``'s store argument bound to one open session, so several registrations commit together."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @contextmanager
    def session(self) -> Iterator[Session]:
        yield self._session


def prune_checkpoint(
    store: Store | Callable[[], Store],
    method_key: str,
    sparsity: float,
    *,
    dense_path: Path | None = None,
    dense_row: Model | None = None,
    parent: DenseParent | None = None,
    eps: float,
    default_eps: float | None = None,
    seed: int = 0,
    track: bool = False,
    overrides: dict[str, Any] | None = None,
    data_dir: str | None = None,
    out_dir: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> PrunedModel:
    """Prune the dense checkpoint with ``method_key`` at canonical ``sparsity`` and register the result.

    The child's name is :func:`model_name`; it carries the :func:`config_tag` unless the method config is the
    default of its schedule and ``eps`` is ``default_eps`` (so the default setting keeps the short name), or
    when the short name is held by another checkpoint (e.g. pruned from an older dense parent).

    Args:
        store: results store, or a function opening it (called once the pruned checkpoint exists, so a run
            that fails creates no store); the pruned model is registered with the dense model as its parent.
        method_key: registered method (``bench methods``).
        sparsity: canonical target sparsity (fraction of zero Conv2d/Linear weights; for structured methods
            the fraction of parameters removed).
        dense_path, dense_row: the dense parent's checkpoint and its stored row; or else
        parent: the dense parent to register in the same transaction as the child (nothing is stored if pruning
            fails).
        eps: the training threat model's L∞ eps.
        default_eps: the eps the short name takes for granted (the track's or the dataset's); None: ``eps``.
        seed: seed of the pruning run.
        track: use the method's CPU-sized digits-track schedule instead of the paper's.
        overrides: method config overrides (``{"prune_epochs": 1}``).
        data_dir: dataset folder.
        out_dir: where pruned checkpoints are written [default: the cache directory].
        log: receives progress lines.
    """
    if (dense_row is None) == (parent is None):
        raise ValueError("prune_checkpoint needs either dense_row (with dense_path) or parent")
    if parent is not None:
        dense_path, arch, dataset, dense_name = Path(parent.path), parent.arch, parent.dataset, parent.name
    else:
        if dense_path is None:
            raise ValueError("prune_checkpoint: dense_row needs its dense_path")
        arch, dataset, dense_name = dense_row.arch, dense_row.dataset, dense_row.name
    method = get_method(method_key)
    method.check_sparsity(sparsity)
    make_config = method.digits_config if track else method.config
    cfg = make_config(**(overrides or {}))
    cfg_dict = config_dict(cfg)
    is_default = cfg_dict == config_dict(make_config()) and (default_eps is None or eps == default_eps)
    dense_sha = sha256_file(dense_path)
    key_payload = {
        "dense": dense_sha,
        "method": method_key,
        "sparsity": sparsity,
        "seed": seed,
        "config": cfg_dict,
        "eps": eps,
    }
    key = stable_hash(key_payload, compact=False)
    folder = out_dir or cache_dir() / "pruned"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{method_key}-{arch}-{dataset}-{key[:16]}.pt"
    meta_path = path.with_suffix(".json")
    reused = path.exists() and meta_path.exists()
    if reused:
        meta = json.loads(meta_path.read_text())
        log(f"reusing the pruned checkpoint {path} ({method_key} at sparsity {sparsity}, seed {seed})")
    else:
        model = load_checkpoint_model(dense_path, arch, dataset).train()
        x, y = load_split(dataset, "train", data_dir=data_dir)
        log(
            f"pruning {dense_name or dense_path.name} with {method.card.display_name} to sparsity {sparsity} "
            f"(seed {seed})"
        )
        torch.manual_seed(seed)
        start = time.perf_counter()
        result = method.prune(model, sparsity, PruneData(x, y, eps=eps), cfg, seed=seed)
        wall = time.perf_counter() - start
        meta = {
            "method": method_key,
            "sparsity": sparsity,
            "seed": seed,
            "config": cfg_dict,
            "schedule": ("digits-track" if track else "paper"),
            "native_sparsity": result.native_sparsity,
            "history": result.history,
            "wall_seconds": wall,
            "dense_sha256": dense_sha,
            "eps": eps,
            "environment": environment("cpu"),
        }
        if result.compact is not None:
            # Structured pruning: the physically smaller network, loadable with methods.structured.compact_model
            # from the widths in native_sparsity. The masked network (dense keys) is what the store evaluates.
            compact_path = path.with_name(path.stem + ".compact.pt")
            atomic_write(compact_path, lambda f: torch.save(result.compact.state_dict(), f))
            meta["compact"] = {
                "file": compact_path.name,
                "sha256": sha256_file(compact_path),
                "params": sum(p.numel() for p in result.compact.parameters()),
            }
            log(f"physically rebuilt network: {meta['compact']['params']:,} parameters → {compact_path}")
        atomic_write(path, lambda f: torch.save(result.model.state_dict(), f))
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1, default=str).encode()))
        log(f"pruned in {wall:.1f} s → {path}")
    pruned = load_checkpoint_model(path, arch, dataset)
    card = method.card
    tagged = model_name(card, arch, dataset, sparsity, seed, config_tag(cfg_dict, eps, dense_sha))
    names = ([model_name(card, arch, dataset, sparsity, seed)] if is_default else []) + [tagged]
    child_sha = sha256_file(path)
    if not hasattr(store, "session"):
        store = store()
    with store.session() as s:
        one = _OneSession(s)
        if parent is not None:
            dense_model = load_checkpoint_model(dense_path, arch, dataset)
            dense_row = register_model(
                one,
                dense_path,
                dense_model,
                arch=arch,
                dataset=dataset,
                name=available_name(s, [parent.name], dense_sha) if parent.name else None,
                source=parent.source,
                provenance=parent.provenance,
            )
        row = register_model(
            one,
            path,
            pruned,
            arch=arch,
            dataset=dataset,
            method=method_key,
            structure=card.structure,
            name=available_name(s, names, child_sha),
            source="bench prune",
            parent_id=dense_row.id,
            target_sparsity=sparsity,
            taxonomy=card.taxonomy,
            provenance=meta,
        )
    return PrunedModel(row=row, path=path, reused=reused, parent=dense_row)
