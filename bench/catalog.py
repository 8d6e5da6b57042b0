"""Registering checkpoints as models in the store, with their measured efficiency figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from bench.checkpoints import count_flops, load_state_dict, load_weights, measure_sparsity, sha256_file
from bench.data import get_dataset_info
from bench.models import create_model
from bench.provenance import utcnow
from bench.store import Model, Store


def build_model(arch: str, dataset: str, normalization: dict[str, Any] | None = None) -> torch.nn.Module:
    """The registered architecture with the dataset's class count and normalisation layer.

    ``normalization`` (``{"mean": [...], "std": [...]}``, as recorded in a converted model's provenance)
    replaces the dataset's constants: an author checkpoint keeps its authors' input handling.
    """
    info = get_dataset_info(dataset)
    mean, std = (normalization["mean"], normalization["std"]) if normalization else (info.mean, info.std)
    return create_model(arch, num_classes=info.num_classes, mean=tuple(mean), std=tuple(std))


def load_checkpoint_model(
    path: str | Path, arch: str, dataset: str, *, state_dict: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """Build ``arch`` for ``dataset`` and load the checkpoint's weights (weights-only, strict), in eval mode.

    ``state_dict`` replaces reading ``path`` (a converted author checkpoint).
    """
    model = build_model(arch, dataset)
    load_weights(model, state_dict if state_dict is not None else load_state_dict(path))
    return model.eval()


def load_stored_model(row: Model, path: str | Path | None = None) -> torch.nn.Module:
    """Rebuild a stored model from its checkpoint: its architecture, its dataset and the input normalisation
    recorded in its provenance (author checkpoints), weights-only, sha256 verified, in eval mode.

    ``path`` overrides ``row.checkpoint_path`` (e.g. the file was moved); the content must still match.
    """
    path = Path(path or row.checkpoint_path or "")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint of model {row.name!r} not found at {str(path)!r}; pass its current path")
    sha = sha256_file(path)
    if sha != row.checkpoint_sha256:
        raise ValueError(
            f"{path} has sha256 {sha[:12]}…, but model {row.name!r} was stored from {row.checkpoint_sha256[:12]}…; "
            "the file changed since it was registered"
        )
    provenance = row.provenance or {}
    fmt = provenance.get("native_format", "plain")
    if fmt != "plain":
        from methods.convert import load_converted_model  # methods depends on bench, not the reverse, at import time

        return load_converted_model(
            path, fmt, row.arch, row.dataset, k=provenance.get("k"), normalization=provenance.get("normalization")
        )
    model = build_model(row.arch, row.dataset, provenance.get("normalization"))
    load_weights(model, load_state_dict(path))
    return model.eval()


def register_model(
    store: Store,
    path: str | Path,
    model: torch.nn.Module,
    *,
    arch: str,
    dataset: str,
    method: str = "dense",
    structure: str = "dense",
    name: str | None = None,
    source: str = "local",
    parent_id: int | None = None,
    target_sparsity: float | None = None,
    taxonomy: dict[str, Any] | None = None,
    reported: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Model:
    """Find the model row for this checkpoint's content (sha256) or create it with measured figures.

    The same checkpoint bytes are one model whatever their file name, so evaluations are shared.
    """
    path = Path(path)
    sha = sha256_file(path)
    with store.session() as s:
        row = s.scalars(select(Model).where(Model.checkpoint_sha256 == sha)).one_or_none()
        if row is not None:
            if row.arch != arch or row.dataset != dataset:
                raise ValueError(
                    f"checkpoint {path} (sha256 {sha[:12]}…) is already stored as model {row.name!r} with "
                    f"--arch {row.arch} --dataset {row.dataset}; the same weights cannot be another architecture"
                )
            return row
        report = measure_sparsity(model)
        info = get_dataset_info(dataset)
        flops = count_flops(model, (1, *info.input_shape))
        row = Model(
            name=name or _unique_name(s, f"{path.stem}-{sha[:8]}"),
            checkpoint_sha256=sha,
            checkpoint_path=str(path.resolve()),
            method=method,
            arch=arch,
            dataset=dataset,
            structure=structure,
            target_sparsity=target_sparsity,
            measured_sparsity=report.sparsity,
            layer_sparsity={
                layer: {"numel": numel, "zeros": zeros, "sparsity": sp}
                for layer, (numel, zeros, sp) in report.per_layer.items()
            },
            params=report.total_params,
            nonzero_params=report.nonzero_params,
            flops=flops["dense_flops"],
            nonzero_flops=flops["nonzero_flops"],
            parent_id=parent_id,
            source=source,
            reported=reported or {},
            taxonomy=taxonomy or {},
            provenance=provenance or {},
            created_at=utcnow(),
        )
        s.add(row)
        s.flush()
        return row


def _unique_name(session, base: str) -> str:
    name, k = base, 1
    while session.scalars(select(Model.id).where(Model.name == name)).first() is not None:
        k += 1
        name = f"{base}-{k}"
    return name
