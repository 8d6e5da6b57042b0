"""Dense checkpoint → method adapter → pruned checkpoint registered in the store with its dense parent.

The pruned checkpoint is cached by content: the key hashes the dense checkpoint's sha256, the method, the
canonical target sparsity, the seed and the resolved method config, so running the same pruning twice
reuses the first result (the built-in track prunes once per method and sparsity).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.catalog import load_checkpoint_model, register_model
from bench.checkpoints import sha256_file
from bench.data import load_split
from bench.provenance import environment
from bench.store import Model, Store
from bench.track import atomic_write, cache_dir
from methods.base import PruneData, config_dict, get_method


@dataclass
class PrunedModel:
    row: Model
    path: Path
    reused: bool


def model_name(card, arch: str, dataset: str, sparsity: float, seed: int) -> str:
    """``<ShortName>_<Author><Year><Word>_<arch>_<dataset>_<US|S>_<sparsity %>_s<seed>`` (protocol section 7)."""
    pct = f"{sparsity * 100:g}".replace(".", "p")
    return f"{card.ap_key}_{arch}_{dataset}_{card.structure}_{pct}_s{seed}"


def prune_checkpoint(
    store: Store,
    method_key: str,
    sparsity: float,
    *,
    dense_path: Path,
    dense_row: Model,
    eps: float,
    seed: int = 0,
    track: bool = False,
    overrides: dict[str, Any] | None = None,
    data_dir: str | None = None,
    out_dir: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> PrunedModel:
    """Prune the dense checkpoint with ``method_key`` at canonical ``sparsity`` and register the result.

    Args:
        store: results store; the pruned model is registered with ``dense_row`` as its parent.
        method_key: registered method (``bench methods``).
        sparsity: canonical target sparsity (fraction of zero Conv2d/Linear weights; for structured methods
            the fraction of parameters removed).
        dense_path, dense_row: the dense parent's checkpoint and its row.
        eps: the training threat model's L∞ eps.
        seed: seed of the pruning run.
        track: use the method's CPU-sized digits-track schedule instead of the paper's.
        overrides: method config overrides (``{"prune_epochs": 1}``).
        data_dir: dataset folder.
        out_dir: where pruned checkpoints are written [default: the cache directory].
        log: receives progress lines.
    """
    method = get_method(method_key)
    method.check_sparsity(sparsity)
    cfg = method.digits_config(**(overrides or {})) if track else method.config(**(overrides or {}))
    cfg_dict = config_dict(cfg)
    dense_sha = sha256_file(dense_path)
    key_payload = {
        "dense": dense_sha,
        "method": method_key,
        "sparsity": sparsity,
        "seed": seed,
        "config": cfg_dict,
        "eps": eps,
    }
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()
    folder = out_dir or cache_dir() / "pruned"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{method_key}-{dense_row.arch}-{dense_row.dataset}-{key[:16]}.pt"
    meta_path = path.with_suffix(".json")
    reused = path.exists() and meta_path.exists()
    if reused:
        meta = json.loads(meta_path.read_text())
        log(f"reusing the pruned checkpoint {path} ({method_key} at sparsity {sparsity}, seed {seed})")
    else:
        model = load_checkpoint_model(dense_path, dense_row.arch, dense_row.dataset).train()
        x, y = load_split(dense_row.dataset, "train", data_dir=data_dir)
        log(f"pruning {dense_row.name} with {method.card.display_name} to sparsity {sparsity} (seed {seed})")
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
    pruned = load_checkpoint_model(path, dense_row.arch, dense_row.dataset)
    card = method.card
    row = register_model(
        store,
        path,
        pruned,
        arch=dense_row.arch,
        dataset=dense_row.dataset,
        method=method_key,
        structure=card.structure,
        name=model_name(card, dense_row.arch, dense_row.dataset, sparsity, seed),
        source="bench prune",
        parent_id=dense_row.id,
        target_sparsity=sparsity,
        taxonomy=card.taxonomy,
        provenance=meta,
    )
    return PrunedModel(row=row, path=path, reused=reused)
