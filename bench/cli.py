"""The ``bench`` command line (click).

Examples:
    bench evaluate                                     # the built-in digits track's dense model
    bench evaluate --checkpoint r18.pt --arch resnet18 --dataset cifar10 --n-samples 1000 --device cuda
    bench results --format csv
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable

import click
import torch

from bench.registry import UnknownNameError

EPILOG_EVALUATE = """\b
Examples:
  bench evaluate
  bench evaluate --checkpoint model.pt --arch resnet18 --dataset cifar10 --n-samples 1000 --device cuda
  bench evaluate --checkpoint model.pt --arch small_cnn --dataset digits --version standard --norm L2 --eps 0.5
"""


def friendly_errors(fn: Callable) -> Callable:
    """Turn expected failures (bad names, files, values) into one-line ``Error:`` messages, exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UnknownNameError, ValueError, FileNotFoundError, RuntimeError) as err:
            raise click.ClickException(str(err)) from err

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="apbench")
def main() -> None:
    """apbench: every pruned model judged the same way, strongly, per sample."""


def _db_option(fn: Callable) -> Callable:
    return click.option(
        "--db",
        "db",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL or SQLite path of the results store [default: $BENCH_DB or sqlite:///results.db].",
    )(fn)


def _format_interval(value: float, interval: tuple[float, float]) -> str:
    low, high = interval
    return f"{value:7.2%}  [{low:.2%}, {high:.2%}]"


def _resolve_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch sees no CUDA device here; use --device cpu")
    return str(dev)


@main.command(epilog=EPILOG_EVALUATE)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="State dict to evaluate (.pt/.pth/.pth.tar/.safetensors). Omit for the digits track's dense model.",
)
@click.option("--arch", default=None, help="Architecture (bench models). Required with --checkpoint.")
@click.option("--dataset", default=None, help="Dataset (bench datasets). Required with --checkpoint.")
@click.option("--track", default="digits", show_default=True, help="Built-in track used when no --checkpoint is given.")
@click.option("--name", default=None, help="Name to store the model under [default: file stem + hash].")
@click.option(
    "--n-samples",
    type=int,
    default=None,
    help="Evaluate the first N test samples [default: the dataset's protocol N].",
)
@click.option("--eps", default=None, help='Perturbation budget, e.g. "8/255" or 0.5 [default: the dataset\'s].')
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default="Linf", show_default=True)
@click.option(
    "--version",
    "aa_version",
    type=click.Choice(["plus", "standard"]),
    default="plus",
    show_default=True,
    help="AutoAttack version.",
)
@click.option("--fmn-steps", type=int, default=100, show_default=True, help="FMN iterations.")
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Samples per chunk (attack batch and unit of resumption) [default: the dataset's; 250 for CIFAR].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--threads",
    type=int,
    default=1,
    show_default=True,
    help="torch CPU threads per process (one per process is fastest on small models).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="CPU processes attacking chunks in parallel [default: the CPU count on cpu, 1 on cuda]; "
    "results do not depend on it.",
)
@_db_option
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with dataset archives [default: $BENCH_DATA_DIR or ~/.cache/apbench/data].",
)
@click.option("--overwrite", is_flag=True, help="Recompute even if this run is already stored.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@friendly_errors
def evaluate(
    checkpoint,
    arch,
    dataset,
    track,
    name,
    n_samples,
    eps,
    norm,
    aa_version,
    fmn_steps,
    batch_size,
    seed,
    device,
    threads,
    workers,
    db,
    data_dir,
    overwrite,
    no_progress,
):
    """Evaluate a checkpoint with the standard protocol (AutoAttack + FMN per sample) and store it."""
    from bench.catalog import load_checkpoint_model, register_model
    from bench.data import get_dataset_info, load_split, parse_eps
    from bench.evaluate import evaluate as run_evaluation
    from bench.models import ARCHS
    from bench.spec import RunSpec
    from bench.store import Store

    torch.set_num_threads(threads)
    device = _resolve_device(device)
    # Everything the user typed is checked before the store is opened, so a typo leaves no results.db behind.
    register_kw: dict = {"name": name}
    if checkpoint is None:
        from bench.track import TRACKS, dense_checkpoint

        if track not in TRACKS:
            raise ValueError(f"unknown track {track!r}; known: {', '.join(TRACKS)}")
        tr = TRACKS[track]
        if arch not in (None, tr.arch) or dataset not in (None, tr.dataset):
            raise ValueError(
                "--arch/--dataset need --checkpoint; without one the built-in "
                f"{tr.name} track ({tr.arch} on {tr.dataset}) is evaluated"
            )
        arch, dataset = tr.arch, tr.dataset
    elif arch is None or dataset is None:
        raise ValueError("--checkpoint needs --arch and --dataset (bench models, bench datasets)")
    ARCHS.get(arch)
    info = get_dataset_info(dataset)
    eps_text = eps or (info.default_eps if norm == "Linf" else "0.5")
    eps_value = parse_eps(eps_text)
    x, y = load_split(dataset, "test", data_dir=data_dir)
    spec = RunSpec(
        dataset=dataset,
        n_samples=n_samples or info.default_n or len(y),
        norm=norm,
        eps=eps_text,
        eps_value=eps_value,
        version=aa_version,
        fmn_steps=fmn_steps,
        batch_size=batch_size or info.default_batch_size,
        seed=seed,
        device=device,
    )
    if checkpoint is None:
        checkpoint, record = dense_checkpoint(tr, log=click.echo)
        register_kw = {"name": name or f"{tr.name}-dense", "source": f"track:{tr.name}", "provenance": record}
    model = load_checkpoint_model(checkpoint, arch, dataset)
    store = Store(db)
    row = register_model(store, checkpoint, model, arch=arch, dataset=dataset, **register_kw)
    click.echo(
        f"model {row.name} ({arch}, {dataset}, sha256 {row.checkpoint_sha256[:12]}…, "
        f"sparsity {row.measured_sparsity:.2%})"
    )
    click.echo(
        f"protocol {spec.protocol}: AutoAttack-{spec.version} {spec.norm} eps={spec.eps}, "
        f"FMN {spec.fmn_steps} steps, N={spec.n_samples}, seed {spec.seed}, {spec.device}"
    )
    if workers is None:
        workers = (os.cpu_count() or 1) if device == "cpu" else 1
    start = time.perf_counter()
    summary = run_evaluation(
        store,
        row.id,
        model.to(device),
        x,
        y,
        spec,
        overwrite=overwrite,
        progress=not no_progress,
        workers=workers,
        log=click.echo,
    )
    elapsed = time.perf_counter() - start
    click.echo("")
    click.echo(
        f"evaluation #{summary.evaluation_id} of {summary.model_name} on {summary.n} samples (Wilson 95 % intervals)"
    )
    click.echo(f"  clean accuracy           {_format_interval(summary.clean_accuracy, summary.intervals['clean'])}")
    click.echo(
        f"  AutoAttack robust        {_format_interval(summary.aa_robust_accuracy, summary.intervals['autoattack'])}"
    )
    click.echo(f"  FMN robust at eps        {_format_interval(summary.fmn_robust_accuracy, summary.intervals['fmn'])}")
    click.echo(
        f"  best-known robust        {_format_interval(summary.best_robust_accuracy, summary.intervals['best_known'])}"
    )
    if summary.fmn_median_distance is not None:
        click.echo(f"  FMN median distance      {summary.fmn_median_distance:.4f} ({spec.norm})")
    if summary.flags:
        click.echo(
            f"  flags                    {', '.join(summary.flags)}"
            + ("  (potentially unreliable)" if summary.unreliable else "")
        )
    attack_time = sum(summary.attack_seconds.values())
    click.echo(
        f"  time                     {attack_time:.1f} s attacking"
        + (" (stored run reused)" if summary.reused else f", {elapsed:.1f} s this run")
    )
    click.echo(f"  stored in                {store.url}")


RESULT_COLUMNS = [
    "evaluation",
    "model",
    "method",
    "arch",
    "dataset",
    "sparsity",
    "norm",
    "eps",
    "version",
    "n",
    "status",
    "clean",
    "autoattack",
    "fmn",
    "best_known",
    "fmn_median",
    "flags",
]


def _results_frame(db: str | None):
    import pandas as pd
    from sqlalchemy import select

    from bench.store import Evaluation, Store

    store = Store(db)
    with store.session() as s:
        rows = []
        for ev in s.scalars(select(Evaluation).order_by(Evaluation.id)):
            m = ev.model
            rows.append(
                {
                    "evaluation": ev.id,
                    "model": m.name,
                    "method": m.method,
                    "arch": m.arch,
                    "dataset": m.dataset,
                    "sparsity": m.measured_sparsity,
                    "norm": ev.spec["norm"],
                    "eps": ev.spec["eps"],
                    "version": ev.spec["version"],
                    "n": ev.n_samples,
                    "status": ev.status,
                    "clean": ev.clean_accuracy,
                    "autoattack": ev.aa_robust_accuracy,
                    "fmn": ev.fmn_robust_accuracy,
                    "best_known": ev.best_robust_accuracy,
                    "fmn_median": ev.fmn_median_distance,
                    "flags": ",".join(ev.flags),
                }
            )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


@main.command()
@_db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@friendly_errors
def results(db, fmt):
    """List stored evaluations (one row each; accuracies as fractions in csv/json)."""
    df = _results_frame(db)
    if fmt == "csv":
        click.echo(df.to_csv(index=False), nl=False)
        return
    if fmt == "json":
        records = json.loads(df.to_json(orient="records"))
        click.echo(json.dumps(records, indent=1))
        return
    if df.empty:
        click.echo("no evaluations stored yet; run `bench evaluate`")
        return
    shown = df.copy()
    for col in ("sparsity", "clean", "autoattack", "fmn", "best_known"):
        shown[col] = shown[col].map(
            lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2%}"
        )
    shown["fmn_median"] = shown["fmn_median"].map(lambda v: "-" if v is None or math.isnan(v) else f"{v:.4f}")
    click.echo(shown.to_string(index=False))


@main.command()
@click.argument("pattern", default="*")
def models(pattern):
    """List the registered architectures (wildcards allowed: bench models 'resnet*')."""
    from bench.models import ARCHS

    for name, info in ARCHS.items():
        if name in ARCHS.list(pattern):
            click.echo(f"{name:<12} {info.description}")


@main.command()
def datasets():
    """List the registered datasets with their default protocol."""
    from bench.data import DATASETS

    for name, info in DATASETS.items():
        n = info.default_n or "all"
        click.echo(
            f"{name:<9} {info.num_classes:>3} classes  {'x'.join(map(str, info.input_shape)):<7} "
            f"eps {info.default_eps:<6} N={n:<6} {info.description}"
        )


@main.group()
def db():
    """Results-store maintenance."""


@db.command("upgrade")
@_db_option
@friendly_errors
def db_upgrade(db):
    """Create or migrate the results store to the newest schema (Alembic)."""
    from bench.store import Store

    store = Store(db)
    click.echo(f"{store.url} is at the newest schema")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
