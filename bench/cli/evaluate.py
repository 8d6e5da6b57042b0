"""``bench evaluate``: the standard protocol (AutoAttack + FMN per sample) on one model or many, stored.

The options become an :class:`~bench.cli.config.EvaluateConfig` (how to evaluate) and a source
(:mod:`bench.cli.sources`: which model); the evaluation is :func:`bench.evaluate.evaluate`, as in the Python API.
This module prints.
"""

from __future__ import annotations

import functools
import time

import click

from bench.analysis.format import interval, percent
from bench.cli.config import EvaluateConfig
from bench.cli.options import (
    SPARSITY,
    AliasedOption,
    data_dir_option,
    db_option,
    fmt_table,
    friendly_errors,
    max_size_option,
    submissions_option,
)
from bench.cli.sources import TrackSource, ZooSource, pick_source, register

EPILOG_EVALUATE = """\b
Examples:
  bench evaluate
  bench evaluate --checkpoint model.pt --arch resnet18 --dataset cifar10 --n-samples 1000 --device cuda
  bench evaluate --checkpoint model.pt --arch small_cnn --dataset digits --aa-version standard --norm L2 --eps 0.5
  bench evaluate --model-id MAD_Lee2022Masking_R18_CIFAR10_US_90 --device cuda     # a zoo entry (bench zoo list)
  bench evaluate --method hydra --sparsity 0.95 --dataset cifar10 --arch resnet18   # resolved through the zoo
  bench evaluate --zoo --method hydra --device cuda          # every hydra entry not yet evaluated (resumable)
  bench evaluate --zoo --executor slurm --db postgresql://host/db --partition gpu --gpus-per-task 1 --device cuda
"""


@click.command(epilog=EPILOG_EVALUATE)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="State dict to evaluate (.pt/.pth/.pth.tar/.safetensors). Omit for the digits track's dense model.",
)
@click.option("--arch", default=None, help="Architecture (bench models). Required with --checkpoint.")
@click.option(
    "--checkpoint-format",
    "--format",
    "ckpt_format",
    cls=AliasedOption,
    hidden_aliases=("--format",),
    default="plain",
    show_default=True,
    help="Native format of --checkpoint: plain, hydra-subnet, hydra-dense, admm, mad, pwoa, atmc (bench formats).",
)
@click.option("--k", type=float, default=None, help="HYDRA's kept fraction, for --checkpoint-format hydra-subnet.")
@click.option(
    "--normalization",
    default=None,
    metavar="dataset|none|MEAN/STD",
    help="Input standardisation --checkpoint was trained behind: dataset (its mean/std, bench datasets), none (raw "
    "[0, 1] inputs) or per-channel MEAN/STD, e.g. 0.4914,0.4822,0.4465/0.2471,0.2435,0.2616 [default: dataset; "
    "with --checkpoint-format, its authors' own]. Part of the model's identity.",
)
@click.option("--dataset", default=None, help="Dataset (bench datasets). Required with --checkpoint.")
@click.option("--track", default="digits", show_default=True, help="Built-in track used when no --checkpoint is given.")
@click.option("--name", default=None, help="Name to store the model under [default: file stem + hash].")
@click.option(
    "--method", default=None, help="Pruning method (bench methods): prune the track's dense model and evaluate both."
)
@click.option(
    "--sparsity", type=SPARSITY, default=None, help="Target sparsity for --method (fraction of zero weights)."
)
@click.option(
    "--prune-seed", type=click.IntRange(min=0), default=None, help="Seed of the pruning run (--method) [default: 0]."
)
@click.option(
    "--seeds",
    "--prune-seeds",
    "prune_seeds",
    default=None,
    metavar="LIST",
    help="Pruning seeds for --method, e.g. 0,1,2 or 0-4: one pruned model per seed, each evaluated, then their "
    "mean and range (--seed is the attacks' seed).",
)
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
@submissions_option
@max_size_option
@click.option(
    "--n-samples",
    type=int,
    default=None,
    help="Evaluate the first N test samples, 1 to the test split's size [default: the dataset's protocol N].",
)
@click.option("--eps", default=None, help='Perturbation budget, e.g. "8/255" or 0.5 [default: the dataset\'s].')
@click.option(
    "--norm",
    type=click.Choice(["Linf", "L2"]),
    default="Linf",
    show_default=True,
    help="Threat model: the norm --eps bounds (L∞ or L2).",
)
@click.option(
    "--aa-version",
    "--version",
    "aa_version",
    cls=AliasedOption,
    hidden_aliases=("--version",),
    type=click.Choice(["plus", "standard"]),
    default="plus",
    show_default=True,
    help="AutoAttack version (pyautoattack's presets; standard is RobustBench's).",
)
@click.option("--fmn-steps", type=click.IntRange(min=1), default=100, show_default=True, help="FMN iterations.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per chunk (attack batch and unit of resumption) [default: the dataset's; 250 for CIFAR].",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the attacks (the pruning run's is --prune-seed)."
)
@click.option(
    "--device", default="cpu", show_default=True, help="torch device the attacks run on: cpu, cuda or cuda:N."
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="torch CPU threads per process (one per process is fastest on small models).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="CPU processes attacking chunks in parallel [default: the CPU count on cpu, 1 on cuda]; "
    "results do not depend on it.",
)
@db_option
@data_dir_option
@click.option("--overwrite", is_flag=True, help="Recompute even if this run is already stored.")
@click.option(
    "--unranked",
    is_flag=True,
    help="A sanity run (random weights, a smoke test): stored and shown, kept off the ranked tables "
    "(bench db rank MODEL --on ranks it later).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option(
    "--executor",
    type=click.Choice(["local", "slurm"]),
    default=None,
    help="Attack the missing chunks as shards: slurm (a job array through submitit; needs a PostgreSQL --db) or "
    "local (processes here: one per GPU, or --workers CPU processes) [default: in this process].",
)
@click.option("--partition", default=None, help="SLURM partition of the job array (--executor slurm).")
@click.option(
    "--gpus-per-task", type=click.IntRange(min=0), default=None, help="GPUs per SLURM array task [default: 0]."
)
@click.option(
    "--time-limit",
    type=click.IntRange(min=1),
    default=None,
    metavar="MINUTES",
    help="Time limit of each SLURM array task; one that reaches it requeues itself [default: 240].",
)
@click.option(
    "--array-parallelism", type=click.IntRange(min=1), default=None, help="SLURM array tasks running at once."
)
@click.option(
    "--tasks",
    type=click.IntRange(min=1),
    default=None,
    help="Shards per evaluation: task i of N attacks the missing chunks i, i+N, ... [default: 4 on SLURM, one per "
    "process with --executor local].",
)
@click.option(
    "--cpus-per-task", type=click.IntRange(min=1), default=None, help="CPUs per SLURM array task [default: --threads]."
)
@click.option(
    "--setup",
    multiple=True,
    metavar="LINE",
    help="Shell line each SLURM array task runs first, e.g. 'source /shared/venv/bin/activate' (repeatable).",
)
@click.option(
    "--executor-folder",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder of the SLURM array's pickles and logs; every node must see it [default: ./apbench-jobs].",
)
@click.option(
    "--executor-config",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file with the SLURM keys (partition, gpus_per_task, time_limit, array_parallelism, tasks, setup, "
    "executor_folder, cpus_per_task, mem_gb); options given on the command line override it.",
)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Return once the SLURM array is submitted: its last task finalises each evaluation (bench status follows).",
)
@friendly_errors
def evaluate(**options):
    """Evaluate a checkpoint with the standard protocol (AutoAttack + FMN per sample) and store it.

    The checkpoint is --checkpoint, a zoo entry (--model-id, or --method/--sparsity with a --dataset other than
    the track's), every matching zoo entry (--zoo), or else the built-in track's dense model. A finished
    evaluation is reused and a partial one resumed. Without --executor, the same evaluation already running in
    another such command is waited for (one line says so), then reused.
    """
    # Everything the user typed is checked before the store is opened, so a typo leaves no results.db behind.
    config = EvaluateConfig.from_cli(options)
    source = pick_source(options, config)
    run = functools.partial(evaluate_row, config=config)
    if isinstance(source, ZooSource):
        from bench.zoo.runs import evaluate_entries

        evaluate_entries(
            source.resolve(),
            skip_done=source.every,
            db=config.db,
            max_size=source.max_size,
            # One spec (and one test split loaded) per dataset, whatever the number of entries.
            make_spec=functools.cache(config.run_spec),
            run=functools.partial(run, defer=True),
            log=click.echo,
        )
        if config.sharded is not None:
            # One submission for every entry: the whole zoo's shards share one job array.
            finish_sharded(config.sharded)
        return
    from bench.store import Store

    # The model first: a missing or unreadable file is reported before a dataset that is missing too.
    resolved = source.resolve(config.db, log=click.echo)
    spec, x, y = config.run_spec(resolved.dataset)
    store = Store(config.db)
    row = register(store, resolved, log=click.echo)
    pruning = isinstance(source, TrackSource) and source.method is not None
    # With --method, --unranked marks the pruned models: the track's dense parent is every pruned model's reference.
    dense_summary = run(store, row, resolved.model, x=x, y=y, spec=spec, unranked=config.unranked and not pruning)
    if not pruning:
        return
    pruned = source.pruned(store, row, resolved, data_dir=config.data_dir, log=click.echo)
    runs = [(seed, prow, run(store, prow, model, x=x, y=y, spec=spec)) for seed, prow, model in pruned]
    click.echo("")
    if len(runs) > 1:
        _print_seed_table(row, dense_summary, runs)
    else:
        _print_dense_and_pruned(row, dense_summary, *runs[0][1:])


def evaluate_row(store, row, model, *, x, y, spec, config: EvaluateConfig, unranked: bool | None = None, defer=False):
    """Evaluate one stored model under ``spec`` and print its summary (``unranked``, default ``--unranked``:
    marked a sanity run first, so no ranked table ever shows its evaluation). With an executor the evaluation is
    opened and its missing chunks run as shards, now or (``defer``) with every other evaluation of the command."""
    from bench.evaluate import evaluate as run_evaluation
    from bench.store.db import shown_url

    if (config.unranked if unranked is None else unranked) and row.ranked:
        from bench.store.lifecycle import set_ranked

        set_ranked(store, [row.id], ranked=False)
        row.ranked = False
        click.echo(f"model {row.name} stored unranked: kept off the ranked tables (bench db rank {row.name} --on)")
    click.echo(
        f"model {row.name} ({row.arch}, {row.dataset}, sha256 {row.checkpoint_sha256[:12]}…, "
        f"sparsity {row.measured_sparsity:.2%})"
    )
    click.echo(
        f"protocol {spec.protocol}: AutoAttack-{spec.version} {spec.norm} eps={spec.eps}, "
        f"FMN {spec.fmn_steps} steps, N={spec.n_samples}, seed {spec.seed}, {spec.device}"
    )
    if config.sharded is not None:
        config.sharded.add(store, row, spec, overwrite=config.overwrite)
        return None if defer else finish_sharded(config.sharded)[0]
    start = time.perf_counter()
    summary = run_evaluation(
        store,
        row.id,
        model.to(spec.device),
        x,
        y,
        spec,
        overwrite=config.overwrite,
        progress=config.progress,
        workers=config.workers,
        log=click.echo,
    )
    _print_summary(summary, spec, shown_url(store.url), time.perf_counter() - start)
    return summary


def finish_sharded(sharded) -> list:
    """Run the collected shards, print each evaluation's summary; one line and exit 1 when chunks are missing."""
    from bench.store.db import shown_url

    start = time.perf_counter()
    plans = list(sharded.run())
    sharded.planned.clear()
    if not sharded.options.wait and sharded.job_ids:
        arrays = " ".join(sharded.job_ids)
        click.echo(
            f"submitted without waiting (--no-wait): follow with bench status --db {shown_url(sharded.db_url)}; "
            f"scancel {arrays} stops it. Each evaluation's last task finalises it; the same command run again "
            "submits only the chunks still missing (or finalises)"
        )
        return [None] * len(plans)
    for plan in plans:
        if plan.summary is not None:
            _print_summary(plan.summary, plan.spec, shown_url(sharded.db_url), time.perf_counter() - start)
    incomplete = [plan for plan in plans if plan.summary is None]
    if incomplete:
        raise RuntimeError(sharded.failure_message(incomplete))
    return [plan.summary for plan in plans]


def _with_interval(value: float, bounds: tuple[float, float]) -> str:
    return f"{percent(value, unit='%', width=7)}  {interval(*bounds, unit='%')}"


def _print_summary(summary, spec, url: str, elapsed: float) -> None:
    click.echo("")
    click.echo(
        f"evaluation #{summary.evaluation_id} of {summary.model_name} on {summary.n} samples (Wilson 95 % intervals)"
    )
    for label, attr, key in (
        ("clean accuracy", "clean_accuracy", "clean"),
        ("AutoAttack robust", "aa_robust_accuracy", "autoattack"),
        ("FMN robust at eps", "fmn_robust_accuracy", "fmn"),
        ("best-known robust", "best_robust_accuracy", "best_known"),
    ):
        click.echo(f"  {label:<24} {_with_interval(getattr(summary, attr), summary.intervals[key])}")
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
    click.echo(f"  stored in                {url}")


# (label, EvaluationSummary attribute) of the dense/pruned comparisons.
_COMPARED = [
    ("clean accuracy", "clean_accuracy"),
    ("AutoAttack robust", "aa_robust_accuracy"),
    ("best-known robust", "best_robust_accuracy"),
]


def _print_dense_and_pruned(dense_row, dense_summary, pruned_row, pruned_summary) -> None:
    click.echo(f"{'':26}{'dense':>10}{'pruned':>10}")
    for label, attr in _COMPARED:
        click.echo(f"  {label:<24}{getattr(dense_summary, attr):>10.2%}{getattr(pruned_summary, attr):>10.2%}")
    click.echo(
        f"  {'sparsity (measured)':<24}{dense_row.measured_sparsity:>10.2%}{pruned_row.measured_sparsity:>10.2%}"
    )


def _print_seed_table(dense_row, dense_summary, pruned_runs) -> None:
    """Each seed's figures beside the dense parent's, then their mean and range across seeds."""
    from bench.analysis.replicates import summarize
    from bench.analysis.stats import wilson_interval

    columns = [("clean", "clean_accuracy"), *_COMPARED[1:]]

    def figures(label, model_row, summary):
        out = {"": label}
        out.update({title: f"{getattr(summary, attr):.2%}" for title, attr in columns})
        out["sparsity"] = f"{model_row.measured_sparsity:.2%}"
        out["model"] = model_row.name
        return out

    rows = [figures("dense", dense_row, dense_summary)]
    rows += [figures(f"seed {seed}", model_row, summary) for seed, model_row, summary in pruned_runs]
    across = {title: summarize({seed: getattr(sm, attr) for seed, _, sm in pruned_runs}) for title, attr in columns}
    across["sparsity"] = summarize({seed: model_row.measured_sparsity for seed, model_row, _ in pruned_runs})
    rows.append({"": f"mean of {len(pruned_runs)} seeds", **{t: f"{s.mean:.2%}" for t, s in across.items()}})
    rows.append({"": "range (min–max)", **{t: f"{s.min:.2%}–{s.max:.2%}" for t, s in across.items()}})
    click.echo(fmt_table(rows))
    aa = across["AutoAttack robust"]
    n = dense_summary.n
    low, high = wilson_interval(round(aa.mean * n), n)
    click.echo(
        f"AutoAttack robust accuracy spans {100 * aa.range:.2f} points across seeds; one evaluation's Wilson 95 % "
        f"interval at the mean is {100 * (high - low):.2f} points wide (N={n}): the seed spread is the pruning "
        "run's, the interval only the test samples'"
    )
