"""``bench db …``: the results store's upkeep (schema, listing, removal, names, ranking)."""

from __future__ import annotations

import click

from bench.analysis.format import MISSING
from bench.cli.options import db_option, fmt_table, friendly_errors, plural


@click.group()
def db():
    """Results-store maintenance."""


@db.command("upgrade")
@db_option
@friendly_errors
def db_upgrade(db):
    """Create or migrate the results store to the newest schema (Alembic)."""
    from bench.store import Store
    from bench.store.db import shown_url

    store = Store(db)
    click.echo(f"{shown_url(store.url)} is at the newest schema")


def _stored_model_line(m) -> str:
    """One model of ``bench db rm``'s plan or report: what goes with it, and where its checkpoint stays."""
    unfinished = f" ({m.unfinished} unfinished)" if m.unfinished else ""
    parent = f", derived from #{m.parent_id}" if m.parent_id is not None else ""
    checkpoint = f"its checkpoint stays on disk at {m.checkpoint_path}" if m.checkpoint_path else "no checkpoint file"
    return (
        f"{m.label} ({m.method}, {m.arch}, {m.dataset}{parent}): {plural(m.evaluations, 'evaluation')}{unfinished}, "
        f"{plural(m.samples, 'per-sample row')}; {checkpoint}"
    )


@db.command("list")
@db_option
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
    click.echo(fmt_table(rows))


@db.command("rm")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option(
    "--with-children", is_flag=True, help="Also remove the models derived from them (e.g. pruned from a dense one)."
)
@click.option("--yes", "-y", is_flag=True, help="Remove without asking for confirmation.")
@db_option
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
                    f"remove {plural(len(plan.models), 'model')}, {plural(plan.evaluations, 'evaluation')} and "
                    f"{plural(plan.samples, 'per-sample row')}?"
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
        f"removed {plural(len(removed.models), 'model')}, {plural(removed.evaluations, 'evaluation')} and "
        f"{plural(removed.samples, 'per-sample row')} from {shown_url(store.url)}; checkpoint files were not touched"
    )


@db.command("rename")
@click.argument("model", metavar="MODEL")
@click.argument("new_name", metavar="NEW_NAME")
@db_option
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
@db_option
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
