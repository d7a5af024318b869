"""A real PostgreSQL for the tests and benchmarks: the server `.ci/run` started (``EVOMERGE_TEST_POSTGRES``), or a private one.

A private server is a fresh cluster (``initdb``) in a temporary directory, listening on a free port on
localhost, started and stopped with ``pg_ctl``; the fault tests restart it under running workers. It
needs Debian's ``postgresql`` package (the binaries under ``/usr/lib/postgresql/*/bin`` or on PATH); as
root the server runs as the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

ENV_URL = "EVOMERGE_TEST_POSTGRES"


def pg_bin(name: str) -> str | None:
    """The path of a PostgreSQL server binary (initdb, pg_ctl), or None when the server is not installed."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """A throw-away PostgreSQL cluster on localhost, trust authentication, user ``postgres``."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                                    "install Debian's postgresql package")
        self.root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self.start()

    def _run(self, *args: str) -> None:
        res = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {res.stdout}{res.stderr}")

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c max_connections=200"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "start")

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def new_database(server_url: str) -> str:
    """A new, empty database on the server of ``server_url``; returns its URL (one per test: no shared state)."""
    import psycopg

    name = "evomerge_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    from sqlalchemy.engine import make_url

    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def unavailable_reason() -> str | None:
    """Why no PostgreSQL can be had for the tests (None when one can)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if os.environ.get(ENV_URL):
        return None
    if not (pg_bin("initdb") and pg_bin("pg_ctl")):
        return (f"no PostgreSQL: set {ENV_URL}=postgresql://... or install Debian's postgresql package "
                f"(.ci/run does both)")
    return None
