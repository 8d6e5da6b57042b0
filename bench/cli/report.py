"""``bench report MODEL``: everything known about one stored model, in the terminal."""

from __future__ import annotations

import json
import math

import click

from bench.analysis.format import MISSING, number, percent, points
from bench.cli.options import DISTANCE_NAMES, accuracy_with_interval, db_option, friendly_errors, method_display_name


@click.command("report")
@click.argument("ref", metavar="MODEL")
@db_option
@friendly_errors
def report(ref, db):
    """Everything known about one model: figures, evaluations with intervals, per-attack breakdown, security
    curve, reported numbers and drops, thin ice against its parent, provenance."""
    from bench.analysis.report import model_report
    from bench.models.normalize import describe_normalization
    from bench.store import Store

    store = Store(db, read_only=True)
    try:
        with store.session() as s:
            rep = model_report(s, ref)
    finally:
        store.dispose()
    m = rep["model"]
    echo = click.echo
    echo(f"model #{m.id} {m.name}")
    echo(f"  method        {method_display_name(m.method)} ({m.method}), structure {m.structure}")
    echo(f"  architecture  {m.arch} on {m.dataset}")
    if inputs := describe_normalization(m.normalization):  # shown only when not the dataset's own mean/std
        echo(f"  inputs        normalisation {inputs}")
    echo(f"  sparsity      {percent(m.measured_sparsity)} measured (target {percent(m.target_sparsity)})")
    echo(f"  parameters    {m.nonzero_params:,} non-zero of {m.params:,}")
    echo(f"  FLOPs         {m.nonzero_flops:,} counting non-zero weights, {m.flops:,} dense")
    if rep["parent"] is not None:
        echo(f"  parent        #{rep['parent'].id} {rep['parent'].name}")
    if rep["children"]:
        echo(f"  pruned from it {', '.join(f'#{c.id} {c.name}' for c in rep['children'])}")
    echo(f"  checkpoint    {m.checkpoint_path or MISSING} (sha256 {m.checkpoint_sha256})")
    echo(f"  source        {m.source}, registered {m.created_at:%Y-%m-%d %H:%M} UTC")
    if m.taxonomy:
        echo(f"  taxonomy      {_inline(m.taxonomy)}")
    if m.layer_sparsity:
        echo("  per-layer sparsity")
        for layer, info in m.layer_sparsity.items():
            echo(f"    {layer:<28} {percent(info['sparsity'], width=8)} of {info['numel']:,}")

    if not rep["evaluations"]:
        echo("")
        echo("no evaluation yet: run `bench evaluate` on its checkpoint")
    for ev in rep["evaluations"]:
        spec = ev["spec"]
        echo("")
        echo(
            f"evaluation #{ev['id']} ({ev['status']}): AutoAttack-{spec.get('version')} {spec.get('norm')} "
            f"eps={spec.get('eps')}, FMN {spec.get('fmn_steps')} steps"
            f"{' (also from AutoAttack adversarials)' if spec.get('fmn_init', 'none') != 'none' else ''}, "
            f"N={ev['n']}, seed {spec.get('seed')}, "
            f"protocol {spec.get('protocol')} {ev['protocol_hash'][:12]}"
        )
        if ev["status"] != "complete":
            echo("  not complete: run the same `bench evaluate` command again to finish it")
            continue
        labels = {
            "clean": "clean",
            "autoattack": "AutoAttack robust",
            "fmn": "FMN robust at eps",
            "best_known": "best-known robust",
        }
        for key, label in labels.items():
            if key in ev["intervals"]:
                seeds = ev["replicates"].get(key)
                across = (
                    f"; seeds {','.join(map(str, seeds.seeds))}: mean {percent(seeds.mean)}, "
                    f"range {percent(seeds.min, unit='')}–{percent(seeds.max)}"
                    if seeds
                    else ""
                )
                echo(f"  {label:<22} {accuracy_with_interval(*ev['intervals'][key])}  (Wilson 95 %{across})")
        if ev["fmn_median_distance"] is not None:
            echo(f"  FMN median distance    {ev['fmn_median_distance']:.5f}  (plain FMN, as the thin-ice paper)")
        best = ev["best_known"]
        if best is not None and best["best_median_distance"] is not None:
            echo(
                f"  best-known median      {best['best_median_distance']:.5f}  (FMN, FMN from AutoAttack's "
                "adversarial, AutoAttack)"
            )
        if best is not None and best["fmn_local_optimality"] is not None:
            ratio = best["fmn_best_median_ratio"]
            echo(
                f"  plain FMN vs best      local optimality {best['fmn_local_optimality']:.4f} (AttackBench; 1 = "
                f"the best known), median ratio {number(ratio)}, "
                f"{best['n_fmn_above_best']} samples more than 1 % above it or not found"
            )
        if ev["flags"]:
            echo(
                f"  flags                  {', '.join(ev['flags'])}"
                + ("  (potentially unreliable)" if ev["unreliable"] else "")
            )
        for error in ev["errors"]:
            echo(f"  note: {error}")
        if ev["breakdown"]:
            echo("  where the samples ended (first AutoAttack stage that broke each)")
            width = max(14, *(len(stage) for stage, _ in ev["breakdown"]))
            for stage, count in ev["breakdown"]:
                share = 100 * count / ev["n"] if ev["n"] else math.nan
                echo(f"    {stage:<{width}} {count:>7}  {share:6.2f} %")
        if ev["curve"]:
            echo(f"  security curve ({DISTANCE_NAMES[ev['curve_distance']]}s)")
            echo("    " + "   ".join(f"eps {e:.4g}: {percent(a, 1)}" for e, a in ev["curve"]))
        if ev["curve_fmn"]:
            echo("  security curve (plain FMN distances)")
            echo("    " + "   ".join(f"eps {e:.4g}: {percent(a, 1)}" for e, a in ev["curve_fmn"]))
        for reported, drop in ev["claims"]:
            drop_text = points(drop)
            echo(
                f"  authors' claim         clean {percent(reported.clean)}, robust {percent(reported.robust)} "
                f"→ drop {drop_text}  ({reported.origin})"
            )
            _echo_reported_details(reported, indent=27)
        for reported, gap in ev["reevaluations"]:
            gap_text = points(None if gap is None else -gap)
            echo(
                f"  other re-evaluation    clean {percent(reported.clean)}, robust {percent(reported.robust)} "
                f"(ours − theirs {gap_text}; {reported.origin})"
            )
            _echo_reported_details(reported, indent=27)
        ti = ev["thin_ice"]
        if ti is not None:
            row = ti.as_table_row()
            echo(
                f"  thin ice vs parent     S00 {row['S00 %']} %, S01 {row['S01 %']} %, S10 {row['S10 %']} %, "
                f"S11 {row['S11 %']} %; AUC ε10<ε11 {row['AUC ε10<ε11 (p)']}, "
                f"AUC |ε01|<|ε00| {row['AUC |ε01|<|ε00| (p)']}"
            )
            echo(f"    ε = the parent's signed {DISTANCE_NAMES[ti.distance]}")
            paper = ev.get("thin_ice_fmn")
            if paper is not None:
                paper_row = paper.as_table_row()
                echo(
                    f"    with plain FMN ε (the paper's): AUC ε10<ε11 {paper_row['AUC ε10<ε11 (p)']}, "
                    f"AUC |ε01|<|ε00| {paper_row['AUC |ε01|<|ε00| (p)']}"
                )
            for note in ti.notes:
                echo(f"    note: {note}")
        elif ev["thin_ice_reason"]:
            echo(f"  thin ice vs parent     not computed: {ev['thin_ice_reason']}")
        if ev["attack_seconds"]:
            echo(f"  attack seconds         {_inline({k: round(v, 1) for k, v in ev['attack_seconds'].items()})}")
        prov = ev["provenance"]
        shown = [k for k in PROVENANCE_KEYS if prov.get(k) is not None]
        if shown:
            echo("  provenance")
            for key in shown:
                echo(f"    {key:<20} {prov[key]}")
    if rep["reported_error"]:
        echo("")
        echo(f"note: {rep['reported_error']}")
    if not any(ev.get("claims") or ev.get("reevaluations") for ev in rep["evaluations"]) and rep["reported"]:
        echo("")
        for reported in rep["reported"]:
            kind = "authors' claim" if reported.kind == "claim" else "re-evaluation"
            echo(
                f"reported ({kind}): clean {percent(reported.clean)}, robust {percent(reported.robust)} "
                f"({reported.origin}); no complete evaluation under its threat model to compare"
            )
            _echo_reported_details(reported, indent=4)
    if m.provenance:
        echo("")
        echo(f"how it was made: {_inline(m.provenance, limit=1200)}")


PROVENANCE_KEYS = (
    "started_at",
    "finished_at",
    "git_commit",
    "apbench",
    "torch",
    "pyautoattack",
    "python",
    "platform",
    "device",
    "dtype",
    "cuda",
    "torch_threads",
    "checkpoint_sha256",
    "spec_hash",
)


def _echo_reported_details(reported, indent: int) -> None:
    pad = " " * indent
    threat = f"{reported.norm or 'norm not stated'} eps={reported.eps or 'not stated'}"
    click.echo(f"{pad}attack: {reported.attack or 'not stated'} ({threat})")
    click.echo(f"{pad}source: {reported.source}" + (f" {reported.source_url}" if reported.source_url else ""))
    if reported.note:
        click.echo(f"{pad}note: {reported.note}")


def _inline(d: dict, limit: int = 300) -> str:
    text = json.dumps(d, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"
