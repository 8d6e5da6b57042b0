"""The public Python API: benchmark a model from a notebook or a script, on the code path ``bench`` runs.

    import apbench
    result = apbench.evaluate(model, dataset="digits", n_samples=40)  # an nn.Module; or "ckpt.pt", arch="small_cnn"
    print(result)                                                       # accuracies with Wilson 95 % intervals
    result.samples                                                      # one row per test sample
    pruned = apbench.prune(model, "hydra", 0.9, schedule="digits-track")
    apbench.evaluate(pruned)
    apbench.load_results()                                              # what `bench results` lists

:func:`evaluate` is ``bench evaluate --checkpoint``: the run spec from :meth:`bench.spec.RunSpec.for_dataset` (the
command's defaults, so the same settings get the same stored key from Python and from the shell), the model
registered by :func:`bench.store.registration.register_model`, the attacks run and stored by
:func:`bench.evaluate.evaluate`.

An in-memory model needs no file. Its identity in the store is :func:`state_dict_sha256`, the hash of its state
dict, stored as the model's ``checkpoint_sha256`` with no checkpoint path, beside the store's ``normalization``
key; the same weights evaluated again (in any process) reuse the stored evaluation.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from bench.analysis.records import CSV_COLUMNS, load_records
from bench.analysis.results import results_frame, settings_frame
from bench.checkpoints import load_checkpoint_model, sha256_file
from bench.data import get_dataset_info, load_split, parse_eps
from bench.evaluate import EvaluationSummary
from bench.evaluate import evaluate as run_evaluation
from bench.models import ARCHS, NormalizedModel, unwrap
from bench.models.normalize import normalization_key, parse_normalization, resolve_normalization
from bench.paths import atomic_write, cache_dir
from bench.spec import RunSpec
from bench.store import Store
from bench.store.db import shown_url
from bench.store.registration import register_model
from methods.base import get_method
from methods.pipeline import DenseParent, is_same_model, name_holder, prune_checkpoint, taken_name_error

# Status lines (reusing a stored run, resuming one, pruning) go here; logging.basicConfig(level="INFO") shows them.
logger = logging.getLogger("apbench")

SCHEDULES = ("paper", "digits-track")
# The store's `source` of a model handed over as a Python object.
IN_MEMORY_SOURCE = "python"
# (label, EvaluationSummary attribute, key of its Wilson interval), in the order `bench evaluate` prints them.
_ACCURACIES = (
    ("clean", "clean_accuracy", "clean"),
    ("autoattack", "aa_robust_accuracy", "autoattack"),
    ("fmn", "fmn_robust_accuracy", "fmn"),
    ("best_known", "best_robust_accuracy", "best_known"),
)


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """One stored evaluation, as :func:`evaluate` returns it.

    Attributes:
        summary: the figures ``bench evaluate`` prints (:class:`bench.evaluate.EvaluationSummary`): clean,
            AutoAttack, FMN and best-known robust accuracies with Wilson 95 % intervals, FMN's median distance,
            flags, attack seconds; each derived from the stored rows.
        samples: the per-sample rows, one per test sample in ``sample_id`` order, with the columns of the
            per-sample CSV (:data:`bench.analysis.records.CSV_COLUMNS`); NaN where FMN or every attack failed.
        spec: the run spec, whose hash keys the stored evaluation.
        db: the store's URL.
    """

    summary: EvaluationSummary
    samples: pd.DataFrame
    spec: RunSpec
    # Not in the repr a notebook shows: a PostgreSQL URL may hold a password (str() masks it).
    db: str = field(repr=False)

    @property
    def evaluation_id(self) -> int:
        return self.summary.evaluation_id

    @property
    def model_name(self) -> str:
        """The name the model is stored under (``bench results``, ``bench show``)."""
        return self.summary.model_name

    @property
    def accuracies(self) -> pd.DataFrame:
        """Clean, AutoAttack, FMN and best-known robust accuracy (fractions) with their Wilson 95 % intervals."""
        s = self.summary
        rows = {label: (getattr(s, attr), *s.intervals[key]) for label, attr, key in _ACCURACIES}
        return pd.DataFrame.from_dict(rows, orient="index", columns=["accuracy", "low", "high"])

    def __str__(self) -> str:
        s, spec = self.summary, self.spec
        flags = ", ".join(s.flags) + ("  (potentially unreliable)" if s.unreliable else "") if s.flags else "none"
        return "\n".join(
            [
                f"evaluation #{s.evaluation_id} of {s.model_name}: {spec.dataset}, AutoAttack-{spec.version} "
                f"{spec.norm} eps={spec.eps}, FMN {spec.fmn_steps} steps, N={s.n}, seed {spec.seed}"
                + (" (stored run reused)" if s.reused else ""),
                self.accuracies.to_string(float_format="{:.4f}".format),
                f"flags: {flags}",
                f"stored in {shown_url(self.db)}",
            ]
        )


@dataclass(frozen=True, eq=False)
class Pruned:
    """A pruned model, as :func:`prune` returns it (pass it to :func:`evaluate`).

    Attributes:
        model: the pruned network, in eval mode.
        name: its stored name (``HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90_s0``), with the dense model as parent.
        checkpoint: the pruned checkpoint file the store keys it on.
        arch, dataset: its architecture and dataset.
        sparsity: the measured fraction of zero Conv2d/Linear weights.
    """

    model: nn.Module
    name: str
    checkpoint: Path
    arch: str
    dataset: str
    sparsity: float


def state_dict_sha256(model: nn.Module) -> str:
    """The identity of an in-memory model: the hex sha256 of a canonical serialisation of its state dict.

    For each entry in sorted key order the digest reads a header line, the JSON object
    ``{"dtype": "float32", "key": "net.conv1.weight", "shape": [16, 1, 3, 3]}`` (sorted keys, no spaces) and a
    newline, then the tensor's raw bytes: on the CPU, contiguous, in C order, in the machine's byte order
    (little-endian wherever torch runs). The header fixes how many bytes follow, so two different state dicts
    never serialise alike. Parameters and persistent buffers (BatchNorm statistics) count; non-persistent buffers
    (the normalisation layer's mean and std, which the store keys separately as ``normalization``), the module's
    code and ``requires_grad`` do not. Equal weights hash alike in any process, on any device, whatever order the
    submodules were registered in.

    Raises:
        ValueError: an entry that is not a dense tensor (extra state, a sparse or quantized tensor); save the
            model to a checkpoint file and evaluate that instead.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_quantized:
            raise ValueError(
                f"state dict entry {key!r} is not a dense tensor ({type(t).__name__}), so the model has no "
                "canonical identity here; save it to a checkpoint and pass the file's path"
            )
        header = {"dtype": str(t.dtype).removeprefix("torch."), "key": key, "shape": list(t.shape)}
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        raw = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy())
    return digest.hexdigest()


def evaluate(
    model: nn.Module | str | os.PathLike[str] | Pruned,
    dataset: str | None = None,
    *,
    n_samples: int | None = None,
    eps: str | float | None = None,
    norm: str = "Linf",
    version: str = "plus",
    fmn_steps: int = 100,
    batch_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    workers: int = 1,
    db: str | None = None,
    name: str | None = None,
    arch: str | None = None,
    normalization: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> EvaluationResult:
    """Evaluate a model with the standard protocol (AutoAttack + FMN per sample) and store it, as
    ``bench evaluate --checkpoint`` does.

    An ``nn.Module`` is evaluated as it is: it must take inputs in [0, 1] and return logits. No normalisation layer
    is added in front of it: a model built with :func:`bench.models.build_model` (or any
    :class:`bench.models.NormalizedModel`) carries its own, which the store records as its ``normalization``; any
    other module is recorded as taking raw [0, 1] inputs (``none``). Its identity is :func:`state_dict_sha256`; it
    is neither moved nor modified (the attacks run on a prepared copy). A checkpoint path is loaded into ``arch``
    behind the dataset's normalisation (or ``normalization``), exactly as the command line loads ``--checkpoint``,
    and keyed on the file's sha256. A :class:`Pruned` model from :func:`prune` is evaluated as the stored pruned
    model (its checkpoint).

    Args:
        model: an ``nn.Module``, a checkpoint file (``.pt``/``.pth``/``.pth.tar``/``.safetensors``) or a
            :class:`Pruned`.
        dataset: a registered dataset (``bench datasets``) [default: the pruned model's, else ``"digits"``].
        n_samples, eps, norm, version, fmn_steps, batch_size, seed: the run spec; ``None`` takes the dataset's
            protocol value, as the command line does (:meth:`RunSpec.for_dataset`). Write a fractional ``eps``
            as text (``"8/255"``): the text is part of the stored key.
        device: torch device the attacks run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        workers: CPU processes attacking chunks in parallel; results do not depend on it. The model is sent to
            them by pickling, so its class must be importable from a module (not defined in a notebook).
        db: SQLAlchemy URL or SQLite path of the store [default: ``$BENCH_DB`` or ``sqlite:///results.db``].
        name: the name to store a new model under [default: the architecture (or file stem) and the hash]; a
            name another model holds is refused.
        arch: the registered architecture of a checkpoint (required for a path); for a module, the label stored
            [default: the registered architecture whose network has the module's state-dict keys and shapes, else
            the module's class name].
        normalization: for a checkpoint only, as ``--normalization``: ``dataset``, ``none`` or ``MEAN/STD``.
        data_dir: folder with dataset archives [default: ``$BENCH_DATA_DIR`` or ``~/.cache/apbench/data``].
        overwrite: recompute even if this run is stored.
        progress: show progress bars.

    Returns:
        The stored evaluation: summary, per-sample rows, spec.

    Raises:
        ValueError: a bad option, a model whose outputs do not fit the dataset, a taken name; one line with the fix.
        UnknownNameError: an unregistered dataset or architecture (with a did-you-mean).
    """
    if isinstance(model, Pruned):
        if dataset not in (None, model.dataset) or arch not in (None, model.arch):
            raise ValueError(
                f"the pruned model is {model.arch} on {model.dataset}; drop dataset=/arch= to evaluate it there"
            )
        model, dataset, arch = model.checkpoint, model.dataset, model.arch
    dataset = dataset or "digits"
    device = _device(device)
    spec = RunSpec.for_dataset(
        dataset,
        n_samples=n_samples,
        eps=eps,
        norm=norm,
        version=version,
        fmn_steps=fmn_steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int of at least 1, got {workers!r}")
    if isinstance(model, nn.Module):
        if normalization is not None:
            raise ValueError(
                "normalization= describes a checkpoint file; an in-memory model is evaluated as it is (give it its "
                "own normalisation layer, e.g. bench.models.build_model(arch, dataset, normalization))"
            )
        source = _in_memory_source(model, dataset, arch, workers)
    elif isinstance(model, (str, os.PathLike)):
        source = _checkpoint_source(Path(model), dataset, arch, normalization)
    else:
        raise ValueError(
            f"model must be an nn.Module, a checkpoint path or what apbench.prune returns; got {type(model).__name__}"
        )
    x, y = load_split(dataset, "test", data_dir=data_dir)
    store = Store(db)
    try:
        if name is not None:
            _check_name(store, name, source["sha"], normalization_key(dataset, source["normalization"]))
        row = register_model(
            store,
            source["path"],
            source["model"],
            arch=source["arch"],
            dataset=dataset,
            name=name,
            source=source["source"],
            provenance=source["provenance"],
            checkpoint_sha256=None if source["path"] is not None else source["sha"],
        )
        if name is not None and row.name != name:
            logger.warning("this model is already stored as %r; name %r not applied", row.name, name)
        summary = run_evaluation(
            store,
            row.id,
            source["model"],
            x,
            y,
            spec,
            overwrite=overwrite,
            progress=progress,
            workers=workers,
            log=logger.info,
        )
        with store.session() as s:
            records = load_records(s, summary.evaluation_id)
        samples = pd.DataFrame({c: getattr(records, c) for c in CSV_COLUMNS if getattr(records, c) is not None})
        return EvaluationResult(summary=summary, samples=samples, spec=spec, db=store.url)
    finally:
        store.dispose()


def prune(
    model_or_path: nn.Module | str | os.PathLike[str],
    method: str = "hydra",
    sparsity: float = 0.9,
    *,
    dataset: str = "digits",
    arch: str | None = None,
    seed: int = 0,
    eps: str | float | None = None,
    schedule: str = "paper",
    db: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    **config: Any,
) -> Pruned:
    """Prune a dense model with a registered method and store the result with the dense model as its parent, as
    ``bench prune --dense`` does (:func:`methods.pipeline.prune_checkpoint`).

    An in-memory dense model is registered under :func:`state_dict_sha256` (the row :func:`evaluate` uses for it)
    and its state dict written once to the cache (``$BENCH_CACHE_DIR/models``) for the pruning run to load; it
    must be a registered architecture behind the dataset's normalisation (:func:`bench.models.build_model`). The
    pruned checkpoint is cached by content: pruning the same model the same way again reuses it.

    Args:
        model_or_path: the dense model, or its checkpoint file.
        method: a registered pruning method (``bench methods``).
        sparsity: the target fraction of zero Conv2d/Linear weights (structured methods: of parameters removed).
        dataset: the dataset it was trained on; pruning trains on its training split.
        arch: the registered architecture (required for a path) [default for a module: the one whose network has
            its state-dict keys and shapes].
        seed: seed of the pruning run.
        eps: the adversarial-training L∞ budget, e.g. ``"8/255"`` [default: the dataset's].
        schedule: ``"paper"`` (the method's published schedule) or ``"digits-track"`` (its CPU-sized schedule).
        db: the store [default: ``$BENCH_DB`` or ``sqlite:///results.db``].
        data_dir: folder with dataset archives.
        out_dir: where pruned checkpoints are written [default: the cache directory].
        **config: method options overriding the schedule's (``prune_epochs=1``); unknown names are refused.

    Returns:
        The pruned model, its stored name and checkpoint.
    """
    m = get_method(method)
    m.check_sparsity(sparsity)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    track = schedule == "digits-track"
    (m.digits_config if track else m.config)(**config)  # unknown options fail before any work
    default_eps = get_dataset_info(dataset).default_eps_value
    eps_value = default_eps if eps is None else parse_eps(repr(eps) if isinstance(eps, (int, float)) else eps)
    if eps_value > 1:
        raise ValueError(f"eps must be in (0, 1] (adversarial training's budget is L∞); got {eps}: e.g. 8/255")
    store = functools.cache(lambda: Store(db))  # opened once there is something to store
    common = dict(
        eps=eps_value,
        default_eps=default_eps,
        seed=seed,
        track=track,
        overrides=config,
        data_dir=data_dir,
        out_dir=Path(out_dir) if out_dir is not None else None,
        log=logger.info,
    )
    try:
        if isinstance(model_or_path, nn.Module):
            arch, dense_path, sha = _in_memory_dense(model_or_path, dataset, arch)
            load_checkpoint_model(dense_path, arch, dataset)  # the cached file rebuilds the network
            row = register_model(
                store(),
                None,
                model_or_path,
                arch=arch,
                dataset=dataset,
                source=IN_MEMORY_SOURCE,
                provenance={"identity": "state_dict_sha256"},
                checkpoint_sha256=sha,
            )
            result = prune_checkpoint(store, method, sparsity, dense_path=dense_path, dense_row=row, **common)
        elif isinstance(model_or_path, (str, os.PathLike)):
            if arch is None:
                raise ValueError("a checkpoint path needs arch= (a registered architecture: bench models)")
            ARCHS.get(arch)
            load_checkpoint_model(model_or_path, arch, dataset)  # a wrong arch/dataset fails before any work
            parent = DenseParent(path=Path(model_or_path), arch=arch, dataset=dataset)
            result = prune_checkpoint(store, method, sparsity, parent=parent, **common)
        else:
            raise ValueError(f"model_or_path must be an nn.Module or a checkpoint path; got {type(model_or_path)}")
    finally:
        if store.cache_info().currsize:
            store().dispose()
    return Pruned(
        model=load_checkpoint_model(result.path, arch, dataset),
        name=result.row.name,
        checkpoint=result.path,
        arch=arch,
        dataset=dataset,
        sparsity=result.row.measured_sparsity,
    )


def load_results(db: str | None = None, *, model: str | int | None = None, by_setting: bool = False) -> pd.DataFrame:
    """The stored evaluations, one row each, as ``bench results`` lists them (accuracies as fractions in [0, 1]).

    Args:
        db: the store [default: ``$BENCH_DB`` or ``sqlite:///results.db``]; it is only read.
        model: only this model's evaluations: its id, its name, or a shell pattern over names (``"HYDRA*"``).
        by_setting: one row per setting and protocol instead, replicates (seeds) aggregated, as
            ``bench results --by-setting`` lists them; not with ``model``.

    Returns:
        A DataFrame with the columns of :data:`bench.analysis.results.RESULT_COLUMNS`
        (:data:`bench.analysis.results.SETTING_COLUMNS` with ``by_setting``).
    """
    if by_setting and model is not None:
        raise ValueError("load_results(by_setting=True) aggregates every model's seeds; leave model= out")
    store = Store(db, read_only=True)
    try:
        return settings_frame(store) if by_setting else results_frame(store, model)
    finally:
        store.dispose()


def _device(device: str) -> str:
    # The spec stores torch's spelling ("cuda" stays "cuda"), as the command line does.
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here; use device='cpu'")
    return str(dev)


def _checkpoint_source(path: Path, dataset: str, arch: str | None, normalization: str | None) -> dict[str, Any]:
    if arch is None:
        raise ValueError(f"checkpoint {path} needs arch= (a registered architecture: bench models)")
    ARCHS.get(arch)
    parsed = parse_normalization(normalization, dataset) if normalization is not None else None
    return {
        "model": load_checkpoint_model(path, arch, dataset, normalization=parsed),
        "path": path,
        "sha": sha256_file(path),
        "arch": arch,
        "normalization": parsed,
        "source": "local",
        "provenance": {"normalization": parsed} if parsed is not None else None,
    }


def _in_memory_source(model: nn.Module, dataset: str, arch: str | None, workers: int) -> dict[str, Any]:
    _check_outputs(model, dataset)
    if workers > 1:
        _check_picklable_classes(model)
    normalization = _normalization_of(model, dataset)
    return {
        "model": model,
        "path": None,
        "sha": state_dict_sha256(model),
        "arch": arch or infer_arch(model, dataset) or type(unwrap(model)).__name__,
        "normalization": normalization,
        "source": IN_MEMORY_SOURCE,
        "provenance": {"normalization": normalization, "identity": "state_dict_sha256"},
    }


def _in_memory_dense(model: nn.Module, dataset: str, arch: str | None) -> tuple[str, Path, str]:
    """``(arch, cached state-dict file, identity)`` of an in-memory dense model to prune."""
    if not isinstance(model, NormalizedModel) or normalization_key(dataset, _normalization_of(model, dataset)) != (
        "dataset"
    ):
        raise ValueError(
            f"pruning rebuilds the network behind {dataset}'s normalisation layer; give a model built with "
            "bench.models.build_model(arch, dataset), or a checkpoint path"
        )
    arch = arch or infer_arch(model, dataset)
    if arch is None:
        raise ValueError(
            f"no registered architecture has this {type(unwrap(model)).__name__}'s state-dict keys and shapes; name "
            "it with arch= (bench models)"
        )
    ARCHS.get(arch)
    sha = state_dict_sha256(model)
    path = cache_dir() / "models" / f"{sha}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_write(path, lambda f: torch.save(state, f))
    return arch, path, sha


def infer_arch(model: nn.Module, dataset: str) -> str | None:
    """The registered architecture whose network (built for ``dataset``) has the same class, state-dict keys and
    shapes as ``model``'s, or None when none or several do. Candidates are built on the meta device (no memory)."""
    info = get_dataset_info(dataset)
    net = unwrap(model)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = []
    for name, candidate in ARCHS.items():
        if candidate.input_shape != info.input_shape:
            continue
        with torch.device("meta"):
            built = candidate.builder(info.num_classes)
        if type(built) is type(net) and {k: tuple(v.shape) for k, v in built.state_dict().items()} == shapes:
            found.append(name)
    return found[0] if len(found) == 1 else None


def _normalization_of(model: nn.Module, dataset: str) -> dict[str, list[float]]:
    """The input normalisation the store records for a module: its own layer, else none (raw [0, 1] inputs)."""
    if isinstance(model, NormalizedModel):
        layer = model.normalize
        given = {"mean": layer.mean.flatten().tolist(), "std": layer.std.flatten().tolist()}
        return resolve_normalization(dataset, given, where="the model's normalisation layer")
    channels = get_dataset_info(dataset).input_shape[0]
    return {"mean": [0.0] * channels, "std": [1.0] * channels}


def _check_outputs(model: nn.Module, dataset: str) -> None:
    """Refuse a module that does not map two test-shaped inputs to one logit per class each (a copy runs it, so
    the caller's BatchNorm statistics and mode stay as they are)."""
    info = get_dataset_info(dataset)
    probe = copy.deepcopy(model).eval()
    param = next(probe.parameters(), None)
    x = torch.rand(2, *info.input_shape, device=param.device if param is not None else "cpu")
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception as err:  # whatever the module raises, the cause is the same: it does not take these inputs
        raise ValueError(
            f"the model fails on {dataset} inputs of shape {tuple(x.shape)} ({type(err).__name__}: {err}); it must "
            "take images in [0, 1] of that shape"
        ) from err
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, info.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the model returns {shape} for 2 {dataset} images, but the benchmark needs logits of shape "
            f"(2, {info.num_classes}): one per class"
        )


def _check_picklable_classes(model: nn.Module) -> None:
    # Worker processes are spawned: they import each module class by name, which fails for a class defined in an
    # interactive session (a notebook's or the REPL's __main__ has no file to import).
    if hasattr(sys.modules.get("__main__"), "__file__"):
        return
    local = sorted({type(m).__name__ for m in model.modules() if type(m).__module__ == "__main__"})
    if local:
        raise ValueError(
            f"workers > 1 sends the model to new processes, which cannot import {', '.join(local)} (defined in this "
            "interactive session); define the class in a module, or use workers=1"
        )


def _check_name(store: Store, name: str, sha: str, key: str) -> None:
    """Refuse a chosen name that another model (other weights or normalisation) holds."""
    with store.session() as s:
        holder = name_holder(s, name)
        if holder is not None and not is_same_model(holder, sha, key):
            raise taken_name_error("name", name, holder)
