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

from bench.analysis.format import MISSING, interval, is_missing, percent, percent_range
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
  bench evaluate --zoo --executor slurm --db postgresql://host/db --partition gpu --gpus-per-task 1 --device cuda
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


class _FiniteFloatRange(click.FloatRange):
    """click's FloatRange that also refuses nan, which passes every comparison with the bounds."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{number} is not in the range {self._describe_range()}.", param, ctx)
        return number


SPARSITY = _FiniteFloatRange(0.0, 1.0, min_open=True, max_open=True)


def _check_n_samples(n_samples: int | None, dataset: str | None) -> None:
    """Refuse an --n-samples outside 1 .. the test split's size (known from the registry, no data loaded)."""
    if n_samples is None:
        return
    from bench.data import DATASETS, get_dataset_info

    if dataset is None:  # zoo filters: the entries' datasets are known later, each checked then
        name, info = max(DATASETS.items(), key=lambda item: item[1].test_size)
        if not 1 <= n_samples <= info.test_size:
            largest = f"the largest test split, {name}'s"
            raise ValueError(f"--n-samples must be between 1 and {info.test_size} ({largest}); got {n_samples}")
        return
    size = get_dataset_info(dataset).test_size
    if not 1 <= n_samples <= size:
        raise ValueError(f"--n-samples must be between 1 and {size} (the {dataset} test split); got {n_samples}")


def _check_eps(eps: str | None, norm: str) -> None:
    """Refuse an --eps that is not a finite positive number, or above 1 under L∞ (inputs lie in [0, 1])."""
    if eps is None:
        return
    from bench.data import parse_eps

    try:
        value = parse_eps(eps)
    except ValueError as err:
        raise ValueError(f"--eps: {err}") from None
    if norm == "Linf" and value > 1:
        raise ValueError(
            f"--eps must be in (0, 1] under Linf (inputs lie in [0, 1], so a larger budget allows any image); "
            f"got {eps}: give the budget in [0, 1] units, e.g. 8/255"
        )


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


def _format_interval(value: float, bounds: tuple[float, float]) -> str:
    return f"{percent(value, unit='%', width=7)}  {interval(*bounds, unit='%')}"


def _resolve_device(device: str, here: bool = True) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid --device {device!r}; use cpu, cuda or cuda:N") from None
    if here and dev.type == "cuda" and not torch.cuda.is_available():
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
@click.option(
    "--normalization",
    default=None,
    metavar="dataset|none|MEAN/STD",
    help="Input standardisation --checkpoint was trained behind: dataset (its mean/std, bench datasets), none (raw "
    "[0, 1] inputs) or per-channel MEAN/STD, e.g. 0.4914,0.4822,0.4465/0.2471,0.2435,0.2616 [default: dataset; "
    "with --format, its authors' own]. Part of the model's identity.",
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
    help="Evaluate the first N test samples, 1 to the test split's size [default: the dataset's protocol N].",
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
@click.option("--fmn-steps", type=click.IntRange(min=1), default=100, show_default=True, help="FMN iterations.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per chunk (attack batch and unit of resumption) [default: the dataset's; 250 for CIFAR].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
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
@_db_option
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with dataset archives [default: $BENCH_DATA_DIR or ~/.cache/apbench/data].",
)
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
def evaluate(
    checkpoint,
    arch,
    ckpt_format,
    k,
    normalization,
    dataset,
    track,
    name,
    method,
    sparsity,
    prune_seed,
    prune_seeds,
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
    unranked,
    no_progress,
    executor,
    partition,
    gpus_per_task,
    time_limit,
    array_parallelism,
    tasks,
    cpus_per_task,
    setup,
    executor_folder,
    executor_config,
    no_wait,
):
    """Evaluate a checkpoint with the standard protocol (AutoAttack + FMN per sample) and store it.

    The checkpoint is --checkpoint, a zoo entry (--model-id, or --method/--sparsity with a --dataset other than
    the track's), every matching zoo entry (--zoo), or else the built-in track's dense model. A finished
    evaluation is reused and a partial one resumed. Without --executor, the same evaluation already running in
    another such command is waited for (one line says so), then reused.
    """
    from bench.catalog import load_checkpoint_model, register_model
    from bench.models import ARCHS
    from bench.store import Store

    _check_eps(eps, norm)
    torch.set_num_threads(threads)
    # A SLURM job's GPUs are on its nodes, not necessarily on the machine that submits it.
    device = _resolve_device(device, here=executor != "slurm")
    sharded = _sharded_run(
        executor,
        db=db,
        data_dir=data_dir,
        threads=threads,
        workers=workers,
        config=executor_config,
        wait=not no_wait,
        partition=partition,
        gpus_per_task=gpus_per_task,
        time_limit=time_limit,
        array_parallelism=array_parallelism,
        tasks=tasks,
        cpus_per_task=cpus_per_task,
        setup=setup,
        folder=executor_folder,
    )
    if sharded is not None and no_wait and method is not None:
        raise ValueError("--method compares the dense and the pruned evaluations, so it waits for them; drop --no-wait")
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
        if checkpoint is not None or ckpt_format != "plain" or {k, name, normalization} != {None}:
            raise ValueError(
                "a zoo entry brings its own checkpoint, format, normalisation and name; "
                "drop --checkpoint/--format/--k/--normalization/--name"
            )
        if model_id is not None and (zoo_all or method or sparsity is not None or dataset or arch):
            raise ValueError(
                "--model-id names one zoo entry; --zoo and --method/--sparsity/--dataset/--arch select by filter"
            )
        # Before any download: against the --dataset filter's split, else the largest (each entry's again later).
        _check_n_samples(n_samples, dataset)
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
            run=functools.partial(
                _evaluate_row,
                overwrite=overwrite,
                progress=not no_progress,
                workers=workers,
                unranked=unranked,
                sharded=sharded,
                defer=True,
            ),
        )
        if sharded is not None:
            # One submission for every entry: the whole zoo's shards share one job array.
            _finish_sharded(sharded)
        return
    # Everything the user typed is checked before the store is opened, so a typo leaves no results.db behind.
    register_kw: dict = {"name": name}
    if checkpoint is None:
        from bench.track import TRACKS, dense_checkpoint

        if track not in TRACKS:
            raise ValueError(f"unknown track {track!r}; known: {', '.join(TRACKS)}")
        tr = TRACKS[track]
        if normalization is not None:
            raise ValueError("--normalization describes a --checkpoint file; the track's models use the dataset's")
        if arch not in (None, tr.arch) or dataset not in (None, tr.dataset):
            raise ValueError(
                "--arch/--dataset need --checkpoint (or --method M --sparsity S to pick a zoo entry, or --model-id); "
                f"without one the built-in {tr.name} track ({tr.arch} on {tr.dataset}) is evaluated"
            )
        arch, dataset = tr.arch, tr.dataset
    elif arch is None or dataset is None:
        raise ValueError("--checkpoint needs --arch and --dataset (bench models, bench datasets)")
    ARCHS.get(arch)
    if normalization is not None:
        from bench.catalog import parse_normalization

        normalization = parse_normalization(normalization, dataset)
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
        seed_list = _seed_list(prune_seed, prune_seeds, "--prune-seed")
    elif sparsity is not None:
        raise ValueError("--sparsity needs --method (bench methods lists them)")
    elif prune_seed is not None or prune_seeds is not None:
        raise ValueError("--prune-seed/--seeds pick the pruning runs of --method M --sparsity S; give those too")
    run = functools.partial(
        _evaluate_row,
        x=x,
        y=y,
        spec=spec,
        overwrite=overwrite,
        progress=not no_progress,
        workers=workers,
        unranked=unranked,
        sharded=sharded,
    )
    if checkpoint is None:
        if name is not None:
            # The dense model is trained once and cached; a taken --name is refused before that work.
            _check_chosen_name(Store(db), name, recipe_key=tr.key)
        checkpoint, record = dense_checkpoint(tr, log=click.echo)
        register_kw = {"name": name or f"{tr.name}-dense", "source": f"track:{tr.name}", "provenance": record}
    if ckpt_format != "plain" or k is not None:
        from bench.catalog import load_converted_model
        from bench.formats import converted_provenance

        if checkpoint is None:
            raise ValueError("--format and --k describe a --checkpoint file; give one")
        model = load_converted_model(checkpoint, ckpt_format, arch, dataset, k=k, normalization=normalization)
        register_kw["provenance"] = converted_provenance(ckpt_format, dataset, k, normalization=normalization)
    else:
        model = load_checkpoint_model(checkpoint, arch, dataset, normalization=normalization)
        if normalization is not None:
            register_kw["provenance"] = {"normalization": normalization}
    store = Store(db)
    # The normalisation register_model will key the model on (a converted author model brings its own).
    stored_normalization = (register_kw.get("provenance") or {}).get("normalization")
    register_kw["name"] = _store_name(
        store,
        checkpoint,
        register_kw.get("name"),
        chosen=name is not None,
        dataset=dataset,
        normalization=stored_normalization,
    )
    row = register_model(store, checkpoint, model, arch=arch, dataset=dataset, **register_kw)
    if name is not None and row.name != name:
        click.echo(f"note: this checkpoint is already stored as model {row.name!r}; --name {name!r} not applied")
    # With --method, --unranked marks the pruned models: the track's dense parent is every pruned model's reference.
    dense_summary = run(store, row, model, unranked=unranked and method is None)
    if method is None:
        return
    from methods.pipeline import prune_checkpoint

    pruned_runs = []
    for one_seed in seed_list:
        click.echo("")
        pruned = prune_checkpoint(
            store,
            method,
            sparsity,
            dense_path=Path(checkpoint),
            dense_row=row,
            eps=tr.training.eps,
            default_eps=tr.training.eps,
            seed=one_seed,
            track=True,
            data_dir=data_dir,
            log=click.echo,
        )
        pruned_model = load_checkpoint_model(pruned.path, arch, dataset)
        pruned_runs.append((one_seed, pruned.row, run(store, pruned.row, pruned_model)))
    click.echo("")
    if len(pruned_runs) > 1:
        _print_seed_table(row, dense_summary, pruned_runs)
        return
    ((_, pruned_row, pruned_summary),) = pruned_runs
    click.echo(f"{'':26}{'dense':>10}{'pruned':>10}")
    for label, attr in [
        ("clean accuracy", "clean_accuracy"),
        ("AutoAttack robust", "aa_robust_accuracy"),
        ("best-known robust", "best_robust_accuracy"),
    ]:
        click.echo(f"  {label:<24}{getattr(dense_summary, attr):>10.2%}{getattr(pruned_summary, attr):>10.2%}")
    click.echo(f"  {'sparsity (measured)':<24}{row.measured_sparsity:>10.2%}{pruned_row.measured_sparsity:>10.2%}")


def _check_chosen_name(
    store, name: str, *, sha: str | None = None, normalization: str = "dataset", recipe_key: str | None = None
) -> None:
    """Refuse a --name another model holds (the same sha256 and normalisation, or the same track recipe, is the
    same model)."""
    from methods.pipeline import is_same_model, name_holder, taken_name_error

    with store.session() as s:
        holder = name_holder(s, name)
        if holder is None or (sha is not None and is_same_model(holder, sha, normalization)):
            return
        if recipe_key is not None and (holder.provenance or {}).get("recipe_key") == recipe_key:
            return
        raise taken_name_error("--name", name, holder)


def _store_name(store, checkpoint, name: str | None, *, chosen: bool, dataset: str, normalization=None) -> str | None:
    """The name to register ``checkpoint`` under: a chosen --name if no other model holds it (else refused), a
    derived one (``digits-dense``) or, when another model holds that, the same with the checkpoint's hash appended.
    """
    from bench.catalog import normalization_key
    from bench.checkpoints import sha256_file
    from methods.pipeline import available_name

    if name is None:
        return None
    sha = sha256_file(checkpoint)
    key = normalization_key(dataset, normalization)
    if chosen:
        _check_chosen_name(store, name, sha=sha, normalization=key)
        return name
    with store.session() as s:
        return available_name(s, [name], sha, key)


def _print_seed_table(dense_row, dense_summary, pruned_runs) -> None:
    """Each seed's figures beside the dense parent's, then their mean and range across seeds."""
    from bench.analysis.replicates import summarize
    from bench.analysis.stats import wilson_interval

    columns = [
        ("clean", "clean_accuracy"),
        ("AutoAttack robust", "aa_robust_accuracy"),
        ("best-known robust", "best_robust_accuracy"),
    ]

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
    click.echo(_fmt_table(rows))
    aa = across["AutoAttack robust"]
    n = dense_summary.n
    low, high = wilson_interval(round(aa.mean * n), n)
    click.echo(
        f"AutoAttack robust accuracy spans {100 * aa.range:.2f} points across seeds; one evaluation's Wilson 95 % "
        f"interval at the mean is {100 * (high - low):.2f} points wide (N={n}): the seed spread is the pruning "
        "run's, the interval only the test samples'"
    )


def _picks_zoo_entry(checkpoint, method, dataset, track) -> bool:
    """``--method M --dataset D`` without ``--checkpoint``, on a dataset that is not the built-in track's."""
    if checkpoint is not None or method is None or dataset is None:
        return False
    from bench.track import TRACKS

    return track not in TRACKS or dataset != TRACKS[track].dataset


def _run_spec(dataset, *, n_samples, eps, norm, aa_version, fmn_steps, batch_size, seed, device, data_dir):
    """``(RunSpec, x, y)``: the command's options over ``dataset``'s defaults, and its test split.

    Unset options take the dataset's protocol values (:meth:`RunSpec.for_dataset`, which the Python API calls
    too): eps (0.5 under L2), N (else the whole split), batch size.
    """
    from bench.data import load_split
    from bench.spec import RunSpec

    # Refused here, before the split is loaded (CIFAR's may be downloaded) and before any store is opened.
    _check_n_samples(n_samples, dataset)
    _check_eps(eps, norm)
    spec = RunSpec.for_dataset(
        dataset,
        n_samples=n_samples,
        eps=eps,
        norm=norm,
        version=aa_version,
        fmn_steps=fmn_steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    x, y = load_split(dataset, "test", data_dir=data_dir)
    return spec, x, y


def _evaluate_row(
    store, row, model, *, x, y, spec, overwrite, progress, workers, unranked=False, sharded=None, defer=False
):
    """Evaluate one stored model under ``spec`` and print its summary (``unranked``: marked a sanity run first, so
    no ranked table ever shows its evaluation). With ``sharded`` (``--executor``) the evaluation is opened and its
    missing chunks run as shards, now or (``defer``) with every other evaluation of the command."""
    from bench.evaluate import evaluate as run_evaluation

    if unranked and row.ranked:
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
    if sharded is not None:
        sharded.add(store, row, spec, overwrite=overwrite)
        return None if defer else _finish_sharded(sharded)[0]
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


def _sharded_run(kind, *, db, data_dir, threads, workers, config, wait, **given):
    """The ``--executor`` run of this command (None without one), its options checked before any work."""
    named = {
        "--partition": given["partition"],
        "--gpus-per-task": given["gpus_per_task"],
        "--time-limit": given["time_limit"],
        "--array-parallelism": given["array_parallelism"],
        "--tasks": given["tasks"],
        "--cpus-per-task": given["cpus_per_task"],
        "--setup": given["setup"] or None,
        "--executor-folder": given["folder"],
        "--executor-config": config,
        "--no-wait": None if wait else True,
    }
    if kind is None:
        stray = [name for name, value in named.items() if value is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} need --executor slurm (or --executor local for --tasks)")
        return None
    from bench.executors import ShardedRun, executor_options, refuse_sqlite
    from bench.store import resolve_db_url

    if kind == "slurm" and workers is not None:
        raise ValueError("--workers is for this machine; with --executor slurm each array task is a process (--tasks)")
    options = executor_options(
        kind, config, **given, threads=threads, workers=workers if kind == "local" else None, wait=wait
    )
    url = resolve_db_url(db)
    if kind == "slurm":
        refuse_sqlite(url)
    return ShardedRun(options, url, data_dir=data_dir, log=click.echo)


def _finish_sharded(sharded) -> list:
    """Run the collected shards, print each evaluation's summary; one line and exit 1 when chunks are missing."""
    from types import SimpleNamespace

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
    where = SimpleNamespace(url=shown_url(sharded.db_url))
    for plan in plans:
        if plan.summary is not None:
            _print_summary(plan.summary, plan.spec, where, time.perf_counter() - start)
    incomplete = [plan for plan in plans if plan.summary is None]
    if incomplete:
        raise RuntimeError(sharded.failure_message(incomplete))
    return [plan.summary for plan in plans]


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
    # The model's input normalisation as --normalization spells it: dataset, none or MEAN/STD.
    "inputs",
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
    # Wilson 95 % interval of the AutoAttack robust accuracy (the test samples drawn).
    "autoattack_low",
    "autoattack_high",
    # The pruning seed, and for a model with replicates (same setting, other seeds) evaluated under the same
    # protocol: how many, and the AutoAttack robust accuracy's mean and range across them (this model included).
    "seed",
    "replicates",
    "autoattack_seeds_mean",
    "autoattack_seeds_min",
    "autoattack_seeds_max",
]
METRIC_NAMES = ("clean", "autoattack", "fmn", "best_known")
SETTING_COLUMNS = [
    "setting",
    "method",
    "arch",
    "dataset",
    "structure",
    "target_sparsity",
    "sparsity",
    "protocol",
    "norm",
    "eps",
    "version",
    "n",
    "n_seeds",
    "seeds",
    *(f"{metric}_{stat}" for metric in METRIC_NAMES for stat in ("mean", "min", "max", "std")),
    "autoattack_wilson_low",
    "autoattack_wilson_high",
    "models",
]


def _replicate_groups(evaluations) -> dict:
    """``{(model id, protocol hash): the replicate group's evaluations}`` for models with two replicates or more."""
    from bench.analysis.replicates import group_replicates

    out = {}
    for (key, protocol), group in group_replicates(evaluations).items():
        if not key.startswith("model:") and len(group) > 1:
            out.update({(ev.model.id, protocol): group for ev in group})
    return out


def _results_frame(db: str | None):
    import pandas as pd
    from sqlalchemy import select

    from bench.analysis.replicates import seed_of, summarize_evaluations
    from bench.analysis.stats import wilson_interval
    from bench.catalog import normalization_label
    from bench.store import Evaluation, Store

    store = Store(db, read_only=True)
    with store.session() as s:
        rows = []
        evaluations = s.scalars(select(Evaluation).order_by(Evaluation.id)).all()
        replicates = _replicate_groups(evaluations)
        for ev in evaluations:
            m = ev.model
            low, high = (None, None)
            if ev.aa_robust_accuracy is not None and ev.n_samples:
                low, high = wilson_interval(round(ev.aa_robust_accuracy * ev.n_samples), ev.n_samples)
            group = replicates.get((m.id, ev.protocol_hash)) if ev.status == "complete" else None
            across = summarize_evaluations(group).get("autoattack") if group else None
            rows.append(
                {
                    "evaluation": ev.id,
                    "model": m.name,
                    "method": m.method,
                    "arch": m.arch,
                    "dataset": m.dataset,
                    "inputs": normalization_label(m.normalization),
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
                    "autoattack_low": low,
                    "autoattack_high": high,
                    "seed": seed_of(m),
                    "replicates": across.n if across else None,
                    "autoattack_seeds_mean": across.mean if across else None,
                    "autoattack_seeds_min": across.min if across else None,
                    "autoattack_seeds_max": across.max if across else None,
                }
            )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"seed": "Int64", "replicates": "Int64"})


def _settings_frame(db: str | None):
    """One row per setting and protocol: replicates (models differing only in their pruning seed) aggregated;
    any other model is a setting of its own."""
    import pandas as pd
    from sqlalchemy import select

    from bench.analysis.replicates import METRICS, group_replicates, seed_of, setting_label, summarize
    from bench.analysis.stats import wilson_interval
    from bench.store import Evaluation, Store

    store = Store(db, read_only=True)
    rows = []
    with store.session() as s:
        groups = group_replicates(s.scalars(select(Evaluation).order_by(Evaluation.id)).all())
        for (key, protocol), group in sorted(groups.items(), key=lambda item: item[1][0].model.id):
            first, m = group[0], group[0].model
            # Index by position for a model without a seed (a setting of its own): one value, no seed to show.
            seeds = [seed_of(ev.model) for ev in group]
            row = {
                "setting": m.name if key.startswith("model:") else setting_label(m.name),
                "method": m.method,
                "arch": m.arch,
                "dataset": m.dataset,
                "structure": m.structure,
                "target_sparsity": m.target_sparsity,
                "sparsity": sum(ev.model.measured_sparsity for ev in group) / len(group),
                "protocol": protocol[:12],
                "norm": first.spec["norm"],
                "eps": first.spec["eps"],
                "version": first.spec["version"],
                "n": first.n_samples,
                "n_seeds": len(group),
                "seeds": ",".join(str(seed) for seed in seeds if seed is not None),
                "models": ",".join(ev.model.name for ev in group),
            }
            for metric, attr in METRICS:
                summary = summarize({i: getattr(ev, attr) for i, ev in enumerate(group)})
                for stat in ("mean", "min", "max", "std"):
                    row[f"{metric}_{stat}"] = getattr(summary, stat) if summary else None
            mean = row["autoattack_mean"]
            if mean is not None and first.n_samples:
                row["autoattack_wilson_low"], row["autoattack_wilson_high"] = wilson_interval(
                    round(mean * first.n_samples), first.n_samples
                )
            rows.append(row)
    return pd.DataFrame(rows, columns=SETTING_COLUMNS)


def _settings_table(df) -> str:
    """The --by-setting table: each accuracy as mean (min–max) across seeds, the Wilson interval beside."""

    def across(row, metric: str) -> str:
        mean, low, high = (row[f"{metric}_{stat}"] for stat in ("mean", "min", "max"))
        if is_missing(mean):
            return MISSING
        text = percent(mean, unit="%")
        return text if row["n_seeds"] < 2 else f"{text} ({percent_range(low, high, unit='%')})"

    rows = []
    for _, row in df.iterrows():
        wilson = interval(row["autoattack_wilson_low"], row["autoattack_wilson_high"], unit="%")
        rows.append(
            {
                "setting": row["setting"],
                "target": percent(row["target_sparsity"], unit="%"),
                "protocol": row["protocol"],
                "n": str(row["n"]),
                "seeds": row["seeds"] or MISSING,
                **{metric: across(row, metric) for metric in METRIC_NAMES},
                "autoattack 95 % (one evaluation at the mean)": wilson,
            }
        )
    return _fmt_table(rows)


@main.command()
@_db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option(
    "--by-setting",
    is_flag=True,
    help="One row per setting and protocol: models that differ only in their pruning seed aggregated "
    "(number of seeds, mean, min–max, std of each accuracy).",
)
@friendly_errors
def results(db, fmt, by_setting):
    """List stored evaluations (one row each; accuracies as fractions in csv/json).

    A pruned model with replicates (other seeds of its setting, evaluated under the same protocol) shows the
    AutoAttack robust accuracy's mean and range across seeds beside its Wilson 95 % interval.
    """
    df = _settings_frame(db) if by_setting else _results_frame(db)
    if fmt == "csv":
        from bench.analysis.export import csv_text

        cells = df.astype(object).where(df.notna(), None)  # pandas' missing values as empty cells
        click.echo(csv_text(df.columns, cells.itertuples(index=False, name=None)), nl=False)
        return
    if fmt == "json":
        records = json.loads(df.to_json(orient="records"))
        click.echo(json.dumps(records, indent=1))
        return
    if df.empty:
        click.echo("no evaluations stored yet; run `bench evaluate`")
        return
    if by_setting:
        click.echo(_settings_table(df))
        return
    shown = df.copy()
    for col in ("sparsity", "clean", "autoattack", "fmn", "best_known"):
        shown[col] = shown[col].map(lambda v: percent(v, unit="%"))
    shown["fmn_median"] = shown["fmn_median"].map(lambda v: MISSING if v is None or math.isnan(v) else f"{v:.4f}")
    shown["autoattack 95 %"] = [
        interval(low, high, unit="%")
        for low, high in zip(df.autoattack_low, df.autoattack_high, strict=True)
    ]
    shown["seed"] = df["seed"].map(lambda v: MISSING if is_missing(v) else str(v))
    shown["across seeds"] = [
        MISSING if is_missing(n) else f"{percent(mean, unit='%')} ({percent_range(low, high, unit='%')}), {n} seeds"
        for n, mean, low, high in zip(
            df.replicates, df.autoattack_seeds_mean, df.autoattack_seeds_min, df.autoattack_seeds_max, strict=True
        )
    ]
    at = RESULT_COLUMNS.index("autoattack") + 1
    columns = [*RESULT_COLUMNS[:at], "autoattack 95 %", *RESULT_COLUMNS[at : RESULT_COLUMNS.index("flags") + 1]]
    shown = shown[[*columns, "seed", "across seeds"]]
    for col in ("seed", "across seeds"):  # shown once some model has a pruning seed, or replicates
        if (shown[col] == MISSING).all():
            shown = shown.drop(columns=col)
    if (shown["inputs"] == "dataset").all():  # the column only says something when a model differs
        shown = shown.drop(columns="inputs")
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


def _seed_list(seed: int | None, seeds: str | None, seed_option: str) -> list[int]:
    """The pruning seeds: ``--seeds`` (a list with ranges), else the single-seed option, else seed 0."""
    from bench.analysis.replicates import parse_seeds

    if seeds is None:
        return [0 if seed is None else seed]
    if seed is not None:
        raise ValueError(f"give {seed_option} N for one seed or --seeds LIST for several, not both")
    return parse_seeds(seeds)


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
@click.option(
    "--sparsity", type=SPARSITY, required=True, help="Target sparsity (fraction of zero Conv2d/Linear weights)."
)
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
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the pruning run [default: 0].")
@click.option(
    "--seeds",
    default=None,
    metavar="LIST",
    help="Prune once per seed, e.g. 0,1,2 or 0-4: replicates of one setting, summarised across seeds.",
)
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
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
@_db_option
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@friendly_errors
def prune(method, sparsity, track, dense, arch, dataset, eps, seed, seeds, settings, out, threads, db, data_dir):
    """Prune a dense model with a registered method, write the checkpoint and register it in the store.

    The dense parent and each pruned model are stored only once the pruned checkpoint exists.
    """
    from bench.catalog import load_checkpoint_model
    from bench.data import get_dataset_info, parse_eps
    from bench.store import Store
    from methods.base import get_method
    from methods.pipeline import DenseParent, prune_checkpoint

    _check_eps(eps, "Linf")  # adversarial training's budget is L∞
    torch.set_num_threads(threads)
    seed_list = _seed_list(seed, seeds, "--seed")
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
        default_eps = tr.training.eps
        dense, record = dense_checkpoint(tr, log=click.echo)
        register_kw = {"name": f"{tr.name}-dense", "source": f"track:{tr.name}", "provenance": record}
    else:
        if arch is None or dataset is None:
            raise ValueError("--dense needs --arch and --dataset (bench models, bench datasets)")
        default_eps = parse_eps(get_dataset_info(dataset).default_eps)
        eps_value = parse_eps(eps) if eps else default_eps
    load_checkpoint_model(dense, arch, dataset)  # a wrong --arch/--dataset fails here, before any work
    store = functools.cache(lambda: Store(db))  # opened once the first pruned checkpoint exists
    parent = DenseParent(path=Path(dense), arch=arch, dataset=dataset, **register_kw)
    rows = []
    for one_seed in seed_list:
        if len(seed_list) > 1:
            click.echo(f"seed {one_seed}")
        result = prune_checkpoint(
            store,
            method,
            sparsity,
            parent=parent,
            eps=eps_value,
            default_eps=default_eps,
            seed=one_seed,
            track=track is not None,
            overrides=overrides,
            data_dir=data_dir,
            out_dir=Path(out) if out else None,
            log=click.echo,
        )
        row = result.row
        rows.append(row)
        click.echo(
            f"model {row.name}: measured sparsity {row.measured_sparsity:.2%} (target {sparsity:.2%}), "
            f"{row.nonzero_params:,} non-zero of {row.params:,} parameters, parent {result.parent.name}"
        )
        click.echo(f"checkpoint {result.path}")
        click.echo(f"evaluate it: bench evaluate --checkpoint {result.path} --arch {arch} --dataset {dataset}")
    if len(rows) > 1:
        click.echo("")
        click.echo(f"{len(rows)} replicates of one setting (they differ only in their seed):")
        click.echo(
            _fmt_table(
                [
                    {"seed": str(one_seed), "model": r.name, "measured sparsity": f"{r.measured_sparsity:.2%}"}
                    for one_seed, r in zip(seed_list, rows, strict=True)
                ]
            )
        )


@main.command()
def formats():
    """List the native checkpoint formats bench evaluate --format reads."""
    from bench.formats import FORMATS

    for name, fmt in FORMATS.items():
        click.echo(f"{name:<13} {fmt.description}")


@main.command()
@click.argument("model", required=False, metavar="[MODEL]")
@_db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@friendly_errors
def status(model, db, fmt):
    """Where each evaluation stands (of MODEL: a stored name, a shell pattern or an id): chunks done, samples
    stored, workers seen recently, attack time so far, an estimate of what remains, and running, stalled or
    complete. Reads the store only (any worker's, SLURM or not)."""
    from bench.executors.status import evaluation_status, format_duration
    from bench.store import Store

    store = Store(db, read_only=True)
    try:
        states = evaluation_status(store, model)
    finally:
        store.dispose()
    if fmt == "json":
        out = []
        for st in states:
            d = {k: v for k, v in vars(st).items() if k not in ("last_chunk_at", "started_at")}
            d["last_chunk_at"] = st.last_chunk_at.isoformat() if st.last_chunk_at else None
            d["started_at"] = st.started_at.isoformat() if st.started_at else None
            out.append(d)
        click.echo(json.dumps(out, indent=2))
        return
    if not states:
        click.echo("no evaluations stored yet; run `bench evaluate`")
        return
    rows = [
        {
            "evaluation": f"#{st.evaluation_id}",
            "model": st.model,
            "protocol": st.protocol,
            "chunks": f"{st.chunks_done}/{st.chunks_total}",
            "samples": f"{st.samples_stored}/{st.n_samples}",
            "workers": f"{len(st.workers_recent)} recent / {st.workers_total}",
            "attack time": format_duration(st.attack_seconds),
            "per chunk": format_duration(st.seconds_per_chunk),
            "remaining": format_duration(st.remaining_s) if st.remaining_s is not None else MISSING,
            "status": st.status,
        }
        for st in states
    ]
    click.echo(_fmt_table(rows))
    for st in states:
        if st.status == "stalled":
            click.echo(
                f"#{st.evaluation_id}: no chunk finished for a while (last at {st.last_chunk_at:%Y-%m-%d %H:%M} UTC); "
                "run its bench evaluate command again to attack the missing chunks"
            )
        elif st.status == "unfinalised":
            click.echo(f"#{st.evaluation_id}: every chunk is stored; its bench evaluate command run again finalises it")
        elif st.status == "running" and st.workers_recent:
            click.echo(f"#{st.evaluation_id}: recent workers {', '.join(st.workers_recent)}")


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _stored_model_line(m) -> str:
    """One model of ``bench db rm``'s plan or report: what goes with it, and where its checkpoint stays."""
    unfinished = f" ({m.unfinished} unfinished)" if m.unfinished else ""
    parent = f", derived from #{m.parent_id}" if m.parent_id is not None else ""
    checkpoint = f"its checkpoint stays on disk at {m.checkpoint_path}" if m.checkpoint_path else "no checkpoint file"
    return (
        f"{m.label} ({m.method}, {m.arch}, {m.dataset}{parent}): {_plural(m.evaluations, 'evaluation')}{unfinished}, "
        f"{_plural(m.samples, 'per-sample row')}; {checkpoint}"
    )


@db.command("list")
@_db_option
@friendly_errors
def db_list(db):
    """List the stored models (evaluated or not) with their ids, evaluations and whether they are ranked."""
    from bench.store import Store
    from bench.store.lifecycle import list_models

    store = Store(db, read_only=True)
    try:
        stored = list_models(store)
    finally:
        store.dispose()
    if not stored:
        click.echo("no models stored yet; run `bench evaluate`")
        return
    rows = [
        {
            "id": str(m.id),
            "name": m.name,
            "method": m.method,
            "arch": m.arch,
            "dataset": m.dataset,
            "sparsity": f"{m.measured_sparsity:.2%}",
            "evaluations": str(m.evaluations),
            "ranked": "yes" if m.ranked else "no (sanity run)",
            "parent": MISSING if m.parent_id is None else f"#{m.parent_id}",
        }
        for m in stored
    ]
    click.echo(_fmt_table(rows))


@db.command("rm")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option(
    "--with-children", is_flag=True, help="Also remove the models derived from them (e.g. pruned from a dense one)."
)
@click.option("--yes", "-y", is_flag=True, help="Remove without asking for confirmation.")
@_db_option
@friendly_errors
def db_rm(models, with_children, yes, db):
    """Remove models (by name or id) with their evaluations and per-sample rows, in one transaction.

    A model other models derive from is refused unless --with-children. Checkpoint files stay on disk; the
    output says where they are.
    """
    from bench.store.db import shown_url
    from bench.store.lifecycle import open_existing, plan_removal, remove_models

    store = open_existing(db)
    try:
        plan = plan_removal(store, models, with_children=with_children)
        if not yes:
            click.echo(f"about to remove from {shown_url(store.url)}:")
            for m in plan.models:
                click.echo(f"  {_stored_model_line(m)}")
            try:
                confirmed = click.confirm(
                    f"remove {_plural(len(plan.models), 'model')}, {_plural(plan.evaluations, 'evaluation')} and "
                    f"{_plural(plan.samples, 'per-sample row')}?"
                )
            except click.Abort:  # no answer: stdin closed or Ctrl-C
                confirmed = False
            if not confirmed:
                # Not click's Abort: friendly_errors would turn that RuntimeError into an empty "Error:" line.
                click.echo("\nnot confirmed; nothing was removed (--yes removes without asking)")
                raise SystemExit(1)
        removed = remove_models(store, models, with_children=with_children, expected=plan)
    finally:
        store.dispose()
    for m in removed.models:
        click.echo(f"removed {_stored_model_line(m)}")
    click.echo(
        f"removed {_plural(len(removed.models), 'model')}, {_plural(removed.evaluations, 'evaluation')} and "
        f"{_plural(removed.samples, 'per-sample row')} from {shown_url(store.url)}; checkpoint files were not touched"
    )


@db.command("rename")
@click.argument("model", metavar="MODEL")
@click.argument("new_name", metavar="NEW_NAME")
@_db_option
@friendly_errors
def db_rename(model, new_name, db):
    """Rename a stored model (by name or id); a name another model holds is refused."""
    from bench.store.lifecycle import open_existing, rename_model

    store = open_existing(db)
    try:
        before, new_name = rename_model(store, model, new_name)
    finally:
        store.dispose()
    if before.name == new_name:
        click.echo(f"{before.label} already has that name; nothing changed")
    else:
        click.echo(f"renamed model #{before.id} {before.name!r} to {new_name!r}")


@db.command("rank")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option(
    "--on/--off",
    "ranked",
    default=None,
    help="Rank the models (--on) or keep them off the ranked tables as sanity runs (--off); with neither, show "
    "whether they are ranked.",
)
@_db_option
@friendly_errors
def db_rank(models, ranked, db):
    """Put models (by name or id) in the leaderboard's ranked tables, or keep them off (sanity runs)."""
    from bench.store import Store
    from bench.store.lifecycle import describe_models, open_existing, set_ranked

    if ranked is None:
        store = Store(db, read_only=True)
        try:
            for m in describe_models(store, models):
                click.echo(f"{m.label} is {'ranked' if m.ranked else 'not ranked (a sanity run)'}")
        finally:
            store.dispose()
        return
    store = open_existing(db)
    try:
        before = set_ranked(store, models, ranked)
    finally:
        store.dispose()
    for m in before:
        if m.ranked == ranked:
            click.echo(f"{m.label} was already {'ranked' if ranked else 'unranked'}; nothing changed")
        elif ranked:
            click.echo(f"{m.label} is now ranked")
        else:
            click.echo(
                f"{m.label} is now unranked: kept off the ranked tables (bench db rank {m.name} --on ranks it again)"
            )


# Command groups living in their own modules register themselves on ``main`` when imported.
from bench import cli_analysis  # noqa: E402,F401  (registers analyze/report commands)
from bench import cli_submit as _cli_submit  # noqa: E402,F401  (registers submit, zoo, export)
from leaderboard import cli as _leaderboard_cli  # noqa: E402,F401  (registers the leaderboard commands)

if __name__ == "__main__":  # pragma: no cover
    # ``python -m bench.cli``: the modules above registered on the imported ``bench.cli.main``, not on this copy.
    from bench.cli import main as _imported_main

    sys.exit(_imported_main())
