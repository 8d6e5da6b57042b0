#!/usr/bin/env python3
"""Run the README's commands top to bottom, as a user on a fresh clone would, and fail on any traceback.

The commands are every line of the ``bash`` block under "## A short tour" and every line starting with ``bench ``
in the README's other ``bash`` blocks, in README order, comments removed, exact repeats run once. Each runs as a
subprocess of the ``bench`` next to this Python, without a shell, in a scratch folder with its own cache, data
folder and store, stdin closed and the network cut (name resolution fails, as on an offline machine).

Some commands need what a fresh clone cannot have: a file the README uses as a placeholder (``dense.pt``,
``r18.pt``), ``<model_id>`` or ``postgresql://...``, a CUDA device, the CIFAR archives, the network. They run all
the same, and must end with a clear error of at most a few lines. A command that needs nothing missing must
succeed. The script exits 1 when any command prints a Python traceback, dies of a signal, runs past
``--timeout``, ends with an error longer than a few lines, or fails although it needed nothing missing; it
prints a table (command, exit status, seconds, the first line of the error) and the last lines of each failure.

    .venv/bin/python scripts/readme_tour.py --list               # the commands, numbered, with what each needs
    .venv/bin/python scripts/readme_tour.py                      # all of them, fresh (trains and evaluates: minutes)
    .venv/bin/python scripts/readme_tour.py --only 3,9-12        # a few
    make demo && .venv/bin/python scripts/readme_tour.py --reuse-demo   # CI: reuse the demo's cache and store

``--reuse-demo`` takes the cache and store ``make demo`` used (bench's defaults: ``$BENCH_CACHE_DIR`` or
``~/.cache/apbench``; ``$BENCH_DB`` or ``results.db`` in the repository root), so the tour's evaluations of the
digits track are reused and it takes a few minutes. A SQLite store given with ``--db`` is copied into the scratch
folder first (the tour prunes and registers models; ``--in-place`` writes to it instead); a server URL is used
as it is. The scratch folder is removed after a clean run, and kept, with each command's output under
``logs/``, after a failing one (or always with ``--workdir``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOUR_HEADING = "## A short tour"
TRACEBACK = "Traceback (most recent call last)"
# "At most a few lines": click's usage error is three (Usage, Try ..., Error); two more leave room for a hint.
MAX_ERROR_LINES = 5
DEFAULT_TIMEOUT_S = 900.0
FAILURES = ("TRACEBACK", "SIGNAL", "TIMEOUT", "LONG ERROR", "FAILED")
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}
# A token ending like this names a file the command reads (a checkpoint, a manifest).
FILE_SUFFIXES = (".pt", ".pth", ".pth.tar", ".tar", ".t7", ".safetensors", ".yaml", ".yml")

# Imported at start-up by every Python the tour starts (PYTHONPATH): name resolution fails for anything but this
# machine, which is what an offline machine does; binding to localhost (a local PostgreSQL) still works.
OFFLINE_SITECUSTOMIZE = '''\
"""Written by scripts/readme_tour.py: this process runs as on a machine without network."""
import socket

_getaddrinfo = socket.getaddrinfo
_LOCAL = {"localhost", "127.0.0.1", "::1", "", None}


def _offline_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name in _LOCAL:
        return _getaddrinfo(host, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known: {name} (no network)")


socket.getaddrinfo = _offline_getaddrinfo
'''


@dataclass(frozen=True)
class Command:
    """One README command: where it is, as written (comment removed), and its argument vector."""

    line: int
    text: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Context:
    """What this run of the tour has: its folders, the network, a CUDA device."""

    workdir: Path
    data_dir: Path
    network: bool
    cuda: bool


@dataclass
class Outcome:
    """How one command ended, judged by :func:`judge`."""

    command: Command
    needs: list[str]
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    timed_out: bool = False
    status: str = ""
    error: str = ""
    error_lines: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status in FAILURES


# ---------------------------------------------------------------------------------------------- extraction


def strip_comment(line: str) -> str:
    """``line`` without a shell comment: a ``#`` outside quotes that starts a word."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _bash_blocks(lines: Sequence[str]) -> Iterable[tuple[list[tuple[int, str]], bool]]:
    """``([(line number, text)], is the tour's block)`` for each fenced ``bash`` block; lines count from 1."""
    in_tour = False
    tour_seen = False
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("#") and not stripped.startswith("```"):
            in_tour = stripped == TOUR_HEADING
        if stripped.startswith("```"):
            lang = stripped[3:].strip()
            body: list[tuple[int, str]] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append((i + 1, lines[i]))
                i += 1
            if lang in ("bash", "sh", "shell"):
                tour = in_tour and not tour_seen
                tour_seen = tour_seen or tour
                yield body, tour
        i += 1


def extract_commands(text: str) -> list[Command]:
    """Every line of the tour's block and every ``bench`` line of the other bash blocks, in README order, once.

    Raises:
        ValueError: the README has no tour, or a tour line cannot be split like a shell would.
    """
    lines = text.splitlines()
    commands: list[Command] = []
    seen: set[str] = set()
    found_tour = False
    for body, tour in _bash_blocks(lines):
        found_tour = found_tour or tour
        for number, raw in body:
            command = strip_comment(raw).strip()
            if not command or (not tour and not command.startswith("bench ")):
                continue
            try:
                argv = tuple(shlex.split(command))
            except ValueError as err:
                raise ValueError(f"README line {number}: cannot split {command!r} like a shell: {err}") from None
            if command not in seen:
                seen.add(command)
                commands.append(Command(number, command, argv))
    if not found_tour:
        raise ValueError(f"the README has no ```bash block under {TOUR_HEADING!r}")
    return commands


def parse_only(spec: str, count: int) -> list[int]:
    """1-based command numbers from ``"3,9-12"``; out-of-range or malformed parts raise ``ValueError``."""
    chosen: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--only {spec!r}: {part!r} is not a number or a range like 9-12")
        low, high = int(match[1]), int(match[2] or match[1])
        if not 1 <= low <= high <= count:
            raise ValueError(f"--only {spec!r}: {part!r} is outside 1-{count} (--list numbers the commands)")
        chosen += [n for n in range(low, high + 1) if n not in chosen]
    return chosen


# ------------------------------------------------------------------------------------------------- needs


def _option_values(argv: Sequence[str], option: str) -> list[str]:
    values = []
    for i, token in enumerate(argv):
        if token == option and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif token.startswith(option + "="):
            values.append(token.split("=", 1)[1])
    return values


def needs(command: Command, ctx: Context) -> list[str]:
    """What ``command`` needs that this run does not have; empty when it should simply work."""
    argv = command.argv
    missing: list[str] = []
    for token in argv:
        if re.search(r"<[^>]*>|\.\.\.", token):
            missing.append(f"placeholder {token}")
        elif not token.startswith("-") and token.lower().endswith(FILE_SUFFIXES):
            if not (ctx.workdir / token).exists():
                missing.append(f"file {token}")
    if not ctx.cuda and any(d.startswith("cuda") for d in _option_values(argv, "--device")):
        missing.append("a CUDA device")
    words = [t for t in argv[1:] if not t.startswith("-")]
    # Only the commands that run a model read the test split (listing the zoo's CIFAR entries does not).
    for dataset in _option_values(argv, "--dataset") if words[:1] in (["evaluate"], ["prune"]) else []:
        archive = CIFAR_ARCHIVES.get(dataset)
        if archive and not (ctx.data_dir / archive).exists():
            missing.append(f"{archive} (CIFAR data)")
    uses_zoo = (
        "--model-id" in argv
        or "--zoo" in argv
        or words[:2] in (["zoo", "fetch"], ["zoo", "import-robustbench"], ["submit", "validate"])
        or (words[:1] == ["evaluate"] and "--method" in argv and "--dataset" in argv and "--checkpoint" not in argv)
    )
    if uses_zoo and not ctx.network:
        missing.append("the network (zoo checkpoints)")
    return missing


# --------------------------------------------------------------------------------------------- running


def _clean_lines(text: str) -> list[str]:
    # A progress bar rewrites its line with carriage returns: keep what a terminal would finally show.
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return [line for line in lines if line.strip()]


def judge(outcome: Outcome) -> Outcome:
    """Set ``status``, ``error`` and ``error_lines`` of ``outcome`` (module docstring)."""
    output = outcome.stdout + "\n" + outcome.stderr
    stderr_lines = _clean_lines(outcome.stderr)
    start = next((i for i, line in enumerate(stderr_lines) if re.match(r"(Usage|Error|error)\b", line)), 0)
    outcome.error_lines = stderr_lines[start:]
    first_error = next((line for line in outcome.error_lines if re.match(r"(Error|error)\b", line)), "")
    # Some commands report on stdout (bench submit validate prints a FAIL line per manifest).
    stdout_lines = _clean_lines(outcome.stdout)
    said = next((line.strip() for line in stdout_lines if re.search(r"\b(FAIL|Error|error)\b", line)), "")
    outcome.error = first_error or (outcome.error_lines[0] if outcome.error_lines else said)
    rc = outcome.returncode
    if outcome.timed_out:
        outcome.status, outcome.error = "TIMEOUT", f"still running after {outcome.seconds:.0f} s; killed"
    elif TRACEBACK in output:
        outcome.status = "TRACEBACK"
        tail = _clean_lines(output.split(TRACEBACK)[-1])
        outcome.error = tail[-1].strip() if tail else TRACEBACK
    elif rc is not None and rc < 0:
        outcome.status, outcome.error = "SIGNAL", f"killed by {signal.Signals(-rc).name}"
    elif rc == 0:
        outcome.status, outcome.error = "ok", ""
    elif len(outcome.error_lines) > MAX_ERROR_LINES:
        outcome.status = "LONG ERROR"
    elif outcome.needs:
        outcome.status = "refused"
    else:
        outcome.status = "FAILED"
    return outcome


def _kill_group(proc: subprocess.Popen) -> None:
    # The command's own process group (start_new_session): its worker processes go with it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_command(
    command: Command, *, bench: Path, cwd: Path, env: dict[str, str], timeout: float, need: list[str]
) -> Outcome:
    """Run ``command`` with ``bench`` in place of its first word; never raises for the command's own failure."""
    argv = [str(bench), *command.argv[1:]] if command.argv[:1] == ("bench",) else list(command.argv)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as err:
        return judge(Outcome(command, need, 127, 0.0, "", f"error: cannot start {argv[0]}: {err}"))
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        stdout, stderr = proc.communicate()
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    return judge(Outcome(command, need, proc.returncode, time.monotonic() - started, stdout, stderr, timed_out))


def tour_env(*, cache_dir: Path, db: str, data_dir: Path, offline_dir: Path | None) -> dict[str, str]:
    """The environment every command runs in: its cache, store and data folder; offline unless ``offline_dir``
    is None."""
    env = dict(os.environ)
    env.update({"BENCH_CACHE_DIR": str(cache_dir), "BENCH_DB": db, "BENCH_DATA_DIR": str(data_dir)})
    env.pop("BENCH_SUBMISSIONS_DIR", None)
    if offline_dir is not None:
        offline_dir.mkdir(parents=True, exist_ok=True)
        (offline_dir / "sitecustomize.py").write_text(OFFLINE_SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(offline_dir), env.get("PYTHONPATH", "")) if p)
    return env


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _sqlite_path(db: str) -> Path | None:
    """The file of a SQLite store given as a path or ``sqlite:///`` URL; None for a server URL."""
    if "://" not in db:
        return Path(db).expanduser()
    match = re.fullmatch(r"sqlite(?:\+\w+)?:///(.+)", db)
    return Path(match[1]).expanduser() if match else None


def prepare_store(db: str | None, workdir: Path, *, in_place: bool) -> str:
    """The store URL the commands use: a fresh one in ``workdir``, a copy of a SQLite ``db``, or ``db`` itself."""
    if db is None:
        return f"sqlite:///{workdir / 'results.db'}"
    path = _sqlite_path(db)
    if path is None:
        return db
    path = path.resolve()
    if in_place:
        return f"sqlite:///{path}"
    if not path.is_file():
        raise ValueError(f"--db {db}: no SQLite store at {path} (run `make demo` first, or leave --db out)")
    copy = workdir / "results.db"
    # The backup API copies a consistent snapshot, write-ahead log included, even while another process writes.
    source = closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True))
    with source as reader, closing(sqlite3.connect(copy)) as writer:
        reader.backup(writer)
    return f"sqlite:///{copy}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(outcomes: Sequence[tuple[int, Outcome]]) -> str:
    """One row per command: number, README line, status, exit status, seconds, command, first error line."""
    rows = [("#", "line", "status", "exit", "seconds", "command", "error")]
    for number, o in outcomes:
        rc = "-" if o.returncode is None else str(o.returncode)
        rows.append(
            (
                str(number),
                str(o.command.line),
                o.status,
                rc,
                f"{o.seconds:.1f}",
                _short(o.command.text, 72),
                _short(o.error, 100),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _write_log(logs: Path, number: int, o: Outcome) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    text = (
        f"$ {o.command.text}\n# README line {o.command.line}; needs: {', '.join(o.needs) or 'nothing missing'}\n"
        f"# exit {o.returncode}, {o.seconds:.1f} s, {o.status}\n\n--- stdout\n{o.stdout}\n--- stderr\n{o.stderr}"
    )
    (logs / f"{number:02d}.log").write_text(text)


def _default_demo_db() -> str:
    return os.environ.get("BENCH_DB", "").strip() or str(ROOT / "results.db")


def _default_demo_cache() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR") or "~/.cache/apbench").expanduser()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the README's commands as on a fresh clone; exit 1 on a traceback, signal or timeout.",
        epilog="CI, after `make demo`: .venv/bin/python scripts/readme_tour.py --reuse-demo",
    )
    parser.add_argument("--readme", type=Path, default=README, help="README to read [%(default)s]")
    parser.add_argument("--list", action="store_true", help="print the numbered commands and what each needs")
    parser.add_argument("--only", metavar="N,M-K", help="run only these commands (numbers from --list)")
    parser.add_argument("--workdir", type=Path, help="folder to run in, kept afterwards [a new temporary one]")
    parser.add_argument("--cache-dir", type=Path, help="$BENCH_CACHE_DIR for the commands [WORKDIR/cache]")
    parser.add_argument("--db", help="store to reuse: a SQLite path or URL (copied, see --in-place) or a server URL")
    parser.add_argument("--in-place", action="store_true", help="write to the SQLite --db itself, not to a copy")
    parser.add_argument("--data-dir", type=Path, help="$BENCH_DATA_DIR for the commands [WORKDIR/data, empty]")
    parser.add_argument(
        "--reuse-demo",
        action="store_true",
        help="--cache-dir and --db as `make demo` used them ($BENCH_CACHE_DIR or ~/.cache/apbench; $BENCH_DB or "
        "results.db in the repository)",
    )
    parser.add_argument("--network", action="store_true", help="let the commands reach the network")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per command before it is killed [%(default)g]"
    )
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout {args.timeout:g}: give a positive number of seconds")
    if args.reuse_demo:
        args.cache_dir = args.cache_dir or _default_demo_cache()
        args.db = args.db or _default_demo_db()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        commands = extract_commands(args.readme.read_text(encoding="utf-8"))
        chosen = parse_only(args.only, len(commands)) if args.only else list(range(1, len(commands) + 1))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bench = Path(sys.executable).parent / "bench"
    if not bench.exists():
        print(
            f"error: no bench next to {sys.executable}; run this with the project's .venv/bin/python", file=sys.stderr
        )
        return 2

    if args.list:
        # Needs are judged against where the commands would run: an empty folder unless --workdir has files.
        where = (args.workdir.resolve() if args.workdir else Path(tempfile.gettempdir()) / "readme-tour") / "clone"
        data = (args.data_dir or where.parent / "data").resolve()
        ctx = Context(workdir=where, data_dir=data, network=args.network, cuda=cuda_available())
        for number in chosen:
            c = commands[number - 1]
            need = needs(c, ctx)
            print(f"{number:>3}  line {c.line:<4} {c.text}")
            if need:
                print(f"{'':>15}needs: {', '.join(need)}")
        return 0

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="readme-tour-")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = (args.data_dir or workdir / "data").resolve()
    try:
        db = prepare_store(args.db, workdir, in_place=args.in_place)
    except (OSError, ValueError, sqlite3.Error) as err:
        print(f"error: {err}", file=sys.stderr)
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return 2
    cache_dir = (args.cache_dir or workdir / "cache").expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = tour_env(
        cache_dir=cache_dir, db=db, data_dir=data_dir, offline_dir=None if args.network else workdir / "offline"
    )
    run_dir = workdir / "clone"  # where the user stands: nothing in it but what the commands write
    run_dir.mkdir(exist_ok=True)
    ctx = Context(workdir=run_dir, data_dir=data_dir, network=args.network, cuda=cuda_available())
    print(f"README tour: {len(chosen)} of {len(commands)} commands in {workdir}")
    print(f"  cache {cache_dir}\n  store {db}\n  data  {data_dir}\n  network {'on' if args.network else 'off'}")

    outcomes: list[tuple[int, Outcome]] = []
    for number in chosen:
        command = commands[number - 1]
        need = needs(command, ctx)
        print(f"[{number}/{len(commands)}] {command.text}", flush=True)
        outcome = run_command(command, bench=bench, cwd=run_dir, env=env, timeout=args.timeout, need=need)
        _write_log(workdir / "logs", number, outcome)
        print(
            f"    {outcome.status}, exit {outcome.returncode}, {outcome.seconds:.1f} s"
            + (f": {outcome.error}" if outcome.error else ""),
            flush=True,
        )
        outcomes.append((number, outcome))

    print()
    print(format_table(outcomes))
    failed = [(n, o) for n, o in outcomes if o.failed]
    for number, o in failed:
        print(f"\n--- #{number} {o.status}: {o.command.text}  (README line {o.command.line})")
        lines = _clean_lines(o.stdout + "\n" + o.stderr)
        print("\n".join("    " + line for line in lines[-15:]))
    if failed:
        print(f"\n{len(failed)} of {len(outcomes)} commands failed; outputs in {workdir / 'logs'}")
        return 1
    print(f"\nall {len(outcomes)} commands ended cleanly")
    if own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
