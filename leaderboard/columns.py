"""The columns of the leaderboard tables, defined once: header, tooltip, cell, sort value, and how they behave on a
narrow screen.

A table row is a :class:`Row`: the plain values the CSV/JSON downloads hold (``record``, see
:func:`leaderboard.tables.row_record`) plus the :class:`~leaderboard.view_models.Entry` behind them. To add a
column, add a field to the record (so the downloads get it) and a :class:`Column` to :data:`COLUMNS`; the index
template draws whatever this list holds, in this order.

Cells are built with :class:`markupsafe.Markup`: ``Markup(...).format(...)`` escapes every argument, so a string a
submitter controls (a model or method name, a source, a flag) is shown as text, never as markup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from markupsafe import Markup, escape

from bench.analysis.format import MISSING, number, points
from leaderboard.formatting import human_count, model_slug, pct, seeds_text, sort_value, word_breaks

if TYPE_CHECKING:
    from leaderboard.view_models import Entry


@dataclass(frozen=True)
class Row:
    """One table row: the download record, the entry it came from, and whether the model is a dense parent."""

    record: dict[str, Any]
    entry: Entry
    is_parent: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.record[key]


@dataclass(frozen=True)
class Column:
    """One column of the leaderboard tables.

    Attributes:
        key: a name for the column (the CSS class ``col-<key>``).
        header: the header text; ``\\n`` breaks the line.
        tooltip: the header's explanation (shown on hover).
        cell: the cell's HTML for a row.
        sort: the cell's ``data-sort`` value (:func:`leaderboard.formatting.sort_value`; empty sorts last).
        cell_title: the cell's tooltip, or None.
        numeric: right-aligned, tabular figures.
        pinned: stays in view when the table scrolls sideways (narrow screens); pinned columns come first.
        ranked: the column the rows are ranked by (shown right after the pinned ones, so a phone sees it).
        initial_sort: ``aria-sort`` of the header as the page opens (the rows come in rank order).
        classes: more CSS classes of the header and the cells (the stylesheet's ``model``, ``flags``).
        present: for a column only some evaluations have a value for (seed replicates, best-known figures):
            whether a row has one; the column is drawn in the tables where some row has (:meth:`shown`). None:
            always drawn.
    """

    key: str
    header: str
    tooltip: str
    cell: Callable[[Row], Markup]
    sort: Callable[[Row], str]
    cell_title: Callable[[Row], str | None] | None = None
    numeric: bool = True
    pinned: bool = False
    ranked: bool = False
    initial_sort: str | None = None
    classes: str = ""
    present: Callable[[Row], bool] | None = None

    def shown(self, rows: list[Row]) -> bool:
        """Whether a table of these rows draws the column."""
        return self.present is None or any(self.present(row) for row in rows)

    @property
    def css(self) -> str:
        classes = [f"col-{self.key}", *self.classes.split()]
        if self.numeric:
            classes.append("num")
        if self.pinned:
            classes.append("pin")
        if self.ranked:
            classes.append("ranked")
        return " ".join(classes)

    @property
    def header_html(self) -> Markup:
        return Markup("<br>").join(escape(line) for line in self.header.split("\n"))

    def title(self, row: Row) -> str | None:
        return self.cell_title(row) if self.cell_title else None


def _pct(key: str, digits: int = 2) -> Callable[[Row], Markup]:
    return lambda row: escape(pct(row[key], digits))


def _sort(key: str) -> Callable[[Row], str]:
    return lambda row: sort_value(row[key])


def _model_cell(row: Row) -> Markup:
    e, m = row.entry, row.entry.model
    if e.method:
        method = e.method
        head = Markup('<a href="{}" title="{}">{}</a>').format(method.href, method.venue_year, method.display_name)
        if e.method.paper_url:
            head += Markup(' <a class="small" href="{}" title="{}">paper</a>').format(
                e.method.paper_url, e.method.paper_title or ""
            )
    else:
        head = Markup('<span class="badge dense">{}</span>').format("dense parent" if row.is_parent else "dense")
    slug = model_slug(m)
    out = head + Markup('<br><a class="name" href="models/{}.html">{}</a>').format(slug, word_breaks(m.name))
    if row["normalization"] != "dataset":
        # Another input normalisation than the dataset's is another model (bench.store.registration): say so
        # beside its name.
        label = "none" if row["normalization"] == "none" else "own mean/std"
        out += Markup(
            ' <span class="badge inputs" title="Input normalisation: {}, not the dataset\'s mean/std">inputs: {}</span>'
        ).format(row.entry.inputs_text or row["normalization"], label)
    return out


def _autoattack_cell(row: Row) -> Markup:
    return Markup('<strong>{}</strong><br><span class="ci">[{}, {}]</span>').format(
        pct(row["autoattack"]), pct(row["autoattack_low"], 1), pct(row["autoattack_high"], 1)
    )


def _seeds_cell(row: Row) -> Markup:
    if row["replicates"] is None:
        return escape(MISSING)
    seeds = seeds_text(row["replicate_seeds"])
    return Markup('<strong>{}</strong><br><span class="ci">{}–{}</span><br><span class="ci">{}</span>').format(
        pct(row["autoattack_seeds_mean"]),
        pct(row["autoattack_seeds_min"]),
        pct(row["autoattack_seeds_max"]),
        f"seeds {seeds}" if len(seeds) <= 10 else f"{row['replicates']} seeds",
    )


def _seeds_title(row: Row) -> str | None:
    setting = row.entry.setting
    if setting is None:
        return None
    return setting.sentence() or setting.error


def _local_optimality_title(row: Row) -> str | None:
    if row["fmn_local_optimality"] is None:
        return None
    return (
        f"median ratio plain FMN / best known {number(row['fmn_best_median_ratio'], 3)}; "
        f"{row['n_fmn_above_best']} samples more than 1 % above the best known or not found; "
        f"best-known median distance {number(row['best_median_distance'])}"
    )


def _drop_cell(row: Row) -> Markup:
    drop = row["drop_points"]
    return escape(points(drop, unit=""))


def _distance_cell(row: Row) -> Markup:
    d = row["fmn_median_distance"]
    # An infinite median (FMN found no adversarial for most samples) is shown as "inf", not as missing.
    return escape(MISSING if d is None else f"{d:.4f}")


def _claim_title(row: Row) -> str | None:
    rep = row.entry.reported
    return f"{rep.attack or 'attack not stated'} — {rep.source}" if rep else None


def _reevaluation_title(row: Row) -> str | None:
    r = row.entry.reevaluation
    if not r:
        return None
    return f"{r.label or 're-evaluation'}: {r.attack or 'attack not stated'} — {r.source}"


def _flags_cell(row: Row) -> Markup:
    out = Markup("")
    if row["potentially_unreliable"]:
        out += Markup('<span class="badge unreliable" title="{}">potentially unreliable</span>').format(
            ", ".join(map(str, row["flags"]))
        )
    if row["fmn_beat_autoattack"]:
        n = row["n_fmn_beat_autoattack"] or 0
        out += Markup(
            '<span class="badge fmn" title="FMN broke {} sample(s) within eps that AutoAttack left robust">'
            "FMN beat AA: {}</span>"
        ).format(n, n)
    if row["best_known_above_eps"]:
        out += Markup('<span class="badge notice" title="{}">best known &gt; ε</span>').format(
            "a sample AutoAttack broke has a best-known distance a float32 unit above eps (not unreliable)"
        )
    return out


def _count(key: str) -> Callable[[Row], Markup]:
    return lambda row: escape(human_count(row[key]))


COLUMNS: list[Column] = [
    Column(
        "rank",
        "#",
        "Rank by AutoAttack robust accuracy",
        cell=lambda row: escape(str(row["rank"])),
        sort=_sort("rank"),
        pinned=True,
        initial_sort="ascending",
    ),
    Column(
        "model",
        "Method / model",
        "Method (links to its page and its paper) and model (links to its page)",
        cell=_model_cell,
        sort=lambda row: f"{row['method_name']} {row['model']}",
        numeric=False,
        pinned=True,
        classes="model",
    ),
    Column(
        "autoattack",
        "AutoAttack\n% [95 % CI]",
        "AutoAttack robust accuracy with its Wilson 95 % interval (the rows are ranked by it)",
        cell=_autoattack_cell,
        sort=_sort("autoattack"),
        ranked=True,
    ),
    Column(
        "seeds",
        "Across\nseeds %",
        "AutoAttack robust accuracy across training-seed replicates (the same method, dense parent, sparsity and "
        "config pruned with other seeds) under this protocol: mean, min–max range, seeds. The Wilson interval "
        "beside it covers only the test samples drawn",
        cell=_seeds_cell,
        sort=_sort("autoattack_seeds_mean"),
        cell_title=_seeds_title,
        present=lambda row: row["replicates"] is not None,
    ),
    Column(
        "sparsity",
        "Sparsity\n%",
        "Fraction of Conv2d/Linear weights that are exactly zero",
        cell=_pct("sparsity", 1),
        sort=_sort("sparsity"),
    ),
    Column("clean", "Clean\n%", "Clean accuracy", cell=_pct("clean"), sort=_sort("clean")),
    Column(
        "best_known",
        "Best\nknown %",
        "Broken by neither AutoAttack nor FMN within eps",
        cell=_pct("best_known"),
        sort=_sort("best_known"),
    ),
    Column(
        "claimed",
        "Claimed\n%",
        "Robust accuracy claimed by the method's authors (their paper or submission)",
        cell=_pct("reported_robust"),
        sort=_sort("reported_robust"),
        present=lambda row: row["reported_robust"] is not None,
        cell_title=_claim_title,
    ),
    Column(
        "drop",
        "Drop\npts",
        "Re-evaluation drop: the authors' claim minus our AutoAttack robust accuracy, percentage points",
        cell=_drop_cell,
        sort=_sort("drop_points"),
        present=lambda row: row["drop_points"] is not None,
    ),
    Column(
        "other_aa",
        "Other\nAA %",
        "Robust accuracy another benchmark measured with AutoAttack (APB leaderboard, RobustBench, thin-ice Table 1)",
        cell=_pct("reevaluation_robust"),
        sort=_sort("reevaluation_robust"),
        present=lambda row: row["reevaluation_robust"] is not None,
        cell_title=_reevaluation_title,
    ),
    Column(
        "fmn_median",
        "FMN\nmedian",
        "Median plain-FMN distance over the correctly classified samples it broke (the thin-ice paper's figure)",
        cell=_distance_cell,
        sort=_sort("fmn_median_distance"),
    ),
    Column(
        "local_optimality",
        "FMN local\noptimality",
        "How close plain FMN came to the best-known distances (FMN, FMN from AutoAttack's adversarial, "
        "AutoAttack): AttackBench's local optimality, 1 = the best known on every sample",
        cell=lambda row: escape(number(row["fmn_local_optimality"], 3)),
        sort=_sort("fmn_local_optimality"),
        cell_title=_local_optimality_title,
        present=lambda row: row["fmn_local_optimality"] is not None,
    ),
    Column(
        "params",
        "Non-zero\nparams",
        "Non-zero parameters (all parameters in the tooltip)",
        cell=_count("nonzero_params"),
        sort=_sort("nonzero_params"),
        cell_title=lambda row: f"{row['nonzero_params']} of {row['params']}",
    ),
    Column(
        "flops",
        "FLOPs\nnon-zero",
        "Multiply-accumulates of Conv2d/Linear counting non-zero weights only",
        cell=_count("nonzero_flops"),
        sort=_sort("nonzero_flops"),
        cell_title=lambda row: f"{row['nonzero_flops']} of {row['flops']} (dense)",
    ),
    Column(
        "flags",
        "Flags",
        "Sanity checks that fired: potentially unreliable evaluations, samples FMN broke that AutoAttack missed, "
        "a best-known distance a float32 unit above eps",
        cell=_flags_cell,
        sort=lambda row: str(
            int(bool(row["potentially_unreliable"])) * 4
            + int(bool(row["fmn_beat_autoattack"])) * 2
            + int(bool(row["best_known_above_eps"]))
        ),
        numeric=False,
        classes="flags",
    ),
]


def check_order(columns: list[Column]) -> None:
    """Pinned columns first, then the ranked one: the layout on a phone relies on it (a test calls this)."""
    pinned = [c.pinned for c in columns]
    n_pinned = sum(pinned)
    if pinned[:n_pinned] != [True] * n_pinned:
        raise ValueError("pinned columns must come first")
    if not columns[n_pinned].ranked:
        raise ValueError("the ranked column must come right after the pinned ones")
    if any(c.present is not None for c in columns[: n_pinned + 1]):
        raise ValueError("the pinned and ranked columns are drawn in every table; they cannot be optional")


check_order(COLUMNS)
