"""Wall time of each method's pruning on the digits track, and optionally of the whole demo.

For every registered method (or those given with --methods): prune the track's dense model (trained once and
cached) at --sparsity with the method's digits-track schedule, one torch thread, and print the wall time and
the measured sparsity. With --demo, also time ``bench evaluate --method hydra --sparsity 0.95`` end to end in a
temporary store and cache (dense training included, as on a fresh machine).

Usage::

    python benchmarks/pruning_times.py                      # every method at 0.9 (structured at 0.75)
    python benchmarks/pruning_times.py --methods hydra mad --sparsity 0.95
    python benchmarks/pruning_times.py --demo

Prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo", action="store_true", help="also time the demo end to end (several minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from bench.checkpoints import load_checkpoint_model
    from bench.store import Store
    from bench.store.registration import register_model
    from bench.track import TRACKS, dense_checkpoint
    from methods.base import get_method, list_methods
    from methods.pipeline import prune_checkpoint

    track = TRACKS["digits"]
    dense_path, record = dense_checkpoint(track, log=print)
    keys = args.methods or list_methods()
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs; digits track, seed {args.seed}")
    print(f"{'method':<12}{'sparsity':>9}{'measured':>10}{'prune s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'r.db'}")
        dense = load_checkpoint_model(dense_path, track.arch, track.dataset)
        dense_row = register_model(store, dense_path, dense, arch=track.arch, dataset=track.dataset)
        for key in keys:
            method = get_method(key)
            sparsity = args.sparsity
            if method.sparsities and sparsity not in method.sparsities:
                sparsity = method.sparsities[len(method.sparsities) // 2]
            start = time.perf_counter()
            result = prune_checkpoint(
                store,
                key,
                sparsity,
                dense_path=dense_path,
                dense_row=dense_row,
                eps=track.training.eps,
                seed=args.seed,
                track=True,
                out_dir=Path(tmp) / key,
            )
            wall = time.perf_counter() - start
            print(f"{key:<12}{sparsity:>9.2f}{result.row.measured_sparsity:>10.4f}{wall:>9.1f}")
        store.dispose()
    if args.demo:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "BENCH_CACHE_DIR": str(Path(tmp) / "cache")}
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.cli",
                    "evaluate",
                    "--method",
                    "hydra",
                    "--sparsity",
                    "0.95",
                    "--db",
                    f"sqlite:///{Path(tmp) / 'demo.db'}",
                    "--no-progress",
                ],
                env=env,
                check=True,
            )
            print(f"demo (fresh cache and store, dense training included): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
