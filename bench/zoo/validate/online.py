"""Checks that need the network: fetch (size-capped, sha256-checked), load weights-only through the converter,
the sparsity claim and the clean accuracy on the first test samples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.zoo.fetch import FetchError, fetch_checkpoint
from bench.zoo.validate.report import CLEAN_CONFIDENCE, CLEAN_SLACK, FileReport, ValidationOptions


def clean_accuracy_interval(correct: int, n: int) -> tuple[float, float]:
    """The range a reported clean accuracy must fall in: the 99.9 % Wilson interval of ``correct/n``, ±1 point."""
    from bench.analysis.stats import wilson_interval

    low, high = wilson_interval(correct, n, confidence=CLEAN_CONFIDENCE)
    return max(0.0, low - CLEAN_SLACK), min(1.0, high + CLEAN_SLACK)


def check_online(report: FileReport, options: ValidationOptions, log: Callable[[str], None]) -> None:
    """Fetch, load (weights only), measure sparsity and clean accuracy."""
    m = report.manifest
    if m is None or not report.ok:
        report.skipped.append(("fetch, load, sparsity, clean accuracy", "the manifest has errors"))
        return
    from bench.data import DATASETS
    from bench.models import ARCHS

    if m.checkpoint.url is None:
        reason = m.unknown.get("checkpoint.url", "no URL")
        report.skipped.append(("fetch, load, sparsity, clean accuracy", f"no checkpoint.url ({reason})"))
        return
    if m.model.arch not in ARCHS or m.model.dataset not in DATASETS:
        report.skipped.append(
            ("fetch, load, sparsity, clean accuracy", "its architecture or dataset is not registered")
        )
        return
    try:
        fetched = fetch_checkpoint(
            m.model_id,
            m.checkpoint.url,
            m.checkpoint.file_name,
            sha256=m.checkpoint.sha256,
            size=m.checkpoint.size,
            max_size=options.max_size,
            root=options.cache_root,
            log=log,
        )
    except FetchError as err:
        report.error(err.field, str(err))
        return
    report.measured.update(sha256=fetched.sha256, size=fetched.size, path=str(fetched.path))
    report.passed.append(f"fetch and sha256 ({fetched.verified_by})")
    if fetched.verified_by == "first download":
        report.note("checkpoint.sha256", f"first download: recorded sha256 {fetched.sha256} (size {fetched.size:,})")
    model = load_entry_model(report, fetched.path)
    if model is None:
        return
    report.passed.append("load (weights only)")
    _check_sparsity(report, model, options)
    _check_clean_accuracy(report, model, options)


def load_entry_model(report: FileReport, path: Path):
    """Convert and load the fetched file; a refusal becomes an error naming the field."""
    from bench.checkpoints import CheckpointMismatchError, UnsafeCheckpointError
    from bench.formats import load_converted_model

    m = report.manifest
    try:
        return load_converted_model(path, m.checkpoint.format, m.model.arch, m.model.dataset, k=m.checkpoint.k)
    except UnsafeCheckpointError as err:
        report.error("checkpoint.url", f"refused: {err}")
    except CheckpointMismatchError as err:
        report.error(
            "model.arch",
            f"the converted weights do not fit {m.model.arch}: {err}",
            "check model.arch and checkpoint.format (bench formats)",
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        report.error(
            "checkpoint.format",
            f"{m.checkpoint.format} could not read the file: {err}",
            "check checkpoint.format (bench formats) and checkpoint.k",
        )
    return None


def _check_sparsity(report: FileReport, model, options: ValidationOptions) -> None:
    from bench.sparsity import measure_sparsity

    m = report.manifest
    measured = measure_sparsity(model).sparsity
    report.measured["sparsity"] = measured
    claim = m.model.claimed_sparsity
    if claim is None:
        reason = m.unknown.get("model.claimed_sparsity", "no claim")
        report.skipped.append(("sparsity claim", f"measured {measured:.4f}; nothing to compare ({reason})"))
        return
    if abs(measured - claim) > options.sparsity_tolerance:
        report.error(
            "model.claimed_sparsity",
            f"claims {claim:.4f} but the checkpoint measures {measured:.4f} (exactly-zero Conv2d/Linear weights, "
            f"biases and BatchNorm excluded); tolerance ±{options.sparsity_tolerance:.4f}",
            f"set it to {measured:.4f}, or check that the uploaded file is the pruned one",
        )
        return
    report.passed.append(f"sparsity {measured:.4f} vs claim {claim:.4f} (±{options.sparsity_tolerance})")


def _check_clean_accuracy(report: FileReport, model, options: ValidationOptions) -> None:
    import torch

    from bench.data import DatasetNotFoundError, load_split

    m = report.manifest
    if m.reported.clean is None:
        reason = m.unknown.get("reported.clean", "none reported")
        report.skipped.append(("clean accuracy", f"no reported clean accuracy ({reason})"))
        return
    try:
        x, y = load_split(m.model.dataset, "test", data_dir=options.data_dir, download=False)
    except DatasetNotFoundError as err:
        first = str(err).splitlines()[0]
        report.skipped.append(("clean accuracy", f"the {m.model.dataset} test split is not on this machine ({first})"))
        return
    n = min(options.clean_samples, len(y))
    model = model.to(options.device).eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, n, 250):
            xb = x[start : min(start + 250, n)].to(options.device)
            correct += int((model(xb).argmax(1).cpu() == y[start : min(start + 250, n)]).sum())
    accuracy = correct / n
    low, high = clean_accuracy_interval(correct, n)
    report.measured["clean_accuracy"] = accuracy
    report.measured["clean_samples"] = n
    if not low <= m.reported.clean <= high:
        report.error(
            "reported.clean",
            f"reported {m.reported.clean:.2%}, but the checkpoint gets {accuracy:.2%} on the first {n} "
            f"{m.model.dataset} test samples; accepted range [{low:.2%}, {high:.2%}] (99.9 % Wilson interval ±1 "
            "point)",
            "check the input normalisation (checkpoint.format) and that the file is the evaluated one",
        )
        return
    report.passed.append(f"clean accuracy {accuracy:.2%} on {n} samples vs reported {m.reported.clean:.2%}")
