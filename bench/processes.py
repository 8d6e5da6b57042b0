"""A child process that ends with its parent: one home for the parent-death signal every worker pool arms.

Worker processes (the evaluator's, :mod:`bench.evaluation.workers`; the site's, :mod:`leaderboard.per_sample`) and
the test suite's PostgreSQL server must not outlive the process that started them: an orphaned worker kept
attacking, or writing into a build folder, after its parent was killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent", "set_parent_death_signal"]

# <sys/prctl.h>
PR_SET_PDEATHSIG = 1
# How often a process checks that its parent still lives where no parent-death signal exists.
PARENT_POLL_S = 1.0


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread ends (Linux' ``prctl``).

    Returns ``False`` where there is no such request (not Linux, or no libc to ask); callers then watch the parent
    themselves (:func:`die_with_parent`). Safe in a ``subprocess`` ``preexec_fn``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends, however it ends (``kill -9`` included).

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, the kernel kills the process the moment its parent dies. Everywhere:
    a daemon thread polling ``os.getppid()``, which changes when the parent dies (the orphan is reparented). Without
    either, orphaned workers kept attacking and printed BrokenPipe tracebacks when sending their results.
    """
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="apbench-parent-watch", daemon=True).start()
