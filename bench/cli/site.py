"""``bench leaderboard build``: the store rendered as the static leaderboard site (:mod:`leaderboard.build`)."""

from __future__ import annotations

import click

from bench.cli.options import db_option, friendly_errors

EPILOG_BUILD = """\b
Examples:
  bench leaderboard build --out site
  bench leaderboard build --db sqlite:///results.db --out public/leaderboard
"""


@click.group()
def leaderboard() -> None:
    """The static leaderboard site."""


@leaderboard.command(epilog=EPILOG_BUILD)
@db_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="site",
    show_default=True,
    help="Folder to write the site into (replaced if an earlier build made it; any other non-empty folder is refused).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Processes for the per-sample work (CSV files, plots) [default: the CPU count, at most 4]; "
    "the site does not depend on it.",
)
@friendly_errors
def build(db, out, workers):
    """Render the store as a static website (open the printed index.html from file://; no network needed)."""
    from bench.store import Store
    from leaderboard.build import build_site

    if workers is not None and workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    # Read-only: a missing store is reported, never created empty, and the build never writes to it.
    store = Store(db, read_only=True)
    try:
        index = build_site(store, out, workers=workers)
    finally:
        store.dispose()
    click.echo(str(index.resolve()))
