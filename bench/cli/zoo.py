"""``bench zoo …`` and ``bench export …``: the model zoo (submitted checkpoints, fetched on demand) and RobustBench.

``bench evaluate --model-id`` / ``--zoo`` evaluate zoo entries (:mod:`bench.cli.sources`, :mod:`bench.zoo.runs`).
"""

from __future__ import annotations

from pathlib import Path

import click

from bench.analysis.format import MISSING, percent
from bench.cli.options import db_option, fmt_table, friendly_errors, max_size_option, submissions_option

EPILOG_ZOO = """\b
Examples:
  bench zoo list --method hydra --dataset cifar10
  bench zoo fetch MAD_Lee2022Masking_R18_CIFAR10_US_90
  bench zoo fetch HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90_Authors --from ~/Downloads/model_best_dense.pth.tar
  bench zoo import-robustbench Carmon2019Unlabeled
  bench evaluate --model-id MAD_Lee2022Masking_R18_CIFAR10_US_90 --device cuda
  bench evaluate --zoo --method hydra --device cuda
"""


@click.group(epilog=EPILOG_ZOO)
def zoo() -> None:
    """The model zoo: the submitted checkpoints (submissions/), fetched and cached on demand."""


@zoo.command("list")
@click.option("--method", default=None, help="Only this method (bench methods; 'dense' for parents).")
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--arch", default=None, help="Only this architecture (or its short name, e.g. R18).")
@submissions_option
@friendly_errors
def zoo_list(method, dataset, arch, submissions):
    """List the zoo's entries: id, architecture, sparsity, reported clean/robust (%), verification, cache."""
    from bench.zoo.fetch import cached_path
    from bench.zoo.zoo import load_zoo

    z = load_zoo(submissions)
    entries = z.find(method=method, dataset=dataset, arch=arch)
    rows = []
    for e in entries:
        m = e.manifest
        rows.append(
            {
                "model_id": m.model_id,
                "method": m.method,
                "arch": m.model.arch,
                "dataset": m.model.dataset,
                "sparsity": f"{m.model.sparsity:g}",
                "clean": percent(m.reported.clean, unit=""),
                "robust": percent(m.reported.robust, unit=""),
                "sha256": "given" if m.checkpoint.sha256 else "on first fetch",
                "url": "yes" if m.checkpoint.url else "by hand",
                "cached": "yes" if cached_path(m.model_id, m.checkpoint.file_name) else MISSING,
            }
        )
    if not rows:
        click.echo(f"no zoo entries match in {z.root}")
    else:
        click.echo(fmt_table(rows))
    if z.invalid:
        click.echo(f"{len(z.invalid)} invalid manifest(s) left out; see bench submit validate --offline {z.root}")


@zoo.command("fetch", epilog=EPILOG_ZOO)
@click.argument("model_id")
@click.option(
    "--from",
    "source_file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A file downloaded by hand (e.g. from a Dropbox folder) to verify and cache instead of downloading.",
)
@submissions_option
@max_size_option
@friendly_errors
def zoo_fetch(model_id, source_file, submissions, max_size):
    """Download an entry's checkpoint into the cache (resumable, size-capped) and verify its sha256.

    An entry without a sha256 (a seeded one) gets the hash of its first download recorded in the cache's
    records.json; every later fetch is checked against it.
    """
    from bench.zoo.manifest import printable
    from bench.zoo.zoo import fetch_entry, load_zoo

    entry = load_zoo(submissions).get(model_id)
    result = fetch_entry(
        entry,
        max_size=max_size,
        source_file=Path(source_file) if source_file else None,
        log=lambda msg: click.echo(printable(msg)),
    )
    click.echo(f"{result.path}")
    click.echo(f"  sha256 {result.sha256}  ({result.size:,} bytes)")
    if result.verified_by == "first download":
        click.echo("  first download of an entry without a sha256: the hash is recorded; later fetches must match it")
    else:
        click.echo(f"  verified against the {'manifest' if result.verified_by == 'manifest' else 'recorded hash'}")


@zoo.command("import-robustbench", epilog=EPILOG_ZOO)
@click.argument("model_name")
@click.option("--dataset", default="cifar10", show_default=True, help="Dataset of the model (bench datasets).")
@click.option(
    "--threat-model",
    type=click.Choice(["Linf", "L2"]),
    default="Linf",
    show_default=True,
    help="RobustBench leaderboard the model is listed on.",
)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="RobustBench's download folder [default: cache].",
)
@db_option
@friendly_errors
def zoo_import_robustbench(model_name, dataset, threat_model, model_dir, db):
    """Register a RobustBench model as a dense parent (needs: pip install 'apbench[robustbench]').

    It is stored as robustbench:MODEL_NAME, which manifests can name as their dense_parent.
    """
    from bench.data import get_dataset_info
    from bench.store import Store
    from bench.store.db import shown_url
    from bench.zoo.robustbench import import_robustbench

    get_dataset_info(dataset)
    store = Store(db)
    row = import_robustbench(
        store,
        model_name,
        dataset=dataset,
        threat_model=threat_model,
        model_dir=Path(model_dir) if model_dir else None,
        log=click.echo,
    )
    click.echo(
        f"model {row.name}: {row.arch} on {row.dataset}, sha256 {row.checkpoint_sha256[:12]}…, "
        f"stored in {shown_url(store.url)}"
    )
    click.echo(f"evaluate it: bench evaluate --checkpoint {row.checkpoint_path} --arch {row.arch} --dataset {dataset}")


@click.group()
def export() -> None:
    """Export stored results in other benchmarks' formats."""


@export.command("robustbench")
@click.argument("model")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="model_info",
    show_default=True,
    help="Folder of RobustBench's model_info tree to write into.",
)
@click.option("--evaluation", "evaluation_id", type=int, default=None, help="Evaluation id [default: best match].")
@submissions_option
@db_option
@friendly_errors
def export_robustbench(model, out, evaluation_id, submissions, db):
    """Write RobustBench's model_info JSON (OUT/<dataset>/<threat>/<Name>.json) for an evaluated model.

    MODEL is a zoo id or a stored model's name (bench results). The complete evaluation with AutoAttack standard
    (RobustBench's) and the most samples is used unless --evaluation picks one.
    """
    from bench.store import Store
    from bench.zoo.robustbench import export_model_info
    from bench.zoo.zoo import load_zoo

    try:
        z = load_zoo(submissions)
    except FileNotFoundError:
        z = None
    path = export_model_info(Store(db), model, out_dir=Path(out), zoo=z, evaluation_id=evaluation_id)
    click.echo(str(path))
