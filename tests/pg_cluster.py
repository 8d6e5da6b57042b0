"""A throwaway PostgreSQL server for the tests: ``initdb`` in a temporary folder, 127.0.0.1 on a free port.

The store's tests run against SQLite and a real PostgreSQL server (never a mock). ``start_cluster`` creates a
cluster with trust authentication in a fresh temporary folder (its unix socket lives there too), starts
``postgres`` on 127.0.0.1 and a free port, and waits until it accepts connections; ``PostgresCluster.stop``
stops that process by its pid and removes the folder. ``initdb`` refuses to run as root, so as root the server
runs as the unprivileged ``postgres`` user that Debian's packages create.

Run as a script (``scripts/pg-test-cluster``) it starts a cluster, prints its URL and keeps it up until
interrupted: a store for trying ``bench ... --db postgresql://...`` by hand.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import set_parent_death_signal

# A folder holding initdb and postgres, when neither the PATH nor /usr/lib/postgresql/*/bin has them.
PG_BIN_ENV = "APBENCH_PG_BIN"
SERVER_USER = "postgres"  # the OS user the server runs as when we are root
SUPERUSER = "postgres"  # the database role initdb creates


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started here; the message says why and what to install."""


def find_bindir() -> Path:
    """The folder holding ``initdb`` and ``postgres``: ``$APBENCH_PG_BIN``, the PATH, or the newest Debian one."""
    candidates = []
    if os.environ.get(PG_BIN_ENV):
        candidates.append(Path(os.environ[PG_BIN_ENV]))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)

    def version(path: Path) -> float:
        match = re.search(r"/postgresql/([\d.]+)/", str(path))
        return float(match.group(1)) if match else 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, postgres) found on the PATH or in /usr/lib/postgresql/*/bin; "
        f"install them (apt-get install postgresql) or point ${PG_BIN_ENV} at their folder"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child after it switched user: if the test process is killed outright, the server follows
    # instead of living on as an orphan (SIGQUIT: immediate shutdown, nothing worth keeping).
    set_parent_death_signal(signal.SIGQUIT)


@dataclass
class PostgresCluster:
    """A running throwaway server; ``url(name)`` is the SQLAlchemy URL of one of its databases."""

    root: Path
    port: int
    process: subprocess.Popen
    _created: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _admin(self):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (a copy of template0: no objects, no connections to wait for); returns its name."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and underscores")
        with self._admin() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        self._created.append(name)
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            # FORCE ends the connections a test's engine may still hold (PostgreSQL 13+).
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if name in self._created:
            self._created.remove(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server by its pid (fast shutdown, then SIGKILL) and remove the cluster's folder."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=timeout)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _user_args() -> dict:
    """Popen arguments that drop root to the ``postgres`` user (initdb and postgres refuse to run as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, and initdb refuses root: create an unprivileged user {SERVER_USER!r} "
            f"(adduser --system --group {SERVER_USER}) or run the tests as another user"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ready(data: Path) -> bool:
    # postmaster.pid's eighth line is the server's status; "ready" once it accepts connections (PostgreSQL 10+).
    try:
        fields = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(fields) >= 8 and fields[7].strip() == "ready"


def start_cluster(*, timeout: float = 60.0, attempts: int = 3) -> PostgresCluster:
    """initdb a cluster in a new temporary folder and start its server on 127.0.0.1; see the module doc."""
    bindir = find_bindir()
    user = _user_args()
    root = Path(tempfile.mkdtemp(prefix="apbench-pg-"))
    try:
        if user:
            os.chown(root, user["user"], user["group"])
        data = root / "data"
        init = subprocess.run(
            [bindir / "initdb", "-D", data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
            capture_output=True,
            text=True,
            timeout=timeout,
            **user,
        )
        if init.returncode != 0:
            tail = " | ".join((init.stderr or init.stdout).strip().splitlines()[-3:])
            raise PostgresUnavailable(f"initdb failed (exit {init.returncode}): {tail}")
        for _ in range(attempts):
            cluster = _start_server(bindir, root, data, user, timeout)
            if cluster is not None:
                return cluster
        raise PostgresUnavailable(
            f"postgres did not start in {attempts} attempts; its log says: {_log_tail(root / 'postgres.log')}"
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _start_server(bindir: Path, root: Path, data: Path, user: dict, timeout: float) -> PostgresCluster | None:
    """Start postgres on a free port; None when the port was taken meanwhile (the caller tries another)."""
    port = _free_port()
    log = root / "postgres.log"
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(root),
        # Durability buys nothing for a server that is thrown away after the tests.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
    }
    args = [bindir / "postgres", "-D", data]
    for key, value in settings.items():
        args += ["-c", f"{key}={value}"]
    with open(log, "ab") as out:
        if user:
            os.chown(log, user["user"], user["group"])
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches the tests, whose teardown then stops the server.
            start_new_session=True,
            preexec_fn=_die_with_parent,
            **user,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if "could not bind" in _log_tail(log, 20) or "already in use" in _log_tail(log, 20):
                return None
            raise PostgresUnavailable(f"postgres exited with status {process.returncode}: {_log_tail(log)}")
        if _ready(data):
            return PostgresCluster(root=root, port=port, process=process)
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise PostgresUnavailable(f"postgres was not ready after {timeout:.0f} s: {_log_tail(log)}")


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM would skip the cleanup.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        cluster = start_cluster()
    except PostgresUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        name = cluster.create_database("apbench")
        print(f"PostgreSQL (pid {cluster.process.pid}) in {cluster.root}; stop it with Ctrl-C", file=sys.stderr)
        print(cluster.url(name), flush=True)
        cluster.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
