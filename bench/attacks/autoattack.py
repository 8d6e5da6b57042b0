"""AutoAttack (Croce & Hein, ICML 2020) through ``pyautoattack``, stage by stage, per sample.

``pyautoattack``'s ``run_standard_evaluation`` returns only the adversarial inputs and labels; it does
not say which attack broke which sample, and its ``state_path`` resume is broken (protocol section 8).
So the harness drives the same attack objects, configured by pyautoattack's own ``version`` presets, in
the same order and on the same still-robust subset as ``run_standard_evaluation`` does for one batch.
For a chunk attacked as one batch the result equals a bare ``run_standard_evaluation`` on that chunk with
the same seed (tested). Each attack reseeds the *global* torch RNG at every ``perturb``; the caller's RNG
state is saved and restored around each stage.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyautoattack import AutoAttack, checks

# AutoAttack's sanity-check warnings (flags_doc.md upstream) → the flag names stored with an evaluation.
FLAG_PATTERNS = {
    "randomized defense": "randomized_defense",
    "probability distribution": "softmax_output",
    "zero gradient": "zero_gradients",
    "dynamic defense": "dynamic_model",
    "Square Attack has decreased": "square_beat_white_box",
    "target classes": "too_few_classes",
    "not possible to use the": "too_few_classes",
}
AA_FLAGS = frozenset(FLAG_PATTERNS.values())


@dataclass
class AutoAttackOutcome:
    """Per-sample outcome of AutoAttack on one chunk.

    Attributes:
        clean_pred: prediction on the clean input.
        robust: correctly classified and broken by no stage.
        broken_by: the first stage that broke each sample (None if robust or misclassified clean).
        adv_pred: prediction on the returned adversarial (the clean prediction when not broken).
        x_adv: the adversarial input of each broken sample, the clean input of the others (as the ``x_adv`` of
            ``run_standard_evaluation``): where FMN's warm start begins.
        seconds: wall time per stage.
        flags: sanity-check flags raised (see ``FLAG_PATTERNS``).
        warnings: the raw warning messages behind the flags.
    """

    clean_pred: torch.Tensor
    robust: torch.Tensor
    broken_by: list[str | None]
    adv_pred: torch.Tensor
    x_adv: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)


class WarningCollector(logging.Handler):
    """Collects the messages of WARNING-level log records (AutoAttack reports its sanity checks this way)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def flags_from_messages(messages: list[str]) -> set[str]:
    return {flag for msg in messages for pattern, flag in FLAG_PATTERNS.items() if pattern in msg}


def square_check_flags(stage_robust_accuracy: dict[str, float]) -> set[str]:
    """pyautoattack's post-hoc check (Square broke what the white-box stages could not), on whole-run figures.

    Args:
        stage_robust_accuracy: ``{"clean": acc, stage: robust accuracy after that stage, ...}`` in run order.
    """
    logger = logging.getLogger("apbench.autoattack.checks")
    collector = WarningCollector()
    logger.addHandler(collector)
    try:
        checks.check_square_sr(stage_robust_accuracy, logger=logger)
    finally:
        logger.removeHandler(collector)
    return flags_from_messages(collector.messages)


def build_autoattack(model: torch.nn.Module, *, norm: str, eps: float, version: str, seed: int, device: str):
    """An ``AutoAttack`` configured by pyautoattack's own preset for ``version`` (plus / standard)."""
    aa = AutoAttack(model, device=device, eps=eps, norm=norm, seed=seed, version=version)
    aa.verbose = False
    return aa


def _run_stage(aa: AutoAttack, attack: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Mirrors the dispatch in pyautoattack's run_standard_evaluation, attribute for attribute.
    if attack in ("apgd-ce", "apgd-dlr"):
        aa.apgd.loss = "ce" if attack == "apgd-ce" else "dlr"
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y)
    if attack == "fab":
        aa.fab.targeted = False
        aa.fab.seed = aa.get_seed()
        return aa.fab.perturb(x, y)
    if attack == "square":
        aa.square.seed = aa.get_seed()
        return aa.square.perturb(x, y)
    if attack == "apgd-t":
        aa.apgd_targeted.seed = aa.get_seed()
        return aa.apgd_targeted.perturb(x, y)
    if attack == "fab-t":
        aa.fab.targeted = True
        aa.fab.n_restarts = 1
        aa.fab.seed = aa.get_seed()
        return aa.fab.perturb(x, y)
    raise ValueError(f"unknown AutoAttack stage {attack!r}")


def sanity_checks(aa: AutoAttack, x: torch.Tensor, y: torch.Tensor, logger: logging.Logger) -> None:
    """pyautoattack's pre-attack checks (randomness, softmax output, dynamic model, class count)."""
    checks.check_randomized(aa.get_logits, x, y, bs=x.shape[0], logger=logger)
    n_cls = checks.check_range_output(aa.get_logits, x, logger=logger)
    # check_dynamic counts calls in a module-global dict that is never reset, and replaces the active
    # tracer (coverage.py): reset the counter and put the tracer back.
    for key in checks.funcs:
        checks.funcs[key] = 0
    tracer = sys.gettrace()
    try:
        checks.check_dynamic(aa.model, x, False, logger=logger)
    finally:
        sys.settrace(tracer)
    checks.check_n_classes(
        n_cls, aa.attacks_to_run, aa.apgd_targeted.n_target_classes, aa.fab.n_target_classes, logger=logger
    )


def run_autoattack(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    version: str = "plus",
    seed: int = 0,
    device: str = "cpu",
    run_checks: bool = True,
    on_stage_done: Callable[[str, int, int], None] | None = None,
) -> AutoAttackOutcome:
    """Run AutoAttack's stages in order on one chunk, each on the samples still robust.

    Args:
        model: a module in eval mode mapping [0, 1] inputs to logits.
        x, y: the chunk, attacked as a single batch (pyautoattack's batch size = chunk size).
        norm, eps, version, seed, device: AutoAttack's parameters.
        run_checks: run the pre-attack sanity checks on this chunk.
        on_stage_done: called as ``(stage, n_attacked, n_broken)`` after each stage (progress bars).

    Returns:
        The per-sample outcome (with the adversarial inputs) with per-stage timings and sanity-check flags.
    """
    aa = build_autoattack(model, norm=norm, eps=eps, version=version, seed=seed, device=device)
    collector = WarningCollector()
    aa.logger.addHandler(collector)
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    x, y = x.to(device), y.to(device)
    try:
        with torch.random.fork_rng(devices=devices):
            if run_checks:
                sanity_checks(aa, x, y, aa.logger)
            with torch.no_grad():
                clean_pred = aa.get_logits(x).argmax(1)
            robust = clean_pred == y
            adv_pred = clean_pred.clone()
            x_adv = x.clone()
            broken_by: list[str | None] = [None] * len(y)
            seconds: dict[str, float] = {}
            for attack in aa.attacks_to_run:
                idx = robust.nonzero().flatten()
                start = time.perf_counter()
                n_broken = 0
                if len(idx):
                    adv = _run_stage(aa, attack, x[idx].clone(), y[idx].clone())
                    with torch.no_grad():
                        out = aa.get_logits(adv).argmax(1)
                    fooled = out != y[idx]
                    broken_idx = idx[fooled]
                    robust[broken_idx] = False
                    adv_pred[broken_idx] = out[fooled]
                    x_adv[broken_idx] = adv[fooled].detach()
                    for i in broken_idx.tolist():
                        broken_by[i] = attack
                    n_broken = int(fooled.sum())
                seconds[attack] = time.perf_counter() - start
                if on_stage_done is not None:
                    on_stage_done(attack, len(idx), n_broken)
    finally:
        aa.logger.removeHandler(collector)
    return AutoAttackOutcome(
        clean_pred=clean_pred.cpu(),
        robust=robust.cpu(),
        broken_by=broken_by,
        adv_pred=adv_pred.cpu(),
        x_adv=x_adv.cpu(),
        seconds=seconds,
        flags=flags_from_messages(collector.messages),
        warnings=collector.messages,
    )
