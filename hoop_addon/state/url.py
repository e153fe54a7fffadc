"""`hoop_state` URLs: which store a process uses."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from hoop_addon.state.approvals import ApprovalStore, MemoryStore, Rules, redact
from hoop_addon.state.sql import PostgresStore, SQLiteStore


def open_store(url: str, rules: Rules, lease_s: float = 15.0) -> ApprovalStore:
    """The store `url` names: `memory` (or empty), `sqlite:///ABSOLUTE/PATH` or
    `postgresql://[user[:password]@]host[:port]/dbname[?param=value]` (libpq URI,
    `postgres://` too). `rules` resolves rule names for rows read back; `lease_s` is
    the heartbeat lease (seconds). Connects and creates the tables at once.
    Raises `ValueError` (a sentence) for a URL it does not accept and `StateError`
    when the store cannot be reached (`hoop_addon.state.approvals.StateError`)."""
    if url in ("", "memory", "memory://"):
        return MemoryStore()
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or not url[len("sqlite://"):].startswith("/"):
            raise ValueError(f"'{url}': write sqlite:///ABSOLUTE/PATH (three slashes, then the absolute path)")
        path = Path(url[len("sqlite://"):])
        if not path.parent.is_dir():
            raise ValueError(f"'{url}': the directory {path.parent} does not exist")
        return SQLiteStore(path, rules, lease_s)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url, rules, lease_s)
    raise ValueError(f"'{redact(url)}' is not a state store: use memory, sqlite:///ABSOLUTE/PATH or postgresql://...")
