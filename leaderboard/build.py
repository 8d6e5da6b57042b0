"""Build the static leaderboard site from the results store: the orchestration.

Flow: store → analysis → site, one module per stage:

- :mod:`leaderboard.site_data` selects what the site shows (models, their newest complete evaluation per protocol,
  the protocols and each dataset's main one, parents, seed replicates, unranked models), read through the ORM in
  one session into the objects of :mod:`leaderboard.view_models`;
- :mod:`leaderboard.tables` ranks the tables (one per protocol, architecture and structure: evaluations under two
  protocols are never ranked together) and makes their rows from :data:`leaderboard.columns.COLUMNS`;
- :mod:`leaderboard.per_sample` does the per-sample work (each evaluation's records, its CSV download, security
  curve, thin-ice analysis against its dense parent) in worker processes;
- :mod:`leaderboard.render` writes the pages with Jinja2 (autoescape on, so every string a submitter controls is
  shown as text) and the method plots (:mod:`leaderboard.plots`, deterministic SVG).

This module runs them: the per-sample jobs in a process pool while the overview pages are written, then the model
pages. Nothing is fetched from the network, so the site works opened from ``file://``; the same database gives
byte-identical files, whatever the number of workers. The site is written into a hidden folder next to the output
folder and renamed into place when complete (:func:`build_site`), so a killed build leaves the previous site,
never a partial one.

Layout of the output folder::

    index.html            per protocol, one table per (architecture, structure); models not evaluated
    methodology.html      the protocol in plain words
    methods.html          every method with its taxonomy
    downloads.html        each table as CSV and JSON, BibTeX of the papers
    models/<id>-<name>.html, .csv, -curve.svg, -thin-ice.svg    one page per model
    methods/<key>.html, -sparsity.svg                           one page per method
    data/*.csv, *.json, papers.bib
"""

from __future__ import annotations

import multiprocessing
import os
import re
import secrets
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from sqlalchemy.engine import make_url

from bench.store import Store
from leaderboard import render
from leaderboard.per_sample import EvalTask, run_job, worker_init, worker_job, write_text
from leaderboard.site_data import SiteData

# Written into every site folder: a later build may replace a folder only if it finds this file there.
MARKER = ".apbench-site"
MARKER_TEXT = "Built by `bench leaderboard build`; the whole folder is replaced on the next build.\n"

# Per-sample jobs: at most this many evaluations each (a dense parent's records are read once per job); worker
# processes only when there is enough work to pay for starting them.
JOB_SIZE = 10
MAX_WORKERS = 4
MIN_TASKS_FOR_POOL = 8

# ------------------------------------------------------------------------------------------- per sample


def _jobs(data: SiteData) -> list[list[EvalTask]]:
    """Per-sample tasks grouped by dense parent (its records are read once per job), in slices of a few."""
    families: dict[int, list[EvalTask]] = defaultdict(list)
    for model in data.models:
        for e in data.entries.get(model.id, []):
            parent = e.parent_entry.ev.id if e.parent_entry else None
            task = EvalTask(
                evaluation_id=e.ev.id,
                stem=e.file_stem,
                autoattack=e.ev.aa_robust_accuracy or 0.0,
                best_known=e.ev.best_robust_accuracy or 0.0,
                parent_evaluation_id=parent,
            )
            families[parent if parent is not None else e.ev.id].append(task)
    jobs = [tasks[i : i + JOB_SIZE] for _, tasks in sorted(families.items()) for i in range(0, len(tasks), JOB_SIZE)]
    return sorted(jobs, key=len, reverse=True)


def _pool(store: Store, workers: int | None, n_tasks: int) -> ProcessPoolExecutor | None:
    """Worker processes for the per-sample jobs, or None to run them here (small sites, in-memory stores)."""
    workers = min(os.cpu_count() or 1, MAX_WORKERS) if workers is None else workers
    url = make_url(store.url)
    in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
    if workers <= 1 or n_tasks < MIN_TASKS_FOR_POOL or in_memory:
        return None
    # On Linux, fork starts a worker in milliseconds with everything imported; the workers never touch torch or
    # the parent's database connection (each opens its own engine). Elsewhere, spawn.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(
        max_workers=min(workers, n_tasks),
        mp_context=context,
        initializer=worker_init,
        initargs=(store.url, os.getpid()),
    )


# A build writes into a hidden folder next to ``--out`` and renames it into place when every file is written, so a
# killed build never leaves a half-written site or a folder a later build refuses. The folder names carry the
# building process's id: a later build removes the leftovers of processes that are gone.
STAGING = "building"
REPLACED = "replaced"


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` this command may not replace: a file, a link, or a non-empty folder without the marker."""
    if out.is_symlink():
        raise ValueError(f"--out {out} is a symbolic link; give the folder it points to, or a new folder")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder for the site")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise ValueError(
                f"--out {out} is not empty and was not built by `bench leaderboard build` (no {MARKER} file); "
                "give a new or empty folder"
            )


def _side_path(out: Path, kind: str) -> Path:
    """A new name next to ``out`` for a staging (or replaced) folder of this process."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"


def _side_folders(out: Path) -> list[tuple[Path, int]]:
    """Folders next to ``out`` that a build of ``out`` made (staging or replaced), with the id of that process."""
    found = []
    if not out.parent.is_dir():
        return found
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{STAGING}|{REPLACED})-(\d+)-[A-Za-z0-9_]+$")
    for path in out.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((path, int(match.group(1))))
    return sorted(found)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    try:  # a killed process its parent has not reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_leftovers(out: Path) -> None:
    """Remove what killed builds of ``out`` left next to it (never a running build's folder)."""
    for path, pid in _side_folders(out):
        if not _process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _staging_folder(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = _side_path(out, STAGING)
        try:
            path.mkdir()  # the umask's permissions, like the folder it becomes (mkdtemp would make it 0700)
            return path
        except FileExistsError:
            continue


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``staging`` folder: two renames, the old site removed afterwards.

    Between the two renames (microseconds) ``out`` does not exist; a kill there leaves no site, and the next build
    writes one. Readers never see a partial site.
    """
    _check_out(out)  # again: the folder may have changed while the site was being built
    old = None
    if out.exists():
        old = _side_path(out, REPLACED)
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another build moved it away meanwhile
            old = None
    try:
        os.rename(staging, out)
    except OSError as err:
        if old is not None and not out.exists():
            os.rename(old, out)  # the previous site goes back
        raise ValueError(
            f"--out {out} was written by another build while this one ran ({err.strerror}); run the build again"
        ) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_site(store_or_url: Store | str | None, out_dir: str | Path, *, workers: int | None = None) -> Path:
    """Render the leaderboard site for the store into ``out_dir`` and return the path of its ``index.html``.

    The site is written into a hidden folder next to ``out_dir`` and renamed into place once complete, so
    ``out_dir`` always holds either the previous site or the new one; leftovers of killed builds are removed.

    Args:
        store_or_url: an open :class:`~bench.store.Store`, or a SQLAlchemy URL / SQLite path (None: the default
            store, ``$BENCH_DB`` or ``sqlite:///results.db``).
        out_dir: the site folder. It is created; a folder from an earlier build is replaced; any other
            non-empty folder is refused.
        workers: processes for the per-sample work (records, CSV files, plots) [default: the CPU count, at
            most 4]; 1 works in this process. The files do not depend on it.

    Raises:
        ValueError: ``out_dir`` is a file or a link, or a non-empty folder this command did not build.
    """
    out = Path(out_dir)
    target = Path(os.path.abspath(out))  # "site/", "." and "a/../site" name their folder
    if not target.name:
        raise ValueError(f"--out {out} is the root folder; give a folder for the site")
    _check_out(target)
    own = not isinstance(store_or_url, Store)
    store = Store(store_or_url) if own else store_or_url
    staging = None
    try:
        with store.session() as session:
            data = SiteData(session)
            _remove_leftovers(target)
            staging = _staging_folder(target)
            _write_site(store, data, staging, workers)
        _move_into_place(staging, target)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if own:
            store.dispose()
    return out / "index.html"


def _write_site(store: Store, data: SiteData, folder: Path, workers: int | None) -> None:
    # The marker first: a staging folder is recognisable from its first file on.
    write_text(folder / MARKER, MARKER_TEXT)
    jobs = _jobs(data)
    pool = _pool(store, workers, sum(map(len, jobs)))
    pages = render.Pages(data, folder)
    if pool is None:
        results = {}
        for job in jobs:
            results.update(run_job(store, job, folder))
        pages.overview()
    else:
        with pool:
            futures = [pool.submit(worker_job, (job, str(folder))) for job in jobs]
            pages.overview()  # while the workers draw
            results = {}
            for future in futures:
                results.update(future.result())
    for entries in data.entries.values():
        for e in entries:
            e.results = results[e.ev.id]
    pages.models()
