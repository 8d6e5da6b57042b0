"""One running evaluation per (model, run spec) at a time, across processes and machines.

:func:`bench.evaluate.evaluate` holds it while it attacks; a second identical ``evaluate`` waits for it and then
reuses (or resumes) the first one's work instead of attacking the same chunks twice. Executors that split an
evaluation between processes do not take it: their chunk commits are idempotent (:mod:`bench.evaluation.commits`).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import sys
import time
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from bench.evaluation.commits import missing_chunks
from bench.spec import RunSpec
from bench.store import Evaluation, Model, Store
from bench.store.db import _sqlite_file

try:
    import fcntl
except ImportError:  # not POSIX: evaluations of a SQLite store are not locked against each other (RunLock)
    fcntl = None


class RunLock:
    """At most one :func:`bench.evaluate.evaluate` per (model, run spec) at a time, across processes; released when
    its holder ends, however it ends (killed included).

    PostgreSQL: a session-level advisory lock on a connection held for the run (the server drops it with the
    connection), whose ``application_name`` names the holder's pid and host. SQLite: a POSIX record lock on one
    byte of ``<store>-evaluations.lock`` next to the store (SQLite's own files are never locked by us: closing any
    descriptor of a file drops every POSIX lock the process holds on it); ``F_GETLK`` names the holder's pid. A
    store without a file (in memory) or a system without ``fcntl`` runs unlocked.
    """

    def __init__(self, store: Store, model_id: int, spec: RunSpec) -> None:
        # 56 bits: a positive PostgreSQL bigint and a byte offset every off_t holds.
        self.key = int.from_bytes(hashlib.sha256(f"{model_id}:{spec.hash}".encode()).digest()[:7], "big")
        self.store = store
        self.held = False
        self._conn = None
        self._fd: int | None = None
        url = make_url(store.url)
        self._postgres = url.get_backend_name() == "postgresql"
        path = None if self._postgres or fcntl is None else _sqlite_file(url)
        self._path = None if path is None else Path(f"{path}-evaluations.lock")

    def try_acquire(self) -> bool:
        if self._postgres:
            if self._conn is None:
                self._conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self.held = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
            if self.held:
                name = f"apbench evaluate pid {os.getpid()} on {socket.gethostname()}"[:63]
                self._conn.execute(text("SELECT set_config('application_name', :n, false)"), {"n": name})
            return self.held
        if self._path is None:
            self.held = True
            return True
        if self._fd is None:
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError:  # a folder we cannot write: the store cannot be written either, and says so
                self._path = None
                self.held = True
                return True
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.key)
        except OSError:  # EAGAIN or EACCES: another process holds it
            return False
        self.held = True
        return True

    def acquire(self, poll_s: float = 1.0) -> None:
        while not self.try_acquire():
            time.sleep(poll_s)

    def holder(self) -> tuple[int | None, str | None]:
        """The pid and host of the process holding the lock, where the system tells (None, None) otherwise."""
        if self._postgres and self._conn is not None:
            name = self._conn.execute(
                text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                    "AND l.classid::bigint = :hi AND l.objid::bigint = :lo "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"hi": self.key >> 32, "lo": self.key & 0xFFFFFFFF},
            ).scalar()
            found = re.fullmatch(r"apbench evaluate pid (\d+) on (.*)", name or "")
            return (int(found[1]), found[2]) if found else (None, None)
        if self._fd is not None and sys.platform.startswith("linux"):
            # struct flock on Linux (x86-64, arm64): l_type, l_whence, l_start, l_len, l_pid.
            fmt = "hhqqi"
            request = struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, self.key, 1, 0)
            try:
                kind, _, _, _, pid = struct.unpack(fmt, fcntl.fcntl(self._fd, fcntl.F_GETLK, request))
            except OSError:
                return None, None
            if kind != fcntl.F_UNLCK and pid > 0:
                return pid, socket.gethostname()
        return None, None

    def release(self) -> None:
        if self._conn is not None:
            try:
                if self.held:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                    self._conn.execute(text("RESET application_name"))
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # drops the record lock
            self._fd = None
        self.held = False


def running_line(store: Store, evaluation_id: int, spec: RunSpec, holder: tuple[int | None, str | None]) -> str:
    """The line a waiting ``evaluate`` logs: which evaluation runs, who holds it (:meth:`RunLock.holder`), how far."""
    with store.session() as s:
        name = s.scalar(select(Model.name).join(Evaluation).where(Evaluation.id == evaluation_id))
    n = len(spec.chunks())
    done = n - len(missing_chunks(store, evaluation_id, spec))
    pid, host = holder
    who = f"pid {pid} on {host}" if pid is not None else "another process"
    return f"evaluation #{evaluation_id} of {name} is running ({who}, chunks {done}/{n} done); waiting…"
