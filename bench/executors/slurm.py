"""Shards as one SLURM job array through submitit (https://github.com/facebookincubator/submitit).

submitit pickles :class:`~bench.executors.ShardTask` and each shard into the executor folder, writes one ``sbatch``
script for the array (``--array=0-N%P``) and runs each task as ``python -m submitit.core._submit``; the task's
return value (or its traceback) comes back as a pickle in the same folder, so that folder must be one every node
sees. The waiting command does not rely on ``sacct``, which clusters without an accounting database lack: a task
is over when its result file exists or when ``squeue`` no longer lists it (killed, preempted without requeue, node
failure), in which case its chunks stay missing for the next submission.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.executors.options import DEFAULT_FOLDER, SLURM_INSTALL, ExecutorError, ExecutorOptions
from bench.executors.task import Shard, ShardTask, TaskOutcome

JOB_NAME = "apbench-evaluate"
# A task squeue stopped listing gets this long for its result file to appear (a shared filesystem's delay).
RESULT_GRACE_S = 15.0


def make_executor(options: ExecutorOptions):
    """A submitit executor for SLURM with the options' resources; a missing submitit or sbatch is one line."""
    try:
        import submitit
    except ImportError:
        raise ExecutorError(f"--executor slurm needs submitit: {SLURM_INSTALL}") from None
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ExecutorError(
            "--executor slurm: no sbatch/srun on this machine's PATH; run bench evaluate where jobs are submitted "
            "(a login node of the cluster), or use --executor local"
        )
    folder = Path(options.folder or DEFAULT_FOLDER).resolve()
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict = {
        "name": JOB_NAME,
        "timeout_min": options.time_limit,
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": options.cpus_per_task or options.threads,
    }
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.gpus_per_task:
        params["gpus_per_node"] = options.gpus_per_task
    if options.array_parallelism:
        params["slurm_array_parallelism"] = options.array_parallelism
    if options.setup:
        params["slurm_setup"] = list(options.setup)
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    executor.update_parameters(**params)
    return executor


def describe(options: ExecutorOptions) -> str:
    """The resources a SLURM array asks for, for the command's log."""
    parts = [f"partition {options.partition}" if options.partition else "the default partition"]
    parts.append(f"{options.gpus_per_task} GPU(s)" if options.gpus_per_task else "no GPU")
    parts.append(f"{options.cpus_per_task or options.threads} CPU(s)")
    parts.append(f"{options.time_limit} min per task")
    if options.array_parallelism:
        parts.append(f"at most {options.array_parallelism} at once")
    return ", ".join(parts)


def submit(shards: list[Shard], options: ExecutorOptions, *, log: Callable[[str], None]) -> list:
    """Submit the shards as one job array; returns submitit's jobs, one per task (``job.job_id`` is ``1234_5``)."""
    executor = make_executor(options)
    if not options.gpus_per_task and any(str(shard.spec.get("device", "")).startswith("cuda") for shard in shards):
        log("note: --device cuda with no --gpus-per-task: the tasks get a GPU only if their partition gives one")
    try:
        jobs = executor.map_array(ShardTask(), shards)
    except Exception as err:  # submitit raises its own FailedSubmissionError with sbatch's message
        reason = " ".join(str(err).split())[:400]
        raise ExecutorError(f"sbatch refused the job array: {reason}") from None
    array = jobs[0].job_id.split("_")[0]
    log(f"submitted SLURM job array {array}: {len(jobs)} task(s), {describe(options)}")
    log(f"task logs in {jobs[0].paths.stdout.parent} ({jobs[0].paths.stdout.name}, ...; .err beside)")
    return jobs


def queued(array_ids: list[str]) -> set[str] | None:
    """The tasks of these arrays that SLURM still lists (pending, running, requeued), as ``1234_5``; None when
    squeue cannot answer right now (the caller looks again later)."""
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i", f"--jobs={','.join(array_ids)}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue refuses ids it no longer knows (every task ended long ago): nothing is queued.
        return set() if "Invalid job id" in out.stderr else None
    return set(out.stdout.split())


def wait(
    jobs: list,
    shards: list[Shard],
    options: ExecutorOptions,
    *,
    progress: Callable[[], str] | None = None,
    log: Callable[[str], None],
) -> list[TaskOutcome]:
    """Wait until every task has ended; returns each one's outcome (a result, or an error with its log file)."""
    pending = {job.job_id: (job, shard) for job, shard in zip(jobs, shards, strict=True)}
    arrays = sorted({job_id.split("_")[0] for job_id in pending})
    gone_since: dict[str, float] = {}
    outcomes: list[TaskOutcome] = []
    last_line = ""
    try:
        while pending:
            listed = queued(arrays)
            now = time.monotonic()
            for job_id, (job, shard) in list(pending.items()):
                if job.paths.result_pickle.exists():
                    outcomes.append(_outcome(job, shard))
                elif listed is not None and job_id not in listed:
                    if now - gone_since.setdefault(job_id, now) < RESULT_GRACE_S:
                        continue
                    outcomes.append(
                        TaskOutcome(
                            task=job_id,
                            shard=shard,
                            error="ended without a result (killed, cancelled, out of memory or time, node failure)",
                            log=str(job.paths.stderr),
                        )
                    )
                else:
                    gone_since.pop(job_id, None)
                    continue
                del pending[job_id]
                outcome = outcomes[-1]
                log(f"task {job_id}: " + (outcome.error or f"{outcome.result.committed} chunk(s) committed"))
            if progress is not None:
                line = progress()
                if line != last_line:
                    log(line)
                    last_line = line
            if pending:
                time.sleep(options.poll_s)
    except KeyboardInterrupt:
        log(
            f"stopped waiting; the array {', '.join(arrays)} keeps running (scancel {' '.join(arrays)} stops it); "
            "follow it with bench status, and run the same command again to finish and finalise"
        )
        raise
    return outcomes


def _outcome(job, shard: Shard) -> TaskOutcome:
    try:
        result = job.result()
    except Exception as err:  # the task's own exception, carried back by submitit with its traceback
        text = str(err)
        # submitit frames the task's traceback between dashed lines; its last line is the exception itself.
        parts = text.split("-" * 22)
        trace = parts[1] if len(parts) >= 3 else text
        lines = [line.strip() for line in trace.splitlines() if line.strip()]
        reason = lines[-1] if lines else type(err).__name__
        return TaskOutcome(task=job.job_id, shard=shard, error=f"failed: {reason}", log=str(job.paths.stderr))
    return TaskOutcome(task=job.job_id, shard=shard, result=result)
