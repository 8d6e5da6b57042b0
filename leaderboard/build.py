"""Build the static leaderboard site from the results store.

Flow: store → analysis → site. Model and evaluation rows are read through the ORM (a few hundred
objects); the tables, the method pages and their plots need only the evaluations' stored aggregates. The
per-sample work (each evaluation's records into numpy arrays, its CSV download, security curve, thin-ice
analysis against its dense parent) runs in worker processes (:mod:`leaderboard.per_sample`). Pages are rendered
with Jinja2 (autoescape on, so every string a submitter controls is shown as text); plots are deterministic SVG
files next to the pages; nothing is fetched from the network, so the site works opened from ``file://``. The same
database gives byte-identical files, whatever the number of workers.

Only evaluations under one protocol (one ``Evaluation.protocol_hash``) are ever ranked together: the index has a
section per protocol, each dataset's main protocol first (:func:`_order_protocols`), the others apart below. The
table columns are defined once, in :mod:`leaderboard.columns`. The site is written into a hidden folder next to
the output folder and renamed into place when complete (:func:`build_site`), so a killed build leaves the previous
site, never a partial one.

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
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from sqlalchemy.engine import make_url

import bench
from bench.analysis.format import number, p_value
from bench.analysis.replicates import (
    seed_of,
)
from bench.analysis.thin_ice import POPULATIONS
from bench.store import Store
from leaderboard import plots
from leaderboard.formatting import (  # noqa: F401  (re-exported: tests and callers import them from here)
    format_value,
    human_count,
    model_slug,
    pct,
    safe_slug,
    safe_url,
    seeds_text,
    slugify,
    sort_value,
    word_breaks,
)
from leaderboard.per_sample import EvalTask, run_job, worker_init, worker_job, write_text
from leaderboard.site_data import SiteData
from leaderboard.tables import build_tables, download_files
from leaderboard.view_models import (
    STRUCTURE_NAMES,
    Entry,
    MethodInfo,
    inputs_label,
    inputs_text,
    is_ranked,
)

# Written into every site folder: a later build may replace a folder only if it finds this file there.
MARKER = ".apbench-site"
MARKER_TEXT = "Built by `bench leaderboard build`; the whole folder is replaced on the next build.\n"

# Per-sample jobs: at most this many evaluations each (a dense parent's records are read once per job); worker
# processes only when there is enough work to pay for starting them.
JOB_SIZE = 10
MAX_WORKERS = 4
MIN_TASKS_FOR_POOL = 8

FLAG_TEXT = {
    "randomized_defense": "AutoAttack saw a randomised forward pass",
    "softmax_output": "the model seems to output probabilities, not logits",
    "zero_gradients": "zero gradients for some samples",
    "dynamic_model": "the forward pass changes between calls",
    "square_beat_white_box": "Square (black-box) broke samples the white-box attacks could not",
    "too_few_classes": "too few classes for the targeted attacks",
    "fmn_beat_autoattack": "FMN found adversarials within eps that AutoAttack missed",
    "clean_pass_disagreement": (
        "AutoAttack's own clean pass disagreed with ours on some samples (a randomised or input-dependent "
        "model); a sample counts as robust only if both passes classified it correctly"
    ),
    "autoattack_adversarial_not_reproduced": (
        "an adversarial example AutoAttack returned was not adversarial in our forward pass (a randomised or "
        "input-dependent model): FMN did not start from it and its norm is no best-known distance"
    ),
    "best_known_above_eps": (
        "a sample AutoAttack broke at ε has a best-known distance just above ε (AutoAttack's perturbation, rounded "
        "in float32, exceeds ε by a last-place unit, and neither FMN run found a smaller one); shown, not unreliable"
    ),
}
# The badge a flag gets: FMN's and the best-known notes inform; every other flag is an AutoAttack or consistency
# check that marks the evaluation potentially unreliable (bench.evaluate.UNRELIABLE_FLAGS; a test checks the split).
FLAG_BADGE = {"fmn_beat_autoattack": "fmn", "best_known_above_eps": "notice"}
# Who found a sample's best-known distance (SampleResult.best_attack), in words.
BEST_ATTACK_TEXT = {"fmn": "plain FMN", "fmn_from_autoattack": "FMN from AutoAttack's adversarial"}

# Papers the protocol rests on (cited on the methodology page and in papers.bib).
PROTOCOL_PAPERS = [
    {
        "key": "Croce2020Reliable",
        "kind": "inproceedings",
        "title": "Reliable Evaluation of Adversarial Robustness with an Ensemble of Diverse Parameter-Free Attacks",
        "author": "Croce, Francesco and Hein, Matthias",
        "venue": "ICML",
        "year": 2020,
        "url": "https://arxiv.org/abs/2003.01690",
    },
    {
        "key": "Pintor2021Fast",
        "kind": "inproceedings",
        "title": "Fast Minimum-norm Adversarial Attacks through Adaptive Norm Constraints",
        "author": "Pintor, Maura and Roli, Fabio and Brendel, Wieland and Biggio, Battista",
        "venue": "NeurIPS",
        "year": 2021,
        "url": "https://arxiv.org/abs/2102.12827",
    },
    {
        "key": "Piras2023Samples",
        "kind": "inproceedings",
        "title": "Samples on Thin Ice: Re-Evaluating Adversarial Pruning of Neural Networks",
        "author": "Piras, Giorgio and Pintor, Maura and Demontis, Ambra and Biggio, Battista",
        "venue": "ICMLC",
        "year": 2023,
        "url": "https://arxiv.org/abs/2310.08073",
    },
    {
        "key": "Piras2024Adversarial",
        "kind": "article",
        "title": "Adversarial Pruning: A Survey and Benchmark of Pruning Methods for Adversarial Robustness",
        "author": (
            "Piras, Giorgio and Pintor, Maura and Demontis, Ambra and Biggio, Battista and Giacinto, Giorgio "
            "and Roli, Fabio"
        ),
        "venue": "Pattern Recognition",
        "year": 2025,
        "url": "https://arxiv.org/abs/2409.01249",
    },
]


def best_attack_text(name: str) -> str:
    """A ``best_attack`` value in words: "plain FMN", "AutoAttack (apgd-ce)"."""
    if name.startswith("autoattack:"):
        return f"AutoAttack ({name.split(':', 1)[1]})"
    return BEST_ATTACK_TEXT.get(name, name)


def _bib_field(text: Any) -> str:
    # Braces and backslashes would end or escape the BibTeX field; nothing else needs care.
    return re.sub(r"[{}\\]", "", str(text)).replace("\n", " ").strip()


def bibtex(entry: dict[str, Any]) -> str:
    kind = entry.get("kind", "inproceedings")
    venue_field = "journal" if kind == "article" else "booktitle"
    lines = [f"@{kind}{{{slugify(str(entry['key']))},"]
    for name, value in (
        ("title", entry.get("title")),
        ("author", entry.get("author")),
        (venue_field, entry.get("venue")),
        ("year", entry.get("year")),
        ("url", safe_url(entry.get("url"))),
    ):
        if value:
            lines.append(f"  {name} = {{{_bib_field(value)}}},")
    lines.append("}")
    return "\n".join(lines)


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


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("leaderboard", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        pct=pct,
        human=human_count,
        sortval=sort_value,
        value=format_value,
        p=p_value,
        norm=plots.norm_symbol,
        url=safe_url,
        wbr=word_breaks,
        num=number,
    )
    env.globals.update(
        version=bench.__version__,
        FLAG_TEXT=FLAG_TEXT,
        FLAG_BADGE=FLAG_BADGE,
        best_attack_text=best_attack_text,
        normalization_label=inputs_label,
        normalization_text=inputs_text,
        seed_of=seed_of,
        POPULATIONS=POPULATIONS,
        model_slug=model_slug,
        is_ranked=is_ranked,
    )
    return env


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out

    def text(self, rel: str, content: str) -> None:
        write_text(self.out / rel, content)


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
    w = _Writer(folder)
    w.text(MARKER, MARKER_TEXT)
    jobs = _jobs(data)
    pool = _pool(store, workers, sum(map(len, jobs)))
    if pool is None:
        results = {}
        for job in jobs:
            results.update(run_job(store, job, folder))
        pages = _render_overview(data, w)
    else:
        with pool:
            futures = [pool.submit(worker_job, (job, str(folder))) for job in jobs]
            pages = _render_overview(data, w)  # while the workers draw
            results = {}
            for future in futures:
                results.update(future.result())
    for entries in data.entries.values():
        for e in entries:
            e.results = results[e.ev.id]
    _render_models(data, w, pages)


def _render_overview(data: SiteData, w: _Writer) -> dict[str, Any]:
    """Index, methods, methodology and downloads pages, the data files, the method pages and their plots."""
    env = _environment()
    site_tables = build_tables(data)
    tables = site_tables.tables
    methods = data.method_list
    for mi in methods:
        mi.plot = _method_plot(data, mi)

    common = {"env": env, "data": data, "methods": methods, "tables": tables, "structure_names": STRUCTURE_NAMES}
    ctx = {k: v for k, v in common.items() if k != "env"}
    w.text(
        "index.html",
        env.get_template("index.html.j2").render(
            root="",
            page="index",
            rows=site_tables.rows,
            columns=site_tables.columns,
            not_evaluated=data.not_evaluated,
            unranked=data.unranked,
            **ctx,
        ),
    )
    w.text("methodology.html", env.get_template("methodology.html.j2").render(root="", page="methodology", **ctx))
    w.text("methods.html", env.get_template("methods.html.j2").render(root="", page="methods", **ctx))

    for rel, text in download_files(site_tables):
        w.text(rel, text)
    papers = _papers(methods)
    w.text("data/papers.bib", "\n\n".join(bibtex(p) for p in papers) + "\n")
    w.text(
        "downloads.html", env.get_template("downloads.html.j2").render(root="", page="downloads", papers=papers, **ctx)
    )

    method_tpl = env.get_template("method.html.j2")
    for mi in methods:
        if mi.plot:
            w.text(f"methods/{mi.slug}-sparsity.svg", mi.plot)
        w.text(f"methods/{mi.slug}.html", method_tpl.render(root="../", page="method", mi=mi, **ctx))
    return common


def _render_models(data: SiteData, w: _Writer, common: dict[str, Any]) -> None:
    ctx = {k: v for k, v in common.items() if k != "env"}
    model_tpl = common["env"].get_template("model.html.j2")
    for model in data.models:
        w.text(
            f"models/{model_slug(model)}.html",
            model_tpl.render(
                root="../",
                page="model",
                model=model,
                entries=data.entries.get(model.id, []),
                method=data.methods.get(model.method),
                parent=data.by_id.get(model.parent_id) if model.parent_id else None,
                children=data.children.get(model.id, []),
                incomplete=data.incomplete.get(model.id, []),
                **ctx,
            ),
        )


def _method_plot(data: SiteData, mi: MethodInfo) -> str | None:
    """Robust accuracy against sparsity, one series per (protocol, architecture) with its dense parents under the
    same protocol: points from different protocols are never joined by a line. A setting pruned with several seeds
    is one point: the mean over its seeds with a min–max bar."""
    if not mi.entries:
        return None
    groups: dict[tuple[str, str], dict[int, Entry]] = defaultdict(dict)
    for e in mi.entries:
        if not is_ranked(e.model):
            continue
        key = (e.ev.protocol_hash, e.model.arch)
        groups[key][e.model.id] = e
        parent = data.by_id.get(e.model.parent_id) if e.model.parent_id else None
        if parent is not None:
            pe = data.entry(parent.id, e.ev.protocol_hash)
            if pe is not None and is_ranked(parent):
                groups[key].setdefault(parent.id, pe)
    if not groups:
        return None
    order = {p.hash: i for i, p in enumerate(data.protocols)}
    series = []
    for key in sorted(groups, key=lambda k: (order[k[0]], k[1])):
        protocol_hash, arch = key
        p = data.protocol_of[protocol_hash]
        points: list[tuple[float, int, float, float, float, int]] = []
        seen: set[int] = set()
        for e in sorted(groups[key].values(), key=lambda e: (e.model.measured_sparsity, e.model.id)):
            across = e.setting.summary.get("autoattack") if e.setting else None
            if across is None:
                low, high = e.interval(e.ev.aa_robust_accuracy)
                robust = e.ev.aa_robust_accuracy or 0.0
                points.append((e.model.measured_sparsity, e.model.id, robust, low, high, 1))
            elif id(e.setting) not in seen:
                seen.add(id(e.setting))
                first = min(x.model.id for x in e.setting.entries)
                points.append((e.setting.sparsity, first, across.mean, across.min, across.max, across.n))
        points.sort()
        series.append(
            plots.Series(
                label=f"{arch} · {p.dataset} · {p.threat} · AA {p.spec.get('version', '?')} · N = {p.n}{p.fmn_note}",
                sparsity=[pt[0] for pt in points],
                robust=[pt[2] for pt in points],
                low=[pt[3] for pt in points],
                high=[pt[4] for pt in points],
                replicates=[pt[5] for pt in points],
            )
        )
    return plots.sparsity_svg(series, ylabel="AutoAttack robust accuracy (%)")


def _papers(methods: list[MethodInfo]) -> list[dict[str, Any]]:
    papers = []
    seen = set()
    for mi in methods:
        if not mi.paper_title:
            continue
        key = mi.ap_key.split("_", 1)[-1] if mi.ap_key else safe_slug(mi.key)
        if key in seen:
            continue
        seen.add(key)
        papers.append(
            {
                "key": key,
                "kind": "inproceedings",
                "title": mi.paper_title,
                "author": mi.authors,
                "venue": mi.venue,
                "year": mi.year,
                "url": mi.paper_url,
                "method": mi,
            }
        )
    return papers + [p for p in PROTOCOL_PAPERS if p["key"] not in seen]
