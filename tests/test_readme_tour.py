"""scripts/readme_tour.py: the README's commands are found as written, and the cheap ones end without a traceback.

The full tour trains and evaluates (minutes); CI runs it after ``make demo`` (``readme_tour.py --reuse-demo``).
Here: the extraction, what a fresh clone lacks, how an outcome is judged (real subprocesses that raise, die of a
signal, hang), and every README command that fails fast or only lists something, run as a user would run it.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_tour", ROOT / "scripts" / "readme_tour.py")
tour = importlib.util.module_from_spec(_spec)
sys.modules["readme_tour"] = tour  # dataclasses look their module up by name
_spec.loader.exec_module(tour)

BENCH = Path(sys.executable).parent / "bench"

SAMPLE = """\
# apbench

```bash
make demo   # not a bench line: left out
bench results --format csv
```

## A short tour

```bash
bench evaluate                                   # a comment
bench models 'res#net*'                          # a quoted hash is not a comment
bench prune --method hydra --sparsity 0.9 --dense dense.pt --arch resnet18 --dataset cifar10
bench evaluate --checkpoint r18.pt --arch resnet18 --dataset cifar10 --device cuda
bench db upgrade --db postgresql://...
```

```text
bench not-a-command
```

## The zoo

```bash
bench submit validate submissions/hydra/<model_id>.yaml   # fetch
                                                           # a continued comment
bench zoo fetch MAD_Lee2022Masking_R18_CIFAR10_US_90
bench evaluate                                   # the same command again: run once
```
"""


def _ctx(tmp_path: Path, *, network: bool = False, cuda: bool = False) -> tour.Context:
    (tmp_path / "clone").mkdir(exist_ok=True)
    return tour.Context(workdir=tmp_path / "clone", data_dir=tmp_path / "data", network=network, cuda=cuda)


def test_extraction_keeps_readme_order_strips_comments_and_runs_repeats_once():
    commands = tour.extract_commands(SAMPLE)
    assert [c.text for c in commands] == [
        "bench results --format csv",
        "bench evaluate",
        "bench models 'res#net*'",
        "bench prune --method hydra --sparsity 0.9 --dense dense.pt --arch resnet18 --dataset cifar10",
        "bench evaluate --checkpoint r18.pt --arch resnet18 --dataset cifar10 --device cuda",
        "bench db upgrade --db postgresql://...",
        "bench submit validate submissions/hydra/<model_id>.yaml",
        "bench zoo fetch MAD_Lee2022Masking_R18_CIFAR10_US_90",
    ]
    lines = SAMPLE.splitlines()
    for c in commands:
        assert lines[c.line - 1].startswith(c.text)
    assert commands[2].argv == ("bench", "models", "res#net*")


def test_a_readme_without_a_tour_is_refused():
    with pytest.raises(ValueError, match="A short tour"):
        tour.extract_commands("```bash\nbench methods\n```\n")


def test_what_a_fresh_clone_lacks_is_detected(tmp_path):
    by_text = {c.text.split()[1] + " " + c.text.split()[-1]: c for c in tour.extract_commands(SAMPLE)}
    ctx = _ctx(tmp_path)
    assert tour.needs(by_text["results csv"], ctx) == []
    assert tour.needs(by_text["evaluate evaluate"], ctx) == []
    assert tour.needs(by_text["prune cifar10"], ctx) == ["file dense.pt", "cifar-10-python.tar.gz (CIFAR data)"]
    assert tour.needs(by_text["evaluate cuda"], ctx) == [
        "file r18.pt",
        "a CUDA device",
        "cifar-10-python.tar.gz (CIFAR data)",
    ]
    assert tour.needs(by_text["db postgresql://..."], ctx) == ["placeholder postgresql://..."]
    assert tour.needs(by_text["submit submissions/hydra/<model_id>.yaml"], ctx) == [
        "placeholder submissions/hydra/<model_id>.yaml",
        "the network (zoo checkpoints)",
    ]
    assert tour.needs(by_text["zoo MAD_Lee2022Masking_R18_CIFAR10_US_90"], ctx) == ["the network (zoo checkpoints)"]
    # What this machine has is not a need.
    (ctx.workdir / "r18.pt").write_bytes(b"")
    ctx.data_dir.mkdir()
    (ctx.data_dir / "cifar-10-python.tar.gz").write_bytes(b"")
    assert tour.needs(by_text["evaluate cuda"], _ctx(tmp_path, cuda=True)) == []
    assert tour.needs(by_text["zoo MAD_Lee2022Masking_R18_CIFAR10_US_90"], _ctx(tmp_path, network=True)) == []


def _tour_block_lines(text: str) -> list[str]:
    # Independent of the script: the non-blank, non-comment lines between the fences after the tour's heading.
    after = text.split(tour.TOUR_HEADING, 1)[1]
    body = after.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_tour_is_extracted_whole(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = tour.extract_commands(text)
    block = _tour_block_lines(text)
    assert len(block) >= 15
    tour_commands = [c for c in commands if c.text in {tour.strip_comment(line).strip() for line in block}]
    assert len(tour_commands) == len(block)
    assert all(c.text.startswith("bench ") and c.argv[0] == "bench" for c in commands)
    other_bench_lines = {
        tour.strip_comment(line).strip()
        for line in text.splitlines()
        if line.startswith("bench ") and line not in block
    }
    assert other_bench_lines <= {c.text for c in commands}
    # Every file a command reads (a checkpoint given by name) is a placeholder on a fresh clone.
    ctx = _ctx(tmp_path)
    files = 0
    for c in commands:
        for option in ("--checkpoint", "--dense"):
            for value in tour._option_values(c.argv, option):
                assert f"file {value}" in tour.needs(c, ctx), c.text
                files += 1
    assert files >= 2


def test_parse_only():
    assert tour.parse_only("3, 9-11,3", 12) == [3, 9, 10, 11]
    for bad in ("0", "13", "2-1", "x", "1,,2"):
        with pytest.raises(ValueError, match="--only"):
            tour.parse_only(bad, 12)


def _python(tmp_path: Path, code: str, *, timeout: float = 20) -> tour.Outcome:
    command = tour.Command(1, "python -c ...", (sys.executable, "-c", code))
    env = tour.tour_env(cache_dir=tmp_path / "c", db=f"sqlite:///{tmp_path}/r.db", data_dir=tmp_path, offline_dir=None)
    return tour.run_command(command, bench=BENCH, cwd=tmp_path, env=env, timeout=timeout, need=[])


def test_outcomes_are_judged_from_real_processes(tmp_path):
    boom = _python(tmp_path, "raise RuntimeError('boom')")
    assert (boom.status, boom.error, boom.returncode) == ("TRACEBACK", "RuntimeError: boom", 1)
    killed = _python(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert (killed.status, killed.error) == ("SIGNAL", "killed by SIGTERM")
    long = _python(tmp_path, "import sys; sys.exit('Error: one\\n' + 'more\\n' * 5)")
    assert long.status == "LONG ERROR" and long.error == "Error: one"
    short = _python(tmp_path, "import sys; sys.exit('Error: missing r18.pt')")
    assert (short.status, short.error) == ("FAILED", "Error: missing r18.pt")
    short.needs = ["file r18.pt"]
    assert tour.judge(short).status == "refused" and not short.failed


def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    started, lived = tmp_path / "child-started", tmp_path / "child-lived"
    child = f"import time; open({str(started)!r}, 'w'); time.sleep(4); open({str(lived)!r}, 'w')"
    hang = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    outcome = _python(tmp_path, hang, timeout=2)
    assert outcome.status == "TIMEOUT" and outcome.failed and outcome.seconds < 10
    time.sleep(4)
    assert started.exists() and not lived.exists()


def test_main_fails_on_a_traceback_and_prints_the_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"## A short tour\n\n```bash\nbench formats\n{sys.executable} -c 'raise KeyError(7)'\n```\n", encoding="utf-8"
    )
    assert tour.main(["--readme", str(readme), "--workdir", str(tmp_path / "w"), "--timeout", "60"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^1\s+4\s+ok\s+0\s+[\d.]+\s+bench formats\s*$", out, re.M)
    assert re.search(r"^2\s+5\s+TRACEBACK\s+1\s.*KeyError: 7$", out, re.M)
    assert (tmp_path / "w" / "logs" / "02.log").read_text().count("KeyError: 7") == 1
    assert tour.main(["--readme", str(readme), "--only", "1", "--workdir", str(tmp_path / "w2")]) == 0


def test_list_numbers_the_commands_with_their_needs(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(SAMPLE, encoding="utf-8")
    assert tour.main(["--readme", str(readme), "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["1", "line", "5", "bench", "results", "--format", "csv"]
    assert "needs: placeholder postgresql://..." in "\n".join(out)


def test_the_readme_commands_that_fail_fast_or_list_end_without_a_traceback(tmp_path):
    """Every README command that needs what a fresh clone lacks, and every listing, run as written, offline."""
    commands = tour.extract_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    ctx = _ctx(tmp_path)
    listing = {"methods", "models", "datasets", "formats", "results", "zoo"}
    extra = [tour.Command(0, "bench models 'resnet*'", ("bench", "models", "resnet*"))]
    chosen, paths = [], set()
    for c in commands:
        # One command per code path: same subcommand, and what it lacks of the same kinds (a file, CUDA, ...).
        kinds = frozenset("file" if need.startswith("file ") else need for need in tour.needs(c, ctx))
        path = (c.argv[1], c.argv[2] if c.argv[1] in ("zoo", "db", "submit") else "", kinds)
        if (kinds or c.argv[1] in listing) and path not in paths:
            paths.add(path)
            chosen.append(c)
    chosen += extra
    assert {c.argv[1] for c in chosen} >= {"methods", "models", "datasets", "formats", "results", "evaluate", "prune"}
    env = tour.tour_env(
        cache_dir=tmp_path / "cache",
        db=f"sqlite:///{tmp_path / 'results.db'}",
        data_dir=tmp_path / "data",
        offline_dir=tmp_path / "offline",
    )

    def run(c: tour.Command) -> tour.Outcome:
        return tour.run_command(c, bench=BENCH, cwd=ctx.workdir, env=env, timeout=60, need=tour.needs(c, ctx))

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(run, chosen))
    for o in outcomes:
        assert o.status not in ("TRACEBACK", "SIGNAL", "TIMEOUT", "LONG ERROR"), f"{o.command.text}\n{o.stderr[-3000:]}"
        assert tour.TRACEBACK not in o.stdout + o.stderr, f"{o.command.text}\n{o.stdout[-3000:]}"
        if o.needs:
            # Refused, with a one-line reason (not a usage dump, not silence).
            assert o.status == "refused" and o.error, (o.command.text, o.stdout, o.stderr)
        elif o.command.argv[1] == "results":
            # An empty folder has no store: a short message, and no store created by a read-only command.
            assert o.returncode == 0 or o.error, o.stderr
            assert not (tmp_path / "results.db").exists()
        else:
            assert o.status == "ok", (o.command.text, o.stderr)
    resnets = outcomes[-1].stdout.split()
    assert "resnet18" in resnets and "small_cnn" not in resnets


def test_a_reused_sqlite_store_is_copied_unless_in_place(tmp_path):
    demo = tmp_path / "results.db"
    with sqlite3.connect(demo) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE models (name TEXT)")
        con.execute("INSERT INTO models VALUES ('digits-dense')")
    work = tmp_path / "work"
    work.mkdir()
    url = tour.prepare_store(str(demo), work, in_place=False)
    assert url == f"sqlite:///{work / 'results.db'}"
    with sqlite3.connect(work / "results.db") as con:
        assert con.execute("SELECT name FROM models").fetchall() == [("digits-dense",)]
        con.execute("INSERT INTO models VALUES ('pruned by the tour')")
    with sqlite3.connect(demo) as con:
        assert con.execute("SELECT count(*) FROM models").fetchone() == (1,)
    assert tour.prepare_store(f"sqlite:///{demo}", work, in_place=True) == f"sqlite:///{demo}"
    assert tour.prepare_store("postgresql://u@db.example/apbench", work, in_place=False).startswith("postgresql://")
    assert tour.prepare_store(None, work, in_place=False) == f"sqlite:///{work / 'results.db'}"
    with pytest.raises(ValueError, match="no SQLite store at .*make demo"):
        tour.prepare_store(str(tmp_path / "missing.db"), work, in_place=False)
