"""``bench prune``: a registered method prunes a dense model; the checkpoint is written and stored."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from bench.cli.options import SPARSITY, check_eps, data_dir_option, db_option, fmt_table, friendly_errors, seed_list


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


@click.command()
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
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="torch CPU threads of the pruning run.",
)
@db_option
@data_dir_option
@friendly_errors
def prune(method, sparsity, track, dense, arch, dataset, eps, seed, seeds, settings, out, threads, db, data_dir):
    """Prune a dense model with a registered method, write the checkpoint and register it in the store.

    The dense parent and each pruned model are stored only once the pruned checkpoint exists.
    """
    import torch

    from bench.checkpoints import load_checkpoint_model
    from bench.data import get_dataset_info, parse_eps
    from bench.store import Store
    from methods.base import get_method
    from methods.pipeline import DenseParent, prune_checkpoint

    check_eps(eps, "Linf")  # adversarial training's budget is L∞
    torch.set_num_threads(threads)
    runs = seed_list(seed, seeds, "--seed")
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
    for one_seed in runs:
        if len(runs) > 1:
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
            fmt_table(
                [
                    {"seed": str(one_seed), "model": r.name, "measured sparsity": f"{r.measured_sparsity:.2%}"}
                    for one_seed, r in zip(runs, rows, strict=True)
                ]
            )
        )
