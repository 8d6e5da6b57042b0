"""Building stores for the analysis tests: models and complete evaluations with chosen per-sample rows.

Rows go through the real ORM tables (no attack is run), so the analyses read them exactly as they read an
evaluator's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta

import numpy as np
from sqlalchemy import insert

from bench.analysis.best_known import distance_gap
from bench.provenance import utcnow
from bench.spec import RunSpec
from bench.store import Evaluation, Model, SampleResult, Store


def digits_spec(**kw) -> RunSpec:
    base = dict(dataset="digits", n_samples=100, norm="Linf", eps="0.2", eps_value=0.2, version="plus", seed=0)
    return RunSpec(**{**base, **kw})


def add_model(store: Store, name: str, *, parent_id: int | None = None, **kw) -> int:
    fields = dict(
        name=name,
        checkpoint_sha256=name.encode().hex().ljust(64, "0")[:64],
        arch="small_cnn",
        dataset="digits",
        method="dense" if parent_id is None else "hydra",
        structure="dense" if parent_id is None else "US",
        measured_sparsity=0.0 if parent_id is None else 0.9,
        target_sparsity=None if parent_id is None else 0.9,
        params=1000,
        nonzero_params=1000 if parent_id is None else 100,
        flops=5000,
        nonzero_flops=5000 if parent_id is None else 600,
        parent_id=parent_id,
        created_at=utcnow(),
    )
    fields.update(kw)
    with store.session() as s:
        row = Model(**fields)
        s.add(row)
        s.flush()
        return row.id


def add_evaluation(
    store: Store,
    model_id: int,
    *,
    clean_correct: Sequence[bool],
    signed_eps: Sequence[float | None] | None = None,
    margin: Sequence[float] | None = None,
    aa_broken_by: Sequence[str | None] | None = None,
    fmn_success: Sequence[bool] | None = None,
    sample_ids: Sequence[int] | None = None,
    labels: Sequence[int] | None = None,
    spec: RunSpec | None = None,
    finished_offset_s: float = 0.0,
    status: str = "complete",
    best_eps: Sequence[float | None] | None = None,
) -> int:
    """A complete evaluation of ``model_id`` with one stored row per sample; returns its id.

    ``signed_eps`` gives FMN's result (None: FMN failed); ``aa_broken_by`` the first AutoAttack stage that broke
    a correctly classified sample (None: robust). The stored accuracies are computed from the rows, as
    ``bench.evaluate`` does. ``best_eps`` gives the signed best-known ε (None: none known) [default: FMN's own];
    it is stored only under a spec that starts FMN from AutoAttack (``fmn_init`` not ``"none"``), as the evaluator
    does.
    """
    n = len(clean_correct)
    spec = spec or digits_spec(n_samples=n)
    correct = [bool(c) for c in clean_correct]
    signed = list(signed_eps) if signed_eps is not None else [0.1 if c else -0.05 for c in correct]
    success = list(fmn_success) if fmn_success is not None else [e is not None for e in signed]
    broken_by = list(aa_broken_by) if aa_broken_by is not None else [None] * n
    margins = list(margin) if margin is not None else [1.0 if c else -1.0 for c in correct]
    ids = list(sample_ids) if sample_ids is not None else list(range(n))
    labs = list(labels) if labels is not None else [i % 10 for i in ids]
    fmn_signed = [e if ok else None for e, ok in zip(signed, success, strict=True)]
    best_signed = list(best_eps) if best_eps is not None else fmn_signed
    rows = []
    for i in range(n):
        dist = None if signed[i] is None or not success[i] else abs(signed[i])
        aa_robust = correct[i] and broken_by[i] is None
        fmn_broke = correct[i] and dist is not None and dist <= spec.eps_value
        rows.append(
            dict(
                sample_id=ids[i],
                label=labs[i],
                clean_pred=labs[i] if correct[i] else (labs[i] + 1) % 10,
                clean_correct=correct[i],
                logit_margin=float(margins[i]),
                aa_robust=aa_robust,
                aa_broken_by=broken_by[i] if correct[i] else None,
                adv_pred=labs[i] if aa_robust else (labs[i] + 1) % 10,
                fmn_label=labs[i],
                fmn_success=dist is not None,
                fmn_distance=dist,
                signed_eps=None if dist is None else (dist if correct[i] else -dist),
                fmn_adv_pred=(labs[i] + 2) % 10,
                best_robust=aa_robust and not fmn_broke,
            )
        )
        if spec.fmn_init != "none":
            best = None if best_signed[i] is None else abs(best_signed[i])
            rows[-1].update(
                best_distance=best,
                best_attack=None if best is None else ("fmn" if best == dist else "fmn_from_autoattack"),
                signed_best_eps=None if best is None else (best if correct[i] else -best),
            )
    gap = None
    if spec.fmn_init != "none":
        gap = distance_gap(
            np.array([math.nan if r["fmn_distance"] is None else r["fmn_distance"] for r in rows]),
            np.array([math.nan if r.get("best_distance") is None else r["best_distance"] for r in rows]),
            np.array(correct),
        )
    now = utcnow()
    with store.session() as s:
        ev = Evaluation(
            model_id=model_id,
            spec_hash=spec.hash,
            protocol_hash=spec.protocol_hash,
            spec=spec.to_dict(),
            status=status,
            n_samples=n,
            clean_accuracy=float(np.mean(correct)),
            aa_robust_accuracy=float(np.mean([r["aa_robust"] for r in rows])),
            fmn_robust_accuracy=float(
                np.mean(
                    [
                        r["clean_correct"] and not (r["fmn_success"] and r["fmn_distance"] <= spec.eps_value)
                        for r in rows
                    ]
                )
            ),
            best_robust_accuracy=float(np.mean([r["best_robust"] for r in rows])),
            fmn_median_distance=_median([r["fmn_distance"] for r in rows if r["clean_correct"] and r["fmn_success"]]),
            n_fmn_beat_aa=sum(r["aa_robust"] and not r["best_robust"] for r in rows),
            best_median_distance=gap and gap.best_median_distance,
            fmn_local_optimality=gap and gap.local_optimality,
            fmn_best_median_ratio=gap and gap.median_ratio,
            n_fmn_above_best=gap and gap.n_above,
            flags=[],
            attack_seconds={"apgd-ce": 1.0},
            provenance={"git_commit": "abc123", "device": "cpu"},
            started_at=now,
            finished_at=now + timedelta(seconds=finished_offset_s) if status == "complete" else None,
        )
        s.add(ev)
        s.flush()
        s.execute(insert(SampleResult), [{"evaluation_id": ev.id, **r} for r in rows])
        return ev.id


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    return float(np.median(values)) if not any(math.isnan(v) for v in values) else None
