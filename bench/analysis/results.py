"""The tables of stored evaluations that ``bench results`` prints and ``apbench.load_results`` returns: one row per
evaluation (:func:`results_frame`), or one per setting with its seeds aggregated (:func:`settings_frame`).

Reading the store is the only I/O here; accuracies are fractions in [0, 1] (the terminal table formats them).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import pandas as pd
from sqlalchemy import select

from bench.analysis.replicates import (
    METRICS,
    group_replicates,
    seed_of,
    setting_label,
    summarize,
    summarize_evaluations,
)
from bench.analysis.stats import wilson_interval
from bench.models.normalize import normalization_label
from bench.store import Evaluation, Store
from bench.store.db import shown_url

RESULT_COLUMNS = [
    "evaluation",
    "model",
    "method",
    "arch",
    "dataset",
    # The model's input normalisation as --normalization spells it: dataset, none or MEAN/STD.
    "inputs",
    "sparsity",
    "norm",
    "eps",
    "version",
    "n",
    "status",
    "clean",
    "autoattack",
    "fmn",
    "best_known",
    "fmn_median",
    "flags",
    # Wilson 95 % interval of the AutoAttack robust accuracy (the test samples drawn).
    "autoattack_low",
    "autoattack_high",
    # The pruning seed, and for a model with replicates (same setting, other seeds) evaluated under the same
    # protocol: how many, and the AutoAttack robust accuracy's mean and range across them (this model included).
    "seed",
    "replicates",
    "autoattack_seeds_mean",
    "autoattack_seeds_min",
    "autoattack_seeds_max",
]


def replicate_groups(evaluations) -> dict[tuple[int, str], list[Any]]:
    """``{(model id, protocol hash): the replicate group's evaluations}`` for models with two replicates or more."""
    out = {}
    for (key, protocol), group in group_replicates(evaluations).items():
        if not key.startswith("model:") and len(group) > 1:
            out.update({(ev.model.id, protocol): group for ev in group})
    return out


def results_frame(store: Store, model: str | int | None = None) -> pd.DataFrame:
    """One row per stored evaluation (:data:`RESULT_COLUMNS`), oldest first.

    Args:
        store: the results store (opened read-only is enough).
        model: keep the evaluations of the models this selects: a numeric id, a name, or a shell pattern over
            names (``"hydra*"``); replicate figures are still computed over every stored model.

    Raises:
        ValueError: ``model`` selects no stored model.
    """
    with store.session() as s:
        rows = []
        evaluations = s.scalars(select(Evaluation).order_by(Evaluation.id)).all()
        replicates = replicate_groups(evaluations)
        if model is not None:
            text = str(model).strip()
            evaluations = [ev for ev in evaluations if str(ev.model.id) == text or fnmatchcase(ev.model.name, text)]
            if not evaluations:
                raise ValueError(
                    f"no evaluation of a model {text!r} in {shown_url(store.url)} (give a model's id, name or a "
                    "shell pattern; `bench results` lists them)"
                )
        for ev in evaluations:
            m = ev.model
            low, high = (None, None)
            if ev.aa_robust_accuracy is not None and ev.n_samples:
                low, high = wilson_interval(round(ev.aa_robust_accuracy * ev.n_samples), ev.n_samples)
            group = replicates.get((m.id, ev.protocol_hash)) if ev.status == "complete" else None
            across = summarize_evaluations(group).get("autoattack") if group else None
            rows.append(
                {
                    "evaluation": ev.id,
                    "model": m.name,
                    "method": m.method,
                    "arch": m.arch,
                    "dataset": m.dataset,
                    "inputs": normalization_label(m.normalization),
                    "sparsity": m.measured_sparsity,
                    "norm": ev.spec["norm"],
                    "eps": ev.spec["eps"],
                    "version": ev.spec["version"],
                    "n": ev.n_samples,
                    "status": ev.status,
                    "clean": ev.clean_accuracy,
                    "autoattack": ev.aa_robust_accuracy,
                    "fmn": ev.fmn_robust_accuracy,
                    "best_known": ev.best_robust_accuracy,
                    "fmn_median": ev.fmn_median_distance,
                    "flags": ",".join(ev.flags),
                    "autoattack_low": low,
                    "autoattack_high": high,
                    "seed": seed_of(m),
                    "replicates": across.n if across else None,
                    "autoattack_seeds_mean": across.mean if across else None,
                    "autoattack_seeds_min": across.min if across else None,
                    "autoattack_seeds_max": across.max if across else None,
                }
            )
    return pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"seed": "Int64", "replicates": "Int64"})


# bench results --by-setting: one row per setting and protocol (settings_frame).
SETTING_COLUMNS = [
    "setting",
    "method",
    "arch",
    "dataset",
    "structure",
    "target_sparsity",
    "sparsity",
    "protocol",
    "norm",
    "eps",
    "version",
    "n",
    "n_seeds",
    "seeds",
    *(f"{metric}_{stat}" for metric, _ in METRICS for stat in ("mean", "min", "max", "std")),
    "autoattack_wilson_low",
    "autoattack_wilson_high",
    "models",
]


def settings_frame(store: Store) -> pd.DataFrame:
    """One row per setting and protocol (``bench results --by-setting``): replicates (models differing only in
    their pruning seed) aggregated, each accuracy's mean, min, max and std across seeds, and the Wilson 95 %
    interval of one evaluation at the mean AutoAttack accuracy; any other model is a setting of its own.
    Accuracies are fractions in [0, 1]; the columns are :data:`SETTING_COLUMNS`."""
    rows = []
    with store.session() as s:
        groups = group_replicates(s.scalars(select(Evaluation).order_by(Evaluation.id)).all())
        for (key, protocol), group in sorted(groups.items(), key=lambda item: item[1][0].model.id):
            first, m = group[0], group[0].model
            # Index by position for a model without a seed (a setting of its own): one value, no seed to show.
            seeds = [seed_of(ev.model) for ev in group]
            row = {
                "setting": m.name if key.startswith("model:") else setting_label(m.name),
                "method": m.method,
                "arch": m.arch,
                "dataset": m.dataset,
                "structure": m.structure,
                "target_sparsity": m.target_sparsity,
                "sparsity": sum(ev.model.measured_sparsity for ev in group) / len(group),
                "protocol": protocol[:12],
                "norm": first.spec["norm"],
                "eps": first.spec["eps"],
                "version": first.spec["version"],
                "n": first.n_samples,
                "n_seeds": len(group),
                "seeds": ",".join(str(seed) for seed in seeds if seed is not None),
                "models": ",".join(ev.model.name for ev in group),
            }
            for metric, attr in METRICS:
                summary = summarize({i: getattr(ev, attr) for i, ev in enumerate(group)})
                for stat in ("mean", "min", "max", "std"):
                    row[f"{metric}_{stat}"] = getattr(summary, stat) if summary else None
            mean = row["autoattack_mean"]
            if mean is not None and first.n_samples:
                row["autoattack_wilson_low"], row["autoattack_wilson_high"] = wilson_interval(
                    round(mean * first.n_samples), first.n_samples
                )
            rows.append(row)
    return pd.DataFrame(rows, columns=SETTING_COLUMNS)
