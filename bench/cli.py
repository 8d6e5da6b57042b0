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
from pathlib import Path

import click
import torch

from bench.registry import UnknownNameError
from bench.zoo.limits import DEFAULT_MAX_SIZE

EPILOG_EVALUATE = """\b
Examples:
  bench evaluate
  bench evaluate --checkpoint model.pt --arch resnet18 --dataset cifar10 --n-samples 1000 --device cuda
  bench evaluate --checkpoint model.pt --arch small_cnn --dataset digits --version standard --norm L2 --eps 0.5
  bench evaluate --model-id MAD_Lee2022Masking_R18_CIFAR10_US_90 --device cuda     # a zoo entry (bench zoo list)
  bench evaluate --method hydra --sparsity 0.95 --dataset cifar10 --arch resnet18   # resolved through the zoo
  bench evaluate --zoo --method hydra --device cuda          # every hydra entry not yet evaluated (resumable)
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


def _fmt_table(rows: list[dict[str, str]]) -> str:
    """Left-aligned columns, two spaces apart, headed by the keys of the first row."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys).rstrip()]
    lines += ["  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys).rstrip() for r in rows]
    return "\n".join(lines)


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
@click.option(
    "--format",
    "ckpt_format",
    default="plain",
    show_default=True,
    help="Native format of --checkpoint: plain, hydra-subnet, hydra-dense, admm, mad, pwoa, atmc (bench formats).",
)
@click.option("--k", type=float, default=None, help="HYDRA's kept fraction, for --format hydra-subnet.")
@click.option("--dataset", default=None, help="Dataset (bench datasets). Required with --checkpoint.")
@click.option("--track", default="digits", show_default=True, help="Built-in track used when no --checkpoint is given.")
@click.option("--name", default=None, help="Name to store the model under [default: file stem + hash].")
@click.option(
    "--method", default=None, help="Pruning method (bench methods): prune the track's dense model and evaluate both."
)
@click.option("--sparsity", type=float, default=None, help="Target sparsity for --method (fraction of zero weights).")
@click.option("--prune-seed", type=int, default=0, show_default=True, help="Seed of the pruning run (--method).")
@click.option(
    "--model-id",
    default=None,
    help="A zoo entry (bench zoo list): fetched, sha256-verified, converted, registered with its manifest, evaluated.",
)
@click.option(
    "--zoo",
    "zoo_all",
    is_flag=True,
    help="Evaluate every zoo entry matching --method/--dataset/--arch/--sparsity that this protocol has not "
    "evaluated yet (resumable).",
)
@click.option(
    "--submissions",
    type=click.Path(file_okay=False),
    default=None,
    help="Zoo manifests folder [default: $BENCH_SUBMISSIONS_DIR or the repository's submissions/].",
)
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_SIZE,
    show_default=True,
    help="Largest zoo checkpoint download accepted, in bytes.",
)
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
    ckpt_format,
    k,
    dataset,
    track,
    name,
    method,
    sparsity,
    prune_seed,
    model_id,
    zoo_all,
    submissions,
    max_size,
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
    """Evaluate a checkpoint with the standard protocol (AutoAttack + FMN per sample) and store it.

    The checkpoint is --checkpoint, a zoo entry (--model-id, or --method/--sparsity with a --dataset other than
    the track's), every matching zoo entry (--zoo), or else the built-in track's dense model.
    """
    from bench.catalog import load_checkpoint_model, register_model
    from bench.models import ARCHS
    from bench.store import Store

    torch.set_num_threads(threads)
    device = _resolve_device(device)
    if workers is None:
        workers = (os.cpu_count() or 1) if device == "cpu" else 1
    # The run spec (and the test split) for a dataset, from the options; the zoo path builds one per dataset.
    run_spec = functools.partial(
        _run_spec,
        n_samples=n_samples,
        eps=eps,
        norm=norm,
        aa_version=aa_version,
        fmn_steps=fmn_steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
        data_dir=data_dir,
    )
    if model_id is not None or zoo_all or _picks_zoo_entry(checkpoint, method, dataset, track):
        if checkpoint is not None or ckpt_format != "plain" or k is not None or name is not None:
            raise ValueError(
                "a zoo entry brings its own checkpoint, format and name; drop --checkpoint/--format/--k/--name"
            )
        if model_id is not None and (zoo_all or method or sparsity is not None or dataset or arch):
            raise ValueError(
                "--model-id names one zoo entry; --zoo and --method/--sparsity/--dataset/--arch select by filter"
            )
        from bench.cli_submit import evaluate_zoo

        evaluate_zoo(
            model_id=model_id,
            all_entries=zoo_all,
            method=method,
            sparsity=sparsity,
            dataset=dataset,
            arch=arch,
            submissions=submissions,
            max_size=max_size,
            db=db,
            data_dir=data_dir,
            # One spec (and one test split loaded) per dataset, whatever the number of entries.
            make_spec=functools.cache(run_spec),
            run=functools.partial(_evaluate_row, overwrite=overwrite, progress=not no_progress, workers=workers),
        )
        return
    # Everything the user typed is checked before the store is opened, so a typo leaves no results.db behind.
    register_kw: dict = {"name": name}
    if checkpoint is None:
        from bench.track import TRACKS, dense_checkpoint

        if track not in TRACKS:
            raise ValueError(f"unknown track {track!r}; known: {', '.join(TRACKS)}")
        tr = TRACKS[track]
        if arch not in (None, tr.arch) or dataset not in (None, tr.dataset):
            raise ValueError(
                "--arch/--dataset need --checkpoint (or --method M --sparsity S to pick a zoo entry, or --model-id); "
                f"without one the built-in {tr.name} track ({tr.arch} on {tr.dataset}) is evaluated"
            )
        arch, dataset = tr.arch, tr.dataset
    elif arch is None or dataset is None:
        raise ValueError("--checkpoint needs --arch and --dataset (bench models, bench datasets)")
    ARCHS.get(arch)
    spec, x, y = run_spec(dataset)
    if method is not None:
        if checkpoint is not None:
            raise ValueError(
                "--method builds the pruned model on the built-in track; to prune your own dense "
                "checkpoint use `bench prune --method M --sparsity S --dense CKPT --arch A --dataset D` "
                "and evaluate the checkpoint it writes"
            )
        if sparsity is None:
            raise ValueError(f"--method {method} needs --sparsity (e.g. --sparsity 0.9)")
        from methods.base import get_method

        get_method(method).check_sparsity(sparsity)
    elif sparsity is not None:
        raise ValueError("--sparsity needs --method (bench methods lists them)")
    run = functools.partial(
        _evaluate_row, x=x, y=y, spec=spec, overwrite=overwrite, progress=not no_progress, workers=workers
    )
    if checkpoint is None:
        checkpoint, record = dense_checkpoint(tr, log=click.echo)
        register_kw = {"name": name or f"{tr.name}-dense", "source": f"track:{tr.name}", "provenance": record}
    if ckpt_format != "plain" or k is not None:
        from methods.convert import converted_provenance, load_converted_model

        if checkpoint is None:
            raise ValueError("--format and --k describe a --checkpoint file; give one")
        model = load_converted_model(checkpoint, ckpt_format, arch, dataset, k=k)
        register_kw["provenance"] = converted_provenance(ckpt_format, dataset, k)
    else:
        model = load_checkpoint_model(checkpoint, arch, dataset)
    store = Store(db)
    row = register_model(store, checkpoint, model, arch=arch, dataset=dataset, **register_kw)
    dense_summary = run(store, row, model)
    if method is None:
        return
    from methods.pipeline import prune_checkpoint

    click.echo("")
    pruned = prune_checkpoint(
        store,
        method,
        sparsity,
        dense_path=Path(checkpoint),
        dense_row=row,
        eps=tr.training.eps,
        seed=prune_seed,
        track=True,
        data_dir=data_dir,
        log=click.echo,
    )
    pruned_model = load_checkpoint_model(pruned.path, arch, dataset)
    pruned_summary = run(store, pruned.row, pruned_model)
    click.echo("")
    click.echo(f"{'':26}{'dense':>10}{'pruned':>10}")
    for label, attr in [
        ("clean accuracy", "clean_accuracy"),
        ("AutoAttack robust", "aa_robust_accuracy"),
        ("best-known robust", "best_robust_accuracy"),
    ]:
        click.echo(f"  {label:<24}{getattr(dense_summary, attr):>10.2%}{getattr(pruned_summary, attr):>10.2%}")
    click.echo(f"  {'sparsity (measured)':<24}{row.measured_sparsity:>10.2%}{pruned.row.measured_sparsity:>10.2%}")


def _picks_zoo_entry(checkpoint, method, dataset, track) -> bool:
    """``--method M --dataset D`` without ``--checkpoint``, on a dataset that is not the built-in track's."""
    if checkpoint is not None or method is None or dataset is None:
        return False
    from bench.track import TRACKS

    return track not in TRACKS or dataset != TRACKS[track].dataset


def _run_spec(dataset, *, n_samples, eps, norm, aa_version, fmn_steps, batch_size, seed, device, data_dir):
    """``(RunSpec, x, y)``: the command's options over ``dataset``'s defaults, and its test split.

    Unset options take the dataset's protocol values: eps (0.5 under L2), N (else the whole split), batch size.
    """
    from bench.data import get_dataset_info, load_split, parse_eps
    from bench.spec import RunSpec

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
    return spec, x, y


def _evaluate_row(store, row, model, *, x, y, spec, overwrite, progress, workers):
    """Evaluate one stored model under ``spec`` and print its summary."""
    from bench.evaluate import evaluate as run_evaluation

    click.echo(
        f"model {row.name} ({row.arch}, {row.dataset}, sha256 {row.checkpoint_sha256[:12]}…, "
        f"sparsity {row.measured_sparsity:.2%})"
    )
    click.echo(
        f"protocol {spec.protocol}: AutoAttack-{spec.version} {spec.norm} eps={spec.eps}, "
        f"FMN {spec.fmn_steps} steps, N={spec.n_samples}, seed {spec.seed}, {spec.device}"
    )
    start = time.perf_counter()
    summary = run_evaluation(
        store,
        row.id,
        model.to(spec.device),
        x,
        y,
        spec,
        overwrite=overwrite,
        progress=progress,
        workers=workers,
        log=click.echo,
    )
    _print_summary(summary, spec, store, time.perf_counter() - start)
    return summary


def _print_summary(summary, spec, store, elapsed: float) -> None:
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

    store = Store(db, read_only=True)
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


@main.command("methods")
@click.argument("pattern", default="*")
def methods_command(pattern):
    """List the pruning methods with their taxonomy (Piras et al. 2024) and native sparsity."""
    from methods.base import get_method, list_methods

    for key in list_methods(pattern):
        card = get_method(key).card
        training = ", ".join(f"{k}: {v}" for k, v in card.training.items())
        click.echo(f"{key:<11} {card.display_name} — {card.paper_title} ({card.venue} {card.year}) {card.paper_url}")
        click.echo(
            f"{'':11} pipeline {card.pipeline} ({training}); structure {card.structure}; scope {card.scope}; "
            f"criterion {card.criterion}; losses {', '.join(card.losses)}"
        )
        click.echo(f"{'':11} native sparsity: {card.native_sparsity}")


def _parse_settings(settings: tuple[str, ...]) -> dict:
    out = {}
    for item in settings:
        if "=" not in item:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r} (e.g. --set prune_epochs=2)")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@main.command()
@click.option("--method", required=True, help="Pruning method (bench methods).")
@click.option("--sparsity", type=float, required=True, help="Target sparsity (fraction of zero Conv2d/Linear weights).")
@click.option("--track", default=None, help="Prune the built-in track's dense model with its CPU-sized schedule.")
@click.option(
    "--dense",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Dense checkpoint to prune (with --arch and --dataset), with the paper's schedule.",
)
@click.option("--arch", default=None, help="Architecture of --dense (bench models).")
@click.option("--dataset", default=None, help="Dataset of --dense (bench datasets).")
@click.option("--eps", default=None, help="Training L∞ eps [default: the track's, or the dataset's].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a method option (repeatable), e.g. --set finetune_epochs=2.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the pruned checkpoint [default: $BENCH_CACHE_DIR/pruned].",
)
@click.option("--threads", type=int, default=1, show_default=True)
@_db_option
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@friendly_errors
def prune(method, sparsity, track, dense, arch, dataset, eps, seed, settings, out, threads, db, data_dir):
    """Prune a dense model with a registered method, write the checkpoint and register it in the store."""
    from bench.catalog import load_checkpoint_model, register_model
    from bench.data import get_dataset_info, parse_eps
    from bench.store import Store
    from methods.base import get_method
    from methods.pipeline import prune_checkpoint

    torch.set_num_threads(threads)
    overrides = _parse_settings(settings)
    m = get_method(method)
    m.check_sparsity(sparsity)
    (m.digits_config if track else m.config)(**overrides)  # unknown options fail before any work
    if (track is None) == (dense is None):
        raise ValueError("give either --track digits or --dense CKPT --arch A --dataset D")
    register_kw: dict = {}
    if track is not None:
        from bench.track import TRACKS, dense_checkpoint

        if track not in TRACKS:
            raise ValueError(f"unknown track {track!r}; known: {', '.join(TRACKS)}")
        tr = TRACKS[track]
        arch, dataset = tr.arch, tr.dataset
        eps_value = parse_eps(eps) if eps else tr.training.eps
        dense, record = dense_checkpoint(tr, log=click.echo)
        register_kw = {"name": f"{tr.name}-dense", "source": f"track:{tr.name}", "provenance": record}
    else:
        if arch is None or dataset is None:
            raise ValueError("--dense needs --arch and --dataset (bench models, bench datasets)")
        eps_value = parse_eps(eps or get_dataset_info(dataset).default_eps)
    dense_model = load_checkpoint_model(dense, arch, dataset)
    store = Store(db)
    dense_row = register_model(store, dense, dense_model, arch=arch, dataset=dataset, **register_kw)
    result = prune_checkpoint(
        store,
        method,
        sparsity,
        dense_path=Path(dense),
        dense_row=dense_row,
        eps=eps_value,
        seed=seed,
        track=track is not None,
        overrides=overrides,
        data_dir=data_dir,
        out_dir=Path(out) if out else None,
        log=click.echo,
    )
    row = result.row
    click.echo(
        f"model {row.name}: measured sparsity {row.measured_sparsity:.2%} (target {sparsity:.2%}), "
        f"{row.nonzero_params:,} non-zero of {row.params:,} parameters, parent {dense_row.name}"
    )
    click.echo(f"checkpoint {result.path}")
    click.echo(f"evaluate it: bench evaluate --checkpoint {result.path} --arch {arch} --dataset {dataset}")


@main.command()
def formats():
    """List the native checkpoint formats bench evaluate --format reads."""
    from methods.convert import FORMATS

    for name, fmt in FORMATS.items():
        click.echo(f"{name:<13} {fmt.description}")


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


# Command groups living in their own modules register themselves on ``main`` when imported.
from bench import cli_analysis  # noqa: E402,F401  (registers analyze/report commands)
from bench import cli_submit as _cli_submit  # noqa: E402,F401  (registers submit, zoo, export)
from leaderboard import cli as _leaderboard_cli  # noqa: E402,F401  (registers the leaderboard commands)

if __name__ == "__main__":  # pragma: no cover
    # ``python -m bench.cli``: the modules above registered on the imported ``bench.cli.main``, not on this copy.
    from bench.cli import main as _imported_main

    sys.exit(_imported_main())
