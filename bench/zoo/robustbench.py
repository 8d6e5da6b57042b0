"""RobustBench interoperability: export an evaluated model as a ``model_info`` JSON, import a RobustBench model.

Export follows the files in RobustBench/robustbench ``model_info/<dataset>/<threat_model>/<Name>.json`` (e.g.
``cifar10/Linf/Sehwag2020Hydra.json``): ``link``, ``name`` (the paper title), ``authors`` (one comma-separated
string), ``additional_data``, ``number_forward_passes``, ``dataset``, ``venue`` (``"NeurIPS 2020"``),
``architecture`` (``"WideResNet-28-10"``), ``eps`` (``"8/255"``), ``clean_acc`` and ``autoattack_acc`` as
percentages in strings with two decimals, ``reported`` (the authors' robust accuracy), and optionally
``footnote``, ``external`` (best known robust accuracy from other attacks) and ``unreliable``. RobustBench renders
the text fields into HTML without escaping, so they are HTML-escaped here; our own store keeps them verbatim.

Import uses the optional ``robustbench`` package (``pip install apbench[robustbench]``): its
``robustbench.utils.load_model`` downloads and builds the model; the weights are matched to a registered
architecture, checked logit for logit, saved as a plain state dict and registered as a dense model named
``robustbench:<Name>``, so manifests can name it as ``dense_parent``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.analysis.format import percent
from bench.models import WRN_UNUSED_PREFIXES
from bench.zoo.manifest import ROBUSTBENCH_NAME_PATTERN

ROBUSTBENCH_PREFIX = "robustbench:"
INSTALL_HINT = (
    "pip install 'apbench[robustbench]' (robustbench 1.1.1 from PyPI also needs the reference AutoAttack, which "
    "is not on PyPI: pip install git+https://github.com/fra31/auto-attack)"
)
# RobustBench's spelling of the architectures (model_info "architecture").
ARCH_NAMES = {
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet56": "ResNet-56",
    "vgg16_bn": "VGG-16",
    "vgg16_bn_hydra": "VGG-16",
    "vgg16_mad": "VGG-16",
    "vgg16_pwoa": "VGG-16",
    "wrn28_4": "WideResNet-28-4",
    "wrn28_10": "WideResNet-28-10",
    "wrn34_10": "WideResNet-34-10",
    "mobilenetv2": "MobileNetV2",
}
_NORMALISATION_KEYS = (("mu", "sigma"), ("mean", "std"))


class RobustBenchUnavailable(RuntimeError):
    """The optional ``robustbench`` package is missing or cannot be imported."""


# --------------------------------------------------------------------------------------------------------
# Export


def _percent(value: float | None) -> str | None:
    # RobustBench's model_info files write accuracies as percentage strings ("44.83") and null when unknown.
    return None if value is None else percent(value, unit="")


def _name_for(model_row, manifest) -> str:
    """RobustBench-style file name: ``<Author><Year><Word>_<Arch>_<US|S>_<sparsity>`` for a zoo entry."""
    if manifest is not None:
        parts = manifest.model_id.split("_")
        return "_".join(parts[1:3] + parts[4:])  # drop <ShortName> and <Dataset>
    return re.sub(r"[^A-Za-z0-9_-]", "_", model_row.name)


def choose_evaluation(model_row, evaluations: list) -> Any:
    """The evaluation to export: complete, preferring AutoAttack standard (RobustBench's), then the largest N."""
    complete = [ev for ev in evaluations if ev.status == "complete"]
    if not complete:
        raise ValueError(
            f"model {model_row.name!r} has no complete evaluation to export; run bench evaluate on it first"
        )
    return max(complete, key=lambda ev: (ev.spec.get("version") == "standard", ev.n_samples, ev.id))


def model_info(model_row, evaluation, manifest=None) -> dict[str, Any]:
    """RobustBench's ``model_info`` dict for a stored model and one of its evaluations.

    Args:
        model_row: the :class:`bench.store.Model`.
        evaluation: a complete :class:`bench.store.Evaluation` of it.
        manifest: its zoo manifest, for the paper fields (else the method card's, where registered).

    Returns:
        The JSON object, keys in RobustBench's order; text fields HTML-escaped; ``additional_data`` always a
        boolean (false, with a footnote, when nobody stated it).
    """
    spec = evaluation.spec
    paper = _paper_fields(model_row, manifest)
    footnote = [
        f"Evaluated by apbench: AutoAttack-{spec['version']} and FMN on the first {evaluation.n_samples} test "
        f"samples (seed {spec['seed']}), protocol {spec['protocol']}.",
        f"Measured sparsity {model_row.measured_sparsity:.2%} ({model_row.method}, {model_row.structure}).",
    ]
    if spec.get("version") != "standard":
        footnote.append("RobustBench's own numbers use AutoAttack standard.")
    if paper["additional_data"] is None:
        # RobustBench's field is a boolean; an unknown is exported as false and said so.
        footnote.append("Whether training used data beyond the training set is not stated (exported as false).")
    own = model_row.reported or {}
    # RobustBench's "reported" is the authors' claim; another benchmark's re-evaluation is not one.
    reported = own.get("robust") if own.get("kind", "claim") == "claim" else None
    info: dict[str, Any] = {
        "link": paper["link"],
        "name": paper["name"],
        "authors": paper["authors"],
        "additional_data": bool(paper["additional_data"]),
        "number_forward_passes": paper["number_forward_passes"],
        "dataset": model_row.dataset,
        "venue": paper["venue"],
        "architecture": html.escape(ARCH_NAMES.get(model_row.arch, model_row.arch)),
        "eps": spec["eps"],
        "clean_acc": _percent(evaluation.clean_accuracy),
        "reported": _percent(reported),
        "autoattack_acc": _percent(evaluation.aa_robust_accuracy),
        "footnote": html.escape(" ".join(footnote)),
    }
    best = evaluation.best_robust_accuracy
    if best is not None and evaluation.aa_robust_accuracy is not None and best < evaluation.aa_robust_accuracy:
        info["external"] = _percent(best)
    info["unreliable"] = bool(evaluation.unreliable)
    return info


def _paper_fields(model_row, manifest) -> dict[str, Any]:
    def esc(text: str | None) -> str:
        return html.escape(text) if text else ""

    if manifest is not None:
        p = manifest.paper
        venue = " ".join(str(v) for v in (p.venue, p.year) if v is not None)
        return {
            "link": esc(p.url),
            "name": esc(p.title),
            "authors": esc(", ".join(p.authors)),
            "additional_data": manifest.model.additional_data,
            "number_forward_passes": manifest.model.number_forward_passes,
            "venue": esc(venue),
        }
    fields = {"link": "", "name": esc(model_row.name), "authors": "", "venue": ""}
    if model_row.method != "dense":
        try:
            from methods.base import get_method

            card = get_method(model_row.method).card
            fields = {
                "link": esc(card.paper_url),
                "name": esc(card.paper_title),
                "authors": "",
                "venue": esc(f"{card.venue} {card.year}"),
            }
        except Exception:  # a method from a submission that has no adapter here
            pass
    return {**fields, "additional_data": None, "number_forward_passes": 1}


def export_model_info(store, model_ref: str, *, out_dir: Path, zoo=None, evaluation_id: int | None = None) -> Path:
    """Write ``<out_dir>/<dataset>/<Linf|L2>/<Name>.json`` for a stored model (by zoo id or stored name).

    Returns:
        The written path.
    """
    from sqlalchemy import select

    from bench.store import Evaluation, Model

    with store.session() as s:
        row = s.scalars(select(Model).where(Model.name == model_ref)).one_or_none()
        if row is None:
            row = next(
                (
                    r
                    for r in s.scalars(select(Model))
                    if (r.provenance or {}).get("zoo", {}).get("model_id") == model_ref
                ),
                None,
            )
        if row is None:
            raise ValueError(
                f"no stored model named {model_ref!r}; evaluate it first (bench evaluate --model-id {model_ref}) "
                "or see bench results"
            )
        evaluations = list(s.scalars(select(Evaluation).where(Evaluation.model_id == row.id)))
        if evaluation_id is not None:
            evaluations = [ev for ev in evaluations if ev.id == evaluation_id]
            if not evaluations:
                raise ValueError(f"evaluation #{evaluation_id} is not an evaluation of {row.name}")
        evaluation = choose_evaluation(row, evaluations)
        zoo_id = (row.provenance or {}).get("zoo", {}).get("model_id")
        manifest = None
        if zoo is not None and zoo_id in zoo.entries:
            manifest = zoo.entries[zoo_id].manifest
        info = model_info(row, evaluation, manifest)
        name = _name_for(row, manifest)
        threat = evaluation.spec["norm"]
    path = Path(out_dir) / row.dataset / threat / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------------
# Import


def load_robustbench_model(name: str, dataset: str, threat_model: str, model_dir: Path) -> torch.nn.Module:
    """``robustbench.utils.load_model``, or :class:`RobustBenchUnavailable` naming what to install."""
    if not re.fullmatch(ROBUSTBENCH_NAME_PATTERN, name):
        raise ValueError(f"invalid RobustBench model name {name!r}")
    try:
        from robustbench.utils import load_model
    except ImportError as err:
        missing = getattr(err, "name", None)
        detail = f" (it needs the module {missing!r})" if missing and missing != "robustbench" else ""
        raise RobustBenchUnavailable(
            f"importing a RobustBench model needs the robustbench package, which cannot be imported here{detail}. "
            f"Fix: {INSTALL_HINT}"
        ) from None
    return load_model(model_name=name, dataset=dataset, threat_model=threat_model, model_dir=str(model_dir))


def match_architecture(
    state_dict: dict[str, torch.Tensor], num_classes: int
) -> tuple[str, dict[str, torch.Tensor], dict[str, list[float]] | None]:
    """Find the registered architecture whose state dict has exactly these keys and shapes.

    Unused ``sub_block1.*`` modules are dropped; a top-level ``mu``/``sigma`` (or ``mean``/``std``) pair is taken
    as the model's input normalisation.

    Returns:
        ``(arch, weights, normalisation or None)``.
    """
    from bench.models import ARCHS

    weights = {k: v for k, v in state_dict.items() if not k.startswith(WRN_UNUSED_PREFIXES)}
    normalization = None
    for mean_key, std_key in _NORMALISATION_KEYS:
        if mean_key in weights and std_key in weights:
            mean, std = weights.pop(mean_key), weights.pop(std_key)
            normalization = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
            break
    wanted = {k: tuple(v.shape) for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    for arch, info in ARCHS.items():
        with torch.device("meta"):
            net = info.builder(num_classes)
        have = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        if have == wanted:
            return arch, weights, normalization
    keys = ", ".join(list(wanted)[:6])
    raise ValueError(
        f"no registered architecture has these weights ({len(wanted)} tensors: {keys}, ...); "
        "register it in bench/models/ (bench models lists those there are)"
    )


def import_robustbench(
    store,
    name: str,
    *,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: Path | None = None,
    log: Callable[[str], None] = lambda _msg: None,
):
    """Register RobustBench model ``name`` as a dense model ``robustbench:<name>``; returns the model row."""
    from bench.checkpoints import load_weights
    from bench.data import get_dataset_info
    from bench.models import build_model
    from bench.paths import atomic_write
    from bench.provenance import package_version
    from bench.store.registration import register_model
    from bench.zoo.fetch import zoo_cache_dir

    info = get_dataset_info(dataset)
    folder = Path(model_dir) if model_dir is not None else zoo_cache_dir() / "robustbench"
    folder.mkdir(parents=True, exist_ok=True)
    log(f"loading {name} ({dataset}, {threat_model}) with robustbench.utils.load_model into {folder}")
    source = load_robustbench_model(name, dataset, threat_model, folder).cpu().eval()
    state = {k: v.detach().cpu() for k, v in source.state_dict().items()}
    arch, weights, normalization = match_architecture(state, info.num_classes)
    if normalization is None:
        # RobustBench models take [0, 1] inputs; without stored constants they normalise nothing.
        channels = info.input_shape[0]
        normalization = {"mean": [0.0] * channels, "std": [1.0] * channels}
    model = build_model(arch, dataset, normalization)
    # Non-finite weights are refused naming the file RobustBench downloaded (delete it to download it again).
    load_weights(model, weights, source=folder / dataset / threat_model / f"{name}.pt")
    model.eval()
    probe = torch.rand(4, *info.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.allclose(model(probe), source(probe), atol=1e-4, rtol=1e-4):
            raise ValueError(
                f"{name}'s weights load into {arch} but its outputs differ from RobustBench's model; it needs an "
                "architecture of its own (bench/models/)"
            )
    path = folder / dataset / threat_model / f"{name}.apbench.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({k: v.contiguous() for k, v in weights.items()}, f))
    row = register_model(
        store,
        path,
        model,
        arch=arch,
        dataset=dataset,
        method="dense",
        structure="dense",
        name=f"{ROBUSTBENCH_PREFIX}{name}",
        source="robustbench",
        provenance={
            "normalization": normalization,
            "robustbench": {
                "model_name": name,
                "dataset": dataset,
                "threat_model": threat_model,
                "package_version": package_version("robustbench"),
                "dropped_keys": sorted(k for k in state if k.startswith(WRN_UNUSED_PREFIXES)),
            },
        },
    )
    _link_children(store, row)
    return row


def _link_children(store, parent) -> None:
    from sqlalchemy import select

    from bench.store import Model

    with store.session() as s:
        for child in s.scalars(select(Model).where(Model.parent_id.is_(None), Model.source == "zoo")):
            if (child.provenance or {}).get("zoo", {}).get("dense_parent") == parent.name:
                child.parent_id = parent.id
