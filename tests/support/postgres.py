"""A throwaway PostgreSQL server from Debian's binaries, for the state store's tests.

`running_postgres()` initializes a cluster in a temporary directory (trust
authentication on loopback, role `hoop`), starts it on a free port with `pg_ctl` and
yields its URL; the server is stopped and the directory removed at the end. initdb
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


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Start a server; yields `postgresql://hoop@127.0.0.1:PORT/postgres`. Raises
    `RuntimeError` naming what failed (with the server's log)."""
    bindir = binaries()
    if bindir is None:
        raise RuntimeError("PostgreSQL's binaries are not installed (/usr/lib/postgresql/*/bin)")
    root = Path(tempfile.mkdtemp(prefix="hoop-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = root / "data", root / "server.log", free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}\n{server_log}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "hoop", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "30", "-o",
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off", "start")
        try:
            yield f"postgresql://hoop@127.0.0.1:{port}/postgres"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
