"""Time ``bench leaderboard build`` on a synthetic store of 100 models × 10 000 samples (the issue's target: < 30 s).

The store is filled by :func:`leaderboard.synthetic.fill_synthetic` (per architecture and seed a dense parent and
its pruned children, one complete CIFAR-10 L∞ 8/255 evaluation each, bulk inserts), then the real command runs
in a subprocess, so the figure includes Python start-up and imports (torch comes in with the method registry).
The site is built twice and the two folders compared byte for byte.

Usage::

    python benchmarks/leaderboard_build.py                      # 100 models x 10 000 samples
    python benchmarks/leaderboard_build.py --models 20 --samples 2000 --keep /tmp/site-bench

Prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.store import Store
from leaderboard.synthetic import fill_synthetic


def _bench_executable() -> list[str]:
    exe = Path(sys.executable).with_name("bench")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from bench.cli import main; main()"]


def build(db: str, out: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and its worker processes) of one build."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [*_bench_executable(), "leaderboard", "build", "--db", db, "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, default=None, help="Copy the built site here.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        db = f"sqlite:///{tmp / 'results.db'}"
        start = time.perf_counter()
        store = Store(db)
        fill_synthetic(store, args.models, args.samples)
        store.dispose()
        fill = time.perf_counter() - start
        size_db = (tmp / "results.db").stat().st_size
        first = build(db, tmp / "site1")
        second = build(db, tmp / "site2")
        files = [p for p in (tmp / "site1").rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        identical = same_tree(tmp / "site1", tmp / "site2")
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(tmp / "site1", args.keep)

    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"store: {args.models} models x {args.samples} samples, filled in {fill:.1f} s ({size_db / 1e6:.0f} MB)")
    load = os.getloadavg()[0]
    print(f"bench leaderboard build: {first[0]:.1f} s wall, {first[1]:.1f} s CPU (second build {second[0]:.1f} s wall)")
    print(f"load average while measuring: {load:.1f} (other processes on the machine slow the wall figure)")
    print(f"site: {len(files)} files, {size / 1e6:.1f} MB; two builds byte-identical: {identical}")


if __name__ == "__main__":
    main()
