"""A PostgreSQL server of a run's own, to stop for real: Debian's server binaries (``/usr/lib/postgresql/N/bin``:
``initdb``, ``pg_ctl``; the package the shared cluster on 127.0.0.1:5432 comes from), a data directory and a unix
socket directory in a private directory under /tmp, listening on 127.0.0.1 on a free port, trust authentication.
The shared cluster serves other test runs at the same time; this one can be stopped, crashed and started again
without failing them (the HA fault soak, benchmarks/ha_chaos.py, and its short version in the suite).

As root the binaries run as the ``postgres`` user (``initdb`` and the server refuse root); otherwise as the user
running them. Fast enough for tests: ``fsync=off``, ``full_page_writes=off`` (a crash here is the server's processes
dying, never the machine's page cache, so crash recovery still finds every WAL record and whole pages).

::

    with pg_server() as pg:
        pg.create_database("fleet_x")
        url = pg.url("fleet_x")         # postgresql+psycopg://postgres@127.0.0.1:PORT/fleet_x
        pg.stop("immediate")            # a crash: every backend gone at once, no checkpoint
        pg.start()                      # crash recovery, then accepting connections
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import psycopg

PG_LIB = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
StopMode = Literal["smart", "fast", "immediate"]  # pg_ctl stop -m: wait for clients / disconnect them / crash


def server_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/N/bin`` that has ``initdb`` and ``pg_ctl``."""
    found = sorted((d for d in PG_LIB.glob("*/bin") if (d / "initdb").exists() and (d / "pg_ctl").exists()),
                   key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError(f"no PostgreSQL server binaries under {PG_LIB}/*/bin (initdb, pg_ctl); install Debian's "
                           "postgresql package (apt-get install postgresql) — the shared test cluster comes from it")
    return found[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One server: ``init`` once, then ``start`` and ``stop`` as often as a test likes."""

    def __init__(self, root: Path, port: int, bin_dir: Path) -> None:
        self.root = root
        self.port = port
        self.bin = bin_dir
        self.data = root / "data"
        self.sockets = root / "sock"
        self.logfile = root / "server.log"
        self.host = "127.0.0.1"
        self.as_server_user = os.geteuid() == 0

    def dsn(self, db: str = "postgres") -> str:
        """A libpq connection string for psycopg (as the ``postgres`` role, trust)."""
        return f"host={self.host} port={self.port} user={SERVER_USER} dbname={db} connect_timeout=3"

    def url(self, db: str) -> str:
        """A SQLAlchemy URL, as the controller's ``--db`` takes it."""
        return f"postgresql+psycopg://{SERVER_USER}@{self.host}:{self.port}/{db}"

    # ---- life ----

    def init(self) -> None:
        self.sockets.mkdir(parents=True, exist_ok=True)
        if self.as_server_user:  # the server user must own its data and socket directories and reach the log
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
            shutil.chown(self.sockets, SERVER_USER, SERVER_USER)
        self._run("initdb", "-D", str(self.data), "-U", SERVER_USER, "--auth=trust", "--no-sync", "-E", "UTF8",
                  "--locale=C.UTF-8", timeout=120)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# written by tests/integration/harness/pgserver.py\nport = {self.port}\n"
                       f"listen_addresses = '{self.host}'\nunix_socket_directories = '{self.sockets}'\n"
                       "max_connections = 200\nfsync = off\nfull_page_writes = off\nshared_buffers = 32MB\n")

    def start(self, timeout: float = 60.0) -> float:
        """Start the server (after a crash: recovery first) and wait until it takes connections: seconds taken."""
        t0 = time.monotonic()
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", f"{timeout:.0f}",
                  timeout=timeout + 10)
        self.wait_accepting(timeout)
        return time.monotonic() - t0

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> float:
        """``pg_ctl stop -m MODE`` and wait until the server is gone: seconds taken."""
        t0 = time.monotonic()
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", f"{timeout:.0f}",
                  timeout=timeout + 10)
        return time.monotonic() - t0

    def running(self) -> bool:
        return self._ctl_status() == 0

    def wait_accepting(self, timeout: float) -> None:
        """``pg_ctl -w`` returns once the postmaster says ready; a TCP connection on our port is what clients need."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn()) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL on port {self.port} takes no connection after {timeout:g} s\n"
                                       f"{self.log()}") from None
                time.sleep(0.1)

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def log(self, lines: int = 30) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return f"--- {self.logfile}:\n" + "\n".join(text.splitlines()[-lines:])

    def _ctl_status(self) -> int:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode

    def _run(self, tool: str, *args: str, timeout: float = 30.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / tool), *args]
        if self.as_server_user:
            argv = ["runuser", "-u", SERVER_USER, "--", *argv]
        # own session: the server outlives pg_ctl, and a Ctrl-C of the run must not reach it before the finally
        # that stops it (its output goes to -l's log, never to our pipe)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, check=False, cwd=self.root, start_new_session=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{self.log()}")
        return proc


@contextlib.contextmanager
def pg_server() -> Iterator[PgServer]:
    """A started server of the caller's own; crashed (``-m immediate``: nothing to keep) and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pgserver-", dir="/tmp"))  # short: the socket path must fit 107 bytes
    server = PgServer(root, free_port(), server_bin_dir())
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.data.exists() and server.running():
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
