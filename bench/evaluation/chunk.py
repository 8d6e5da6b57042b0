"""Attacking one chunk of samples: the clean pass, AutoAttack, FMN and FMN started from AutoAttack's adversarial
examples, turned into one per-sample record each (:class:`bench.records.SampleRecord`).

Under the default spec (``fmn_init="autoattack"``) FMN runs a second time, started from AutoAttack's adversarial
example, on every sample AutoAttack broke, and each record holds the best-known minimal distance over plain FMN, that
run and AutoAttack's own perturbation (:mod:`bench.analysis.best_known`): no stored best-known distance exceeds a
perturbation the evaluation already holds. The plain FMN figures stay as they were (the thin-ice paper's).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.analysis.best_known import FMN, FMN_FROM_AUTOATTACK, autoattack_source, best_known
from bench.attacks.autoattack import run_autoattack
from bench.attacks.fmn import NotAdversarialError, minimum_norm
from bench.attacks.utils import logit_difference
from bench.evaluation.flags import AA_ADV_NOT_REPRODUCED_FLAG, CLEAN_DISAGREEMENT_FLAG
from bench.performance import execution_settings
from bench.provenance import utcnow
from bench.records import SampleRecord
from bench.spec import RunSpec

# The stage name of FMN's warm start (timings, progress bars).
FMN_WARM_STAGE = FMN_FROM_AUTOATTACK


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
    one chunk; returns (rows, seconds per stage, flags, warnings), one row (:meth:`SampleRecord.to_row`) per sample."""
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
        fmn_broke = bool(correct[i]) and distance is not None and distance <= spec.eps_value
        best_distance, best_attack = None, None
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
        record = SampleRecord(
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
            signed_eps=_signed(distance, bool(correct[i])),
            fmn_adv_pred=int(fmn.adv_pred[i]),
            best_robust=bool(aa_robust[i]) and not fmn_broke,
            aa_distance=aa_distance.get(i),
            fmn_warm_distance=warm_distance.get(i),
            best_distance=best_distance,
            best_attack=best_attack,
            signed_best_eps=_signed(best_distance, bool(correct[i])),
        )
        rows.append(record.to_row())
    return rows, seconds, flags, aa.warnings


def _signed(distance: float | None, correct: bool) -> float | None:
    """The thin-ice convention: +distance for a correctly classified sample, −distance (to leave the predicted
    class) for a misclassified one."""
    return None if distance is None else (distance if correct else -distance)


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


def _device_label(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} {torch.cuda.get_device_name(dev)}"
    return str(dev)


@dataclass
class ChunkResult:
    """One attacked chunk, ready to commit: its per-sample rows and its bookkeeping (an ``evaluation_chunks`` row)."""

    chunk_index: int
    first_sample: int
    rows: list[dict[str, Any]]
    attack_seconds: dict[str, float]
    flags: list[str]
    warnings: list[str]
    host: str
    device: str
    worker: str | None
    pid: int
    execution: dict[str, Any] | None
    started_at: Any
    finished_at: Any


def attack_one_chunk(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: RunSpec,
    index: int,
    *,
    worker: str | None,
    on_stage_done: Callable[[str, int, int], None] | None = None,
) -> ChunkResult:
    """Attack chunk ``index`` of ``spec`` (``x, y``: that chunk's samples) and describe how it ran."""
    chunk = spec.chunks()[index]
    started = utcnow()
    # The sanity checks run once per evaluation, on its first chunk, whichever process attacks it: the flags they
    # raise then do not depend on how the chunks were split between processes or runs.
    rows, seconds, flags, warnings = attack_chunk(
        model, x, y, list(chunk), spec, run_checks=index == 0, on_stage_done=on_stage_done
    )
    return ChunkResult(
        chunk_index=index,
        first_sample=chunk.start,
        rows=rows,
        attack_seconds=seconds,
        flags=sorted(flags),
        warnings=list(warnings),
        host=socket.gethostname(),
        device=_device_label(spec.device),
        worker=worker,
        pid=os.getpid(),
        execution=execution_settings(model),
        started_at=started,
        finished_at=utcnow(),
    )
