"""A throwaway PostgreSQL server from Debian's binaries, for the state store's tests.

`running_postgres()` initializes a cluster in a temporary directory (trust
authentication on loopback, role `hoop`), starts it on a free port with `pg_ctl` and
yields it (`Postgres`: its `url`, `stop()`, `start()`); the server is stopped and the directory removed at the end. initdb
and postgres refuse to run as root: as root, the cluster belongs to (and runs as) the
`postgres` user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def binaries() -> Path | None:
    """The newest `/usr/lib/postgresql/*/bin` holding initdb and pg_ctl, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found and Path(found[-1]).with_name("pg_ctl").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """One throwaway server: `url` (`postgresql://hoop@127.0.0.1:PORT/postgres`),
    `start()` and `stop()` (idempotent; `running_postgres` calls both). Raises
    `RuntimeError` naming what failed (with the server's log)."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir, self.root = bindir, root
        self.data, self.log, self.port = root / "data", root / "server.log", free_port()
        self.url = f"postgresql://hoop@127.0.0.1:{self.port}/postgres"
        self.as_user: list[str] = []
        self.running = False
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "hoop", "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bindir / program), *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            server_log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed: {done.stderr.strip()}\n{server_log}")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A started server in a temporary directory, stopped and removed at the end.
    Raises `RuntimeError` when the binaries are missing or the server fails."""
    bindir = binaries()
    if bindir is None:
        raise RuntimeError("PostgreSQL's binaries are not installed (/usr/lib/postgresql/*/bin)")
    root = Path(tempfile.mkdtemp(prefix="hoop-pg-"))
    try:
        server = Postgres(bindir, root)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
