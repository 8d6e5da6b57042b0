"""How close the attacks run to the machine's limit, per stage; and how one evaluation scales over worker processes.

**Stage mode** (default). The evaluator's own per-chunk work, ``bench.evaluate.attack_chunk`` (clean pass,
AutoAttack stage by stage, FMN, FMN from AutoAttack's adversarial examples), runs on N samples as one chunk, once
per model *variant*:

* ``plain``: the model as loaded, as the evaluator runs it without ``bench.performance.fast_model``;
* ``frozen``: ``fast_model(..., channels_last=False)``, parameters that collect no gradient;
* ``fast``: ``fast_model(...)``, frozen and, for convolution networks, channels_last.

A forward hook on the model counts the samples of every forward pass, and a hook on its output the samples of
every backward pass through it (FAB's untargeted step runs one backward per class). Per stage the script prints
forward and backward samples per second and the achieved FLOP/s: a forward pass costs 2 × the model's MACs
(``bench.sparsity.count_flops``, Conv2d and Linear layers), a backward pass to the input as much again (the
weight gradients a trainable model also builds are not counted: no attack uses them). The ceiling is the fastest
float32 matrix product measured on the same device and threads (``torch.mm`` and a 1x1 channels_last convolution,
which reach different libraries: :func:`matmul_ceiling`); "model alone" is the network's own forward +
input-gradient rate on a batch of N, the best any attack can do at that batch size. A 3x3 convolution that oneDNN
or cuDNN computes with Winograd's algorithm needs fewer multiplications than its MAC count, so a fraction of the
ceiling above 100 % is possible and means exactly that. Beside the evaluator's wall-clock stage times, the
process's CPU seconds per stage are kept: on a machine shared with other work they vary much less.

The first variant is the reference for the speed-ups and for the outcome check: robust flags, adversarial
predictions and FMN's success must be equal between variants, distances equal up to float rounding (the largest
difference is printed).

``--bare`` also runs pyautoattack's ``run_standard_evaluation`` on the plain model and the same inputs (its sanity
checks included, as a bare run does them), to compare with the evaluator's AutoAttack stages.

**Scale-out mode** (``--workers 1,2,4``, digits only). The whole evaluator, ``bench.evaluate.evaluate``, into a
fresh temporary SQLite store, once per worker count, chunks of ``--batch-size`` (default N/8). Per run: wall time,
speed-up and parallel efficiency against one worker (T1 / (k·Tk)), the attack seconds summed over chunks (as
stored), the store time (every ``store.session()`` block: queries, ORM work, commits; SQL execution alone timed by
SQLAlchemy cursor events), and the chunk overhead, the worker-seconds per chunk spent neither attacking nor in the
store (process start, model transfer, sanity checks, workers idle at the end). Rows must equal the one-worker run.

Models: ``digits``, the digits track's dense PGD-trained ``small_cnn`` (trained once, then cached); ``resnet18-test``,
pyautoattack's own CIFAR-shaped ResNet-18 (``pyautoattack/examples/resnet.py`` with ``model_test.pt``). There is
no CIFAR data here, so its inputs are made: uniform random images moved by signed gradient ascent on the model's
logit margin z_y − max_{j≠y} z_j for labels 0..9 in turn, each until its margin reaches a target spread evenly
over ``--margin``. The default, 5:40, was chosen so that about half of the inputs survive AutoAttack at 8/255,
the robust share of an adversarially trained CIFAR-10 model (the script prints the share it got).

Usage::

    python benchmarks/attack_throughput.py --model digits --n 40 --version plus --json out.json
    python benchmarks/attack_throughput.py --model resnet18-test --n 256 --version standard --device cuda --bare
    python benchmarks/attack_throughput.py --model digits --n 80 --workers 1,2,4 --version standard

Timings on a machine shared with other work vary widely; the pass counts do not. Prints figures, writes them
with their provenance to ``--json`` (after every run, so a cut-off run keeps what it measured) and asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import event, select
from torch import nn

from bench.analysis.format import MISSING
from bench.attacks.utils import logit_difference
from bench.data import get_dataset_info, load_split, parse_eps
from bench.evaluate import attack_chunk, evaluate
from bench.performance import exact_float_backends, execution_settings, fast_model
from bench.provenance import cpu_info, git_commit, package_version, usable_cpus, utcnow
from bench.sparsity import count_flops
from bench.spec import RunSpec

VARIANTS = ("plain", "frozen", "fast")
MODELS = ("digits", "resnet18-test")
# Stored-row bookkeeping that differs between runs by construction.
_IGNORED_FIELDS = {"id", "evaluation_id", "created_at"}


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs


def load_digits(n: int) -> dict[str, Any]:
    from bench.checkpoints import load_checkpoint_model
    from bench.track import TRACKS, dense_checkpoint

    track = TRACKS["digits"]
    path, _ = dense_checkpoint(track, log=lambda msg: print(f"[training] {msg}", flush=True))
    model = load_checkpoint_model(path, track.arch, track.dataset)
    x_all, y_all = load_split(track.dataset, "test")
    if n > len(y_all):
        raise SystemExit(f"--n {n} exceeds the {len(y_all)} digits test samples; use at most {len(y_all)}")
    return dict(
        model=model,
        x=x_all[:n],
        y=y_all[:n],
        x_all=x_all,
        y_all=y_all,
        path=path,
        arch=track.arch,
        dataset=track.dataset,
        eps=track.eps,
        source=f"digits track dense {track.arch} ({path.name})",
    )


def _pyautoattack_resnet18() -> tuple[nn.Module, Path]:
    import pyautoattack

    folder = Path(pyautoattack.__file__).parent / "examples"
    weights = folder / "model_test.pt"
    if not (folder / "resnet.py").is_file() or not weights.is_file():
        raise SystemExit(
            f"pyautoattack's example ResNet-18 is not in {folder}; "
            "reinstall it: pip install --force-reinstall pyautoattack"
        )
    spec = importlib.util.spec_from_file_location("pyautoattack_example_resnet", folder / "resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.ResNet18()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), weights


def confident_inputs(
    model: nn.Module,
    n: int,
    shape: tuple[int, ...],
    num_classes: int,
    margins: tuple[float, float],
    *,
    device: str,
    seed: int,
    step: float = 0.01,
    max_steps: int = 300,
    batch: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images pushed by signed gradient ascent on the logit margin until each reaches its target margin.

    Returns:
        ``(x, y, margin)`` on the CPU: inputs in [0, 1], labels 0..num_classes-1 in turn, final margins.
    """
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.rand((n, *shape), generator=gen)
    y_all = torch.arange(n) % num_classes
    targets = torch.linspace(margins[0], margins[1], n)[torch.randperm(n, generator=gen)]
    out_x, out_m = [], []
    for start in range(0, n, batch):
        x = x_all[start : start + batch].to(device)
        y = y_all[start : start + batch].to(device)
        target = targets[start : start + batch].to(device)
        for _ in range(max_steps):
            x.requires_grad_(True)
            margin = logit_difference(model(x), y)
            active = margin < target
            if not bool(active.any()):
                break
            (grad,) = torch.autograd.grad(margin.sum(), x)
            x = (x.detach() + step * active.view(-1, *[1] * len(shape)) * grad.sign()).clamp(0.0, 1.0)
        x = x.detach()
        with torch.no_grad():
            out_m.append(logit_difference(model(x), y).cpu())
        out_x.append(x.cpu())
    return torch.cat(out_x), y_all, torch.cat(out_m)


def load_resnet18_test(n: int, device: str, margins: tuple[float, float], seed: int) -> dict[str, Any]:
    model, weights = _pyautoattack_resnet18()
    model.to(device)
    info = get_dataset_info("cifar10")
    start = time.perf_counter()
    x, y, margin = confident_inputs(model, n, info.input_shape, info.num_classes, margins, device=device, seed=seed)
    seconds = time.perf_counter() - start
    model.cpu()
    print(
        f"inputs: {n} made in {seconds:.1f} s, margins {float(margin.min()):.1f} .. {float(margin.max()):.1f} "
        f"(targets {margins[0]:g} .. {margins[1]:g}), all classified as labelled: {bool((margin > 0).all())}",
        flush=True,
    )
    return dict(
        model=model,
        x=x,
        y=y,
        path=weights,
        arch="pyautoattack ResNet18",
        dataset="cifar10",
        eps=info.default_eps,
        source=f"pyautoattack examples ResNet18 ({weights.name}), synthetic confident inputs",
        inputs={"margin_targets": list(margins), "seconds": seconds, "seed": seed},
    )


def prepare(variant: str, base: nn.Module, device: str, sample: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(base)
    if variant == "plain":
        return model.to(device).eval()
    if variant == "frozen":
        return fast_model(model, device, channels_last=False, inplace=True)
    return fast_model(model, device, sample=sample.to(device), inplace=True)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


class PassCounter:
    """Samples through the model's forward passes and backward passes (a hook on the output's gradient)."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        n = int(output.shape[0])
        self.forward += n
        if output.requires_grad:
            output.register_hook(functools.partial(self._backward, n))

    def _backward(self, n: int, grad: torch.Tensor) -> None:
        self.backward += n

    def snapshot(self) -> tuple[int, int]:
        return self.forward, self.backward


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn, device: str, min_seconds: float) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    best, total = math.inf, 0.0
    while total < min_seconds:
        start = time.perf_counter()
        fn()
        _sync(device)
        t = time.perf_counter() - start
        best, total = min(best, t), total + t
    return best


def matmul_ceiling(device: str, min_seconds: float) -> dict[str, Any]:
    """The fastest float32 matrix product measured here: FLOP/s of each kernel tried, and the best.

    Two libraries multiply matrices on a CPU build of torch: ``torch.mm`` calls MKL, which on non-Intel CPUs may run
    narrower vector code than the CPU has; a 1x1 convolution on channels_last input is the same product done by
    oneDNN, which dispatches on the instruction set. Both are tried (cuBLAS and cuDNN on CUDA); the faster one is
    the ceiling.
    """
    gen = torch.Generator().manual_seed(0)
    rates: dict[str, float] = {}
    sizes = (4096, 8192) if torch.device(device).type == "cuda" else (256, 512, 1024, 2048)
    for size in sizes:
        a = torch.randn(size, size, generator=gen).to(device)
        b = torch.randn(size, size, generator=gen).to(device)
        c = torch.empty(size, size, device=device)
        seconds = _best_seconds(functools.partial(torch.mm, a, b, out=c), device, min_seconds)
        rates[f"mm {size}x{size}"] = 2 * size**3 / seconds
    rows = 16384 if torch.device(device).type == "cuda" else 4096
    for channels in (256, 512):
        conv = nn.Conv2d(channels, channels, 1, bias=False).to(device).to(memory_format=torch.channels_last)
        x = torch.randn(rows // 64, channels, 8, 8, generator=gen).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        conv.requires_grad_(False)
        with torch.no_grad():
            seconds = _best_seconds(functools.partial(conv, x), device, min_seconds)
        rates[f"1x1 conv NHWC {rows}x{channels}x{channels}"] = 2 * rows * channels * channels / seconds
    best = max(rates, key=rates.get)
    return {"kernels": rates, "best": best, "flop_per_s": rates[best]}


def model_alone(model: nn.Module, x: torch.Tensor, device: str, min_seconds: float) -> dict[str, float]:
    """Forward + input-gradient passes of the network alone on the batch ``x``: samples per second (best call)."""
    x = x.to(device)

    def step() -> None:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xr).sum(), xr)

    best = _best_seconds(step, device, min_seconds)
    return {"batch": len(x), "seconds_per_batch": best, "samples_per_s": len(x) / best}


def run_chunk(model: nn.Module, x, y, spec: RunSpec) -> tuple[dict[str, dict], list[dict]]:
    """``attack_chunk`` on one chunk with per-stage pass counts and CPU seconds; returns (stages, rows).

    CPU seconds (this process, all threads) between the stage callbacks are kept beside the evaluator's wall-clock
    stage times: on a machine shared with other work they vary much less. They include the little work between
    stages that the wall-clock times leave out (AutoAttack's setup and clean pass).
    """
    counter = PassCounter()
    handle = model.register_forward_hook(counter)
    marks: list[tuple[str, tuple[int, int], float]] = []

    def stage_done(stage: str, _n_attacked: int, _n_broken: int) -> None:
        marks.append((stage, counter.snapshot(), time.process_time()))

    cpu_start = time.process_time()
    try:
        rows, seconds, _flags, _warnings = attack_chunk(
            model, x, y, list(range(len(y))), spec, run_checks=False, on_stage_done=stage_done
        )
    finally:
        handle.remove()
    stages, last, last_cpu = {}, (0, 0), cpu_start
    for stage, (fwd, bwd), cpu in marks:
        f, b = fwd - last[0], bwd - last[1]
        if stage == spec.attacks[0]:
            f -= len(y)  # AutoAttack's own clean pass runs before its first stage, outside the stage's time
        stages[stage] = {"seconds": seconds.get(stage, 0.0), "cpu_seconds": cpu - last_cpu, "forward": f, "backward": b}
        last, last_cpu = (fwd, bwd), cpu
    return stages, rows


def run_bare(model: nn.Module, x, y, spec: RunSpec) -> dict[str, Any]:
    """pyautoattack's ``run_standard_evaluation`` on one batch: seconds, passes, robust flags."""
    from pyautoattack import AutoAttack

    counter = PassCounter()
    handle = model.register_forward_hook(counter)
    try:
        with torch.random.fork_rng(devices=[torch.device(spec.device).index or 0] if "cuda" in spec.device else []):
            aa = AutoAttack(
                model, norm=spec.norm, eps=spec.eps_value, version=spec.version, seed=spec.seed, device=spec.device
            )
            aa.verbose = False
            _sync(spec.device)
            start = time.perf_counter()
            _, y_adv = aa.run_standard_evaluation(x.to(spec.device), y.to(spec.device), batch_size=len(y))
            _sync(spec.device)
            seconds = time.perf_counter() - start
    finally:
        handle.remove()
    return {
        "seconds": seconds,
        "forward": counter.forward,
        "backward": counter.backward,
        "robust": (y_adv.cpu() == y).tolist(),
    }


def compare_rows(ref: list[dict], other: list[dict]) -> dict[str, Any]:
    """Discrete fields must be equal; float fields are compared by their largest absolute difference."""
    mismatches: dict[str, int] = {}
    max_diff: dict[str, float] = {}
    for a, b in zip(ref, other, strict=True):
        for key in a.keys() - _IGNORED_FIELDS:
            va, vb = a[key], b.get(key)
            if isinstance(va, float) and isinstance(vb, float):
                if math.isfinite(va) and math.isfinite(vb):
                    max_diff[key] = max(max_diff.get(key, 0.0), abs(va - vb))
                    continue
            if va != vb:
                mismatches[key] = mismatches.get(key, 0) + 1
    return {"mismatches": mismatches, "max_abs_diff": max_diff}


def stage_figures(stage: dict, flops_fwd: float, matmul: float) -> dict[str, float]:
    """Rates per wall-clock second, and the FLOP rate per CPU second (the steadier figure on a shared machine;
    with one thread and nothing else running the two agree)."""
    s, cpu = stage["seconds"], stage["cpu_seconds"]
    useful = flops_fwd * (stage["forward"] + stage["backward"])
    rate = useful / s if s > 0 else 0.0
    cpu_rate = useful / cpu if cpu > 0 else 0.0
    return {
        "forward_per_s": stage["forward"] / s if s > 0 else 0.0,
        "backward_per_s": stage["backward"] / s if s > 0 else 0.0,
        "flop_per_s": rate,
        "fraction_of_matmul": rate / matmul,
        "flop_per_cpu_s": cpu_rate,
        "fraction_of_matmul_cpu": cpu_rate / matmul,
    }


# ----------------------------------------------------------------------------------------------------------------
# Scale-out


class StoreTimer:
    """Wall time inside every ``store.session()`` block, and SQL execution time from SQLAlchemy cursor events."""

    def __init__(self, store) -> None:
        self.session_s = 0.0
        self.sql_s = 0.0
        self.sessions = 0
        self.statements = 0
        original = store.session

        @contextmanager
        def timed_session():
            start = time.perf_counter()
            try:
                with original() as session:
                    yield session
            finally:
                self.session_s += time.perf_counter() - start
                self.sessions += 1

        store.session = timed_session
        event.listen(store.engine, "before_cursor_execute", self._before)
        event.listen(store.engine, "after_cursor_execute", self._after)

    def _before(self, conn, *_args) -> None:
        conn.info.setdefault("apbench_sql_start", []).append(time.perf_counter())

    def _after(self, conn, *_args) -> None:
        self.sql_s += time.perf_counter() - conn.info["apbench_sql_start"].pop()
        self.statements += 1


def scale_out(args, data: dict, workers: list[int], out: dict, write) -> None:
    from bench.store import Evaluation, SampleResult, Store
    from bench.store.registration import register_model

    eps = args.eps or data["eps"]
    batch = args.batch_size or max(1, args.n // 8)
    spec = RunSpec(
        dataset=data["dataset"],
        n_samples=args.n,
        norm=args.norm,
        eps=eps,
        eps_value=parse_eps(eps),
        version=args.version,
        fmn_steps=args.fmn_steps,
        batch_size=batch,
        seed=args.seed,
        device="cpu",
    )
    n_chunks = len(spec.chunks())
    print(
        f"scale-out: evaluate() on {args.n} samples in {n_chunks} chunks of {batch}, AutoAttack-{spec.version} "
        f"{spec.norm} eps={eps} (the evaluator prepares the model itself)",
        flush=True,
    )
    runs: dict[str, dict] = {}
    ref_rows = None
    for k in workers:
        with tempfile.TemporaryDirectory(prefix="apbench-throughput-") as tmp:
            store = Store(str(Path(tmp) / "bench.db"))
            row = register_model(store, data["path"], data["model"], arch=data["arch"], dataset=data["dataset"])
            timer = StoreTimer(store)
            start = time.perf_counter()
            summary = evaluate(
                store, row.id, data["model"], data["x_all"], data["y_all"], spec, progress=False, workers=k
            )
            wall = time.perf_counter() - start
            with store.session() as s:
                stored = s.scalars(
                    select(SampleResult)
                    .where(SampleResult.evaluation_id == summary.evaluation_id)
                    .order_by(SampleResult.sample_id)
                ).all()
                rows = [{c.name: getattr(r, c.name) for c in SampleResult.__table__.columns} for r in stored]
                ev = s.get(Evaluation, summary.evaluation_id)
                attack_s = sum(ev.attack_seconds.values())
                execution = ev.provenance.get("execution")
            store.dispose()
        run = {
            "workers": k,
            "execution": execution,
            "wall_s": wall,
            "attack_s": attack_s,
            "store_s": timer.session_s,
            "sql_s": timer.sql_s,
            "store_sessions": timer.sessions,
            "sql_statements": timer.statements,
            "chunks": n_chunks,
            "chunk_overhead_s": (k * wall - attack_s - timer.session_s) / n_chunks,
        }
        if ref_rows is None:
            ref_rows = rows
        run["rows_vs_first"] = compare_rows(ref_rows, rows)
        first = runs[str(workers[0])] if runs else run
        run["speedup"] = first["wall_s"] / wall
        run["efficiency"] = first["wall_s"] * first["workers"] / (k * wall)
        run["attack_s_ratio"] = attack_s / first["attack_s"]
        runs[str(k)] = run
        out["scale_out"] = {"spec": spec.to_dict(), "runs": runs}
        write()
        print(
            f"  workers {k}: wall {wall:7.2f} s  speed-up {run['speedup']:5.2f}  efficiency {run['efficiency']:6.1%}  "
            f"attack {attack_s:7.2f} s (x{run['attack_s_ratio']:.2f})  store {timer.session_s:6.3f} s "
            f"(SQL {timer.sql_s:.3f} s, {timer.statements} statements, {timer.sessions} sessions)  "
            f"chunk overhead {run['chunk_overhead_s']:6.3f} s  row mismatches {run['rows_vs_first']['mismatches']}",
            flush=True,
        )


# ----------------------------------------------------------------------------------------------------------------


def provenance(device: str) -> dict[str, Any]:
    info = {
        "date": utcnow().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "pyautoattack": package_version("pyautoattack"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": device,
        "cpu": cpu_info(),
        # The cores this process may use, and the load when it started: worker figures mean little without them.
        "cpus_usable": usable_cpus(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["float_backends"] = {
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
        }
    return info


def _parse_margins(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--margin takes LOW:HIGH, e.g. 5:40; got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"--margin needs 0 < LOW <= HIGH, got {text!r}")
    return lo, hi


def _parse_list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty list")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument("--n", type=int, default=None, help="samples (default: 40 digits, 16 resnet18-test)")
    parser.add_argument("--version", choices=["plus", "standard"], default="plus", help="AutoAttack version")
    parser.add_argument("--norm", choices=["Linf", "L2"], default="Linf")
    parser.add_argument("--eps", default=None, help="budget, e.g. 0.2 or 8/255 (default: the dataset's)")
    parser.add_argument("--fmn-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--variants",
        type=lambda t: _parse_list(t, VARIANTS),
        default=list(VARIANTS),
        help="comma-separated, the first is the reference (default plain,frozen,fast)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant, order rotated; medians")
    parser.add_argument("--bare", action="store_true", help="also time a bare pyautoattack run_standard_evaluation")
    parser.add_argument("--margin", type=_parse_margins, default=(5.0, 40.0), help="resnet18-test input margins")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing loop per kernel (ceiling, model alone)")
    parser.add_argument(
        "--workers",
        type=lambda t: [int(v) for v in _parse_list(t)],
        default=None,
        help="scale-out mode: worker counts, e.g. 1,2,4",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="scale-out chunk size (default N/8)")
    parser.add_argument("--json", type=Path, default=None, help="write figures and provenance here")
    args = parser.parse_args()

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch here")
    if args.workers is not None:
        if args.model != "digits":
            parser.error("--workers (scale-out) runs the evaluator on a dataset's test split: use --model digits")
        if dev.type != "cpu":
            parser.error("--workers is for CPU worker processes; on a GPU use one process")
        if any(k < 1 for k in args.workers):
            parser.error("--workers counts must be at least 1")
    if args.n is None:
        args.n = 40 if args.model == "digits" else 16
    if args.n < 1:
        parser.error("--n must be at least 1")
    torch.set_num_threads(args.threads)
    logging.getLogger("auto-attack").propagate = False  # sanity-check warnings are the evaluator's business here
    # Every variant, and the bare run, under the same process-wide float settings: full float32 on CUDA.
    exact_float_backends(args.device)

    out: dict[str, Any] = {"provenance": provenance(args.device), "config": {**vars(args), "json": str(args.json)}}

    def write() -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")

    if args.model == "digits":
        data = load_digits(args.n)
    else:
        data = load_resnet18_test(args.n, args.device, args.margin, args.seed)
    out["model"] = {"name": args.model, "source": data["source"]}
    if "inputs" in data:
        out["model"]["inputs"] = data["inputs"]
    prov = out["provenance"]
    print(
        f"machine: {prov['cpu']['model']} ({prov['cpu']['torch_capability']}), torch {prov['torch']}, "
        f"{prov['threads']} threads, device {prov.get('device_name', args.device)}, commit {prov['git_commit']}; "
        f"{prov['cpus_usable']} usable CPUs, load average {prov['load_average_at_start']}",
        flush=True,
    )
    if args.workers is not None:
        scale_out(args, data, args.workers, out, write)
        return

    x, y = data["x"], data["y"]
    macs = count_flops(data["model"], tuple(x.shape[1:]))["dense_flops"]
    flops_fwd = 2.0 * macs
    out["ceiling"] = matmul_ceiling(args.device, args.min_seconds)
    matmul = out["ceiling"]["flop_per_s"]
    out["model"].update(macs_per_sample=macs, flops_per_pass=flops_fwd)
    eps = args.eps or data["eps"]
    spec = RunSpec(
        dataset=data["dataset"],
        n_samples=args.n,
        norm=args.norm,
        eps=eps,
        eps_value=parse_eps(eps),
        version=args.version,
        fmn_steps=args.fmn_steps,
        batch_size=args.n,
        seed=args.seed,
        device=args.device,
    )
    out["spec"] = spec.to_dict()
    print(
        f"model: {data['source']}, {macs / 1e6:.2f} M MACs per sample; AutoAttack-{spec.version} {spec.norm} "
        f"eps={eps}, N={args.n} as one chunk, FMN {spec.fmn_steps} steps, seed {spec.seed}\n"
        f"matmul ceiling: {matmul / 1e9:.1f} GFLOP/s float32, {out['ceiling']['best']} ("
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in out["ceiling"]["kernels"].items())
        + ")",
        flush=True,
    )

    models = {v: prepare(v, data["model"], args.device, x[:2]) for v in args.variants}
    results: dict[str, dict] = {v: {"settings": execution_settings(models[v]), "runs": []} for v in args.variants}
    rows: dict[str, list[dict]] = {}
    out["variants"] = results
    for v in args.variants:
        results[v]["model_alone"] = model_alone(models[v], x, args.device, args.min_seconds)
    if args.bare:  # first: under a time limit it is the figure the comparison needs most
        print("[bare] pyautoattack run_standard_evaluation ...", flush=True)
        out["bare"] = run_bare(prepare("plain", data["model"], args.device, x[:2]), x, y, spec)
        write()
    for r in range(args.repeats):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for v in order:
            print(f"[run {r + 1}/{args.repeats}] {v} ...", flush=True)
            stages, rows[v] = run_chunk(models[v], x, y, spec)
            results[v]["runs"].append(stages)
            write()

    # Medians over repeats; pass counts are the same in every repeat (fixed seeds).
    ref = args.variants[0]
    for v in args.variants:
        runs = results[v]["runs"]
        med = {}
        for stage in runs[-1]:
            med[stage] = {
                **runs[-1][stage],
                "seconds": statistics.median(run[stage]["seconds"] for run in runs),
                "cpu_seconds": statistics.median(run[stage]["cpu_seconds"] for run in runs),
            }
            med[stage].update(stage_figures(med[stage], flops_fwd, matmul))
        results[v]["stages"] = med
        results[v]["total_seconds"] = sum(s["seconds"] for s in med.values())
        results[v]["total_cpu_seconds"] = sum(s["cpu_seconds"] for s in med.values())
        alone = results[v]["model_alone"]
        alone["flop_per_s"] = 2 * flops_fwd * alone["samples_per_s"]
        alone["fraction_of_matmul"] = alone["flop_per_s"] / matmul
        results[v]["outcomes_vs_" + ref] = compare_rows(rows[ref], rows[v])
    write()

    # Speed-ups against the reference variant, per stage with work and end to end.
    for v in args.variants:
        speedups = {}
        for stage, st in results[v]["stages"].items():
            base = results[ref]["stages"][stage]
            if st["forward"] + st["backward"] and st["seconds"] > 0:
                speedups[stage] = {
                    "wall": base["seconds"] / st["seconds"],
                    "cpu": base["cpu_seconds"] / st["cpu_seconds"],
                }
        speedups["total"] = {
            "wall": results[ref]["total_seconds"] / results[v]["total_seconds"],
            "cpu": results[ref]["total_cpu_seconds"] / results[v]["total_cpu_seconds"],
        }
        results[v]["speedup_vs_" + ref] = speedups
    write()
    print_stage_report(results, ref, args.variants, spec, out.get("bare"), rows, args.n)


def print_stage_report(results, ref, variants, spec, bare, rows, n) -> None:
    stages = list(results[ref]["stages"])
    for v in variants:
        res = results[v]
        alone = res["model_alone"]
        print(f"\n== {v}: {res['settings'] or 'model as loaded'}")
        print(
            f"   model alone (forward + input gradient, batch {alone['batch']}): {alone['samples_per_s']:.0f} "
            f"samples/s, {alone['flop_per_s'] / 1e9:.2f} GFLOP/s, {alone['fraction_of_matmul']:.1%} of the ceiling"
        )
        print(
            f"   {'stage':<20}{'wall s':>8}{'CPU s':>8}{'forward':>10}{'backward':>10}{'fwd/s':>9}{'bwd/s':>9}"
            f"{'GFLOP/s':>9}{'ceiling':>9}   speed-up vs {ref} (wall, CPU)"
        )
        speedups = res["speedup_vs_" + ref]
        for stage in stages:
            st = res["stages"][stage]
            line = f"   {stage:<20}{st['seconds']:8.2f}{st['cpu_seconds']:8.2f}{st['forward']:10d}{st['backward']:10d}"
            if stage in speedups:
                sp = speedups[stage]
                line += (
                    f"{st['forward_per_s']:9.0f}{st['backward_per_s']:9.0f}{st['flop_per_s'] / 1e9:9.2f}"
                    f"{st['fraction_of_matmul']:9.1%}   {sp['wall']:.2f}, {sp['cpu']:.2f}"
                )
            else:
                line += f"{MISSING:>9}" * 4 + "   (no passes)"
            print(line)
        sp = speedups["total"]
        print(
            f"   {'total':<20}{res['total_seconds']:8.2f}{res['total_cpu_seconds']:8.2f}{'':>56}"
            f"{sp['wall']:.2f}, {sp['cpu']:.2f}"
        )
        if v != ref:
            cmp = res["outcomes_vs_" + ref]
            diffs = {k: f"{d:.2e}" for k, d in cmp["max_abs_diff"].items() if d} or "none"
            print(
                f"   outcomes vs {ref}: mismatched fields {cmp['mismatches'] or 'none'}; "
                f"largest float differences {diffs}"
            )
    if bare is not None:
        print(
            f"\nbare pyautoattack run_standard_evaluation: {bare['seconds']:.2f} s, {bare['forward']} forward / "
            f"{bare['backward']} backward samples (sanity checks included)"
        )
        for v in variants:
            aa_s = sum(results[v]["stages"][a]["seconds"] for a in spec.attacks)
            robust = [bool(r["aa_robust"]) for r in rows[v]]
            mism = sum(a != b for a, b in zip(robust, bare["robust"], strict=True))
            print(
                f"   {v}: AutoAttack stages {aa_s:.2f} s, bare / {v} = {bare['seconds'] / aa_s:.2f}; "
                f"whole chunk with FMN {results[v]['total_seconds']:.2f} s; robust-flag mismatches {mism}"
            )
    print(f"\nrobust (AutoAttack) {sum(bool(r['aa_robust']) for r in rows[ref])}/{n}")


if __name__ == "__main__":
    main()
