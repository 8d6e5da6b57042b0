#!/usr/bin/env python3
"""The README's figures about the built-in digits track, made from fresh runs and checked against them.

No figure about the track is typed into the README: each lives in a JSON file under ``docs/figures/`` written by a
script from a fresh run, and the README's marked blocks (``<!-- figures:NAME -->`` … ``<!-- /figures:NAME -->``)
are rendered from those files.

    python scripts/figures.py demo            # the main job, fresh (empty cache, store) -> docs/figures/demo.json
    python scripts/figures.py render          # rewrite the README's marked blocks from docs/figures/*.json
    python scripts/figures.py check-readme    # exit 1 when a marked block differs from its rendering (a test runs it)
    python scripts/figures.py check-demo LOG  # exit 1 when a figure the main job printed in LOG leaves its range

``docs/figures/track_stability.{json,md}`` come from ``benchmarks/track_stability.py``.

The documented range of an accuracy is the Wilson 95 % score interval of the documented figure on the same number
of samples: a fresh run that lands outside it differs by more than the test-sample draw alone explains, so
something changed (code, schedule, or a machine whose float kernels flip many borderline samples: the CPU of the
documented run is recorded beside it). Measured sparsity must match to the printed precision; the FMN median
distance within 10 %.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
README = ROOT / "README.md"
DEMO_COMMAND = ["evaluate", "--method", "hydra", "--sparsity", "0.95"]
# The README's main-job command, as the Makefile's demo target runs it.
DEMO_README_COMMAND = "bench " + " ".join(DEMO_COMMAND)
Z95 = 1.959963984540054
ACCURACIES = {
    "clean accuracy": "clean",
    "AutoAttack robust": "autoattack",
    "FMN robust at eps": "fmn_at_eps",
    "best-known robust": "best_known",
}
FMN_MEDIAN_TOLERANCE = 0.10


def wilson(p: float, n: int) -> tuple[float, float]:
    """Wilson's 95 % score interval for a proportion ``p`` observed on ``n`` samples."""
    if n <= 0:
        raise ValueError("an interval needs at least one sample")
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------------------------- parsing the output

_SUMMARY_HEAD = re.compile(r"^evaluation #\d+ of (?P<name>\S+) on (?P<n>\d+) samples")
_PERCENT = re.compile(r"(-?\d+(?:\.\d+)?)%")


def parse_demo_output(text: str) -> dict[str, dict[str, Any]]:
    """The figures the main job printed: its two evaluation summaries (dense first) and the side-by-side sparsity.

    Returns ``{"dense": {...}, "pruned": {...}}`` with accuracies as fractions, ``n``, ``name``, ``fmn_median``
    and ``sparsity``. Raises ValueError naming what is missing, so a changed output format fails loudly.
    """
    lines = text.splitlines()
    summaries: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    sparsity: tuple[float, float] | None = None
    for line in lines:
        head = _SUMMARY_HEAD.match(line.strip())
        if head:
            current = {"name": head["name"], "n": int(head["n"])}
            summaries.append(current)
            continue
        stripped = line.strip()
        if not stripped:  # a summary ends at its blank line; the side-by-side table repeats its labels
            current = None
            continue
        if stripped.startswith("sparsity (measured)"):
            values = [float(v) / 100 for v in _PERCENT.findall(stripped)]
            if len(values) != 2:
                raise ValueError(f"cannot read the measured sparsities from {line!r}")
            sparsity = (values[0], values[1])
            continue
        if current is None:
            continue
        for label, key in ACCURACIES.items():
            if stripped.startswith(label):
                match = _PERCENT.search(stripped)
                if match:
                    current[key] = float(match.group(1)) / 100
        if stripped.startswith("FMN median distance"):
            current["fmn_median"] = float(stripped.split()[3])
    if len(summaries) < 2:
        raise ValueError(f"expected the dense and the pruned evaluation summaries, found {len(summaries)}")
    if sparsity is None:
        raise ValueError("the side-by-side table's 'sparsity (measured)' line is missing")
    dense, pruned = summaries[-2], summaries[-1]
    dense["sparsity"], pruned["sparsity"] = sparsity
    for which, summary in (("dense", dense), ("pruned", pruned)):
        missing = [key for key in (*ACCURACIES.values(), "fmn_median") if key not in summary]
        if missing:
            raise ValueError(f"the {which} evaluation summary lacks {', '.join(missing)}")
    return {"dense": dense, "pruned": pruned}


def ranges_for(figures: dict[str, Any]) -> dict[str, list[float]]:
    """The documented range of each printed figure of one evaluation (module docstring)."""
    n = figures["n"]
    out = {key: [round(v, 6) for v in wilson(figures[key], n)] for key in ACCURACIES.values()}
    out["fmn_median"] = [
        round(figures["fmn_median"] * (1 - FMN_MEDIAN_TOLERANCE), 6),
        round(figures["fmn_median"] * (1 + FMN_MEDIAN_TOLERANCE), 6),
    ]
    out["sparsity"] = [round(figures["sparsity"] - 5e-5, 6), round(figures["sparsity"] + 5e-5, 6)]
    return out


def check_figures(printed: dict[str, dict[str, Any]], documented: dict[str, Any]) -> list[str]:
    """Each printed figure outside its documented range, as a line; empty when all hold."""
    problems = []
    for which in ("dense", "pruned"):
        got, doc = printed[which], documented["evaluations"][which]
        if got["n"] != doc["n"]:
            problems.append(f"{which}: {got['n']} samples evaluated, the README documents {doc['n']}")
        for key, (lo, hi) in documented["ranges"][which].items():
            value = got[key]
            if not lo - 1e-9 <= value <= hi + 1e-9:
                problems.append(
                    f"{which} {key}: printed {value:.4f}, documented {doc[key]:.4f} with range [{lo:.4f}, {hi:.4f}]"
                )
    return problems


# ---------------------------------------------------------------------------------------------- running the job


def _bench() -> list[str]:
    exe = Path(sys.executable).parent / "bench"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bench.cli"]


def _cpu() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from bench.provenance import cpu_info, git_commit, usable_cpus

    return {"cpu": cpu_info(), "git_commit": git_commit(), "cpus_usable": usable_cpus()}


def run_demo(out: Path) -> dict[str, Any]:
    """Run the main job in an empty cache and store, read its printed figures and the thin-ice analysis."""
    import torch

    with tempfile.TemporaryDirectory(prefix="apbench-figures-") as tmp:
        env = {**os.environ, "BENCH_CACHE_DIR": str(Path(tmp) / "cache"), "BENCH_DB": f"sqlite:///{tmp}/results.db"}
        start = time.perf_counter()
        done = subprocess.run(
            [*_bench(), *DEMO_COMMAND, "--no-progress"], env=env, cwd=tmp, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the main job failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        printed = parse_demo_output(done.stdout)
        thin = subprocess.run(
            [*_bench(), "analyze", "thin-ice", "--pruned", printed["pruned"]["name"], "--format", "json"],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        )
        thin_ice = json.loads(thin.stdout)
    record = {
        "command": DEMO_README_COMMAND,
        "generated_by": "python scripts/figures.py demo",
        "provenance": {
            **_cpu(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "wall_seconds": round(wall, 1),
            "cache": "empty (dense model trained in the run)",
        },
        "printed": _printed_tables(done.stdout),
        "evaluations": printed,
        "ranges": {which: ranges_for(figures) for which, figures in printed.items()},
        "thin_ice": thin_ice,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def _printed_tables(stdout: str) -> dict[str, str]:
    """The dense evaluation's summary block and the final side-by-side table, verbatim (machine paths dropped)."""
    lines = stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if _SUMMARY_HEAD.match(line.strip())]
    block = []
    for line in lines[heads[0] :]:
        if not line.strip() or line.strip().startswith("stored in"):
            break
        block.append(line.rstrip())
    side = [i for i, line in enumerate(lines) if line.split() == ["dense", "pruned"]]
    table = [line.rstrip() for line in lines[side[-1] :] if line.strip()][:5]
    return {"dense_summary": "\n".join(block), "side_by_side": "\n".join(table)}


# ---------------------------------------------------------------------------------------------- the README blocks


def render_blocks() -> dict[str, str]:
    """Every marked README block, rendered from the JSON files in docs/figures/."""
    from bench.analysis.format import number, p_value, percent

    blocks: dict[str, str] = {}
    demo_path = FIGURES / "demo.json"
    if demo_path.exists():
        demo = json.loads(demo_path.read_text())
        prov = demo["provenance"]
        dense, pruned = demo["evaluations"]["dense"], demo["evaluations"]["pruned"]
        where = (
            f"fresh run of `{demo['command']}` (`{demo['generated_by']}`) on {prov['date']}, commit "
            f"{str(prov['git_commit'])[:10]}, {prov['cpu']['model']} ({prov['cpu']['torch_capability']}), "
            f"torch {prov['torch']}"
        )
        blocks["demo-side-by-side"] = "\n".join(
            ["```", demo["printed"]["side_by_side"], "```", "", f"<sub>{where}.</sub>"]
        )
        blocks["demo-dense-summary"] = "\n".join(["```", demo["printed"]["dense_summary"], "```"])
        lo, hi = wilson(dense["autoattack"], dense["n"])
        blocks["demo-dense-figures"] = (
            f"Measured on all {dense['n']} test digits by the main job's fresh run ({where}): "
            f"**clean {percent(dense['clean'])}, AutoAttack-plus robust {percent(dense['autoattack'])} "
            f"[{percent(lo)}, {percent(hi)}]**, FMN-at-eps {percent(dense['fmn_at_eps'])}, best-known "
            f"{percent(dense['best_known'])}, FMN median L∞ distance {dense['fmn_median']:.3f}."
        )
        ranges = demo["ranges"]
        rows = ["| figure | dense | pruned |", "|---|---|---|"]
        for label, key in ACCURACIES.items():
            rows.append(
                f"| {label} | {percent(dense[key])} (range {percent(ranges['dense'][key][0])}–"
                f"{percent(ranges['dense'][key][1])}) | {percent(pruned[key])} "
                f"(range {percent(ranges['pruned'][key][0])}–{percent(ranges['pruned'][key][1])}) |"
            )
        rows.append(f"| FMN median distance | {dense['fmn_median']:.4f} (±10 %) | {pruned['fmn_median']:.4f} (±10 %) |")
        rows.append(f"| measured sparsity | {percent(dense['sparsity'])} | {percent(pruned['sparsity'])} |")
        blocks["demo-ranges"] = "\n".join(rows)
        ti = demo["thin_ice"]
        s10 = ti["counts"]["S10"]
        blocks["demo-thin-ice"] = (
            f"On the demo's models (same run): S10 {ti['percent']['S10']:.2f} % ({s10} samples), "
            f"AUC(ε10 < ε11) {number(ti['auc_10_11'], 3)} (p {p_value(ti['p_10_11'])})"
        )
        blocks["demo-perf"] = (
            f"| the main job, `{demo['command']}`, fresh cache and store (dense training, dense evaluation, HYDRA "
            f"pruning, pruned evaluation) | `scripts/figures.py demo` | **{prov['wall_seconds']:.0f} s** on "
            f"{prov['date']} ({prov['cpu']['model']}, {_cores(prov)}) |"
        )
    throughput = FIGURES / "attack_throughput_digits.json"
    if throughput.exists():
        blocks["attack-throughput"] = _throughput_table(json.loads(throughput.read_text()))
    scaleout = FIGURES / "attack_scaleout_digits.json"
    if scaleout.exists():
        blocks["attack-scaleout"] = _scaleout_table(json.loads(scaleout.read_text()))
    stability_md = FIGURES / "track_stability.md"
    if stability_md.exists():
        blocks["track-stability"] = stability_md.read_text().strip()
    return blocks


def _throughput_table(t: dict[str, Any]) -> str:
    """benchmarks/attack_throughput.py's per-stage figures: the plain model's rate against the machine's ceiling, and
    the speed-ups of frozen parameters and of channels_last (CPU seconds, steadier than wall time on a shared
    machine), with whether per-sample outcomes stayed identical."""
    prov, cfg, variants = t["provenance"], t["config"], t["variants"]
    plain, frozen, fast = variants["plain"], variants.get("frozen"), variants.get("fast")
    rows = [
        "| stage | forward + backward passes | plain: GFLOP/s per CPU s (of the ceiling) | frozen parameters | "
        "+ channels_last |",
        "|---|---|---|---|---|",
    ]
    for stage, fig in plain["stages"].items():
        if stage == "clean":
            continue
        frozen_x = frozen["speedup_vs_plain"][stage]["cpu"] if frozen else None
        fast_x = fast["speedup_vs_plain"][stage]["cpu"] if fast else None
        rows.append(
            f"| {stage} | {fig['forward'] + fig['backward']:,} | {fig['flop_per_cpu_s'] / 1e9:.1f} "
            f"({100 * fig['fraction_of_matmul_cpu']:.1f} %) | "
            f"{'–' if frozen_x is None else f'{frozen_x:.2f}×'} | {'–' if fast_x is None else f'{fast_x:.2f}×'} |"
        )
    total = [v["speedup_vs_plain"]["total"]["cpu"] if v else None for v in (frozen, fast)]
    rows.append(f"| **all stages** | | | **{total[0]:.2f}×** | **{total[1]:.2f}×** |")

    def diffs(v: dict[str, Any] | None) -> str:
        if v is None:
            return "not run"
        out = v["outcomes_vs_plain"]
        worst = max((x for x in out["max_abs_diff"].values()), default=0.0)
        flags = "identical" if not out["mismatches"] else f"different in {', '.join(out['mismatches'])}"
        return f"flags and predictions {flags}; largest float difference {worst:.2g}"

    ceiling = t["ceiling"]
    return "\n".join(
        [
            f"`python benchmarks/attack_throughput.py --model digits --n {cfg['n']} --version {cfg['version']} "
            f"--json docs/figures/attack_throughput_digits.json` on {prov['date'][:10]} ({prov['cpu']['model']}, "
            f"{prov['cpu']['torch_capability']}, {prov['threads']} thread, commit {str(prov['git_commit'])[:10]}); "
            f"ceiling = the fastest measured kernel, {ceiling['best']}, {ceiling['flop_per_s'] / 1e9:.0f} GFLOP/s:",
            "",
            *rows,
            "",
            f"Frozen parameters: {diffs(frozen)}. channels_last: {diffs(fast)}.",
        ]
    )


def _cores(prov: dict[str, Any]) -> str:
    cpus = prov.get("cpus_usable")
    return f"{cpus} usable CPUs" if cpus else "CPU count not recorded"


def _scaleout_table(t: dict[str, Any]) -> str:
    """benchmarks/attack_throughput.py --workers: one evaluation over 1, 2, 4 worker processes (wall time, parallel
    efficiency, attack seconds summed over chunks, time in the store, chunk overhead, rows against one worker)."""
    prov, cfg, so = t["provenance"], t["config"], t["scale_out"]
    spec = so["spec"]
    rows = [
        "| workers | wall s | speed-up | parallel efficiency | attack s, summed over chunks | store s (SQL alone) | "
        "chunk overhead s | rows against 1 worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in so["runs"].values():
        same = run["rows_vs_first"]
        worst = max(same["max_abs_diff"].values(), default=0.0)
        rows_text = "identical" if not same["mismatches"] and worst == 0.0 else f"differ ({same['mismatches']})"
        rows.append(
            f"| {run['workers']} | {run['wall_s']:.1f} | {run['speedup']:.2f}× | {100 * run['efficiency']:.1f} % | "
            f"{run['attack_s']:.1f} | {run['store_s']:.3f} ({run['sql_s']:.3f}) | {run['chunk_overhead_s']:.2f} | "
            f"{rows_text} |"
        )
    load = prov.get("load_average_at_start")
    machine = f"{prov['cpu']['model']}, {_cores(prov)}"
    if load:
        machine += f", load average {load[0]:.2f} at the start"
    return "\n".join(
        [
            f"`python benchmarks/attack_throughput.py --model digits --n {cfg['n']} --workers "
            f"{','.join(str(w) for w in cfg['workers'])} --version {cfg['version']} --json "
            f"docs/figures/attack_scaleout_digits.json` on {prov['date'][:10]} ({machine}, commit "
            f"{str(prov['git_commit'])[:10]}): one evaluation of {spec['n_samples']} samples in chunks of "
            f"{spec['batch_size']}, AutoAttack-{spec['version']} and FMN, into a fresh SQLite store:",
            "",
            *rows,
        ]
    )


_BLOCK = re.compile(r"<!-- figures:(?P<name>[a-z0-9-]+) -->\n(?P<body>.*?)<!-- /figures:(?P=name) -->", re.S)


def rendered_readme(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every marked block replaced by its rendering; an unknown block name is an error."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in blocks:
            raise SystemExit(f"README block {name!r} has no figures file to render it from (docs/figures/)")
        return f"<!-- figures:{name} -->\n{blocks[name]}\n<!-- /figures:{name} -->"

    return _BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job fresh and write docs/figures/demo.json")
    demo.add_argument("--out", type=Path, default=FIGURES / "demo.json")
    sub.add_parser("render", help="rewrite the README's marked blocks")
    sub.add_parser("check-readme", help="exit 1 when a marked block differs from its rendering")
    check = sub.add_parser("check-demo", help="check the figures the main job printed in LOG")
    check.add_argument("log", type=Path)
    check.add_argument("--figures", type=Path, default=FIGURES / "demo.json")
    args = parser.parse_args(argv)

    if args.command == "demo":
        record = run_demo(args.out)
        print(json.dumps(record["evaluations"], indent=1))
        print(f"wrote {args.out} ({record['provenance']['wall_seconds']} s); now run: python scripts/figures.py render")
        return 0
    if args.command in ("render", "check-readme"):
        text = README.read_text()
        new = rendered_readme(text, render_blocks())
        if args.command == "render":
            README.write_text(new)
            print(f"rendered {len(_BLOCK.findall(text))} blocks into {README}")
            return 0
        if new != text:
            print("README.md's figure blocks differ from docs/figures/: run python scripts/figures.py render")
            return 1
        return 0
    documented = json.loads(args.figures.read_text())
    printed = parse_demo_output(args.log.read_text())
    problems = check_figures(printed, documented)
    cmd = shlex.quote(documented["command"])
    if problems:
        print(f"the main job ({cmd}) printed figures outside the README's documented ranges:")
        print("\n".join(f"  {line}" for line in problems))
        return 1
    same_cpu = documented["provenance"]["cpu"] == _cpu()["cpu"]
    exact = all(
        printed[w][k] == documented["evaluations"][w][k] for w in ("dense", "pruned") for k in ACCURACIES.values()
    )
    print(
        f"the main job's figures are inside the documented ranges ({'identical' if exact else 'not identical'} to the "
        f"documented run; {'same' if same_cpu else 'another'} CPU)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
