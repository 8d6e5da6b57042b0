"""``bench evaluate``'s options turned into one config, once (as lm-evaluation-harness's ``EvaluatorConfig.from_cli``).

:class:`EvaluateConfig` holds how to evaluate (the run-spec options, the device and processes, the store, the
executor); which model to evaluate is a source (:mod:`bench.cli.sources`). Every option is checked here, before
anything is loaded, downloaded or stored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bench.cli.options import check_eps


def check_n_samples(n_samples: int | None, dataset: str | None) -> None:
    """Refuse an --n-samples outside 1 .. the test split's size (known from the registry, no data loaded)."""
    if n_samples is None:
        return
    from bench.data import DATASETS, get_dataset_info

    if dataset is None:  # zoo filters: the entries' datasets are known later, each checked then
        name, info = max(DATASETS.items(), key=lambda item: item[1].test_size)
        if not 1 <= n_samples <= info.test_size:
            largest = f"the largest test split, {name}'s"
            raise ValueError(f"--n-samples must be between 1 and {info.test_size} ({largest}); got {n_samples}")
        return
    size = get_dataset_info(dataset).test_size
    if not 1 <= n_samples <= size:
        raise ValueError(f"--n-samples must be between 1 and {size} (the {dataset} test split); got {n_samples}")


def resolve_device(device: str, here: bool = True) -> str:
    """torch's spelling of ``--device``; a CUDA device must exist on this machine unless the work runs elsewhere."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid --device {device!r}; use cpu, cuda or cuda:N") from None
    if here and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but torch sees no CUDA device here; use --device cpu")
    return str(dev)


def run_spec(dataset, *, n_samples, eps, norm, aa_version, fmn_steps, batch_size, seed, device, data_dir):
    """``(RunSpec, x, y)``: the command's options over ``dataset``'s defaults, and its test split.

    Unset options take the dataset's protocol values (:meth:`RunSpec.for_dataset`, which the Python API calls
    too): eps (0.5 under L2), N (else the whole split), batch size.
    """
    from bench.data import load_split
    from bench.spec import RunSpec

    # Refused here, before the split is loaded (CIFAR's may be downloaded) and before any store is opened.
    check_n_samples(n_samples, dataset)
    check_eps(eps, norm)
    spec = RunSpec.for_dataset(
        dataset,
        n_samples=n_samples,
        eps=eps,
        norm=norm,
        version=aa_version,
        fmn_steps=fmn_steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    x, y = load_split(dataset, "test", data_dir=data_dir)
    return spec, x, y


# --executor's options: (click parameter, flag as typed, ExecutorOptions field).
_EXECUTOR_OPTIONS = (
    ("partition", "--partition", "partition"),
    ("gpus_per_task", "--gpus-per-task", "gpus_per_task"),
    ("time_limit", "--time-limit", "time_limit"),
    ("array_parallelism", "--array-parallelism", "array_parallelism"),
    ("tasks", "--tasks", "tasks"),
    ("cpus_per_task", "--cpus-per-task", "cpus_per_task"),
    ("setup", "--setup", "setup"),
    ("executor_folder", "--executor-folder", "folder"),
)


@dataclass(frozen=True)
class EvaluateConfig:
    """How ``bench evaluate`` evaluates, whatever the model: :meth:`from_cli` builds it from the options.

    Attributes:
        n_samples, eps, norm, aa_version, fmn_steps, batch_size, seed: the run spec's options as typed
            (``None``: the dataset's protocol value).
        device: torch's spelling of ``--device``.
        data_dir, db: where the test splits and the store are.
        workers: CPU processes attacking chunks (the CPU count on cpu, 1 on cuda, unless given).
        overwrite, progress, unranked: ``--overwrite``, not ``--no-progress``, ``--unranked``.
        sharded: the ``--executor`` run collecting the evaluations' shards (``bench.executors.ShardedRun``), or
            None to attack in this process.
    """

    n_samples: int | None
    eps: str | None
    norm: str
    aa_version: str
    fmn_steps: int
    batch_size: int | None
    seed: int
    device: str
    data_dir: str | None
    db: str | None
    workers: int
    overwrite: bool
    progress: bool
    unranked: bool
    sharded: Any = None

    @classmethod
    def from_cli(cls, options: dict[str, Any]) -> EvaluateConfig:
        """The config of ``bench evaluate``'s parsed options; refuses a bad budget, device or executor option.

        Sets torch's CPU threads (``--threads``) for this process.
        """
        import torch

        check_eps(options["eps"], options["norm"])
        torch.set_num_threads(options["threads"])
        # A SLURM job's GPUs are on its nodes, not necessarily on the machine that submits it.
        device = resolve_device(options["device"], here=options["executor"] != "slurm")
        sharded = _sharded_run(options)
        if sharded is not None and options["no_wait"] and options["method"] is not None:
            raise ValueError(
                "--method compares the dense and the pruned evaluations, so it waits for them; drop --no-wait"
            )
        workers = options["workers"]
        if workers is None:
            workers = (os.cpu_count() or 1) if device == "cpu" else 1
        return cls(
            n_samples=options["n_samples"],
            eps=options["eps"],
            norm=options["norm"],
            aa_version=options["aa_version"],
            fmn_steps=options["fmn_steps"],
            batch_size=options["batch_size"],
            seed=options["seed"],
            device=device,
            data_dir=options["data_dir"],
            db=options["db"],
            workers=workers,
            overwrite=options["overwrite"],
            progress=not options["no_progress"],
            unranked=options["unranked"],
            sharded=sharded,
        )

    def check(self, dataset: str | None) -> None:
        """Refuse the run-spec options that do not fit ``dataset`` (None: any dataset), loading nothing."""
        check_n_samples(self.n_samples, dataset)
        check_eps(self.eps, self.norm)

    def run_spec(self, dataset: str):
        """``(RunSpec, x, y)`` on ``dataset``: the spec these options give there, and its test split."""
        return run_spec(
            dataset,
            n_samples=self.n_samples,
            eps=self.eps,
            norm=self.norm,
            aa_version=self.aa_version,
            fmn_steps=self.fmn_steps,
            batch_size=self.batch_size,
            seed=self.seed,
            device=self.device,
            data_dir=self.data_dir,
        )


def _sharded_run(options: dict[str, Any]):
    """The ``--executor`` run of this command (None without one), its options checked before any work."""
    kind = options["executor"]
    named = {
        **{flag: options[param] for param, flag, _ in _EXECUTOR_OPTIONS},
        "--setup": options["setup"] or None,
        "--executor-config": options["executor_config"],
        "--no-wait": True if options["no_wait"] else None,
    }
    if kind is None:
        stray = [name for name, value in named.items() if value is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} need --executor slurm (or --executor local for --tasks)")
        return None
    import click

    from bench.executors import ShardedRun, check_slurm_db_url, executor_options
    from bench.store import resolve_db_url

    workers = options["workers"]
    if kind == "slurm" and workers is not None:
        raise ValueError("--workers is for this machine; with --executor slurm each array task is a process (--tasks)")
    given = {field: options[param] for param, _, field in _EXECUTOR_OPTIONS}
    settings = executor_options(
        kind,
        options["executor_config"],
        **given,
        threads=options["threads"],
        workers=workers if kind == "local" else None,
        wait=not options["no_wait"],
    )
    url = resolve_db_url(options["db"])
    if kind == "slurm":
        check_slurm_db_url(url)
    return ShardedRun(settings, url, data_dir=options["data_dir"], log=click.echo)
