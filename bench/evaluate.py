"""The standardized evaluator: AutoAttack + FMN per sample, committed chunk by chunk, resumable.

Flow (STYLE.md): dataset + checkpoint → model → attacks → store. One evaluation = one model × one
:class:`~bench.spec.RunSpec`. Samples are processed in fixed chunks of ``spec.batch_size``; each chunk's
per-sample rows and its attack timings are committed in one transaction, so a run killed at any point
restarts at the first chunk without rows, and no sample is ever stored twice (a unique constraint on
(evaluation, sample_id) guards it too). An evaluation whose rows are complete is reused unless
``overwrite`` is given.

Under the default spec (``fmn_init="autoattack"``) FMN runs a second time, started from AutoAttack's adversarial
example, on every sample AutoAttack broke, and each row stores the best-known minimal distance over plain FMN, that
run and AutoAttack's own perturbation (:mod:`bench.analysis.best_known`): no stored best-known distance exceeds a
perturbation the evaluation already holds. The plain FMN figures stay as they were (the thin-ice paper's).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, select
from tqdm.auto import tqdm

from bench.analysis.best_known import FMN, FMN_FROM_AUTOATTACK, autoattack_source, best_known, distance_gap
from bench.analysis.stats import SampleOutcome, aggregate, wilson_interval
from bench.attacks.autoattack import AA_FLAGS, run_autoattack, square_check_flags
from bench.attacks.fmn import NotAdversarialError, minimum_norm
from bench.attacks.utils import logit_difference
from bench.provenance import environment, utcnow
from bench.spec import RunSpec
from bench.store import Evaluation, Model, SampleResult, Store

FMN_BEAT_AA_FLAG = "fmn_beat_autoattack"
# AutoAttack's own clean pass disagreed with ours on some sample (a randomised or input-dependent model).
CLEAN_DISAGREEMENT_FLAG = "clean_pass_disagreement"
# Our forward pass did not find an adversarial example AutoAttack returned adversarial (the same kind of model):
# FMN does not start from it and its norm is no best-known distance.
AA_ADV_NOT_REPRODUCED_FLAG = "autoattack_adversarial_not_reproduced"
# A sample AutoAttack broke at eps ended with a best-known distance above eps: AutoAttack's own perturbation, rounded
# in float32, exceeds eps by a last-place unit and neither FMN run found a smaller one. Visible, not unreliable.
BEST_KNOWN_ABOVE_EPS_FLAG = "best_known_above_eps"
UNRELIABLE_FLAGS = AA_FLAGS | {CLEAN_DISAGREEMENT_FLAG, AA_ADV_NOT_REPRODUCED_FLAG}
# The stage name of FMN's warm start (timings, progress bars).
FMN_WARM_STAGE = FMN_FROM_AUTOATTACK


@dataclass
class EvaluationSummary:
    """What ``bench evaluate`` prints at the end; every figure is derived from the stored rows."""

    evaluation_id: int
    model_name: str
    spec: dict[str, Any]
    n: int
    clean_accuracy: float
    aa_robust_accuracy: float
    fmn_robust_accuracy: float
    best_robust_accuracy: float
    fmn_median_distance: float | None
    n_fmn_beat_aa: int
    flags: list[str]
    unreliable: bool
    attack_seconds: dict[str, float]
    reused: bool = False
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Plain FMN against the best-known distances (None for the protocol without FMN's warm start).
    best_median_distance: float | None = None
    fmn_local_optimality: float | None = None
    fmn_best_median_ratio: float | None = None
    n_fmn_above_best: int | None = None

    @classmethod
    def from_row(cls, ev: Evaluation, reused: bool = False) -> EvaluationSummary:
        n = ev.n_samples
        accs = {
            "clean": ev.clean_accuracy,
            "autoattack": ev.aa_robust_accuracy,
            "fmn": ev.fmn_robust_accuracy,
            "best_known": ev.best_robust_accuracy,
        }
        return cls(
            evaluation_id=ev.id,
            model_name=ev.model.name,
            spec=ev.spec,
            n=n,
            clean_accuracy=ev.clean_accuracy,
            aa_robust_accuracy=ev.aa_robust_accuracy,
            fmn_robust_accuracy=ev.fmn_robust_accuracy,
            best_robust_accuracy=ev.best_robust_accuracy,
            fmn_median_distance=ev.fmn_median_distance,
            n_fmn_beat_aa=ev.n_fmn_beat_aa,
            flags=list(ev.flags),
            unreliable=ev.unreliable,
            attack_seconds=dict(ev.attack_seconds),
            reused=reused,
            intervals={k: wilson_interval(round(v * n), n) for k, v in accs.items()},
            best_median_distance=ev.best_median_distance,
            fmn_local_optimality=ev.fmn_local_optimality,
            fmn_best_median_ratio=ev.fmn_best_median_ratio,
            n_fmn_above_best=ev.n_fmn_above_best,
        )


def attack_chunk(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sample_ids: list[int],
    spec: RunSpec,
    *,
    run_checks: bool,
    on_stage_done: Callable[[str, int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float], set[str], list[str]]:
    """Clean pass, AutoAttack, FMN and (spec ``fmn_init="autoattack"``) FMN from AutoAttack's adversarial examples on
    one chunk; returns (rows, seconds per stage, flags, warnings)."""
    device = spec.device
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x.to(device)).cpu()
    pred = logits.argmax(1)
    margin = logit_difference(logits, y)  # z_y − max_{j≠y} z_j: positive when classified correctly
    seconds["clean"] = time.perf_counter() - start
    if on_stage_done is not None:
        on_stage_done("clean", len(y), int((pred != y).sum()))

    aa = run_autoattack(
        model,
        x,
        y,
        norm=spec.norm,
        eps=spec.eps_value,
        version=spec.version,
        seed=spec.seed,
        device=device,
        run_checks=run_checks,
        on_stage_done=on_stage_done,
    )
    seconds.update(aa.seconds)

    # Protocol section 4: misclassified samples are attacked with their *predicted* class as the label,
    # giving the distance needed to leave it; stored as a negative epsilon.
    correct = pred == y
    fmn_labels = torch.where(correct, y, pred)
    p = _norm_p(spec.norm)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        fmn = minimum_norm(model, x.to(device), fmn_labels.to(device), norm=p, steps=spec.fmn_steps)
    seconds["fmn"] = time.perf_counter() - start
    if on_stage_done is not None:
        on_stage_done("fmn", len(y), int(fmn.success.sum()))

    # AutoAttack decides clean correctness with its own forward pass. For a deterministic model the two passes
    # agree; where they do not (a randomised or input-dependent model), a sample counts as AutoAttack-robust
    # only if both passes classified it correctly, and the evaluation is flagged (potentially unreliable).
    aa_robust = aa.robust.cpu() & correct
    flags = set(aa.flags)
    if bool((aa.clean_pred.cpu() != pred).any()):
        flags.add(CLEAN_DISAGREEMENT_FLAG)

    aa_distance: dict[int, float] = {}
    warm_distance: dict[int, float] = {}
    if spec.fmn_init == "autoattack":
        start = time.perf_counter()
        aa_distance, warm_distance, reproduced = _fmn_from_autoattack(model, x, y, correct, aa, spec)
        if not reproduced:
            flags.add(AA_ADV_NOT_REPRODUCED_FLAG)
        seconds[FMN_WARM_STAGE] = time.perf_counter() - start
        if on_stage_done is not None:
            on_stage_done(FMN_WARM_STAGE, len(aa_distance), len(warm_distance))

    rows = []
    for i, sid in enumerate(sample_ids):
        success = bool(fmn.success[i])
        distance = float(fmn.distance[i]) if success else None
        signed = None if distance is None else (distance if correct[i] else -distance)
        fmn_broke = bool(correct[i]) and distance is not None and distance <= spec.eps_value
        best: dict[str, Any] = dict(
            aa_distance=None, fmn_warm_distance=None, best_distance=None, best_attack=None, signed_best_eps=None
        )
        if spec.fmn_init == "autoattack":
            # Ties go to the attack that produced the point: AutoAttack before the FMN run that started from it.
            candidates = [(FMN, distance)]
            if i in aa_distance:
                candidates = [
                    (autoattack_source(aa.broken_by[i]), aa_distance[i]),
                    *candidates,
                    (FMN_FROM_AUTOATTACK, warm_distance.get(i)),
                ]
            best_distance, best_attack = best_known(candidates)
            best.update(
                aa_distance=aa_distance.get(i),
                fmn_warm_distance=warm_distance.get(i),
                best_distance=best_distance,
                best_attack=best_attack,
                signed_best_eps=None if best_distance is None else (best_distance if correct[i] else -best_distance),
            )
        rows.append(
            dict(
                sample_id=sid,
                label=int(y[i]),
                clean_pred=int(pred[i]),
                clean_correct=bool(correct[i]),
                logit_margin=float(margin[i]),
                aa_robust=bool(aa_robust[i]),
                aa_broken_by=aa.broken_by[i],
                adv_pred=int(aa.adv_pred[i]),
                fmn_label=int(fmn_labels[i]),
                fmn_success=success,
                fmn_distance=distance,
                signed_eps=signed,
                fmn_adv_pred=int(fmn.adv_pred[i]),
                best_robust=bool(aa_robust[i]) and not fmn_broke,
                **best,
            )
        )
    return rows, seconds, flags, aa.warnings


def _fmn_from_autoattack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, aa, spec: RunSpec
) -> tuple[dict[int, float], dict[int, float], bool]:
    """FMN started from AutoAttack's adversarial example on each sample AutoAttack broke (and we classify right).

    Returns:
        ``(aa_distance, warm_distance, reproduced)``: per chunk index, the norm of AutoAttack's perturbation and
        the warm-started FMN's distance; whether our forward passes found every such example adversarial (one they
        do not is left out of both: it is not a perturbation we hold; when FMN's own check disagrees with ours, a
        model whose output changes from one pass to the next, the whole chunk is left out).
    """
    device, p = spec.device, _norm_p(spec.norm)
    broken = [i for i, stage in enumerate(aa.broken_by) if stage is not None and bool(correct[i])]
    if not broken:
        return {}, {}, True
    idx = torch.tensor(broken)
    xs, ys, starts = x[idx].to(device), y[idx].to(device), aa.x_adv[idx].to(device)
    with torch.no_grad():
        adversarial = (model(starts).argmax(1) != ys).cpu()
    keep = adversarial.nonzero().flatten()
    # Measured as minimum_norm measures FMN's distances: the same float32 perturbation norm.
    norms = torch.linalg.vector_norm((starts - xs).flatten(1), ord=p, dim=1).float().cpu()
    aa_distance = {broken[k]: float(norms[k]) for k in keep.tolist()}
    warm_distance: dict[int, float] = {}
    if len(keep):
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                warm = minimum_norm(
                    model, xs[keep], ys[keep], norm=p, steps=spec.fmn_steps, starting_points=starts[keep]
                )
        except NotAdversarialError:
            return {}, {}, False
        for j, k in enumerate(keep.tolist()):
            if bool(warm.success[j]):
                warm_distance[broken[k]] = float(warm.distance[j])
    return aa_distance, warm_distance, bool(adversarial.all())


def _norm_p(norm: str) -> float:
    return math.inf if norm == "Linf" else 2.0


def evaluate(
    store: Store,
    model_id: int,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: RunSpec,
    *,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    log: Callable[[str], None] = lambda _msg: None,
) -> EvaluationSummary:
    """Evaluate ``model`` (stored as ``model_id``) on the first ``spec.n_samples`` of ``x, y``.

    Args:
        store: the results store.
        model_id: primary key of the model's row.
        model: the network (inputs in [0, 1], logits out); put in eval mode here.
        x, y: the dataset's test split in canonical order (only the first N are used).
        spec: the run spec.
        overwrite: discard stored results for this (model, spec) and recompute.
        progress: show progress bars (tqdm; silent anyway when not a terminal).
        workers: CPU processes attacking chunks in parallel, one torch thread each (CPU only). Chunks are
            attacked independently with the same seed, so the results do not depend on this number.
        log: receives one-line status messages (resuming, reusing).

    Returns:
        The summary, recomputed from the stored per-sample rows.
    """
    if spec.n_samples > len(y):
        raise ValueError(
            f"--n-samples {spec.n_samples} exceeds the {len(y)} samples of the {spec.dataset} test split; "
            f"use at most {len(y)}"
        )
    if workers > 1 and torch.device(spec.device).type != "cpu":
        raise ValueError("--workers > 1 is for CPU evaluation; on a GPU use one worker and a larger --batch-size")
    model.eval()
    evaluation_id, done = _open_evaluation(store, model_id, spec, overwrite=overwrite)
    if evaluation_id is None:
        with store.session() as s:
            ev = s.scalars(
                select(Evaluation).where(Evaluation.model_id == model_id, Evaluation.spec_hash == spec.hash)
            ).one()
            log(f"reusing the finished evaluation #{ev.id} (same checkpoint and run spec); --overwrite recomputes")
            return EvaluationSummary.from_row(ev, reused=True)
    if done:
        log(f"resuming evaluation #{evaluation_id}: {len(done)}/{spec.n_samples} samples already stored")

    stages = ("clean", *spec.attacks, "fmn", *((FMN_WARM_STAGE,) if spec.fmn_init == "autoattack" else ()))
    bars = {
        stage: tqdm(
            total=spec.n_samples,
            desc=f"{stage:>8}",
            unit="sample",
            position=i,
            leave=True,
            disable=None if progress else True,
            initial=len(done),
        )
        for i, stage in enumerate(stages)
    }

    todo = [chunk for chunk in spec.chunks() if not set(chunk) <= done]
    workers = max(1, min(workers, len(todo)))
    # The sanity checks run once per invocation, on its first chunk (as AutoAttack runs them on its first batch).
    try:
        if workers == 1:
            for i, c in enumerate(todo):

                def stage_done(stage: str, _n_attacked: int, _n_broken: int, n: int = len(c)) -> None:
                    bars[stage].update(n)

                result = attack_chunk(
                    model,
                    x[c.start : c.stop],
                    y[c.start : c.stop],
                    list(c),
                    spec,
                    run_checks=i == 0,
                    on_stage_done=stage_done,
                )
                _commit_chunk(store, evaluation_id, *result)
        else:
            log(f"attacking {len(todo)} chunks in {workers} worker processes")
            # Clones: a slice would pickle the whole test split's storage into every job.
            jobs = [
                (x[c.start : c.stop].clone(), y[c.start : c.stop].clone(), list(c), spec, i == 0)
                for i, c in enumerate(todo)
            ]
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_worker_init, initargs=(model,)) as pool:
                for n, result in pool.imap_unordered(_worker_attack, jobs):
                    _commit_chunk(store, evaluation_id, *result)
                    for bar in bars.values():
                        bar.update(n)
    finally:
        for bar in bars.values():
            bar.close()
    return _finalize(store, evaluation_id, spec)


_WORKER_MODEL: torch.nn.Module | None = None


def _worker_init(model: torch.nn.Module) -> None:
    global _WORKER_MODEL
    torch.set_num_threads(1)
    _WORKER_MODEL = model.eval()


def _worker_attack(job) -> tuple[int, tuple]:
    x, y, ids, spec, run_checks = job
    return len(ids), attack_chunk(_WORKER_MODEL, x, y, ids, spec, run_checks=run_checks)


def _open_evaluation(store: Store, model_id: int, spec: RunSpec, *, overwrite: bool) -> tuple[int | None, set[int]]:
    """Find or create the evaluation row; returns (id or None when complete and reusable, stored sample ids)."""
    with store.session() as s:
        ev = s.scalars(
            select(Evaluation).where(Evaluation.model_id == model_id, Evaluation.spec_hash == spec.hash)
        ).one_or_none()
        if ev is not None and overwrite:
            s.execute(delete(SampleResult).where(SampleResult.evaluation_id == ev.id))
            s.delete(ev)
            s.flush()
            ev = None
        if ev is not None and ev.status == "complete":
            return None, set()
        if ev is None:
            ev = Evaluation(
                model_id=model_id,
                spec_hash=spec.hash,
                protocol_hash=spec.protocol_hash,
                spec=spec.to_dict(),
                status="running",
                n_samples=spec.n_samples,
                flags=[],
                attack_seconds={},
                provenance={},
                started_at=utcnow(),
            )
            s.add(ev)
            s.flush()
        done = set(s.scalars(select(SampleResult.sample_id).where(SampleResult.evaluation_id == ev.id)))
        return ev.id, done


def _commit_chunk(store: Store, evaluation_id: int, rows, seconds, flags, warnings) -> None:
    with store.session() as s:
        ev = s.get(Evaluation, evaluation_id)
        s.add_all(SampleResult(evaluation_id=evaluation_id, **row) for row in rows)
        ev.attack_seconds = {
            k: ev.attack_seconds.get(k, 0.0) + seconds.get(k, 0.0) for k in {*ev.attack_seconds, *seconds}
        }
        ev.flags = sorted({*ev.flags, *flags})
        if warnings:
            ev.provenance = {
                **ev.provenance,
                "autoattack_warnings": [*ev.provenance.get("autoattack_warnings", []), *warnings],
            }


def _finalize(store: Store, evaluation_id: int, spec: RunSpec) -> EvaluationSummary:
    with store.session() as s:
        ev = s.get(Evaluation, evaluation_id)
        records = s.scalars(select(SampleResult).where(SampleResult.evaluation_id == evaluation_id)).all()
        if len(records) != spec.n_samples:
            raise RuntimeError(
                f"evaluation #{evaluation_id} has {len(records)} per-sample rows, expected {spec.n_samples}"
            )
        agg = aggregate(
            [
                SampleOutcome(
                    r.clean_correct, r.aa_robust, r.aa_broken_by, r.fmn_success, r.fmn_distance, r.best_robust
                )
                for r in records
            ],
            spec.eps_value,
            spec.attacks,
        )
        flags = {*ev.flags, *square_check_flags(agg.stage_robust_accuracy)}
        if agg.n_fmn_beat_aa:
            flags.add(FMN_BEAT_AA_FLAG)
        if spec.fmn_init == "autoattack":
            correct = np.array([r.clean_correct for r in records], dtype=bool)
            gap = distance_gap(
                _floats(r.fmn_distance if r.fmn_success else None for r in records),
                _floats(r.best_distance for r in records),
                correct,
            )
            ev.best_median_distance = gap.best_median_distance
            ev.fmn_local_optimality = gap.local_optimality
            ev.fmn_best_median_ratio = gap.median_ratio
            ev.n_fmn_above_best = gap.n_above
            if any(
                r.clean_correct and r.aa_distance is not None and (r.best_distance or 0.0) > spec.eps_value
                for r in records
            ):
                flags.add(BEST_KNOWN_ABOVE_EPS_FLAG)
        model = s.get(Model, ev.model_id)
        ev.flags = sorted(flags)
        ev.unreliable = bool(flags & UNRELIABLE_FLAGS)
        ev.clean_accuracy = agg.clean_accuracy
        ev.aa_robust_accuracy = agg.aa_robust_accuracy
        ev.fmn_robust_accuracy = agg.fmn_robust_accuracy
        ev.best_robust_accuracy = agg.best_robust_accuracy
        ev.fmn_median_distance = agg.fmn_median_distance
        ev.n_fmn_beat_aa = agg.n_fmn_beat_aa
        ev.finished_at = utcnow()
        ev.provenance = {
            **ev.provenance,
            **environment(spec.device),
            "protocol": spec.protocol,
            "protocol_hash": spec.protocol_hash,
            "spec_hash": spec.hash,
            "n_samples": spec.n_samples,
            "seed": spec.seed,
            "threat_model": {"norm": spec.norm, "eps": spec.eps, "eps_value": spec.eps_value},
            "autoattack_version": spec.version,
            "checkpoint_sha256": model.checkpoint_sha256,
            "started_at": ev.started_at.isoformat(),
            "finished_at": ev.finished_at.isoformat(),
            "attack_seconds": dict(ev.attack_seconds),
            "broken_by": agg.broken_by,
            "stage_robust_accuracy": agg.stage_robust_accuracy,
        }
        ev.status = "complete"
        s.flush()
        return EvaluationSummary.from_row(ev)


def _floats(values) -> np.ndarray:
    # None (no distance) becomes NaN.
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)
