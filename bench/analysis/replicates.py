"""Training-seed replicates: models that differ only in the seed of their pruning run.

Benchmarks report a confidence interval over the test samples drawn (Wilson, here), which says nothing about how
much the same recipe varies when pruned again with another seed; on small schedules that spread can dwarf the
sampling one. A *setting* is everything that defines a pruned model except its seed; models of one setting are
replicates, and a metric summarised across them (:class:`ReplicateSummary`) is shown beside the interval.

Everything here is a pure function of stored rows (duck-typed: any object with the attributes named below), so
the command line and the leaderboard site group and summarise replicates the same way:

    groups = group_replicates(evaluations)            # {(setting key, protocol hash): [evaluation, ...]}
    for (key, protocol), evs in groups.items():
        summaries = summarize_evaluations(evs)        # {"autoattack": ReplicateSummary(n=3, mean=..., ...), ...}

A model row is read through ``parent_id``, ``method``, ``target_sparsity``, ``structure`` and ``provenance`` (the
record ``bench prune`` writes: ``seed``, ``config``, ``schedule``, ``eps``, ``dense_sha256``); an evaluation row
through ``model``, ``status``, ``protocol_hash``, ``finished_at``, ``id`` and the accuracy attributes of
:data:`METRICS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bench.paths import stable_hash

# Metric name → evaluation attribute, in the order tables show them (the names `bench results` uses).
METRICS = (
    ("clean", "clean_accuracy"),
    ("autoattack", "aa_robust_accuracy"),
    ("fmn", "fmn_robust_accuracy"),
    ("best_known", "best_robust_accuracy"),
)
# Seeds go to torch.manual_seed and to the adapters' generators; 2**32 - 1 also keeps numpy's seeding valid.
MAX_SEED = 2**32 - 1
# Each seed is a whole pruning run; a longer list is a typo (0-10000 for 0-10), not a plan.
MAX_SEEDS = 1000
_SEED_SUFFIX = re.compile(r"_s\d+(-[0-9a-f]{8})?$")


def parse_seeds(text: str) -> list[int]:
    """The seeds a command line lists: ``"0,1,2"``, ``"0-4"``, ``"0-2,7"`` → ``[0, 1, 2, 7]`` (in the order given).

    Raises:
        ValueError: an empty list, a negative or non-integer seed, an empty range (``4-0``), a seed above
            :data:`MAX_SEED`, more than :data:`MAX_SEEDS` seeds, or a seed listed twice; one line naming the item
            and the fix.
    """
    seeds: list[int] = []
    seen: set[int] = set()
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise ValueError("--seeds is empty; list pruning seeds, e.g. --seeds 0,1,2 or --seeds 0-4")
    for item in items:
        if re.fullmatch(r"-\s*\d+", item):
            raise ValueError(f"--seeds has a negative seed {item!r}; seeds are integers >= 0 (e.g. --seeds 0-4)")
        single = re.fullmatch(r"\d+", item)
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", item)
        if single:
            values = [int(item)]
        elif span:
            low, high = int(span[1]), int(span[2])
            if high < low:
                raise ValueError(f"--seeds range {item!r} is empty; write ranges low-high, e.g. {high}-{low}")
            values = range(low, high + 1)
        else:
            raise ValueError(f"--seeds item {item!r} is not a seed or a range; use e.g. --seeds 0,1,2 or --seeds 0-4")
        if len(seeds) + len(values) > MAX_SEEDS:
            raise ValueError(f"--seeds {text!r} asks for more than {MAX_SEEDS} pruning runs; list fewer seeds")
        for seed in values:
            if seed > MAX_SEED:
                raise ValueError(f"--seeds has seed {seed}, above the largest allowed {MAX_SEED}")
            if seed in seen:
                raise ValueError(f"--seeds lists seed {seed} twice ({text!r}); give each seed once")
            seen.add(seed)
            seeds.append(seed)
    return seeds


def seed_of(model: Any) -> int | None:
    """The pruning seed recorded in the model's provenance, or None (dense, zoo and submitted models)."""
    seed = (getattr(model, "provenance", None) or {}).get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def setting_of(model: Any) -> dict[str, Any] | None:
    """Everything that defines a pruned model except its seed, or None for a model not pruned by ``bench prune``.

    The dense parent is identified by its checkpoint's sha256 (the same bytes are one model in any store), so a
    changed track recipe, another ``--dense`` file or another training eps is another setting, as are a different
    method config (``--set``) and schedule (the digits track's or the paper's).
    """
    provenance = getattr(model, "provenance", None) or {}
    if seed_of(model) is None or "config" not in provenance:
        return None
    config = {k: v for k, v in (provenance.get("config") or {}).items() if k != "seed"}
    parent = provenance.get("dense_sha256") or (
        f"model:{model.parent_id}" if getattr(model, "parent_id", None) is not None else None
    )
    return {
        "parent": parent,
        "method": getattr(model, "method", None),
        "target_sparsity": getattr(model, "target_sparsity", None),
        "structure": getattr(model, "structure", None),
        "schedule": provenance.get("schedule"),
        "eps": provenance.get("eps"),
        "config": config,
    }


def setting_key(model: Any) -> str | None:
    """A stable text key of :func:`setting_of` (sha256 of its canonical JSON), or None when it has no setting."""
    setting = setting_of(model)
    if setting is None:
        return None
    return stable_hash(setting, compact=False, default=str)


def setting_label(name: str) -> str:
    """A replicate's model name without its seed suffix (``…_US_90_c1a2b3c4_s2`` → ``…_US_90_c1a2b3c4``)."""
    return _SEED_SUFFIX.sub("", name)


@dataclass(frozen=True)
class ReplicateSummary:
    """One metric across the seeds of a setting.

    Attributes:
        n: number of replicates (seeds) with a value.
        mean, min, max: of the values (fractions for accuracies).
        std: sample standard deviation (n - 1 in the denominator); None for a single replicate.
        seeds: the seeds, ascending, each with its value in ``values``.
    """

    n: int
    mean: float
    min: float
    max: float
    std: float | None
    seeds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def range(self) -> float:
        return self.max - self.min


def summarize(values: Mapping[int, float | None]) -> ReplicateSummary | None:
    """Summarise ``{seed: value}``; missing (None or NaN) values are left out; None when none is left."""
    kept = sorted((seed, float(v)) for seed, v in values.items() if v is not None and not math.isnan(float(v)))
    if not kept:
        return None
    seeds = tuple(seed for seed, _ in kept)
    xs = tuple(v for _, v in kept)
    n = len(xs)
    mean = math.fsum(xs) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return ReplicateSummary(n=n, mean=mean, min=min(xs), max=max(xs), std=std, seeds=seeds, values=xs)


def _newest_first(ev: Any) -> tuple:
    finished = getattr(ev, "finished_at", None)
    return (finished is not None, finished.isoformat() if finished is not None else "", ev.id)


def group_replicates(evaluations: Iterable[Any]) -> dict[tuple[str, str], list[Any]]:
    """Complete evaluations grouped by ``(setting key, protocol hash)``, each group ordered by seed.

    Each model contributes its newest complete evaluation per protocol (latest ``finished_at``, ties to the higher
    id, as ``bench.analysis.records.latest_evaluation`` picks it). A model without a setting (dense, zoo) is a
    group of its own, keyed ``("model:<id>", protocol hash)``.
    """
    newest: dict[tuple[int, str], Any] = {}
    for ev in evaluations:
        if ev.status != "complete":
            continue
        slot = (ev.model.id, ev.protocol_hash)
        if slot not in newest or _newest_first(ev) > _newest_first(newest[slot]):
            newest[slot] = ev
    groups: dict[tuple[str, str], list[Any]] = {}
    for (model_id, protocol), ev in newest.items():
        key = setting_key(ev.model) or f"model:{model_id}"
        groups.setdefault((key, protocol), []).append(ev)
    for evs in groups.values():
        evs.sort(key=lambda e: (seed_of(e.model) is None, seed_of(e.model) or 0, e.model.id))
    return groups


def summarize_evaluations(evaluations: Iterable[Any]) -> dict[str, ReplicateSummary]:
    """``{metric: ReplicateSummary}`` over replicate evaluations (one per seed), for the metrics of :data:`METRICS`.

    Raises:
        ValueError: two evaluations carry the same seed, or one has no seed: they are not replicates of a setting.
    """
    by_seed: dict[int, Any] = {}
    for ev in evaluations:
        seed = seed_of(ev.model)
        if seed is None:
            raise ValueError(f"model {ev.model.name!r} records no pruning seed; it is not a replicate")
        if seed in by_seed:
            raise ValueError(
                f"models {by_seed[seed].model.name!r} and {ev.model.name!r} both have seed {seed}; "
                "replicates of one setting differ in their seed"
            )
        by_seed[seed] = ev
    out = {}
    for name, attr in METRICS:
        summary = summarize({seed: getattr(ev, attr) for seed, ev in by_seed.items()})
        if summary is not None:
            out[name] = summary
    return out
