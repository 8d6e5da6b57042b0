"""Registering checkpoints as models in the store, with their measured efficiency figures.

A model is its checkpoint's bytes *and* the fixed input normalisation in front of them
(:class:`bench.models.Normalize`): the same weights behind another mean/std compute other logits, so they are
another model. ``bench evaluate --normalization`` says which one a checkpoint was trained with
(:func:`parse_normalization`); the store keys models on ``(checkpoint_sha256, normalization)``
(:func:`normalization_key`).

The models are built here too: :func:`build_model` (an architecture behind its normalisation),
:func:`load_checkpoint_model` (a plain checkpoint), :func:`load_converted_model` (a file in one of
:data:`bench.formats.FORMATS`) and :func:`load_stored_model` (a stored row, whatever its format).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from bench.checkpoints import CheckpointMismatchError, load_state_dict, load_weights, sha256_file
from bench.data import get_dataset_info
from bench.formats import FORMATS, converted_provenance, load_converted
from bench.models import NormalizedModel, create_model
from bench.provenance import utcnow
from bench.sparsity import count_flops, measure_sparsity
from bench.store import Model, Store

# The key of a model that standardises its inputs with its dataset's own constants (bench datasets).
DATASET_NORMALIZATION = "dataset"
NORMALIZATION_SYNTAX = "dataset, none or MEAN/STD (e.g. 0.4914,0.4822,0.4465/0.2471,0.2435,0.2616)"


def parse_normalization(text: str, dataset: str) -> dict[str, list[float]]:
    """Read ``bench evaluate --normalization`` for ``dataset``.

    Args:
        text: ``dataset`` (its mean/std, bench datasets), ``none`` (raw [0, 1] inputs: mean 0, std 1), or
            ``MEAN/STD`` with one comma-separated value per input channel in each.
        dataset: a registered dataset; its channel count is the number of values expected.

    Returns:
        ``{"mean": [...], "std": [...]}``, as provenance records it.

    Raises:
        ValueError: a one-line message naming what is wrong and the accepted forms.
    """
    channels = get_dataset_info(dataset).input_shape[0]
    word = text.strip().lower()
    if word == DATASET_NORMALIZATION:
        return resolve_normalization(dataset, None)
    if word == "none":
        return {"mean": [0.0] * channels, "std": [1.0] * channels}
    where = f"--normalization {text!r}"
    parts = text.split("/")
    if len(parts) != 2:
        raise ValueError(f"{where} is not {NORMALIZATION_SYNTAX}")
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in parts)
    except ValueError:
        raise ValueError(f"{where}: MEAN and STD must be comma-separated numbers; use {NORMALIZATION_SYNTAX}") from None
    return resolve_normalization(dataset, {"mean": mean, "std": std}, where=where)


def resolve_normalization(
    dataset: str, normalization: Mapping[str, Any] | None, *, where: str = "normalization"
) -> dict[str, list[float]]:
    """``normalization`` checked against ``dataset``, or the dataset's own constants when it is ``None``.

    Raises:
        ValueError: not one finite mean and one positive, finite std per input channel of ``dataset``.
    """
    info = get_dataset_info(dataset)
    if normalization is None:
        return {"mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std]}
    mean, std = [float(v) for v in normalization["mean"]], [float(v) for v in normalization["std"]]
    channels = info.input_shape[0]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"{where} has {len(mean)} mean and {len(std)} std values, but {dataset} images have {channels} "
            f"channel{'s' if channels > 1 else ''}; give one of each per channel"
        )
    # The layer holds float32: 1e39 is infinite there and 1e-46 is zero.
    with np.errstate(over="ignore", under="ignore"):
        in_layer = np.asarray(mean + std, dtype=np.float32)
    if not (all(map(math.isfinite, mean + std)) and np.isfinite(in_layer).all()):
        raise ValueError(f"{where} has a value that is not a finite (float32) number; give finite means and stds")
    if min(std) <= 0 or in_layer[channels:].min() <= 0:
        raise ValueError(f"{where} has a std that is not positive ({min(std)}); every std must be > 0")
    return {"mean": mean, "std": std}


def _float32_text(values: list[float]) -> str:
    # The layer holds float32 (Normalize), so values that round to the same float32 are the same model; +0.0 turns
    # -0.0 into 0.0. str() of a numpy float32 is its shortest round-tripping decimal.
    return ",".join(str(np.float32(v) + np.float32(0.0)) for v in values)


def normalization_key(dataset: str, normalization: Mapping[str, Any] | None) -> str:
    """The store's ``models.normalization``: part of a model's identity with its checkpoint's sha256.

    ``"dataset"`` when the layer equals the one the dataset's constants build (``None`` included), else
    ``MEAN/STD`` as float32 decimals (``0.0,0.0,0.0/1.0,1.0,1.0`` for raw inputs), so two spellings of one layer
    are one model.
    """

    def text(ms: dict[str, list[float]]) -> str:
        return f"{_float32_text(ms['mean'])}/{_float32_text(ms['std'])}"

    ours = text(resolve_normalization(dataset, normalization))
    return DATASET_NORMALIZATION if ours == text(resolve_normalization(dataset, None)) else ours


def normalization_label(key: str | None) -> str:
    """A stored model's ``normalization`` as ``--normalization`` spells it: ``dataset``, ``none`` or ``MEAN/STD``."""
    if key in (None, "", DATASET_NORMALIZATION):
        return DATASET_NORMALIZATION
    mean, _, std = key.partition("/")
    if all(float(v) == 0.0 for v in mean.split(",")) and all(float(v) == 1.0 for v in std.split(",")):
        return "none"
    return key


def describe_normalization(key: str | None) -> str | None:
    """A stored model's input normalisation in words, or ``None`` for the dataset's own (the default)."""
    label = normalization_label(key)
    if label == DATASET_NORMALIZATION:
        return None
    return "none (raw [0, 1] inputs)" if label == "none" else f"mean/std {label}"


def build_model(arch: str, dataset: str, normalization: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The registered architecture with the dataset's class count and normalisation layer.

    ``normalization`` (``{"mean": [...], "std": [...]}``, as recorded in a model's provenance) replaces the
    dataset's constants: an author checkpoint keeps its authors' input handling.
    """
    info = get_dataset_info(dataset)
    mean, std = (normalization["mean"], normalization["std"]) if normalization else (info.mean, info.std)
    return create_model(arch, num_classes=info.num_classes, mean=tuple(mean), std=tuple(std))


def load_checkpoint_model(
    path: str | Path,
    arch: str,
    dataset: str,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    normalization: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build ``arch`` for ``dataset`` and load the checkpoint's weights (weights-only, strict), in eval mode.

    ``state_dict`` replaces reading ``path`` (a converted author checkpoint); ``normalization``
    (:func:`parse_normalization`) replaces the dataset's mean/std in front of the network.
    """
    model = build_model(arch, dataset, normalization)
    load_weights(model, state_dict if state_dict is not None else load_state_dict(path))
    return model.eval()


def load_converted_model(
    path: str | Path,
    fmt: str,
    arch: str,
    dataset: str,
    *,
    k: float | None = None,
    normalization: Mapping[str, Any] | None = None,
) -> NormalizedModel:
    """Convert ``path`` and load it into ``arch`` behind the authors' input normalisation, in eval mode.

    The result gives the native model's logits on [0, 1] inputs: :func:`bench.formats.load_converted` for the
    weights, :func:`bench.formats.native_normalization` for the fixed first layer.

    Args:
        path: the checkpoint file.
        fmt: a registered format (``bench formats``).
        arch: a registered architecture; the format's ``archs`` are the ones its authors' files fit.
        dataset: a registered dataset (its class count sizes the classifier).
        k: HYDRA's kept fraction, for ``hydra-subnet`` only.
        normalization: ``{"mean", "std"}`` recorded in a stored model's provenance; replaces the format's
            constants, so a stored model is rebuilt as it was registered.

    Returns:
        A :class:`bench.models.NormalizedModel`.

    Raises:
        CheckpointMismatchError: the converted keys do not fit ``arch``; the message names the format's
            architectures.
    """
    spec = FORMATS.get(fmt)
    state_dict = load_converted(path, fmt, k=k)
    model = build_model(arch, dataset, normalization or converted_provenance(fmt, dataset)["normalization"])
    try:
        load_weights(model, state_dict, source=path)
    except CheckpointMismatchError as e:
        if not spec.archs or arch in spec.archs:
            raise
        hint = f"--format {fmt} files fit --arch {' or '.join(spec.archs)}, not {arch!r}"
        raise CheckpointMismatchError(f"{e}\n{hint}", e.missing, e.unexpected, e.mismatched) from None
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
                f"{normalization[what]}; build it with bench.catalog.build_model(arch, dataset, normalization)"
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
