"""Evaluate chunks as shards: a SLURM job array through submitit, or processes on this machine.

``bench evaluate --executor slurm|local`` registers the model(s) and opens the evaluation(s) in the store as an
in-process run does, then splits each evaluation's *missing* chunks into shards (task ``i`` of ``n`` takes
``missing[i::n]``). A shard is one call of :func:`run_shard`: it opens the store by URL, rebuilds the stored model
from its checkpoint, loads the test split, attacks its chunks with :func:`bench.evaluate.evaluate_chunks` (a chunk
that another task already committed is skipped), finalises the evaluation when it was the last chunk, and exits.
The submitting command waits for the tasks (unless ``--no-wait``) and finalises too (idempotent).

So a task killed, preempted or out of time loses at most the chunk it was attacking: submitting the same command
again shards only the chunks still missing, and SLURM's own requeue of a task reruns its shard, whose committed
chunks are skipped. The results do not depend on the sharding: every chunk is attacked alone with the spec's seed.

The modules: :mod:`.options` (the command's options and ``--executor-config``), :mod:`.task` (a shard and the
function a task runs), :mod:`.run` (one command's evaluations: opened, sharded, run, finalised), :mod:`.slurm` and
:mod:`.local` (where the shards run), :mod:`.status` (``bench status``).
"""

from bench.executors.local import local_slots
from bench.executors.options import (
    CONFIG_KEYS,
    DEFAULT_FOLDER,
    DEFAULT_TIME_LIMIT_MIN,
    EXECUTORS,
    POSTGRES_INSTALL,
    SLURM_INSTALL,
    ExecutorError,
    ExecutorOptions,
    check_slurm_db_url,
    executor_options,
    load_executor_config,
)
from bench.executors.run import DEFAULT_SLURM_TASKS, PlannedEvaluation, ShardedRun, shard_chunks
from bench.executors.slurm import describe
from bench.executors.task import (
    STALL_ENV,
    STALL_MAX_S,
    Shard,
    ShardResult,
    ShardTask,
    TaskOutcome,
    run_shard,
    worker_label,
)

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_FOLDER",
    "DEFAULT_SLURM_TASKS",
    "DEFAULT_TIME_LIMIT_MIN",
    "EXECUTORS",
    "POSTGRES_INSTALL",
    "SLURM_INSTALL",
    "STALL_ENV",
    "STALL_MAX_S",
    "ExecutorError",
    "ExecutorOptions",
    "PlannedEvaluation",
    "Shard",
    "ShardResult",
    "ShardTask",
    "ShardedRun",
    "TaskOutcome",
    "describe",
    "executor_options",
    "load_executor_config",
    "local_slots",
    "check_slurm_db_url",
    "run_shard",
    "shard_chunks",
    "worker_label",
]
