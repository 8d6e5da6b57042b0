"""Registering checkpoints as models in the store, with their measured efficiency figures, and rebuilding a stored
model from its row.

A model is its checkpoint's bytes *and* the fixed input normalisation in front of them
(:class:`bench.models.Normalize`): the same weights behind another mean/std compute other logits, so they are
another model. The store keys models on ``(checkpoint_sha256, normalization)``
(:func:`bench.models.normalize.normalization_key`); :func:`register_model` finds or creates the row and measures
the model's sparsity and compute once; :func:`load_stored_model` rebuilds a row's model, whatever its format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from bench.checkpoints import load_state_dict, load_weights, sha256_file
from bench.data import get_dataset_info
from bench.formats import load_converted_model
from bench.models import NormalizedModel, build_model
from bench.models.normalize import DATASET_NORMALIZATION, normalization_key, normalization_label, resolve_normalization
from bench.provenance import utcnow
from bench.sparsity import count_flops, measure_sparsity
from bench.store.db import Store
from bench.store.schema import Model

__all__ = ["load_stored_model", "register_model"]


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
        return load_converted_model(
            path, fmt, row.arch, row.dataset, k=provenance.get("k"), normalization=provenance.get("normalization")
        )
    model = build_model(row.arch, row.dataset, provenance.get("normalization"))
    load_weights(model, load_state_dict(path))
    return model.eval()


def register_model(
    store: Store,
    path: str | Path | None,
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
    checkpoint_sha256: str | None = None,
) -> Model:
    """Find the model row for this checkpoint's content (sha256) and input normalisation, or create it with
    measured figures.

    A model with no file (``path`` None, the Python API's in-memory models) is identified by ``checkpoint_sha256``
    (:func:`bench.api.state_dict_sha256`) and stored without a checkpoint path.

    The same checkpoint bytes behind the same normalisation are one model whatever their file name, so
    evaluations are shared; behind another normalisation they are another model. The normalisation is
    ``provenance["normalization"]`` (the dataset's constants when absent), recorded there in any case, and must
    be the one ``model``'s first layer applies.
    """
    if (path is None) == (checkpoint_sha256 is None):
        raise ValueError("register_model takes a checkpoint path or, for a model without a file, checkpoint_sha256")
    if path is None:
        sha, stem, what = checkpoint_sha256, arch, "the in-memory model"
    else:
        path = Path(path)
        sha, stem, what = sha256_file(path), path.stem, f"checkpoint {path}"
    normalization = resolve_normalization(dataset, (provenance or {}).get("normalization"))
    key = normalization_key(dataset, normalization)
    _check_normalization_layer(model, normalization)
    provenance = {**(provenance or {}), "normalization": normalization}
    with store.session() as s:
        rows = s.scalars(select(Model).where(Model.checkpoint_sha256 == sha).order_by(Model.id)).all()
        for other in rows:
            if other.arch != arch or other.dataset != dataset:
                raise ValueError(
                    f"{what} (sha256 {sha[:12]}…) is already stored as model {other.name!r} with "
                    f"--arch {other.arch} --dataset {other.dataset}; the same weights cannot be another architecture"
                )
        row = next((r for r in rows if r.normalization == key), None)
        if row is not None:
            return row
        report = measure_sparsity(model)
        info = get_dataset_info(dataset)
        flops = count_flops(model, (1, *info.input_shape))
        row = Model(
            name=name or _unique_name(s, f"{stem}-{sha[:8]}{_name_suffix(key)}"),
            checkpoint_sha256=sha,
            normalization=key,
            checkpoint_path=None if path is None else str(path.resolve()),
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


def _check_normalization_layer(model: torch.nn.Module, normalization: Mapping[str, list[float]]) -> None:
    # The row would say one normalisation while the evaluation attacks a model built with another.
    if not isinstance(model, NormalizedModel):
        return
    layer = model.normalize
    for what in ("mean", "std"):
        ours = getattr(layer, what).flatten()
        recorded = torch.tensor(normalization[what], dtype=torch.float32)
        if ours.shape != recorded.shape or not torch.equal(ours.cpu(), recorded):
            raise ValueError(
                f"the model's normalisation layer has {what} {ours.tolist()}, but its provenance records "
                f"{normalization[what]}; build it with bench.models.build_model(arch, dataset, normalization)"
            )


def _name_suffix(key: str) -> str:
    if key == DATASET_NORMALIZATION:
        return ""
    if normalization_label(key) == "none":
        return "-raw"
    return f"-norm{hashlib.sha256(key.encode()).hexdigest()[:6]}"


def _unique_name(session, base: str) -> str:
    name, k = base, 1
    while session.scalars(select(Model.id).where(Model.name == name)).first() is not None:
        k += 1
        name = f"{base}-{k}"
    return name
