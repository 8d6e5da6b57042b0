"""The site's figures as deterministic SVG text (matplotlib, Agg-free ``Figure`` objects, no pyplot state).

Same inputs give the same bytes: ``svg.hashsalt`` fixes the ids matplotlib derives, ``metadata={"Date": None}``
drops the timestamp, and text stays text (``svg.fonttype: none``) so files are small and the browser's sans-serif
font renders the labels. Scatters with many points are rasterised inside the SVG (axes and labels stay vector).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# Above this many points a scatter is drawn as one embedded image: 10 000 vector markers would make a
# megabyte-sized file that browsers draw slowly, and the build would spend most of its time writing them.
RASTERIZE_ABOVE = 2000
RASTER_DPI = 120

STYLE = {
    "svg.hashsalt": "apbench",
    "svg.id": "apbench-figure",
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.8,
    "path.simplify": False,
}

# The thin-ice paper's Figure 2: S11 and S00 as dark dots, S10 (pruning broke it) as cyan crosses,
# S01 (pruning fixed it) as red crosses. Populations are keyed "S<dense correct><pruned correct>".
POPULATION_STYLE = {
    "S11": {"label": "S11 both correct", "color": "#222222", "marker": "o", "size": 4, "zorder": 2.1},
    "S00": {"label": "S00 both wrong", "color": "#8a8a8a", "marker": "o", "size": 4, "zorder": 2.1},
    "S10": {"label": "S10 dense right, pruned wrong", "color": "#00a5c8", "marker": "x", "size": 26, "zorder": 2.2},
    "S01": {"label": "S01 dense wrong, pruned right", "color": "#d62728", "marker": "x", "size": 26, "zorder": 2.2},
}
# (All below the spines' zorder 2.5: consecutive rasterised artists share one embedded image.)

# What a security curve's main line reads (bench.analysis.records.EvaluationRecords.distance_used).
CURVE_LABELS = {"best": "best-known distances", "fmn": "plain FMN distances"}
DISTANCE_WORDS = {"best": "best-known", "fmn": "FMN"}

SERIES_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def norm_symbol(norm: str) -> str:
    return {"Linf": "L∞", "L2": "L2"}.get(norm, norm)


def _figure(width: float = 6.4, height: float = 4.0, bottom: float = 0.6) -> tuple[Figure, object]:
    # Fixed margins (in inches) instead of a layout engine: constrained layout triples the time per figure.
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=bottom / height, top=1 - 0.15 / height)
    return fig, fig.add_subplot()


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, dpi=RASTER_DPI)
    return buf.getvalue()


def _render(draw) -> str:
    with matplotlib.rc_context(STYLE):
        fig, ax = _figure()
        draw(fig, ax)
        return _svg(fig)


class _SecurityCurve:
    """The security-curve figure, built once per process and redrawn with each model's data.

    Creating a figure, its axes and their ticks costs more than drawing it; every artist that depends on the
    data is updated in :meth:`render`, so the output equals a freshly built figure's (a test checks it).
    """

    def __init__(self) -> None:
        self.fig, ax = _figure()
        self.ax = ax
        (self.curve,) = ax.plot([], [], color="#1f77b4")
        # Plain FMN's curve under the best-known one: the gap is what FMN's warm start and AutoAttack added.
        (self.fmn,) = ax.plot([], [], color="#7fa7cf", linestyle="--", linewidth=1.3, label=CURVE_LABELS["fmn"])
        self.nominal = ax.axvline(0, color="#999999", linestyle="--", linewidth=1)
        (self.autoattack,) = ax.plot(
            [],
            [],
            "o",
            color="#d62728",
            markersize=10,
            markerfacecolor="none",
            markeredgewidth=1.8,
            label="AutoAttack at ε",
        )
        (self.best,) = ax.plot([], [], "D", color="#222222", markersize=5, label="best known at ε (AutoAttack or FMN)")
        self.note = ax.annotate(
            "",
            (0, 1),
            xycoords=("data", "axes fraction"),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=9,
            color="#555555",
        )
        ax.set_ylim(0, 100)
        ax.set_ylabel("robust accuracy (%)")

    def render(
        self, eps_grid, robust, norm, nominal_eps, nominal_label, autoattack, best_known, distance, fmn_robust
    ) -> str:
        self.curve.set_data(eps_grid, 100 * np.asarray(robust, dtype=float))
        self.curve.set_label(CURVE_LABELS[distance])
        overlay = fmn_robust is not None
        self.fmn.set_data(eps_grid if overlay else [], 100 * np.asarray(fmn_robust, dtype=float) if overlay else [])
        self.fmn.set_visible(overlay)
        lines = [self.curve, self.fmn] if overlay else [self.curve]
        self.ax.legend(handles=[*lines, self.autoattack, self.best], loc="upper right", frameon=False, fontsize=9)
        self.nominal.set_xdata([nominal_eps, nominal_eps])
        self.autoattack.set_data([nominal_eps], [100 * autoattack])
        self.best.set_data([nominal_eps], [100 * best_known])
        self.note.set_text(f"ε = {nominal_label}")
        self.note.xy = (nominal_eps, 1)
        self.ax.set_xlim(0, float(eps_grid[-1]) if len(eps_grid) else 2 * nominal_eps)
        self.ax.set_xlabel(f"perturbation budget ε ({norm_symbol(norm)})")
        return _svg(self.fig)


_templates: dict[str, object] = {}


def _template(cls):
    if cls.__name__ not in _templates:
        _templates[cls.__name__] = cls()
    return _templates[cls.__name__]


def security_curve_svg(
    eps_grid: np.ndarray,
    robust: np.ndarray,
    *,
    norm: str,
    nominal_eps: float,
    nominal_label: str,
    autoattack: float,
    best_known: float,
    distance: str = "fmn",
    fmn_robust: np.ndarray | None = None,
) -> str:
    """Robust accuracy against the budget from per-sample minimal distances, with AutoAttack's point at the
    nominal eps.

    Args:
        eps_grid, robust: the curve (fractions).
        norm: "Linf" or "L2", for the axis label.
        nominal_eps, nominal_label: the evaluated budget as a float and as written ("8/255").
        autoattack, best_known: robust accuracy (fractions) at the nominal budget.
        distance: the distances ``robust`` comes from, ``"best"`` (best-known) or ``"fmn"`` (plain FMN), for the
            legend.
        fmn_robust: plain FMN's curve on the same grid, drawn dashed under a best-known one [default: none].
    """
    if distance not in CURVE_LABELS:
        raise ValueError(f"unknown distance {distance!r}; use one of {', '.join(CURVE_LABELS)}")
    with matplotlib.rc_context(STYLE):
        return _template(_SecurityCurve).render(
            eps_grid, robust, norm, nominal_eps, nominal_label, autoattack, best_known, distance, fmn_robust
        )


@dataclass(frozen=True)
class Series:
    """One line of the robustness-against-sparsity plot (sparsity and accuracies as fractions).

    A point is one model, its bar the Wilson 95 % interval; or, where ``replicates`` gives it two seeds or more,
    the mean over a setting's training-seed replicates, its bar their min–max range.
    """

    label: str
    sparsity: Sequence[float]
    robust: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    replicates: Sequence[int] = ()


def sparsity_svg(series: Sequence[Series], *, ylabel: str) -> str:
    """Robust accuracy against sparsity, one line per series: single models with Wilson 95 % intervals, settings
    pruned with several seeds as their mean with a min–max bar (labelled with the number of seeds)."""

    def draw(fig, ax):
        handles = []
        any_replicates = False
        for i, s in enumerate(series):
            color = SERIES_COLORS[i % len(SERIES_COLORS)]
            order = np.argsort(np.asarray(s.sparsity, dtype=float), kind="stable")
            x = 100 * np.asarray(s.sparsity, dtype=float)[order]
            y = 100 * np.asarray(s.robust, dtype=float)[order]
            lo = 100 * np.asarray(s.low, dtype=float)[order]
            hi = 100 * np.asarray(s.high, dtype=float)[order]
            reps = np.asarray(s.replicates if len(s.replicates) else np.ones(len(x)), dtype=int)[order]
            ax.plot(x, y, color=color)
            yerr = np.vstack([np.maximum(y - lo, 0), np.maximum(hi - y, 0)])
            single = reps < 2
            if single.any():
                ax.errorbar(x[single], y[single], yerr=yerr[:, single], fmt="o", markersize=5, capsize=3, color=color)
            if (~single).any():
                any_replicates = True
                group = ~single
                ax.errorbar(
                    x[group],
                    y[group],
                    yerr=yerr[:, group],
                    fmt="s",
                    markersize=6,
                    capsize=5,
                    elinewidth=2.6,
                    color=color,
                )
                for xi, top, n in zip(x[group], hi[group], reps[group], strict=True):
                    ax.annotate(
                        f"{n} seeds",
                        (xi, top),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        color=color,
                    )
            handles.append(Line2D([], [], color=color, marker="o", markersize=5, label=s.label))
        if any_replicates:
            grey = "#555555"
            handles.append(
                Line2D([], [], linestyle="none", marker="o", markersize=5, color=grey, label="one model, Wilson 95 %")
            )
            handles.append(
                Line2D([], [], linestyle="none", marker="s", markersize=6, color=grey, label="mean over seeds, min–max")
            )
        ax.set_xlim(-3, 103)
        ax.set_ylim(0, 100)
        ax.set_xlabel("sparsity (% of Conv2d/Linear weights that are zero)")
        ax.set_ylabel(ylabel)
        if series:
            ax.legend(handles=handles, loc="lower left", frameon=False)
        else:
            ax.text(0.5, 0.5, "no evaluated model", transform=ax.transAxes, ha="center", color="#777777")

    return _render(draw)


class _ThinIce:
    """The thin-ice scatter, built once per process and redrawn with each pair's data (see _SecurityCurve)."""

    ORDER = ("S11", "S00", "S10", "S01")

    def __init__(self) -> None:
        self.fig, ax = _figure(6.8, 5.0, bottom=1.15)
        self.ax = ax
        self.points = {}
        handles = []
        for key in self.ORDER:
            style = POPULATION_STYLE[key]
            cross = style["marker"] == "x"
            self.points[key] = ax.scatter(
                np.empty(0),
                np.empty(0),
                s=style["size"],
                marker=style["marker"],
                color=style["color"],
                linewidths=1.1 if cross else 0,
                zorder=style["zorder"],
            )
            # Proxy handles: the legend stays vector when the points are rasterised.
            handles.append(
                Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker=style["marker"],
                    markersize=6 if cross else 4,
                    markeredgewidth=1.3 if cross else 0,
                    color=style["color"],
                    label=style["label"],
                )
            )
        ax.axhline(0, color="#555555", linewidth=0.8, zorder=1)
        ax.axvline(0, color="#555555", linewidth=0.8, zorder=1)
        self.nominal = ax.axvline(0, color="#999999", linestyle="--", linewidth=1, zorder=1)
        ax.set_ylabel("logit margin of the dense model")
        self.legend = self.fig.legend(
            handles=handles, loc="lower center", ncols=2, frameon=False, bbox_to_anchor=(0.5, 0.0)
        )
        self.missing = ax.text(
            1, 0.01, "", transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="#777777"
        )

    def render(self, eps, margin, population, norm, nominal_eps, counts, distance) -> str:
        shown = np.isfinite(eps) & np.isfinite(margin)
        rasterize = int(shown.sum()) > RASTERIZE_ABOVE
        for key, text in zip(self.ORDER, self.legend.get_texts(), strict=True):
            sel = shown & (population == key)
            self.points[key].set_offsets(np.column_stack([eps[sel], margin[sel]]))
            self.points[key].set_rasterized(rasterize)
            # Few points: larger markers; thousands: small ones, so the populations stay distinguishable.
            self.points[key].set_sizes([POPULATION_STYLE[key]["size"] * (1.0 if rasterize else 2.5)])
            # The population's size as in the statistics table, drawn or not.
            text.set_text(f"{POPULATION_STYLE[key]['label']} ({counts[key]})")
        self.nominal.set_xdata([nominal_eps, nominal_eps])
        # Autoscaling ignores set_offsets; the limits of a fresh scatter are the data's with 5 % margins.
        self.ax.set_xlim(*_limits(np.concatenate([eps[shown], [0.0, nominal_eps]])))
        self.ax.set_ylim(*_limits(np.concatenate([margin[shown], [0.0]])))
        words = DISTANCE_WORDS[distance]
        self.ax.set_xlabel(f"ε of the dense model (signed {words} distance, {norm_symbol(norm)})")
        missing = int((~shown).sum())
        self.missing.set_text(
            f"{missing} of {len(eps)} samples not drawn (no {words} distance on the dense model)" if missing else ""
        )
        return _svg(self.fig)


def _limits(values: np.ndarray, margin: float = 0.05) -> tuple[float, float]:
    low, high = float(values.min()), float(values.max())
    pad = (high - low) * margin or 1.0
    return low - pad, high + pad


def thin_ice_svg(
    eps: np.ndarray,
    margin: np.ndarray,
    population: np.ndarray,
    *,
    norm: str,
    nominal_eps: float,
    counts: dict[str, int] | None = None,
    distance: str = "fmn",
) -> str:
    """The thin-ice scatter (Piras et al., Figure 2): the dense model's logit margin against its signed ε.

    Args:
        eps: the dense model's signed minimal distance per shared sample (NaN where none was found; not drawn).
        margin: the dense model's clean logit margin z_y − max_{j≠y} z_j per sample.
        population: "S00", "S01", "S10" or "S11" per sample.
        norm: "Linf" or "L2", for the axis label.
        nominal_eps: the evaluated budget, drawn as a dashed line.
        counts: samples per population for the legend, as in the statistics table [default: counted from
            ``population``]; the samples not drawn are counted in a note on the plot.
        distance: what ``eps`` is, ``"best"`` (best-known distances) or ``"fmn"`` (plain FMN's, the paper's), for
            the axis label.
    """
    if distance not in DISTANCE_WORDS:
        raise ValueError(f"unknown distance {distance!r}; use one of {', '.join(DISTANCE_WORDS)}")
    eps = np.asarray(eps, dtype=float)
    margin = np.asarray(margin, dtype=float)
    population = np.asarray(population).astype(str)
    if counts is None:
        counts = {key: int((population == key).sum()) for key in POPULATION_STYLE}
    with matplotlib.rc_context(STYLE):
        return _template(_ThinIce).render(eps, margin, population, norm, nominal_eps, counts, distance)
