"""A private PostgreSQL server for tests: `initdb` in a temporary folder, `pg_ctl start` on a free loopback
port, stopped at the end. PostgreSQL refuses to run as root, so as root the server runs as the unprivileged
user `nobody` (its folder is handed to that user). The binaries come from PATH or Debian's
/usr/lib/postgresql/<version>/bin (`scripts/setup.sh --test` installs the `postgresql` package).

The test server runs with fsync off: the tests kill app processes, never the database server, so what
they check (a write acknowledged by the app is committed in the database) does not depend on it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

UNPRIVILEGED_USER = "nobody"
START_TIMEOUT_S = 60


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self):
        self.initdb, self.pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("PostgreSQL's initdb/pg_ctl are not installed: run scripts/setup.sh --test "
                                    "(it installs Debian's postgresql package)")
        self.root = Path(tempfile.mkdtemp(prefix="assistant-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0

    def _run(self, *args, check=True):
        cmd = list(args)
        if self.as_root:
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                              cwd=self.root, env={**os.environ, "LC_ALL": "C"})

    def start(self, fsync: bool = False) -> "PostgresServer":
        """`fsync`: on for benchmarks (commits as durable as in production), off for tests."""
        if self.as_root:
            pw = pwd.getpwnam(UNPRIVILEGED_USER)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            os.chmod(self.root, 0o755)
            os.chown(self.root, self.uid, self.gid)
        self._run(self.initdb, "-D", str(self.data), "-U", "assistant", "-A", "trust", "-E", "UTF8", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' " \
               f"-c fsync={'on' if fsync else 'off'} -c max_connections=300"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w",
                  "-t", str(START_TIMEOUT_S), "start")
        return self

    def stop(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://assistant@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database -> its URL."""
        import psycopg
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
