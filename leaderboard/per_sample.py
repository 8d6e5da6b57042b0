"""The site's per-sample work: read each evaluation's records, write its CSV and plots, run its analyses.

This is the expensive part of a build (10 000 rows and two figures per model), so it runs in worker processes,
one *job* per dense parent and (a slice of) its children: the parent's records are read once per job. A job
writes its files itself and returns only the small results the pages need (:class:`SampleResults`). Each file
depends only on its evaluation's rows, so the site is the same whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.analysis.curves import ROBUST, attack_breakdown, security_curve
from bench.analysis.export import FORMULA_STARTS
from bench.analysis.paired import McNemar, mcnemar
from bench.analysis.records import CSV_COLUMNS, EvaluationRecords, load_records
from bench.analysis.report import failure
from bench.analysis.thin_ice import ThinIce, ThinIceError, thin_ice
from bench.processes import die_with_parent
from bench.store import Store
from leaderboard import plots


@dataclass(frozen=True)
class EvalTask:
    """One evaluation to process, and the dense parent's evaluation under the same protocol (if any)."""

    evaluation_id: int
    stem: str
    autoattack: float
    best_known: float
    parent_evaluation_id: int | None = None


@dataclass
class SampleResults:
    """What a model page needs from the per-sample records (ThinIce without its per-sample arrays)."""

    breakdown: list[dict[str, Any]] = field(default_factory=list)
    thin: ThinIce | None = None
    thin_error: str | None = None
    paired: list[tuple[str, McNemar]] = field(default_factory=list)
    has_thin_ice_plot: bool = False
    has_csv: bool = False
    has_curve: bool = False
    # The distances the security curve and the thin-ice analysis read: "best" (best-known) or "fmn" (plain FMN's,
    # for an evaluation stored without best-known distances); and the thin-ice statistics with plain FMN's ε (the
    # paper's) when ``thin`` used the best-known ones.
    curve_distance: str | None = None
    thin_fmn: ThinIce | None = None
    # Where the best-known distances came from: correctly classified samples per attack that found theirs (in
    # the protocol's order), and how many have one above 0 (the count of samples plain FMN missed is out of these).
    best_found_by: list[tuple[str, int]] = field(default_factory=list)
    n_best_known: int | None = None
    # One line per analysis that failed on this evaluation's records: shown on the model's page, never fatal.
    errors: list[str] = field(default_factory=list)


def write_text(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(content)


def records_csv(rec: EvaluationRecords) -> str:
    """``rec.to_csv()``, column at a time (the same bytes; a test checks it): 5-10x faster on 10 000 rows."""
    columns = []
    for name in CSV_COLUMNS:
        values = getattr(rec, name)
        if values is None:
            continue
        if values.dtype == bool:
            cells = np.where(values, "1", "0").tolist()
        elif values.dtype.kind in "iu":
            cells = [str(v) for v in values.tolist()]
        elif values.dtype.kind == "f":
            cells = [repr(v) if math.isfinite(v) else "" for v in values.tolist()]
        else:
            cells = ["" if v is None else str(v) for v in values.tolist()]
            if any(ch in c for c in set(cells) for ch in ',"\r\n') or any(c.startswith(FORMULA_STARTS) for c in cells):
                return rec.to_csv()  # quoting or a formula guard: leave it to the project's CSV writer
        columns.append([name, *cells])
    return "".join(",".join(row) + "\n" for row in zip(*columns, strict=True))


def breakdown_rows(rec: EvaluationRecords) -> list[dict[str, Any]]:
    """Where each sample ended (clean error, the AutoAttack stage that broke it, robust), with the robust
    accuracy left after each stage, in percent."""
    n = rec.n
    remaining = n
    rows = []
    stages = rec.stages
    for label, count in attack_breakdown(rec, stages):
        if label != ROBUST:
            remaining -= count
        rows.append(
            {
                "label": label,
                "stage": label in stages,
                "count": count,
                "percent": 100 * count / n if n else math.nan,
                "after": 100 * remaining / n if n and label != ROBUST else None,
            }
        )
    return rows


def best_known_counts(rec: EvaluationRecords) -> tuple[list[tuple[str, int]], int]:
    """Correctly classified samples per attack that found their best-known distance (plain FMN, FMN from
    AutoAttack's adversarial, each AutoAttack stage in run order, then any other name, then "none found"), and
    the number with a best-known distance above 0 (:func:`bench.analysis.best_known.distance_gap`'s ``n``)."""
    correct = rec.clean_correct
    best = rec.best_distance[correct]
    attacks = [a for a in rec.best_attack[correct].tolist() if a is not None]
    order = ["fmn", "fmn_from_autoattack", *(f"autoattack:{stage}" for stage in rec.stages)]
    counts = {name: attacks.count(name) for name in order}
    for name in sorted(set(attacks) - set(order)):
        counts[name] = attacks.count(name)
    out = [(name, n) for name, n in counts.items() if n]
    none_found = int(np.isnan(best).sum())
    if none_found:
        out.append(("none found", none_found))
    return out, int((np.isfinite(best) & (best > 0)).sum())


def _stripped(thin: ThinIce) -> ThinIce:
    """The statistics without their per-sample arrays (a page needs only the figures)."""
    empty = np.empty(0)
    return dataclasses.replace(thin, sample_id=empty, eps=empty, margin=empty, population=empty)


def process(rec: EvaluationRecords, task: EvalTask, parent: EvaluationRecords | None, out: Path) -> SampleResults:
    """Write the CSV and plots of one evaluation under ``out/models`` and return its page results.

    Each analysis that fails on these records (rows that contradict each other, an unknown AutoAttack version, a
    degenerate thin-ice pair) leaves a line in ``errors`` for the model's page; the rest of the page and the rest
    of the site are still built.
    """
    folder = out / "models"
    result = SampleResults()
    try:
        write_text(folder / f"{task.stem}.csv", records_csv(rec))
        result.has_csv = True
    except Exception as err:  # one bad evaluation must not stop the site
        result.errors.append(failure("the per-sample CSV", err))
    try:
        result.breakdown = breakdown_rows(rec)
    except Exception as err:
        result.errors.append(failure("the AutoAttack stage breakdown", err))
    if rec.has_best_known:
        try:
            result.best_found_by, result.n_best_known = best_known_counts(rec)
        except Exception as err:
            result.errors.append(failure("counting where the best-known distances came from", err))
    try:
        # Best-known distances where the evaluation stored them, with plain FMN's curve under them.
        used = rec.distance_used("best")
        grid, robust = security_curve(rec)
        fmn_robust = security_curve(rec, grid, "fmn")[1] if used == "best" else None
        write_text(
            folder / f"{task.stem}-curve.svg",
            plots.security_curve_svg(
                grid,
                robust,
                norm=rec.norm,
                nominal_eps=rec.eps,
                nominal_label=str(rec.spec.get("eps", rec.eps)),
                autoattack=task.autoattack,
                best_known=task.best_known,
                distance=used,
                fmn_robust=fmn_robust,
            ),
        )
        result.has_curve = True
        result.curve_distance = used
    except Exception as err:
        result.errors.append(failure("the security curve", err))
    if parent is None:
        return result
    try:
        thin = thin_ice(parent, rec)
    except ThinIceError as err:
        result.thin_error = str(err)
        return result
    except Exception as err:
        result.thin_error = failure("the thin-ice analysis", err)
        return result
    try:
        write_text(
            folder / f"{task.stem}-thin-ice.svg",
            plots.thin_ice_svg(
                thin.eps,
                thin.margin,
                thin.population,
                norm=rec.norm,
                nominal_eps=rec.eps,
                counts=thin.counts,
                distance=thin.distance,
            ),
        )
        result.has_thin_ice_plot = True
    except Exception as err:
        result.errors.append(failure("the thin-ice scatter", err))
    result.thin = _stripped(thin)
    if thin.distance == "best":
        try:  # the figures comparable with the paper, which had plain FMN only
            result.thin_fmn = _stripped(thin_ice(parent, rec, distance="fmn"))
        except Exception as err:
            result.errors.append(failure("the thin-ice analysis with plain FMN distances", err))
    for flag, label in (("aa_robust", "AutoAttack robust"), ("best_robust", "best-known robust")):
        try:
            result.paired.append((label, mcnemar(rec, parent, flag=flag)))
        except Exception as err:
            result.errors.append(failure(f"the paired comparison on {flag}", err))
    return result


def run_job(store: Store, tasks: list[EvalTask], out: Path) -> dict[int, SampleResults]:
    """Process a job's tasks, reading each evaluation's records once."""
    cache: dict[int, EvaluationRecords] = {}
    results = {}
    with store.session() as session:

        def records(evaluation_id: int) -> EvaluationRecords:
            if evaluation_id not in cache:
                cache[evaluation_id] = load_records(session, evaluation_id)
            return cache[evaluation_id]

        for task in tasks:
            try:
                rec = records(task.evaluation_id)
            except Exception as err:  # the page says so; the site is still built
                results[task.evaluation_id] = SampleResults(errors=[failure("reading the per-sample records", err)])
                continue
            parent = None
            parent_error = None
            if task.parent_evaluation_id is not None:
                try:
                    parent = records(task.parent_evaluation_id)
                except Exception as err:
                    parent_error = failure("reading the dense parent's per-sample records", err)
            results[task.evaluation_id] = process(rec, task, parent, out)
            if parent_error is not None:
                results[task.evaluation_id].thin_error = parent_error
    return results


# Worker processes open their own engine on the same URL (a connection must not cross a fork).
_worker_store: Store | None = None


def worker_init(url: str, parent_pid: int | None = None) -> None:
    global _worker_store
    if parent_pid is not None:
        # A killed build leaves no worker writing into its folder.
        die_with_parent(parent_pid)
    _worker_store = Store(url, migrate=False)


def worker_job(args: tuple[list[EvalTask], str]) -> dict[int, SampleResults]:
    tasks, out = args
    assert _worker_store is not None, "worker_init was not called"
    return run_job(_worker_store, tasks, Path(out))
