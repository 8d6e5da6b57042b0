"""``bench submit …``: submission manifests checked (what the pull-request workflow runs) and their schema."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bench.cli.options import friendly_errors, max_size_option, submissions_option

EPILOG_SUBMIT = """\b
Examples:
  bench submit validate submissions/hydra/HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90.yaml
  bench submit validate --offline submissions/
  bench submit schema --out submissions/schema.json
"""


@click.group(epilog=EPILOG_SUBMIT)
def submit() -> None:
    """Check submission manifests (what the pull-request workflow runs) and publish their schema."""


@submit.command("validate", epilog=EPILOG_SUBMIT)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--offline", is_flag=True, help="Skip what needs the network: fetch, sha256, load, sparsity, accuracy.")
@submissions_option
@max_size_option
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
@click.option(
    "--device", default="cpu", show_default=True, help="torch device of the clean-accuracy check (cpu, cuda, cuda:N)."
)
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
