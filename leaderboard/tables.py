"""The ranked tables: which entries a table holds and in what order, each row as plain values (the record the CSV
and JSON downloads hold), the rows and columns a page draws (:data:`leaderboard.columns.COLUMNS`), and the
download files.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from bench.analysis.export import csv_text
from leaderboard.columns import COLUMNS, Column, Row
from leaderboard.formatting import slugify
from leaderboard.site_data import SiteData
from leaderboard.view_models import Entry, Table, is_ranked


@dataclass
class SiteTables:
    """The site's tables in protocol order, and per table (by slug) its download records, the rows its page draws
    and the columns drawn."""

    tables: list[Table]
    records: dict[str, list[dict[str, Any]]]
    rows: dict[str, list[Row]]
    columns: dict[str, list[Column]]


def build_tables(data: SiteData) -> SiteTables:
    """Every table of the site with its rows; each protocol gets its own tables (``Protocol.tables``)."""
    tables = _tables(data)
    records = {t.slug: [row_record(t, i, e) for i, e in enumerate(t.entries, 1)] for t in tables}
    rows = {
        t.slug: [
            Row(r, e, bool(data.children.get(e.model.id))) for r, e in zip(records[t.slug], t.entries, strict=True)
        ]
        for t in tables
    }
    # A column that only some evaluations have (seeds, best-known figures) is drawn in the tables where a row has it.
    columns = {t.slug: [c for c in COLUMNS if c.shown(rows[t.slug])] for t in tables}
    return SiteTables(tables, records, rows, columns)


def _tables(data: SiteData) -> list[Table]:
    """One table per (protocol, architecture, structure), in protocol order; a dense parent joins every structure
    of its architecture under the same protocol. A table never holds two protocols."""
    tables = []
    for protocol in data.protocols:
        pruned: dict[tuple[str, str], list[Entry]] = defaultdict(list)
        dense: dict[str, list[Entry]] = defaultdict(list)
        for model in data.models:
            entry = data.entry(model.id, protocol.hash)
            if entry is None or not is_ranked(model):
                continue
            if model.structure == "dense":
                dense[model.arch].append(entry)
            else:
                pruned[(model.arch, model.structure)].append(entry)
        groups = {key: entries + dense.get(key[0], []) for key, entries in pruned.items()}
        for arch, entries in dense.items():
            if not any(a == arch for a, _ in pruned):
                groups[(arch, "dense")] = entries
        protocol.tables = []
        for arch, structure in sorted(groups):
            rows = sorted(
                groups[(arch, structure)],
                key=lambda e: (
                    -(e.ev.aa_robust_accuracy or 0.0),
                    -(e.ev.best_robust_accuracy or 0.0),
                    -(e.ev.clean_accuracy or 0.0),
                    e.model.name,
                ),
            )
            name = slugify(
                "-".join(
                    (protocol.dataset, protocol.spec.get("norm", "?"), str(protocol.spec.get("eps")), arch, structure)
                )
            )
            slug = f"table-{len(tables) + 1:02d}-{name}-{slugify(protocol.short)}"
            table = Table(protocol, arch, structure, rows, slug=slug)
            protocol.tables.append(table)
            tables.append(table)
    return tables


def row_record(table: Table, rank: int, e: Entry) -> dict[str, Any]:
    """One table row as plain values (fractions, counts): the CSV/JSON download and the page share it."""
    m, ev = e.model, e.ev
    aa_low, aa_high = e.interval(ev.aa_robust_accuracy)
    rep = e.reported
    across = e.setting.summary.get("autoattack") if e.setting else None
    return {
        "rank": rank,
        "model": m.name,
        "method": m.method,
        "method_name": e.method.display_name if e.method else m.method,
        "paper_url": e.method.paper_url if e.method else None,
        "dataset": m.dataset,
        "norm": table.norm,
        "eps": table.eps,
        "arch": m.arch,
        "structure": m.structure,
        "sparsity": m.measured_sparsity,
        "clean": ev.clean_accuracy,
        "autoattack": ev.aa_robust_accuracy,
        "autoattack_low": aa_low,
        "autoattack_high": aa_high,
        "best_known": ev.best_robust_accuracy,
        "reported_robust": getattr(rep, "robust", None),
        "reported_attack": getattr(rep, "attack", None),
        "reported_source": getattr(rep, "source", None),
        "drop_points": e.drop,
        "reevaluation_robust": getattr(e.reevaluation, "robust", None),
        "reevaluation_attack": getattr(e.reevaluation, "attack", None),
        "reevaluation_source": getattr(e.reevaluation, "source", None),
        "seed": e.seed,
        "replicates": across.n if across else None,
        "replicate_seeds": list(across.seeds) if across else [],
        "autoattack_seeds_mean": across.mean if across else None,
        "autoattack_seeds_min": across.min if across else None,
        "autoattack_seeds_max": across.max if across else None,
        "autoattack_seeds_std": across.std if across else None,
        "fmn_median_distance": ev.fmn_median_distance,
        "best_median_distance": ev.best_median_distance,
        "fmn_local_optimality": ev.fmn_local_optimality,
        "fmn_best_median_ratio": ev.fmn_best_median_ratio,
        "n_fmn_above_best": ev.n_fmn_above_best,
        "normalization": e.inputs,
        "params": m.params,
        "nonzero_params": m.nonzero_params,
        "flops": m.flops,
        "nonzero_flops": m.nonzero_flops,
        "potentially_unreliable": bool(ev.unreliable),
        "fmn_beat_autoattack": e.fmn_beat_aa,
        "n_fmn_beat_autoattack": ev.n_fmn_beat_aa,
        "best_known_above_eps": "best_known_above_eps" in (ev.flags or []),
        "flags": list(ev.flags or []),
        "n": ev.n_samples,
        "version": e.spec.get("version"),
        "protocol_hash": ev.protocol_hash,
        "evaluation_id": ev.id,
        "model_id": m.id,
    }


TABLE_CSV_COLUMNS = [
    "rank",
    "model",
    "method",
    "dataset",
    "norm",
    "eps",
    "arch",
    "structure",
    "sparsity",
    "clean",
    "autoattack",
    "autoattack_low",
    "autoattack_high",
    "best_known",
    "reported_robust",
    "reported_attack",
    "drop_points",
    "reevaluation_robust",
    "reevaluation_attack",
    "seed",
    "replicates",
    "replicate_seeds",
    "autoattack_seeds_mean",
    "autoattack_seeds_min",
    "autoattack_seeds_max",
    "autoattack_seeds_std",
    "fmn_median_distance",
    "best_median_distance",
    "fmn_local_optimality",
    "fmn_best_median_ratio",
    "n_fmn_above_best",
    "normalization",
    "params",
    "nonzero_params",
    "flops",
    "nonzero_flops",
    "potentially_unreliable",
    "fmn_beat_autoattack",
    "flags",
    "n",
    "version",
    "protocol_hash",
    "evaluation_id",
    "model_id",
]


def download_files(site: SiteTables) -> Iterator[tuple[str, str]]:
    """Each table as CSV and JSON, and all of them in one CSV and one JSON file: (path in the site, text)."""
    all_rows = []
    for t in site.tables:
        rows = site.records[t.slug]
        all_rows += [{"table": t.title, **r} for r in rows]
        yield (
            f"data/{t.slug}.csv",
            csv_text(TABLE_CSV_COLUMNS, ([_csv_value(r[c]) for c in TABLE_CSV_COLUMNS] for r in rows)),
        )
        meta = {
            "dataset": t.dataset,
            "norm": t.norm,
            "eps": t.eps,
            "arch": t.arch,
            "structure": t.structure,
            "protocol_hash": t.protocol.hash,
            "main_protocol": t.protocol.main,
            "protocol": t.protocol.spec,
        }
        yield f"data/{t.slug}.json", inert_json({"table": meta, "rows": rows})
    columns = ["table", *TABLE_CSV_COLUMNS]
    yield "data/leaderboard.csv", csv_text(columns, ([_csv_value(r[c]) for c in columns] for r in all_rows))
    yield "data/leaderboard.json", inert_json(all_rows)


def inert_json(obj: Any) -> str:
    """JSON that is safe inside HTML or a ``<script>`` block: ``<``, ``>`` and ``&`` as \\u escapes.

    These characters only occur inside JSON strings, where the escapes mean the same characters.
    """
    text = json.dumps(_jsonable(obj), indent=1, sort_keys=False, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e") + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _jsonable(obj.item())
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def _csv_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    return value
