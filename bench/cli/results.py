"""``bench results`` and ``bench status``: the stored evaluations, as figures and as progress."""

from __future__ import annotations

import json
import math

import click

from bench.analysis.format import MISSING, interval, is_missing, percent, percent_range
from bench.cli.options import db_option, fmt_table, friendly_errors, output_format_option


def _settings_table(df) -> str:
    """The --by-setting table: each accuracy as mean (min–max) across seeds, the Wilson interval beside."""
    from bench.analysis.replicates import METRICS

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
                **{metric: across(row, metric) for metric, _ in METRICS},
                "autoattack 95 % (one evaluation at the mean)": wilson,
            }
        )
    return fmt_table(rows)


def _results_table(df) -> str:
    """The terminal table of :func:`bench.analysis.results.results_frame`: percentages, the interval beside the
    AutoAttack accuracy, and the seed columns only once they say something."""
    from bench.analysis.results import RESULT_COLUMNS

    shown = df.copy()
    for col in ("sparsity", "clean", "autoattack", "fmn", "best_known"):
        shown[col] = shown[col].map(lambda v: percent(v, unit="%"))
    shown["fmn_median"] = shown["fmn_median"].map(lambda v: MISSING if v is None or math.isnan(v) else f"{v:.4f}")
    shown["autoattack 95 %"] = [
        interval(low, high, unit="%") for low, high in zip(df.autoattack_low, df.autoattack_high, strict=True)
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
    return shown.to_string(index=False)


@click.command()
@db_option
@output_format_option("table", "csv", "json")
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
    from bench.analysis.results import results_frame, settings_frame
    from bench.store import Store

    store = Store(db, read_only=True)
    try:
        df = settings_frame(store) if by_setting else results_frame(store)
    finally:
        store.dispose()
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
    click.echo(_settings_table(df) if by_setting else _results_table(df))


@click.command()
@click.argument("model", required=False, metavar="[MODEL]")
@db_option
@output_format_option("table", "json")
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
    click.echo(fmt_table(rows))
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
