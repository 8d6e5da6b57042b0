"""Shards as processes on this machine: one per GPU (each sees only its own, CUDA_VISIBLE_DEVICES) or ``--workers``
CPU processes, started with ``spawn`` (no CUDA state or open database connection is inherited) and running the
same :func:`~bench.executors.run_shard` as a SLURM task."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from bench.executors.options import ExecutorOptions
from bench.executors.task import Shard, TaskOutcome, run_shard


def local_slots(options: ExecutorOptions, device: str) -> list[dict[str, str]]:
    """The processes ``--executor local`` starts, as the environment each one gets: one per visible GPU on
    ``cuda`` (its ``CUDA_VISIBLE_DEVICES``), one on ``cuda:N``, else ``--workers`` CPU processes."""
    if device == "cuda":
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
        count = torch.cuda.device_count()
        ids = (ids or [str(i) for i in range(count)])[:count]
        if options.workers is not None:
            ids = ids[: options.workers]
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in ids] or [{}]
    if device.startswith("cuda"):
        return [{}]
    return [{} for _ in range(options.workers or os.cpu_count() or 1)]


def _init_slot(slots, threads: int) -> None:
    # Each process takes one slot's environment before torch touches CUDA (it does so lazily).
    os.environ.update(slots.get())
    import torch

    torch.set_num_threads(threads)


def run_local(
    shards: list[Shard], options: ExecutorOptions, device: str, *, log: Callable[[str], None]
) -> list[TaskOutcome]:
    """Run every shard in a pool of ``local_slots`` processes; returns each shard's outcome."""
    slots = local_slots(options, device)
    n = min(len(slots), len(shards))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    for env in slots[:n]:
        queue.put(env)
    where = ", ".join(f"GPU {env['CUDA_VISIBLE_DEVICES']}" for env in slots[:n] if env) or f"{n} CPU process(es)"
    log(f"running {len(shards)} shard(s) on this machine: {where}")
    outcomes: list[TaskOutcome] = []
    with ProcessPoolExecutor(
        max_workers=n, mp_context=ctx, initializer=_init_slot, initargs=(queue, options.threads)
    ) as pool:
        futures = {pool.submit(run_shard, shard): (i, shard) for i, shard in enumerate(shards)}
        for future in as_completed(futures):
            i, shard = futures[future]
            task = f"local shard {i}"
            try:
                result = future.result()
            except BrokenProcessPool:
                outcome = TaskOutcome(task=task, shard=shard, error="its process died (killed, out of memory?)")
            except Exception as err:  # the shard's own error, re-raised here by the pool
                reason = " ".join(str(err).split()) or type(err).__name__
                outcome = TaskOutcome(task=task, shard=shard, error=f"failed: {type(err).__name__}: {reason}")
            else:
                outcome = TaskOutcome(task=task, shard=shard, result=result)
            outcomes.append(outcome)
            log(f"{task}: " + (outcome.error or f"{outcome.result.committed} chunk(s) committed"))
    return outcomes
