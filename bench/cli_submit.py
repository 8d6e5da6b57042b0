"""``bench submit …``, ``bench zoo …`` and ``bench export …``: submissions, the model zoo and RobustBench.

Registered on the ``bench`` group when imported (the last lines of :mod:`bench.cli`). The zoo part of
``bench evaluate`` (``--model-id``, ``--zoo``, and ``--method/--sparsity/--dataset/--arch`` resolving through the
zoo) is :func:`evaluate_zoo`, called from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from bench.analysis.format import MISSING, percent
from bench.cli import _db_option, _fmt_table, friendly_errors, main

EPILOG_SUBMIT = """\b
Examples:
  bench submit validate submissions/hydra/HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90.yaml
  bench submit validate --offline submissions/
  bench submit schema --out submissions/schema.json
"""
EPILOG_ZOO = """\b
Examples:
  bench zoo list --method hydra --dataset cifar10
  bench zoo fetch MAD_Lee2022Masking_R18_CIFAR10_US_90
  bench zoo fetch HYDRA_Sehwag2020Hydra_V16_CIFAR10_US_90_Authors --from ~/Downloads/model_best_dense.pth.tar
  bench zoo import-robustbench Carmon2019Unlabeled
  bench evaluate --model-id MAD_Lee2022Masking_R18_CIFAR10_US_90 --device cuda
  bench evaluate --zoo --method hydra --device cuda
"""


def _submissions_option(fn: Callable) -> Callable:
    return click.option(
        "--submissions",
        "submissions",
        type=click.Path(file_okay=False),
        default=None,
        help="Folder of <method>/<model_id>.yaml manifests [default: $BENCH_SUBMISSIONS_DIR or the repository's "
        "submissions/].",
    )(fn)


def _max_size_option(fn: Callable) -> Callable:
    from bench.zoo.fetch import DEFAULT_MAX_SIZE

    return click.option(
        "--max-size",
        type=click.IntRange(min=1),
        default=DEFAULT_MAX_SIZE,
        show_default=True,
        help="Largest checkpoint download accepted, in bytes.",
    )(fn)


# --------------------------------------------------------------------------------------------------------
# bench submit


@main.group(epilog=EPILOG_SUBMIT)
def submit() -> None:
    """Check submission manifests (what the pull-request workflow runs) and publish their schema."""


@submit.command("validate", epilog=EPILOG_SUBMIT)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--offline", is_flag=True, help="Skip what needs the network: fetch, sha256, load, sparsity, accuracy.")
@_submissions_option
@_max_size_option
@click.option(
    "--sparsity-tolerance",
    type=click.FloatRange(0, 1),
    default=None,
    help="Allowed |measured - claimed| canonical sparsity [default: 0.005, half a percentage point].",
)
@click.option(
    "--clean-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Test samples for the clean-accuracy check [default: 500].",
)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Dataset archives (never downloaded).")
@click.option("--device", default="cpu", show_default=True)
@friendly_errors
def validate_command(paths, offline, submissions, max_size, sparsity_tolerance, clean_samples, data_dir, device):
    """Validate manifests (files or folders); exit status 1 if any has an error.

    Every problem names the file, the field, why, and the fix. Online it also fetches each checkpoint
    (size-capped, resumable, sha256-checked), loads it weights-only through its converter, compares the measured
    sparsity with the claim and, when the dataset is on this machine, the clean accuracy on the first test samples
    with the reported one.
    """
    from bench.zoo.manifest import printable
    from bench.zoo.validate import CLEAN_SAMPLES, SPARSITY_TOLERANCE, ValidationOptions, validate_paths
    from bench.zoo.zoo import submissions_dir

    try:
        root = submissions_dir(submissions)
    except FileNotFoundError:
        if submissions:
            raise
        root = None  # validating files outside any submissions folder (e.g. a draft)
    options = ValidationOptions(
        offline=offline,
        max_size=max_size,
        sparsity_tolerance=SPARSITY_TOLERANCE if sparsity_tolerance is None else sparsity_tolerance,
        clean_samples=clean_samples or CLEAN_SAMPLES,
        data_dir=data_dir,
        device=device,
    )
    reports = validate_paths(list(paths), root=root, options=options, log=lambda msg: click.echo(f"  {printable(msg)}"))
    if not reports:
        raise click.ClickException(f"no manifests found in {', '.join(_shown(Path(p)) for p in paths)}")
    failed = 0
    for r in reports:
        failed += not r.ok
        head = "ok  " if r.ok else "FAIL"
        passed = f" ({printable('; '.join(r.passed))})" if r.passed and r.ok else ""
        click.echo(f"{head} {_shown(r.path)}{passed}")
        for p in r.problems:
            click.echo(f"  {p.render()}")
        for check, reason in r.skipped:
            click.echo(f"  skipped {printable(check)}: {printable(reason)}")
    click.echo(f"{len(reports)} manifest(s): {len(reports) - failed} ok, {failed} failed")
    if failed:
        raise SystemExit(1)


def _shown(path: Path) -> str:
    """A path as typed, or quoted with escapes when it holds characters a terminal would interpret."""
    text = str(path)
    return text if text.isprintable() else repr(text)


@submit.command("schema")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON Schema here.")
@click.option("--check", is_flag=True, help="With --out: fail if the file is not up to date (for CI).")
def schema_command(out, check):
    """Print (or write) the manifest's JSON Schema, generated from the pydantic model."""
    from bench.zoo.manifest import manifest_json_schema

    text = json.dumps(manifest_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        if check:
            raise click.UsageError("--check needs --out FILE")
        click.echo(text, nl=False)
        return
    path = Path(out)
    if check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            raise click.ClickException(f"{path} is out of date; regenerate it: bench submit schema --out {path}")
        click.echo(f"{path} is up to date")
        return
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path}")


# --------------------------------------------------------------------------------------------------------
# bench zoo


@main.group(epilog=EPILOG_ZOO)
def zoo() -> None:
    """The model zoo: the submitted checkpoints (submissions/), fetched and cached on demand."""


@zoo.command("list")
@click.option("--method", default=None, help="Only this method (bench methods; 'dense' for parents).")
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--arch", default=None, help="Only this architecture (or its short name, e.g. R18).")
@_submissions_option
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
        click.echo(_fmt_table(rows))
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
@_submissions_option
@_max_size_option
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
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--threat-model", type=click.Choice(["Linf", "L2"]), default="Linf", show_default=True)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="RobustBench's download folder [default: cache].",
)
@_db_option
@friendly_errors
def zoo_import_robustbench(model_name, dataset, threat_model, model_dir, db):
    """Register a RobustBench model as a dense parent (needs: pip install 'apbench[robustbench]').

    It is stored as robustbench:MODEL_NAME, which manifests can name as their dense_parent.
    """
    from bench.data import get_dataset_info
    from bench.store import Store
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
        f"model {row.name}: {row.arch} on {row.dataset}, sha256 {row.checkpoint_sha256[:12]}…, stored in {store.url}"
    )
    click.echo(f"evaluate it: bench evaluate --checkpoint {row.checkpoint_path} --arch {row.arch} --dataset {dataset}")


# --------------------------------------------------------------------------------------------------------
# bench export


@main.group()
def export() -> None:
    """Export stored results in other benchmarks' formats."""


@export.command("robustbench")
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False), default="model_info", show_default=True)
@click.option("--evaluation", "evaluation_id", type=int, default=None, help="Evaluation id [default: best match].")
@_submissions_option
@_db_option
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


# --------------------------------------------------------------------------------------------------------
# bench evaluate --model-id / --zoo / --method … through the zoo


def evaluate_zoo(
    *,
    model_id: str | None,
    all_entries: bool,
    method: str | None,
    sparsity: float | None,
    dataset: str | None,
    arch: str | None,
    submissions: str | None,
    max_size: int,
    db: str | None,
    data_dir: str | None,
    make_spec: Callable,
    run: Callable,
) -> None:
    """Evaluate zoo entries under the protocol.

    Args:
        model_id: one entry (``--model-id``).
        all_entries: every entry matching the filters not yet evaluated under this protocol (``--zoo``).
        method, sparsity, dataset, arch: filters; without ``model_id`` or ``all_entries`` they must pick one entry.
        make_spec: ``make_spec(dataset) -> (RunSpec, x, y)`` from the command's options.
        run: ``run(store, row, model, x=..., y=..., spec=...) -> summary`` (``bench evaluate``'s printer).
    """
    from bench.store import Store
    from bench.zoo.fetch import cached_path
    from bench.zoo.manifest import printable
    from bench.zoo.zoo import fetch_entry, known_sha256, load_model, load_zoo, register_entry

    z = load_zoo(submissions)
    if model_id is not None:
        entries = [z.get(model_id)]
    elif all_entries:
        entries = z.find(method=method, sparsity=sparsity, dataset=dataset, arch=arch)
        if not entries:
            raise ValueError(f"no zoo entries match the filters in {z.root} (bench zoo list)")
    else:
        entries = [z.resolve(method=method, sparsity=sparsity, dataset=dataset, arch=arch)]
    store = None  # opened once something is ready to store, so a failed lookup leaves no results.db behind
    # reason -> the entries it stopped. A missing dataset or an unreachable host stops many entries the same way:
    # it is reported once, with their ids, not once per entry.
    failures: dict[str, list[str]] = {}
    unusable_datasets: dict[str, str] = {}
    for i, entry in enumerate(entries):
        m = entry.manifest
        if all_entries and m.model.dataset in unusable_datasets:
            failures[unusable_datasets[m.model.dataset]].append(m.model_id)
            continue
        if i:
            click.echo("")
        try:
            if all_entries:
                try:
                    spec, _x, _y = make_spec(m.model.dataset)
                except (ValueError, RuntimeError, OSError) as err:
                    reason = _reason(err)
                    unusable_datasets[m.model.dataset] = reason
                    failures.setdefault(reason, []).append(m.model_id)
                    click.echo(f"FAILED {m.model_id} (and every other {m.model.dataset} entry): {reason}")
                    continue
                sha = known_sha256(entry)
                done = _complete_evaluation(db, sha, spec, entry) if sha is not None else None
                if done is not None:
                    click.echo(f"{m.model_id}: already evaluated under this protocol (evaluation #{done})")
                    continue
                if m.checkpoint.url is None and cached_path(m.model_id, m.checkpoint.file_name) is None:
                    click.echo(
                        f"skipping {m.model_id}: no download URL; bench zoo fetch {m.model_id} --from FILE first"
                    )
                    continue
            click.echo(f"zoo entry {entry.describe()}")
            fetched = fetch_entry(entry, max_size=max_size, log=lambda msg: click.echo(printable(msg)))
            model = load_model(entry, fetched.path)
            spec, x, y = make_spec(m.model.dataset)
            store = store or Store(db)
            row = register_entry(store, entry, fetched, model)
            run(store, row, model, x=x, y=y, spec=spec)
        # Whatever one entry's file or server does wrong (KeyError: a state dict without an expected key), the
        # others are still evaluated.
        except (ValueError, RuntimeError, OSError, KeyError) as err:
            if not all_entries:
                raise
            reason = _reason(err)
            failures.setdefault(reason, []).append(m.model_id)
            click.echo(f"FAILED {m.model_id}: {reason}")
    if failures:
        n_failed = sum(len(ids) for ids in failures.values())
        lines = []
        for reason, ids in failures.items():
            shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            head = f"{len(ids)} entr{'y' if len(ids) == 1 else 'ies'} ({shown}):"
            lines.append(head + "\n    " + reason.replace("\n", "\n    "))
        raise click.ClickException(f"{n_failed} of {len(entries)} zoo entries failed:\n  " + "\n  ".join(lines))


def _reason(err: BaseException) -> str:
    """An error's message for the terminal: its own line breaks kept, control characters in each line escaped
    (a server's or a file's words may be in it)."""
    from bench.zoo.manifest import printable

    text = f"missing key {err}" if type(err) is KeyError else str(err)  # str() of a bare KeyError is only the key
    return "\n".join(printable(line) for line in text.splitlines() or [""])


def _complete_evaluation(db: str | None, sha256: str, spec, entry) -> int | None:
    """A complete evaluation of these bytes behind the entry's input normalisation under the same protocol (any
    device or batch size), if stored."""
    from sqlalchemy import select

    from bench.catalog import normalization_key
    from bench.formats import converted_provenance
    from bench.store import Evaluation, Model, Store
    from bench.store.db import resolve_db_url

    url = resolve_db_url(db)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    fmt, dataset = entry.manifest.checkpoint.format, entry.manifest.model.dataset
    key = normalization_key(dataset, converted_provenance(fmt, dataset)["normalization"])
    store = Store(db)
    try:
        with store.session() as s:
            return s.scalars(
                select(Evaluation.id)
                .join(Model)
                .where(
                    Model.checkpoint_sha256 == sha256,
                    Model.normalization == key,
                    Evaluation.protocol_hash == spec.protocol_hash,
                    Evaluation.status == "complete",
                )
            ).first()
    finally:
        store.dispose()
