"""Stability of every method's digits-track schedule across pruning seeds: clean, PGD-20 and AutoAttack-plus.

For every registered method (or those given with --methods), every sparsity (structured pruning at its own
levels) and every pruning seed, prune the digits track's dense model with the method's digits-track schedule
exactly as ``bench prune`` does, then measure on all 360 test digits:

- clean accuracy;
- PGD-20 robust accuracy: L∞ ε of the track (0.2), step 0.05, uniform random start, the attack seeded with 0 so
  that rows differ only by their pruning seed;
- AutoAttack-plus robust accuracy (pyautoattack's ``plus`` preset, seed 0, driven stage by stage by
  :func:`bench.attacks.autoattack.run_autoattack`), for pruning seed 0 only (--no-autoattack skips it).

A row (method × sparsity) COLLAPSES when any seed's PGD-20 accuracy is below half of the row's median; it is
"within 10" when every seed is within 10 points of the median. The acceptance checked at the end: HYDRA at
0.95 within 10, and no row collapsing except structured pruning (which fine-tunes on clean data, so its robust
accuracy is reported but not held to this).

Every (method, sparsity, seed) result is cached as JSON (with the pruned state dict next to it) under
``$BENCH_CACHE_DIR/track_stability/``, keyed by the track's recipe key, the dense checkpoint's sha256, the
method's resolved config, the evaluation settings and a hash of the method's source files, so an interrupted
run resumes and a code or schedule change recomputes only what it affects. The final table is written as
JSON (with provenance: git commit, torch version, CPU, date, command line) and as markdown next to it.

Usage::

    python benchmarks/track_stability.py                          # everything (hours on one core)
    python benchmarks/track_stability.py --methods hydra --sparsities 0.95 --seeds 0 1 2 3 4
    python benchmarks/track_stability.py --no-autoattack --workers 2
    python benchmarks/track_stability.py --methods hydra --sparsities 0.95 --set random_start=false \
        --no-autoattack --out /tmp/hydra-paper-start.json     # a schedule variant, written elsewhere

Prints the table; exits 1 when the acceptance above fails (--no-check to always exit 0).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

DEFAULT_SPARSITIES = (0.5, 0.9, 0.95, 0.99)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_OUT = REPO / "docs" / "figures" / "track_stability.json"
# Evaluation settings; part of every cache key.
PGD = {"steps": 20, "step_size": 0.05, "random_start": True, "attack_seed": 0}
AA = {"version": "plus", "seed": 0}
COLLAPSE_FRACTION = 0.5
SPREAD_POINTS = 10.0
# A row whose median clean accuracy is below this multiple of chance barely classifies at all: marked, so that its
# robust figures (near the floor) are not read as a working schedule's.
NEAR_CHANCE_MULTIPLE = 3
# Structured pruning fine-tunes on clean data only: reported, not held to the collapse criterion.
NOT_HELD = frozenset({"structured"})
# The row whose per-seed spread the acceptance checks explicitly (issue: HYDRA 95 % collapsed on most seeds).
SPREAD_CHECKED = (("hydra", 0.95),)
# Packages whose source decides a result (see code_hash).
PROJECT_PACKAGES = ("methods", "bench")


@dataclass(frozen=True)
class Job:
    method: str
    sparsity: float
    seed: int
    autoattack: bool
    overrides: tuple[tuple[str, object], ...] = ()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_modules(method_key: str) -> list:
    """The project modules a method's result depends on: its adapter module, every ``methods`` module it reaches
    through module-level names (functions, classes, modules), and the ``bench`` modules those name directly."""
    from methods.base import get_method

    stack = [sys.modules[type(get_method(method_key)).__module__]]
    seen = {}
    while stack:
        module = stack.pop()
        if module.__name__ in seen:
            continue
        seen[module.__name__] = module
        if module.__name__.split(".")[0] != "methods":
            continue  # a bench module is hashed, not followed: the track's data and models have their own keys
        for value in vars(module).values():
            name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            if isinstance(name, str) and name.split(".")[0] in PROJECT_PACKAGES and name in sys.modules:
                stack.append(sys.modules[name])
    return [seen[name] for name in sorted(seen)]


_CODE_HASHES: dict[str, str] = {}


def code_hash(method_key: str) -> str:
    """Hash of :func:`source_modules`' files: a change there recomputes the method's entries (moves do not).

    Read once per process for every registered method together, right after the imports, so that files moved or
    edited while a long run goes on neither break it nor mislabel it: the run keys by the code it imported.
    """
    if not _CODE_HASHES:
        from methods.base import list_methods

        _CODE_HASHES.update({key: _hash_sources(key) for key in list_methods()})
    return _CODE_HASHES[method_key]


def _hash_sources(method_key: str) -> str:
    h = hashlib.sha256()
    for module in source_modules(method_key):
        path = getattr(module, "__file__", None)
        if path:
            h.update(module.__name__.encode())
            h.update(Path(path).read_bytes())
    return h.hexdigest()


def job_key(job: Job, *, track_key: str, dense_sha: str, config: dict, code: str) -> str:
    payload = {
        "track": track_key,
        "dense_sha256": dense_sha,
        "method": job.method,
        "sparsity": job.sparsity,
        "seed": job.seed,
        "config": config,
        "code": code,
        "pgd": PGD,
    }
    return _sha256(json.dumps(payload, sort_keys=True, default=str).encode())


def cache_root() -> Path:
    from bench.paths import cache_dir

    return cache_dir() / "track_stability"


def _entry_paths(job: Job, key: str, root: Path) -> tuple[Path, Path]:
    stem = f"{job.method}-{job.sparsity:g}-seed{job.seed}-{key[:16]}"
    return root / f"{stem}.json", root / f"{stem}.pt"


def _pgd20(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    from bench.training import pgd_linf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PGD["attack_seed"])
        x_adv = pgd_linf(
            model, x, y, eps=eps, steps=PGD["steps"], step_size=PGD["step_size"], random_start=PGD["random_start"]
        )
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def run_job(job: Job, root: str) -> dict:
    """Prune (or load the cached pruned model), evaluate, write the entry; returns it. Runs in a worker."""
    torch.set_num_threads(1)
    from bench.attacks.autoattack import run_autoattack
    from bench.checkpoints import load_checkpoint_model, sha256_file
    from bench.data import load_split
    from bench.paths import atomic_write
    from bench.provenance import environment
    from bench.sparsity import measure_sparsity
    from bench.track import TRACKS, dense_checkpoint
    from methods.base import PruneData, config_dict, get_method

    track = TRACKS["digits"]
    eps = track.training.eps
    dense_path, _ = dense_checkpoint(track)
    dense_sha = sha256_file(dense_path)
    method = get_method(job.method)
    cfg = method.digits_config(**dict(job.overrides))
    cfg_dict = config_dict(cfg)
    code = code_hash(job.method)
    key = job_key(job, track_key=track.key, dense_sha=dense_sha, config=cfg_dict, code=code)
    json_path, pt_path = _entry_paths(job, key, Path(root))
    entry = json.loads(json_path.read_text()) if json_path.exists() and pt_path.exists() else None
    x_test, y_test = load_split(track.dataset, "test")

    model = load_checkpoint_model(dense_path, track.arch, track.dataset)
    if entry is None:
        # The same steps as methods.pipeline.prune_checkpoint (bench prune), without a store.
        model.train()
        x, y = load_split(track.dataset, "train")
        torch.manual_seed(job.seed)
        start = time.perf_counter()
        result = method.prune(model, job.sparsity, PruneData(x, y, eps=eps), cfg, seed=job.seed)
        wall = time.perf_counter() - start
        pruned = result.model.eval()
        atomic_write(pt_path, lambda f: torch.save(pruned.state_dict(), f))
        with torch.no_grad():
            clean = pruned(x_test).argmax(1) == y_test
        robust = _pgd20(pruned, x_test, y_test, eps)
        last = {row.get("phase", ""): row for row in result.history}
        entry = {
            "method": job.method,
            "sparsity": job.sparsity,
            "seed": job.seed,
            "key": key,
            "config": cfg_dict,
            "code_sha256": code,
            "track_key": track.key,
            "dense_sha256": dense_sha,
            "pruned_sha256": sha256_file(pt_path),
            "measured_sparsity": measure_sparsity(pruned).sparsity,
            "native_sparsity": result.native_sparsity,
            "prune_wall_seconds": wall,
            "final_history": list(last.values()),
            "n": len(y_test),
            "clean_accuracy": clean.float().mean().item(),
            "pgd20_accuracy": robust.float().mean().item(),
            "pgd": PGD,
            "environment": environment("cpu"),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    else:
        pruned = model
        pruned.load_state_dict(torch.load(pt_path, map_location="cpu", weights_only=True))
        pruned.eval()
    if job.autoattack and "autoattack_plus" not in entry:
        start = time.perf_counter()
        out = run_autoattack(pruned, x_test, y_test, norm="Linf", eps=eps, version=AA["version"], seed=AA["seed"])
        with torch.no_grad():
            correct = pruned(x_test).argmax(1) == y_test
        entry["autoattack_plus"] = {
            **AA,
            # As the evaluator does: robust only if our own clean pass also classified the sample correctly.
            "robust_accuracy": (out.robust & correct).float().mean().item(),
            "flags": sorted(out.flags),
            "seconds": out.seconds,
            "wall_seconds": time.perf_counter() - start,
            "environment": environment("cpu"),
        }
    atomic_write(json_path, lambda f: f.write(json.dumps(entry, indent=1, default=str).encode()))
    return entry


def levels_for(method, requested: list[float] | None) -> list[float]:
    """The sparsities a method runs at: its own grid for grid-bound (structured) methods."""
    if method.sparsities:
        if requested is None:
            return list(method.sparsities)
        return [s for s in requested if any(abs(s - own) < 1e-9 for own in method.sparsities)]
    return list(requested if requested is not None else DEFAULT_SPARSITIES)


def summarise(entries: list[dict], num_classes: int = 10) -> list[dict]:
    """One row per (method, sparsity): median and range over seeds, the collapse and spread verdicts."""
    rows: dict[tuple[str, float], list[dict]] = {}
    for e in entries:
        rows.setdefault((e["method"], e["sparsity"]), []).append(e)
    out = []
    for (method, sparsity), group in rows.items():
        group.sort(key=lambda e: e["seed"])
        clean = [e["clean_accuracy"] for e in group]
        pgd = [e["pgd20_accuracy"] for e in group]
        median = statistics.median(pgd)
        collapsed = [e["seed"] for e in group if e["pgd20_accuracy"] < COLLAPSE_FRACTION * median]
        spread = max(abs(p - median) for p in pgd) * 100
        aa = next((e["autoattack_plus"] for e in group if e["seed"] == 0 and "autoattack_plus" in e), None)
        out.append(
            {
                "method": method,
                "sparsity": sparsity,
                "seeds": [e["seed"] for e in group],
                "measured_sparsity": statistics.median(e["measured_sparsity"] for e in group),
                "clean": {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "per_seed": clean},
                "pgd20": {"median": median, "min": min(pgd), "max": max(pgd), "per_seed": pgd},
                "autoattack_plus_seed0": None if aa is None else aa["robust_accuracy"],
                "autoattack_flags_seed0": None if aa is None else aa["flags"],
                "collapsed_seeds": collapsed,
                "collapse": bool(collapsed),
                "max_distance_from_median_points": spread,
                "within_10_points": spread <= SPREAD_POINTS,
                "held_to_collapse_criterion": method not in NOT_HELD,
                "near_chance": statistics.median(clean) < NEAR_CHANCE_MULTIPLE / num_classes,
            }
        )
    return out


def acceptance(rows: list[dict]) -> dict:
    checks = []
    for method, sparsity in SPREAD_CHECKED:
        row = next((r for r in rows if r["method"] == method and abs(r["sparsity"] - sparsity) < 1e-9), None)
        if row is not None:
            checks.append(
                {
                    "check": f"{method} {sparsity:g}: every seed's PGD-20 within {SPREAD_POINTS:g} points of the "
                    "median",
                    "passed": row["within_10_points"],
                }
            )
    bad = [f"{r['method']} {r['sparsity']:g}" for r in rows if r["collapse"] and r["held_to_collapse_criterion"]]
    checks.append(
        {
            "check": "no method/sparsity/seed below half of its row's PGD-20 median (structured pruning not held)",
            "passed": not bad,
            "failing_rows": bad,
        }
    )
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def _pct(v: float | None) -> str:
    from bench.analysis.format import percent

    return percent(v, 1, unit="")


def _range(stat: dict) -> str:
    return f"{_pct(stat['median'])} [{_pct(stat['min'])}–{_pct(stat['max'])}]"


def _verdict(row: dict) -> str:
    parts = []
    if row["collapse"]:
        seeds = ", ".join(str(s) for s in row["collapsed_seeds"])
        parts.append(f"COLLAPSE (seed {seeds})" + ("" if row["held_to_collapse_criterion"] else ", not held"))
    parts.append("within 10" if row["within_10_points"] else f"spread {row['max_distance_from_median_points']:.1f}")
    if row.get("near_chance"):
        parts.append("near chance")
    return "; ".join(parts)


HEADER = (
    "method",
    "sparsity",
    "zero weights",
    "seeds",
    "clean % median [min–max]",
    "PGD-20 % median [min–max]",
    "AA-plus % (seed 0)",
    "verdict",
)


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    return [
        (
            r["method"],
            f"{r['sparsity']:g}",
            f"{r['measured_sparsity']:.4f}",
            str(len(r["seeds"])),
            _range(r["clean"]),
            _range(r["pgd20"]),
            _pct(r["autoattack_plus_seed0"]),
            _verdict(r),
        )
        for r in rows
    ]


def text_table(rows: list[dict]) -> str:
    body = [HEADER, *table_rows(rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in body)


def markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [
        "# Digits-track stability across pruning seeds",
        "",
        f"Generated by `{prov['command']}` on {prov['date']} (git {prov['git_commit']}, torch {prov['torch']}, "
        f"{prov['cpu']['model']}, one torch thread per process). Do not edit by hand.",
        "",
        f"All {result['settings']['n_test']} test digits; ε = {result['settings']['eps']:g} (L∞). PGD-20: step "
        f"{PGD['step_size']:g}, uniform random start in the ε-ball clipped to [0, 1], attack seed "
        f"{PGD['attack_seed']}. That start leaves most blank pixels (exactly 0) where a very sparse net's "
        "first-layer units are all off and the input gradient is 0, so PGD-20 can overstate robustness; it is "
        "cheap enough for every seed, so the collapse criterion uses it, but methods compare by AutoAttack-plus "
        "(its Square stage needs no gradient). AutoAttack-plus: pruning "
        f"seed 0 only. A row COLLAPSES when a seed's PGD-20 accuracy is below {COLLAPSE_FRACTION:g} × the row's "
        f'median; "within 10" means every seed is within {SPREAD_POINTS:g} points of it. Structured pruning '
        'fine-tunes on clean data and is reported, not held to the collapse criterion. "near chance": median '
        f"clean accuracy below {NEAR_CHANCE_MULTIPLE}× chance; such a model barely classifies, and its robust "
        "accuracy sits near the floor.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(result["rows"])),
        "",
        "Dense parent: clean {}, PGD-20 {}{}.".format(
            _pct(result["dense"]["clean_accuracy"]),
            _pct(result["dense"]["pgd20_accuracy"]),
            ""
            if result["dense"].get("autoattack_plus") is None
            else f", AutoAttack-plus {_pct(result['dense']['autoattack_plus'])}",
        ),
        "",
        "Acceptance: " + ("passed" if result["acceptance"]["passed"] else "FAILED"),
        *(
            f"- {'pass' if c['passed'] else 'FAIL'}: {c['check']}"
            + (f" (failing: {', '.join(c['failing_rows'])})" if c.get("failing_rows") else "")
            for c in result["acceptance"]["checks"]
        ),
        "",
    ]
    return "\n".join(lines)


def dense_figures(autoattack: bool, root: Path) -> dict:
    """Clean / PGD-20 (and AutoAttack-plus) of the dense parent, cached like the entries."""
    from bench.attacks.autoattack import run_autoattack
    from bench.checkpoints import load_checkpoint_model, sha256_file
    from bench.data import load_split
    from bench.paths import atomic_write
    from bench.track import TRACKS, dense_checkpoint

    track = TRACKS["digits"]
    dense_path, _ = dense_checkpoint(track)
    sha = sha256_file(dense_path)
    path = root / f"dense-{_sha256(json.dumps([sha, PGD, AA], sort_keys=True).encode())[:16]}.json"
    record = json.loads(path.read_text()) if path.exists() else {"dense_sha256": sha, "track_key": track.key}
    model = load_checkpoint_model(dense_path, track.arch, track.dataset).eval()
    x, y = load_split(track.dataset, "test")
    if "pgd20_accuracy" not in record:
        with torch.no_grad():
            record["clean_accuracy"] = (model(x).argmax(1) == y).float().mean().item()
        record["pgd20_accuracy"] = _pgd20(model, x, y, track.training.eps).float().mean().item()
    if autoattack and "autoattack_plus" not in record:
        out = run_autoattack(model, x, y, norm="Linf", eps=track.training.eps, version=AA["version"], seed=AA["seed"])
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        record["autoattack_plus"] = (out.robust & correct).float().mean().item()
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None, help="registered method keys [default: all]")
    parser.add_argument(
        "--sparsities",
        nargs="*",
        type=float,
        default=None,
        help=f"canonical sparsities [default: {' '.join(map(str, DEFAULT_SPARSITIES))}; "
        "grid-bound methods keep only their own levels]",
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=list(DEFAULT_SEEDS), help="pruning seeds")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="override a digits-config field of every selected method (VALUE parsed as JSON if it can be)",
    )
    parser.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack-plus (seed 0)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="JSON output; the markdown goes next to it with the .md suffix"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder [default: $BENCH_CACHE_DIR/track_stability]"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes, one torch thread each")
    parser.add_argument("--no-check", action="store_true", help="exit 0 even when the acceptance fails")
    args = parser.parse_args(argv)
    command_args = list(argv if argv is not None else sys.argv[1:])
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    if args.out.suffix != ".json":
        parser.error(f"--out must name a .json file, got {args.out}")
    overrides = parse_overrides(args.set, parser)
    if overrides and args.out == DEFAULT_OUT:
        parser.error("--set runs a schedule variant: give --out so that the published table is not overwritten")
    torch.set_num_threads(1)

    from bench.provenance import cpu_info, git_commit
    from bench.track import TRACKS, dense_checkpoint
    from methods.base import get_method, list_methods

    keys = args.methods or list_methods()
    known = set(list_methods())
    unknown = [k for k in keys if k not in known]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(known))}")
    for key in keys:
        try:
            get_method(key).digits_config(**overrides)
        except (TypeError, ValueError) as err:
            parser.error(f"--set: {err}")
    root = args.cache or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dense_checkpoint(TRACKS["digits"], log=print)  # train once here, not in every worker

    jobs = [
        Job(key, sparsity, seed, autoattack=not args.no_autoattack and seed == 0, overrides=tuple(overrides.items()))
        for key in keys
        for sparsity in levels_for(get_method(key), args.sparsities)
        for seed in args.seeds
    ]
    skipped = [k for k in keys if not levels_for(get_method(k), args.sparsities)]
    if skipped:
        print(f"skipped (no requested sparsity is one of their levels): {', '.join(skipped)}")
    print(f"{len(jobs)} runs, {args.workers} worker(s), cache {root}", flush=True)
    entries = []
    started = time.perf_counter()
    ctx = get_context("spawn")  # no fork after torch has started its thread pools
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = [(job, pool.submit(run_job, job, str(root))) for job in jobs]
        for i, (job, future) in enumerate(futures, 1):
            entry = future.result()
            entries.append(entry)
            aa = entry.get("autoattack_plus", {}).get("robust_accuracy")
            print(
                f"[{i}/{len(jobs)} {time.perf_counter() - started:7.0f} s] "
                f"{job.method} {job.sparsity:g} seed {job.seed}: "
                f"clean {_pct(entry['clean_accuracy'])}, PGD-20 {_pct(entry['pgd20_accuracy'])}"
                + ("" if aa is None else f", AA-plus {_pct(aa)}"),
                flush=True,
            )
    dense = dense_figures(not args.no_autoattack, root)
    from bench.data import get_dataset_info

    rows = summarise(entries, num_classes=get_dataset_info(TRACKS["digits"].dataset).num_classes)
    track = TRACKS["digits"]
    result = {
        "rows": rows,
        "acceptance": acceptance(rows),
        "dense": dense,
        "settings": {
            "track": track.name,
            "track_key": track.key,
            "eps": track.training.eps,
            "n_test": entries[0]["n"] if entries else None,
            "pgd": PGD,
            "autoattack": None if args.no_autoattack else AA,
            "collapse_fraction_of_median": COLLAPSE_FRACTION,
            "spread_points": SPREAD_POINTS,
            "methods": keys,
            "seeds": args.seeds,
            "overrides": overrides,
            "configs": {k: entries_config(entries, k) for k in keys},
        },
        "provenance": {
            "git_commit": git_commit(),
            "entry_commits": sorted({str(e["environment"].get("git_commit")) for e in entries}),
            "torch": torch.__version__,
            "cpu": cpu_info(),
            "torch_threads_per_process": 1,
            "workers": args.workers,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/track_stability.py", *command_args]),
            "wall_seconds": time.perf_counter() - started,
        },
        "entries": [
            {k: v for k, v in e.items() if k != "environment"} | {"git_commit": e["environment"].get("git_commit")}
            for e in entries
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print()
    print(text_table(rows))
    print()
    for check in result["acceptance"]["checks"]:
        print(f"{'pass' if check['passed'] else 'FAIL'}: {check['check']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0 if result["acceptance"]["passed"] or args.no_check else 1


def parse_overrides(items: list[str], parser: argparse.ArgumentParser) -> dict[str, object]:
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            parser.error(f"--set takes NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def entries_config(entries: list[dict], key: str) -> dict | None:
    return next((e["config"] for e in entries if e["method"] == key), None)


if __name__ == "__main__":
    sys.exit(main())
