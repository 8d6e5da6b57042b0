"""The flags an evaluation can raise beside AutoAttack's own sanity-check flags, and those that mark it unreliable."""

from __future__ import annotations

from bench.attacks.autoattack import AA_FLAGS

# FMN broke, within eps, a sample every AutoAttack stage left robust.
FMN_BEAT_AA_FLAG = "fmn_beat_autoattack"
# AutoAttack's own clean pass disagreed with ours on some sample (a randomised or input-dependent model).
CLEAN_DISAGREEMENT_FLAG = "clean_pass_disagreement"
# Our forward pass did not find an adversarial example AutoAttack returned adversarial (the same kind of model):
# FMN does not start from it and its norm is no best-known distance.
AA_ADV_NOT_REPRODUCED_FLAG = "autoattack_adversarial_not_reproduced"
# A sample AutoAttack broke at eps ended with a best-known distance above eps: AutoAttack's own perturbation, rounded
# in float32, exceeds eps by a last-place unit and neither FMN run found a smaller one. Visible, not unreliable.
BEST_KNOWN_ABOVE_EPS_FLAG = "best_known_above_eps"
# The chunks of one evaluation ran under different result-relevant execution settings (memory layout, TF32, cuDNN
# determinism: RESULT_SETTINGS), e.g. a run resumed without APBENCH_CHANNELS_LAST=1 that began with it. Flags and
# predictions are those of either setting; distances may differ from a run under one setting in the last float bits.
# Visible, not unreliable.
MIXED_EXECUTION_FLAG = "mixed_execution_settings"
# The execution settings (bench.performance.execution_settings) that can change a per-sample float.
RESULT_SETTINGS = ("channels_last", "tf32", "cudnn_deterministic")


def result_settings(execution: dict | None) -> tuple | None:
    """The part of a chunk's execution settings that can change its rows, comparable across chunks; None if none
    was recorded (chunks moved by migration 0005)."""
    return None if execution is None else tuple(execution.get(key) for key in RESULT_SETTINGS)


def distinct_executions(recorded) -> list[dict]:
    """The distinct execution settings among chunks' recorded ones (None skipped), in first-seen order."""
    out: list[dict] = []
    for execution in recorded:
        if execution is not None and execution not in out:
            out.append(execution)
    return out


UNRELIABLE_FLAGS = AA_FLAGS | {CLEAN_DISAGREEMENT_FLAG, AA_ADV_NOT_REPRODUCED_FLAG}
