"""A throwaway PostgreSQL server for tests: the Debian binaries, loopback only, a free port.

PostgreSQL refuses to run as root, so under uid 0 every server command runs as the
``postgres`` user (``runuser``) on a data folder it owns. Password authentication over TCP is
real (scram-sha-256), so a URL's password is needed and can be checked for leaks.
Missing binaries or driver: the tests skip with the reason, unless
``NAS_FAIR_REQUIRE_SYSTEM_TESTS=1`` (CI), where they fail instead.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PASSWORD = "nf-Secr3t-pw-4242"  # distinctive, so any leak is found by a plain search
USER = "postgres"


def require(reason: str) -> None:
    """Skip (or fail where system tests are required) with ``reason``."""
    if os.environ.get("NAS_FAIR_REQUIRE_SYSTEM_TESTS") == "1":
        pytest.fail(f"{reason} (NAS_FAIR_REQUIRE_SYSTEM_TESTS=1)")
    pytest.skip(reason)


def find_bindir() -> Path | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    which = shutil.which("pg_ctl")
    if which:
        dirs.append(str(Path(which).resolve().parent))
    for d in dirs:
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="nasfair-pg-"))  # /tmp: reachable by postgres
        self.data = self.root / "data"
        self.port = _free_port()
        self._names = itertools.count()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", USER, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stderr[-2000:]}\n{tail}")

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_postgres:
            import pwd

            pw = pwd.getpwnam(USER)
            for p in (self.root, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", USER, "-E", "UTF8", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "-o", opts, "start")

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database for one test; returns its URL."""
        import psycopg2

        name = f"t{next(self._names)}_{os.getpid()}"
        con = psycopg2.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                               dbname="postgres")
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                          timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """A running server, or a skip (fail under NAS_FAIR_REQUIRE_SYSTEM_TESTS=1) saying why."""
    bindir = find_bindir()
    if bindir is None:
        require("PostgreSQL server binaries (initdb, pg_ctl) not found; "
                "apt-get install postgresql")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        require("the psycopg2 driver is not installed; pip install psycopg2-binary")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        require("running as root without runuser: cannot start PostgreSQL as its own user")
    server = PostgresServer(bindir)
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    return server
