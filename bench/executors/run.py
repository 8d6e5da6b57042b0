"""The evaluations of one ``bench evaluate --executor`` command: opened, sharded, run, waited for and finalised.

Each evaluation's *missing* chunks are split into shards (task ``i`` of ``n`` takes ``missing[i::n]``); every shard
of every evaluation goes out at once (one SLURM job array for a whole zoo, or one pool of local processes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from bench.executors.local import local_slots
from bench.executors.options import ExecutorOptions
from bench.executors.task import Shard, TaskOutcome

# Shards per evaluation when --tasks is not given (SLURM): enough to spread one model over a few GPUs, few enough
# that each task amortises its start (Python, torch, the model, the test split) over several chunks.
DEFAULT_SLURM_TASKS = 4


def shard_chunks(missing: Iterable[int], n_tasks: int) -> list[tuple[int, ...]]:
    """Task ``i`` of ``n_tasks`` gets ``missing[i::n_tasks]``; no empty shard (fewer tasks than chunks left)."""
    missing = sorted(missing)
    n = max(1, min(n_tasks, len(missing)))
    return [tuple(missing[i::n]) for i in range(n)] if missing else []


@dataclass
class PlannedEvaluation:
    """An evaluation the command opened, the chunks it still misses, and (after the run) its summary."""

    evaluation_id: int
    model_id: int
    model_name: str
    spec: Any  # bench.spec.RunSpec
    missing: list[int]
    summary: Any = None  # bench.evaluate.EvaluationSummary once finalised
    reused: bool = False


@dataclass
class ShardedRun:
    """The evaluations of one ``bench evaluate --executor`` command: collected, sharded, run, finalised.

    ``add`` opens an evaluation (race-free) and notes its missing chunks; ``run`` submits every shard of every
    evaluation at once (one job array for a whole zoo), waits, and finalises each evaluation.
    """

    options: ExecutorOptions
    db_url: str
    data_dir: str | None = None
    log: Callable[[str], None] = print
    planned: list[PlannedEvaluation] = field(default_factory=list)
    outcomes: list[TaskOutcome] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def add(self, store, row, spec, *, overwrite: bool = False) -> PlannedEvaluation:
        from bench.evaluate import finalize_evaluation, missing_chunks, open_evaluation

        evaluation_id = open_evaluation(store, row.id, spec, overwrite=overwrite)
        missing = missing_chunks(store, evaluation_id, spec)
        plan = PlannedEvaluation(evaluation_id, row.id, row.name, spec, missing)
        if not missing:
            # Complete, or every chunk stored but never finalised (its last task died just before): finalise now.
            summary = finalize_evaluation(store, evaluation_id, spec)
            plan.summary = None if summary is None else replace(summary, reused=True)
            plan.reused = True
            self.log(f"evaluation #{evaluation_id} of {row.name} has every chunk stored: nothing to submit")
        else:
            n_chunks = len(spec.chunks())
            self.log(
                f"evaluation #{evaluation_id} of {row.name}: {len(missing)} of {n_chunks} chunks missing"
                + ("" if len(missing) == n_chunks else " (the others are stored and kept)")
            )
        self.planned.append(plan)
        return plan

    def shards(self) -> list[Shard]:
        n_tasks = self.options.tasks or (
            DEFAULT_SLURM_TASKS if self.options.kind == "slurm" else len(local_slots(self.options, self._device()))
        )
        return [
            Shard(
                db_url=self.db_url,
                evaluation_id=plan.evaluation_id,
                model_id=plan.model_id,
                spec=plan.spec.to_dict(),
                chunk_ids=chunk_ids,
                data_dir=self.data_dir,
                threads=self.options.threads,
            )
            for plan in self.planned
            for chunk_ids in shard_chunks(plan.missing, n_tasks)
        ]

    def _device(self) -> str:
        devices = {plan.spec.device for plan in self.planned}
        return devices.pop() if len(devices) == 1 else "cpu"

    def run(self) -> list[PlannedEvaluation]:
        """Run every shard, then finalise; returns the plans (``summary`` None where chunks are still missing)."""
        from bench.store import Store

        shards = self.shards()
        store = Store(self.db_url)
        try:
            if shards and self.options.kind == "slurm":
                from bench.executors.slurm import submit, wait

                jobs = submit(shards, self.options, log=self.log)
                self.job_ids = sorted({job.job_id.split("_")[0] for job in jobs})
                if not self.options.wait:
                    return self.planned
                self.outcomes = wait(jobs, shards, self.options, progress=lambda: self._progress(store), log=self.log)
            elif shards:
                from bench.executors.local import run_local

                self.outcomes = run_local(shards, self.options, self._device(), log=self.log)
            self._finalize(store)
        finally:
            store.dispose()
        return self.planned

    def _progress(self, store) -> str:
        """Chunks stored, read from the store: one line for the waiting command's log."""
        from bench.evaluate import missing_chunks

        counts = []
        for plan in self.planned:
            if not plan.reused:
                total = len(plan.spec.chunks())
                counts.append(
                    (plan.evaluation_id, total - len(missing_chunks(store, plan.evaluation_id, plan.spec)), total)
                )
        if len(counts) <= 4:
            return "chunks stored: " + ", ".join(f"#{i} {done}/{total}" for i, done, total in counts)
        done = sum(c[1] for c in counts)
        total = sum(c[2] for c in counts)
        finished = sum(c[1] == c[2] for c in counts)
        return f"chunks stored: {done}/{total} over {len(counts)} evaluations ({finished} with every chunk)"

    def _finalize(self, store) -> None:
        from bench.evaluate import finalize_evaluation, missing_chunks

        for plan in self.planned:
            if not plan.reused:
                plan.summary = finalize_evaluation(store, plan.evaluation_id, plan.spec)
                if plan.summary is None:
                    plan.missing = missing_chunks(store, plan.evaluation_id, plan.spec)

    def failure_message(self, incomplete: list[PlannedEvaluation]) -> str:
        """One line for the evaluations left incomplete (failed or killed tasks) and what to do."""
        parts = [f"#{p.evaluation_id} ({p.model_name}) misses {len(p.missing)} chunk(s)" for p in incomplete]
        failed = [o for o in self.outcomes if o.error is not None]
        first = f"; task {failed[0].task} {failed[0].error}" if failed else ""
        logs = f", its log: {failed[0].log}" if failed and failed[0].log else ""
        return (
            f"{len(failed)} task(s) failed or were killed, so evaluation {', '.join(parts)}: run the same command "
            f"again to attack only the missing chunks{first}{logs}"
        )
