"""Overhead of ``bench evaluate``'s AutoAttack stage against a bare ``pyautoattack`` run, same model and samples.

Three timings on the first N samples of the test split, all with the same seed and the same chunks
(``RunSpec.chunks()``: consecutive slices of ``--batch-size``; by default one chunk of N):

(a) ours: ``bench.attacks.autoattack.run_autoattack`` on each chunk, stage by stage, with the sanity checks
    on every chunk (as a bare call per chunk does; the evaluator runs them on the first chunk only);
(b) bare: ``pyautoattack.AutoAttack(model, norm, eps, version, seed).run_standard_evaluation(x, y,
    batch_size=len(chunk))`` on each chunk, a fresh ``AutoAttack`` per chunk (as ours builds one per chunk);
(c) the whole evaluator, ``bench.evaluate.evaluate`` into a temporary SQLite store: clean pass, AutoAttack,
    FMN and the per-chunk commits; its stored per-stage seconds split the total, and "other" is the rest
    (the sanity checks, AutoAttack's own clean pass, database work and bookkeeping).

The per-sample robust flags of (a) and of the rows (c) stored must equal the bare run's ``y_adv == y``; the
mismatch counts are printed (expected 0). With ``--repeats`` > 1 the order of (a) and (b) alternates and
medians are reported. The default model is the digits track's dense PGD-trained ``small_cnn``
(trained once, about 1-2 minutes, then cached under ``$BENCH_CACHE_DIR`` or ``~/.cache/apbench``).

The default N is 40, lowered from 120: each of the three AutoAttack-plus runs costs about 1.6 s per robust
sample on the digits model with one thread (FAB and Square dominate), so N = 120 (83 robust) took 6 CPU
minutes (10 wall-clock minutes on a busy shared 2-core machine) and N = 40 (33 robust) about 3 minutes.
Timings vary by about ±10 % from run to run on such a machine: use ``--repeats 3`` for an overhead figure;
the equal forward-call counts printed are the noise-free evidence that both sides do the same work.

Usage::

    python benchmarks/evaluator_overhead.py --n 120 --version plus --seed 0 --threads 1
    python benchmarks/evaluator_overhead.py --checkpoint model.pt --arch small_cnn --dataset digits

Prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from sqlalchemy import select

from bench.attacks.autoattack import WarningCollector, run_autoattack
from bench.checkpoints import load_checkpoint_model
from bench.data import get_dataset_info, load_split, parse_eps
from bench.evaluate import evaluate
from bench.paths import cache_dir
from bench.spec import RunSpec
from bench.store import Evaluation, SampleResult, Store
from bench.store.registration import register_model
from bench.track import TRACKS, dense_checkpoint


def run_ours(model, x, y, spec: RunSpec) -> tuple[float, torch.Tensor, dict[str, float]]:
    """Our AutoAttack stage over the evaluator's chunks: (wall seconds, robust flags, stage seconds)."""
    robust, stages = [], {}
    start = time.perf_counter()
    for chunk in spec.chunks():
        out = run_autoattack(
            model,
            x[chunk.start : chunk.stop],
            y[chunk.start : chunk.stop],
            norm=spec.norm,
            eps=spec.eps_value,
            version=spec.version,
            seed=spec.seed,
            device=spec.device,
            run_checks=True,
        )
        robust.append(out.robust)
        for k, v in out.seconds.items():
            stages[k] = stages.get(k, 0.0) + v
    return time.perf_counter() - start, torch.cat(robust), stages


def run_bare(model, x, y, spec: RunSpec) -> tuple[float, torch.Tensor, list[str]]:
    """Bare pyautoattack, one ``run_standard_evaluation`` per chunk: (wall seconds, robust flags, warnings)."""
    from pyautoattack import AutoAttack

    collector = WarningCollector()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(collector)
    robust = []
    try:
        start = time.perf_counter()
        for chunk in spec.chunks():
            xc, yc = x[chunk.start : chunk.stop], y[chunk.start : chunk.stop]
            # Every attack reseeds the global RNG (protocol section 8); keep the caller's state.
            with torch.random.fork_rng(devices=[]):
                aa = AutoAttack(model, norm=spec.norm, eps=spec.eps_value, version=spec.version, seed=spec.seed)
                aa.verbose = False
                _, y_adv = aa.run_standard_evaluation(xc, yc, batch_size=len(yc))
            robust.append((y_adv == yc).cpu())
        seconds = time.perf_counter() - start
    finally:
        aa_logger.removeHandler(collector)
    return seconds, torch.cat(robust), collector.messages


def run_evaluator(model, path: Path, arch: str, x, y, spec: RunSpec) -> dict:
    """The full evaluator into a fresh temporary store; returns its timings and stored robust flags."""
    with tempfile.TemporaryDirectory(prefix="apbench-overhead-") as tmp:
        start = time.perf_counter()
        store = Store(str(Path(tmp) / "bench.db"))
        row = register_model(store, path, model, arch=arch, dataset=spec.dataset, name="overhead")
        setup = time.perf_counter() - start
        start = time.perf_counter()
        summary = evaluate(store, row.id, model, x, y, spec, progress=False)
        total = time.perf_counter() - start
        with store.session() as s:
            rows = s.scalars(select(SampleResult).where(SampleResult.evaluation_id == summary.evaluation_id))
            robust = {r.sample_id: r.aa_robust for r in rows}
            seconds = dict(s.get(Evaluation, summary.evaluation_id).attack_seconds)
        store.dispose()
    flags = torch.tensor([robust[i] for i in range(spec.n_samples)])
    return {"setup": setup, "total": total, "seconds": seconds, "robust": flags, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40, help="first N test samples")
    parser.add_argument("--batch-size", type=int, default=None, help="chunk size (default: N, one chunk)")
    parser.add_argument("--version", choices=["plus", "standard"], default="plus", help="AutoAttack version")
    parser.add_argument("--norm", choices=["Linf", "L2"], default="Linf")
    parser.add_argument("--eps", default=None, help="budget, e.g. 0.2 or 8/255 (default: the dataset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the digits track's dense model")
    parser.add_argument("--arch", default=None, help="with --checkpoint")
    parser.add_argument("--dataset", default=None, help="with --checkpoint")
    parser.add_argument("--fmn-steps", type=int, default=100, help="FMN iterations in the evaluator run")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; ours/bare alternate; medians")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("auto-attack").propagate = False  # quiet; warnings are collected and counted
    if args.checkpoint is None:
        if args.arch or args.dataset:
            parser.error("--arch/--dataset need --checkpoint")
        track = TRACKS["digits"]
        path, _ = dense_checkpoint(track, log=lambda msg: print(f"[training] {msg}", flush=True))
        arch, dataset = track.arch, track.dataset
    else:
        if not (args.arch and args.dataset):
            parser.error("--checkpoint needs --arch and --dataset")
        path, arch, dataset = args.checkpoint, args.arch, args.dataset
    model = load_checkpoint_model(path, arch, dataset)
    info = get_dataset_info(dataset)
    eps = args.eps or (info.default_eps if args.norm == "Linf" else "0.5")
    x_all, y_all = load_split(dataset, "test")
    spec = RunSpec(
        dataset=dataset,
        n_samples=args.n,
        norm=args.norm,
        eps=eps,
        eps_value=parse_eps(eps),
        version=args.version,
        fmn_steps=args.fmn_steps,
        batch_size=args.batch_size or args.n,
        seed=args.seed,
    )
    x, y = x_all[: args.n], y_all[: args.n]

    # Untimed warm-up (first-call allocations, lazy init) so the first timed run is not penalised.
    xw = x[:8].clone().requires_grad_(True)
    model(xw).sum().backward()

    ours_t, bare_t, eval_runs = [], [], []
    ours_robust = bare_robust = None
    ours_stages: dict[str, float] = {}
    bare_warnings: list[str] = []
    # Count the model's forward calls: equal counts mean equal work, whatever the timing noise.
    forwards = {"n": 0}
    model.register_forward_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    counts: dict[str, int] = {}
    for r in range(args.repeats):
        order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
        for which in order:
            forwards["n"] = 0
            if which == "ours":
                t, ours_robust, ours_stages = run_ours(model, x, y, spec)
                ours_t.append(t)
            else:
                t, bare_robust, bare_warnings = run_bare(model, x, y, spec)
                bare_t.append(t)
            counts[which] = forwards["n"]
        forwards["n"] = 0
        eval_runs.append(run_evaluator(model, path, arch, x, y, spec))
        counts["evaluator"] = forwards["n"]

    med = statistics.median
    t_ours, t_bare = med(ours_t), med(bare_t)
    ev_total = med(e["total"] for e in eval_runs)
    ev = min(eval_runs, key=lambda e: abs(e["total"] - ev_total))  # the median run's split
    sec = ev["seconds"]
    ev_clean = sec.get("clean", 0.0)
    ev_fmn = sec.get("fmn", 0.0)
    ev_aa = sum(sec.get(a, 0.0) for a in spec.attacks)
    ev_other = ev["total"] - ev_clean - ev_fmn - ev_aa
    n = args.n
    mismatch_ours = int((ours_robust != bare_robust).sum())
    mismatch_eval = int((ev["robust"] != bare_robust).sum())
    clean_acc = ev["summary"].clean_accuracy

    print(
        f"machine: torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(
        f"model: {arch} on {dataset} ({path if args.checkpoint else f'digits track, {cache_dir()}'})\n"
        f"run: AutoAttack-{spec.version} {spec.norm} eps={spec.eps}, N={n}, chunks of {spec.batch_size} "
        f"({len(spec.chunks())}), seed {spec.seed}, repeats {args.repeats}" + (" (medians)" if args.repeats > 1 else "")
    )
    print(f"clean accuracy              {clean_acc:8.2%}")
    print(f"robust accuracy ours        {float(ours_robust.float().mean()):8.2%}  ({int(ours_robust.sum())}/{n})")
    print(f"robust accuracy bare        {float(bare_robust.float().mean()):8.2%}  ({int(bare_robust.sum())}/{n})")
    print(f"robust flag mismatches      {mismatch_ours:8d}  (ours vs bare; evaluator rows vs bare: {mismatch_eval})")
    print(f"time ours AA stage          {t_ours:8.2f} s  (stages {sum(ours_stages.values()):.2f} s)")
    print(f"time bare pyautoattack      {t_bare:8.2f} s")
    print(
        f"model forward calls         ours {counts['ours']}, bare {counts['bare']}, "
        f"evaluator {counts['evaluator']} (with clean pass and FMN)"
    )
    print(f"overhead ratio              {t_ours / t_bare:8.3f}  (ours / bare)")
    if args.repeats > 1:
        print(f"  all ours                 {', '.join(f'{t:.2f}' for t in ours_t)} s")
        print(f"  all bare                 {', '.join(f'{t:.2f}' for t in bare_t)} s")
        eval_aa = [sum(e["seconds"].get(a, 0.0) for a in spec.attacks) for e in eval_runs]
        print(f"  all evaluator AA stages  {', '.join(f'{t:.2f}' for t in eval_aa)} s")
    print(f"evaluator total             {ev_total:8.2f} s  (+ {ev['setup']:.2f} s store open and register)")
    print(f"  clean pass                {ev_clean:8.2f} s")
    print(f"  AutoAttack stages         {ev_aa:8.2f} s  (ratio to bare {ev_aa / t_bare:.3f})")
    for a in spec.attacks:
        print(f"    {a:<10} ours {ours_stages.get(a, 0.0):7.2f} s   evaluator {sec.get(a, 0.0):7.2f} s")
    print(f"  FMN ({spec.fmn_steps} steps)           {ev_fmn:8.2f} s")
    print(f"  other                     {ev_other:8.2f} s  (checks, AA clean pass, database, bookkeeping)")
    if bare_warnings:
        print(f"bare pyautoattack warnings: {len(bare_warnings)}: {bare_warnings[0][:100]}")
    if ev["summary"].flags:
        print(f"evaluator flags: {', '.join(ev['summary'].flags)}")


if __name__ == "__main__":
    main()
