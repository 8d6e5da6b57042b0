"""bench.processes: a child armed with the parent-death signal ends when its parent ends; one not armed lives on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

CHILD = {
    # Armed by the parent between fork and exec (what the test PostgreSQL server does).
    "signal": "from bench.processes import set_parent_death_signal\n"
    "child = subprocess.Popen(SLEEP, preexec_fn=lambda: set_parent_death_signal(signal.SIGKILL), **QUIET)\n",
    # Armed by the child itself, knowing its parent's pid (what the evaluator's and the site's workers do).
    "die_with_parent": "child = subprocess.Popen([sys.executable, '-c', 'import os, time; from bench.processes import "
    "die_with_parent; die_with_parent(os.getppid()); print(1, flush=True); time.sleep(60)'], stdout=subprocess.PIPE, "
    "stderr=subprocess.DEVNULL)\n"
    "child.stdout.readline()\n",
    # The control: nothing armed.
    "none": "child = subprocess.Popen(SLEEP, **QUIET)\n",
}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; only its exit status waits to be read


def _orphan(kind: str) -> int:
    """Start a parent that starts a sleeping child as ``kind`` says, prints the child's pid and exits at once."""
    # The children hold none of the parent's pipes, so the parent's output ends when the parent does.
    code = "import signal, subprocess, sys\nSLEEP = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
    code += "QUIET = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    code += CHILD[kind] + "print(child.pid, flush=True)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=60, check=True)  # fmt: skip
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kind", ["signal", "die_with_parent", "none"])
def test_a_child_armed_with_the_parent_death_signal_ends_with_its_parent(kind):
    pid = _orphan(kind)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert _alive(pid) == (kind == "none")
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
