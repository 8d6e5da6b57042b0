"""``bench evaluate --executor``'s options: the command line's, or an ``--executor-config`` file's, checked once.

:class:`ExecutorOptions` refuses a value the executors cannot work with, and a SLURM-only option given to the local
executor, with one line that names the option and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "slurm")
DEFAULT_FOLDER = "apbench-jobs"
DEFAULT_TIME_LIMIT_MIN = 240
SLURM_INSTALL = "pip install 'apbench[slurm]'"
POSTGRES_INSTALL = "pip install 'apbench[postgres]'"


class ExecutorError(ValueError):
    """Options or a setting the executors cannot work with; the message names the problem and the fix."""


@dataclass(frozen=True)
class ExecutorOptions:
    """How ``bench evaluate --executor`` shards and submits (the CLI options, or ``--executor-config``'s keys).

    Attributes:
        kind: ``"local"`` (processes on this machine) or ``"slurm"`` (a job array through submitit).
        tasks: shards per evaluation [SLURM: 4; local: one per process].
        partition, gpus_per_task, time_limit (minutes), array_parallelism, setup (shell lines run before each task),
            cpus_per_task, mem_gb: the job array's resources (SLURM only).
        folder: submitit's folder for the tasks' pickles and logs; every node must see it (SLURM only).
        wait: wait for the tasks and finalise; False returns once the array is submitted (SLURM only).
        workers: CPU processes (local, on a CPU device).
        threads: torch threads per task.
        poll_s: seconds between two looks at the queue while waiting (``poll_seconds`` in a config file).
    """

    kind: str = "slurm"
    tasks: int | None = None
    partition: str | None = None
    gpus_per_task: int = 0
    time_limit: int = DEFAULT_TIME_LIMIT_MIN
    array_parallelism: int | None = None
    setup: tuple[str, ...] = ()
    folder: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    wait: bool = True
    workers: int | None = None
    threads: int = 1
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ExecutorError(f"unknown executor {self.kind!r}; use one of {', '.join(EXECUTORS)}")
        for name in ("tasks", "time_limit", "array_parallelism", "cpus_per_task", "workers", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ExecutorError(f"{_option(name)} must be a whole number of at least 1; got {value!r}")
        if not isinstance(self.gpus_per_task, int) or isinstance(self.gpus_per_task, bool) or self.gpus_per_task < 0:
            raise ExecutorError(f"--gpus-per-task must be a whole number of at least 0; got {self.gpus_per_task!r}")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, int | float) and self.mem_gb > 0):
            raise ExecutorError(f"mem_gb must be a positive number of gigabytes; got {self.mem_gb!r}")
        if not (isinstance(self.poll_s, int | float) and self.poll_s > 0):
            raise ExecutorError(f"poll_seconds must be a positive number; got {self.poll_s!r}")
        if any(not isinstance(line, str) or "\n" in line for line in self.setup):
            raise ExecutorError("each --setup is one shell line (a string without line breaks)")
        if self.kind == "local":
            slurm_only = [
                _option(name)
                for name in ("partition", "array_parallelism", "folder", "cpus_per_task", "mem_gb")
                if getattr(self, name) is not None
            ]
            slurm_only += ["--gpus-per-task"] if self.gpus_per_task else []
            slurm_only += ["--setup"] if self.setup else []
            slurm_only += ["--no-wait"] if not self.wait else []
            if slurm_only:
                raise ExecutorError(
                    f"{', '.join(slurm_only)} set the SLURM job array; --executor local runs on this machine "
                    "(use --workers, --tasks and --device there)"
                )


# The keys of an --executor-config file: the long options' names with dashes or underscores.
CONFIG_KEYS = {
    "partition": "partition",
    "gpus_per_task": "gpus_per_task",
    "time_limit": "time_limit",
    "array_parallelism": "array_parallelism",
    "tasks": "tasks",
    "setup": "setup",
    "executor_folder": "folder",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "poll_seconds": "poll_s",
}


def _option(name: str) -> str:
    key = {v: k for k, v in CONFIG_KEYS.items()}.get(name, name)
    return "--" + key.replace("_", "-")


def load_executor_config(path: str | Path) -> dict[str, Any]:
    """The settings of a small YAML file with the keys of the command's options, e.g.::

        partition: gpu
        gpus_per_task: 1
        time_limit: 240        # minutes
        array_parallelism: 16
        tasks: 8
        executor_folder: /shared/apbench-jobs
        setup:
          - module load cuda/12.1
          - source /shared/venv/bin/activate

    Returns ``ExecutorOptions`` keyword arguments; an unknown key or a wrong type is refused in one line.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ExecutorError(f"cannot read --executor-config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ExecutorError(f"--executor-config {path} is not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExecutorError(f"--executor-config {path} must be a mapping of keys to values, e.g. 'partition: gpu'")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = CONFIG_KEYS.get(str(key).replace("-", "_"))
        if name is None:
            raise ExecutorError(
                f"unknown key {key!r} in --executor-config {path}; known: {', '.join(sorted(CONFIG_KEYS))}"
            )
        if name == "setup":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ExecutorError(f"setup in --executor-config {path} must be a shell line or a list of them")
            value = tuple(value)
        elif name in ("partition", "folder"):
            if not isinstance(value, str) or not value.strip():
                raise ExecutorError(f"{key} in --executor-config {path} must be a non-empty string")
        elif name in ("mem_gb", "poll_s"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ExecutorError(f"{key} in --executor-config {path} must be a number; got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ExecutorError(f"{key} in --executor-config {path} must be a whole number; got {value!r}")
        out[name] = value
    return out


def executor_options(kind: str, config: str | Path | None = None, **given: Any) -> ExecutorOptions:
    """Options from ``--executor-config`` (if any) overridden by those given on the command line (not None)."""
    settings = load_executor_config(config) if config is not None else {}
    known = {f.name for f in fields(ExecutorOptions)}
    for name, value in given.items():
        if name not in known:
            raise TypeError(f"unknown executor option {name!r}")
        if value is not None and value != ():
            settings[name] = tuple(value) if name == "setup" else value
    return ExecutorOptions(kind=kind, **settings)


def check_slurm_db_url(url: str) -> None:
    """SLURM's tasks run on other machines: they need a database server, not a SQLite file, reached by a URL
    without a password (the URL is written into every task's pickle in the executor folder)."""
    if url.startswith("sqlite"):
        raise ExecutorError(
            "--executor slurm needs a PostgreSQL store that every node reaches (SQLite's locking does not work "
            f"over a network filesystem): give --db postgresql://user@host/db ({POSTGRES_INSTALL}; "
            "create it with bench db upgrade --db ...)"
        )
    from bench.store.db import url_password

    try:
        password = url_password(url)
    except Exception:  # an unreadable URL is the store's to report
        return
    if password:
        raise ExecutorError(
            "--db holds a password, and --executor slurm writes the URL into every task's file in the executor "
            "folder: drop it from the URL and put it in ~/.pgpass (HOST:PORT:DATABASE:USER:PASSWORD, chmod 600) on "
            "a home directory the nodes share; psycopg reads it there (docs/cluster.md)"
        )
