"""``bench analyze …`` and ``bench reported …``: the analyses of ``bench.analysis`` in the terminal.

A MODEL argument is a model's numeric id or its name (``bench results`` lists them); where an evaluation is
meant, ``eval:N`` picks evaluation N and a model picks its newest complete evaluation.
"""

from __future__ import annotations

import json
import math

import click

from bench.analysis.format import MISSING, percent, points
from bench.cli.options import (
    DISTANCE_NAMES,
    accuracy_with_interval,
    db_option,
    fmt_table,
    friendly_errors,
    method_display_name,
    output_format_option,
)

EPILOG_ANALYZE = """\b
Examples:
  bench analyze thin-ice --pruned HYDRA_Sehwag2020Hydra_small_cnn_digits_US_90_s0
  bench analyze thin-ice --pruned 2 --dense 1
  bench analyze compare 2 3 --flag best_robust
  bench analyze drops --format csv
  bench analyze curve eval:4
"""

_DISTANCE_OPTION = click.option(
    "--distance",
    type=click.Choice(["best", "fmn"]),
    default="best",
    show_default=True,
    help="Per-sample distance read: best known (FMN, FMN from AutoAttack's adversarial, AutoAttack; plain FMN for an "
    "evaluation stored without it) or plain FMN (the thin-ice paper's figures).",
)


def resolve_evaluation_model(session, ref: str):
    """The model a MODEL argument names (``eval:N`` names its evaluation's model)."""
    from bench.analysis.report import EVALUATION_PREFIX, resolve_evaluation, resolve_model

    if str(ref).strip().startswith(EVALUATION_PREFIX):
        return resolve_evaluation(session, ref).model
    return resolve_model(session, ref)


def _store(db, *, read_only: bool = False):
    from bench.store import Store

    return Store(db, read_only=read_only)


@click.group(epilog=EPILOG_ANALYZE)
def analyze() -> None:
    """Analyses over stored per-sample records: thin ice, paired tests, drops, security curves."""


@analyze.command("thin-ice", short_help="Samples on thin ice: populations and AUCs against the dense parent.")
@click.option("--pruned", "pruned_ref", required=True, metavar="MODEL", help="Pruned model (id, name or eval:N).")
@click.option(
    "--dense",
    "dense_ref",
    default=None,
    metavar="MODEL",
    help="Dense model (id, name or eval:N) [default: the pruned model's parent].",
)
@click.option("--min-group", type=int, default=5, show_default=True, help="Populations smaller than this get a note.")
@_DISTANCE_OPTION
@output_format_option("table", "json")
@db_option
@friendly_errors
def thin_ice_command(pruned_ref, dense_ref, min_group, distance, fmt, db):
    """Samples on thin ice (Piras et al. 2023, Table 2): populations S00/S01/S10/S11 by clean correctness of the
    dense (first digit) and pruned (second digit) model, and how well the dense model's distance ε separates
    them (AUC with the two-sided Mann–Whitney p-value). ε is the best-known distance by default; --distance fmn
    gives the paper's plain FMN ε."""
    from bench.analysis.records import load_records
    from bench.analysis.report import resolve_model, resolve_pair
    from bench.analysis.thin_ice import thin_ice

    store = _store(db, read_only=True)
    with store.session() as s:
        if dense_ref is None:
            pruned_model = resolve_evaluation_model(s, pruned_ref)
            if pruned_model.parent_id is None:
                raise ValueError(f"model {pruned_model.name!r} has no dense parent in the store; name one with --dense")
            dense_ref = str(pruned_model.parent_id)
        pruned_ev, dense_ev = resolve_pair(s, pruned_ref, dense_ref)
        pruned, dense = pruned_ev.model, dense_ev.model
        result = thin_ice(
            load_records(s, dense_ev.id), load_records(s, pruned_ev.id), min_group=min_group, distance=distance
        )
        if pruned.parent_id is not None and pruned.parent_id != dense.id:
            parent = resolve_model(s, pruned.parent_id)
            result.notes.append(f"{dense.name!r} is not the pruned model's recorded parent ({parent.name!r})")
        lead = {
            "Method": method_display_name(pruned.method),
            "Sparsity %": percent(pruned.measured_sparsity, unit=""),
            "Network": pruned.arch,
        }
        title = (
            f"Samples on thin ice: {pruned.name} (evaluation #{pruned_ev.id}) against {dense.name} "
            f"(evaluation #{dense_ev.id}), {result.n} shared samples, {dense_ev.spec.get('norm')} "
            f"eps={dense_ev.spec.get('eps')}"
        )
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "pruned_evaluation": pruned_ev.id,
                    "dense_evaluation": dense_ev.id,
                    "distance": result.distance,
                    "n": result.n,
                    "counts": result.counts,
                    "percent": result.percent,
                    "auc_10_11": result.auc_10_11,
                    "p_10_11": result.p_10_11,
                    "auc_01_00": result.auc_01_00,
                    "p_01_00": result.p_01_00,
                    "notes": result.notes,
                },
                indent=1,
            )
        )
        return
    click.echo(title)
    click.echo("")
    click.echo(fmt_table([{**lead, **result.as_table_row()}]))
    click.echo("")
    click.echo(
        f"S_dp: d = dense correct, p = pruned correct (clean); ε = the dense model's signed "
        f"{DISTANCE_NAMES[result.distance]};"
    )
    click.echo("AUC = P(ε of a random sample of the first group < ε of one of the second).")
    for note in result.notes:
        click.echo(f"note: {note}")


@analyze.command("compare")
@click.argument("a_ref", metavar="MODEL_A")
@click.argument("b_ref", metavar="MODEL_B")
@click.option(
    "--flag",
    type=click.Choice(["aa_robust", "best_robust", "clean_correct"]),
    default="aa_robust",
    show_default=True,
    help="Per-sample flag compared: robust after AutoAttack, best-known robust (AutoAttack or FMN), or clean.",
)
@output_format_option("table", "json")
@db_option
@friendly_errors
def compare_command(a_ref, b_ref, flag, fmt, db):
    """McNemar's exact test: is A's robustness different from B's beyond noise, on the samples both hold?"""
    from bench.analysis.paired import mcnemar
    from bench.analysis.records import load_records
    from bench.analysis.report import resolve_pair
    from bench.analysis.stats import wilson_interval

    store = _store(db, read_only=True)
    with store.session() as s:
        a_ev, b_ev = resolve_pair(s, a_ref, b_ref)
        result = mcnemar(load_records(s, a_ev.id), load_records(s, b_ev.id), flag=flag)
        a_name, b_name = a_ev.model.name, b_ev.model.name
    if fmt == "json":
        out = {"a_evaluation": a_ev.id, "b_evaluation": b_ev.id, **vars(result)}
        click.echo(json.dumps(out, indent=1))
        return
    n = result.n_shared
    acc_a, acc_b = result.a_only + result.both, result.b_only + result.both
    click.echo(f"A = {a_name} (evaluation #{a_ev.id}), B = {b_name} (evaluation #{b_ev.id}); {n} shared samples")
    click.echo("")
    click.echo(
        fmt_table(
            [
                {"": f"A {flag}", f"B {flag}": str(result.both), f"B not {flag}": str(result.a_only)},
                {"": f"A not {flag}", f"B {flag}": str(result.b_only), f"B not {flag}": str(result.neither)},
            ]
        )
    )
    click.echo("")
    click.echo(f"A  {accuracy_with_interval(acc_a / n, *wilson_interval(acc_a, n))}")
    click.echo(f"B  {accuracy_with_interval(acc_b / n, *wilson_interval(acc_b, n))}")
    click.echo(f"A − B = {points(100 * result.difference)}; {result.statistic_note}")
    verdict = "a difference beyond noise at the 5 % level" if result.pvalue < 0.05 else "not distinguishable at 5 %"
    click.echo(f"p = {result.pvalue:.3g}: {verdict}")


@analyze.command("drops")
@output_format_option("table", "csv", "json")
@db_option
@friendly_errors
def drops_command(fmt, db):
    """Re-evaluation drop of every evaluated model with a reported number: the authors' claimed robust accuracy −
    our AutoAttack robust accuracy, in points, with another benchmark's AutoAttack figure beside it (accuracies as
    fractions in csv/json). A model whose reported numbers cannot be read is skipped with a warning on stderr."""
    from bench.analysis.export import csv_text
    from bench.analysis.report import DROP_COLUMNS, drop_rows

    store = _store(db, read_only=True)
    with store.session() as s:
        rows, warnings = drop_rows(s)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if fmt == "csv":
        click.echo(csv_text(DROP_COLUMNS, ([r[c] for c in DROP_COLUMNS] for r in rows)), nl=False)
        return
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(
            "no evaluated model has a reported number; attach one with `bench reported set`, or evaluate a model "
            "that matches the shipped tables (`bench reported list`)"
        )
        return
    shown = []
    for r in rows:
        claim = r["reported_attack"] or "attack not stated"
        shown.append(
            {
                "eval": str(r["evaluation_id"]),
                "model": r["model"],
                "sparsity": percent(r["sparsity"]),
                "claimed robust": percent(r["reported_robust"]),
                "measured AA robust [95 %]": accuracy_with_interval(
                    r["measured_robust"], r["measured_robust_low"], r["measured_robust_high"]
                ),
                "drop": points(r["drop_points"], unit=""),
                "other AA": percent(r["reevaluation_robust"]),
                "claim: attack — source": (
                    MISSING if r["reported_source"] is None else f"{claim} — {r['reported_source']}"
                ),
            }
        )
    click.echo(fmt_table(shown))


@analyze.command("curve")
@click.argument("ref", metavar="MODEL")
@click.option("--points", type=int, default=13, show_default=True, help="Budgets printed, evenly from 0 to 3·eps.")
@_DISTANCE_OPTION
@db_option
@friendly_errors
def curve_command(ref, points, distance, db):
    """Security curve: robust accuracy against the budget from the per-sample distances (best known by default,
    --distance fmn for plain FMN's), with the AutoAttack point."""
    import numpy as np

    from bench.analysis.curves import security_curve
    from bench.analysis.records import load_records
    from bench.analysis.report import resolve_evaluation

    if points < 2:
        raise ValueError("--points must be at least 2")
    store = _store(db, read_only=True)
    with store.session() as s:
        ev = resolve_evaluation(s, ref)
        records = load_records(s, ev.id)
        name, aa = ev.model.name, ev.aa_robust_accuracy
    grid, acc = security_curve(records, np.linspace(0, 3 * records.eps, points), distance=distance)
    used = records.distance_used(distance)
    click.echo(
        f"security curve of {name} (evaluation #{ev.id}, {records.norm}, nominal eps {records.spec.get('eps')}, "
        f"N={records.n}); robust accuracy = correct and {DISTANCE_NAMES[used]} > eps"
    )
    if used != distance:
        click.echo(
            f"note: evaluation #{ev.id} has no best-known distances (stored before FMN started from AutoAttack's "
            "adversarial examples); the curve reads plain FMN's"
        )
    for e, a in zip(grid, acc, strict=True):
        mark = ""
        if math.isclose(e, records.eps, rel_tol=1e-9):
            mark = f"   <- nominal eps; AutoAttack robust {percent(aa)}"
        click.echo(f"  eps {e:10.5f}  {percent(a, width=8)}{mark}")


@click.group()
def reported() -> None:
    """Reported accuracies (a paper's claim) attached to models, and the shipped tables of them."""


@reported.command("set")
@click.argument("ref", metavar="MODEL")
@click.option("--clean", type=float, default=None, help="Reported clean accuracy, a fraction (0.84).")
@click.option("--robust", type=float, default=None, help="Reported robust accuracy, a fraction (0.52).")
@click.option("--attack", required=True, help='Attack behind --robust, e.g. "PGD-20" or "AutoAttack standard".')
@click.option("--source", required=True, help="Paper, table or URL the numbers come from.")
@click.option("--eps", default=None, help='Budget of the reported attack, e.g. "8/255".')
@click.option(
    "--norm", type=click.Choice(["Linf", "L2"]), default=None, help="Threat model of the reported attack's budget."
)
@click.option("--note", default=None, help="Anything a reader should know about these numbers (shown beside them).")
@db_option
@friendly_errors
def reported_set(ref, clean, robust, attack, source, eps, norm, note, db):
    """Attach reported numbers to a model (they replace any it had and take precedence over the shipped tables)."""
    from bench.analysis.report import resolve_model
    from bench.analysis.reported import parse_reported

    data = {
        "clean": clean,
        "robust": robust,
        "attack": attack,
        "source": source,
        "eps": eps,
        "norm": norm,
        "note": note,
    }
    if clean is None and robust is None:
        raise ValueError("bench reported set: give at least one of --clean and --robust")
    rep = parse_reported({k: v for k, v in data.items() if v is not None}, "bench reported set")
    store = _store(db)
    with store.session() as s:
        model = resolve_model(s, ref)
        model.reported = rep.to_json()
        name = model.name

    click.echo(
        f"model {name}: reported clean {percent(rep.clean)}, robust {percent(rep.robust)} ({rep.attack}; {rep.source})"
    )


@reported.command("clear")
@click.argument("ref", metavar="MODEL")
@db_option
@friendly_errors
def reported_clear(ref, db):
    """Remove a model's own reported numbers (shipped-table matches still apply)."""
    from bench.analysis.report import resolve_model

    store = _store(db)
    with store.session() as s:
        model = resolve_model(s, ref)
        model.reported = {}
        name = model.name
    click.echo(f"model {name}: reported numbers removed")


@reported.command("list")
@click.option("--method", default=None, help="Only this method key (hydra, mad, pwoa, admm, atmc).")
@output_format_option("table", "json")
def reported_list(method, fmt):
    """The shipped reported numbers (thin-ice Table 1, the APB leaderboard, the methods' papers)."""
    from bench.analysis.reported import load_reported_table

    entries = [e for e in load_reported_table() if method is None or e["method"] == method]
    if fmt == "json":
        click.echo(json.dumps(entries, indent=1, ensure_ascii=False))
        return
    rows = [
        {
            "id": e["id"],
            "method": e["method"],
            "arch": e["arch"],
            "dataset": e["dataset"],
            "struct": e["structure"],
            "sparsity": f"{100 * e['sparsity']:g} %",
            "threat": f"{e['norm']} {e['eps']}" if e["norm"] else "not stated",
            "clean": percent(e["clean"], unit=""),
            "robust": percent(e["robust"], unit=""),
            "kind": e["kind"],
            "table": e.get("table", ""),
        }
        for e in entries
    ]
    click.echo(fmt_table(rows))
