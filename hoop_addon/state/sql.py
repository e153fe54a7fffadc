"""The SQL backends of the approval store: SQLite (one host) and PostgreSQL (several).

One table is the record (`hoop_approvals`), one holds the processes' leases
(`hoop_holders`). Both backends run the same statements (written with `?`
placeholders); they differ in how a transaction locks (SQLite `BEGIN IMMEDIATE`: one
writer at a time; PostgreSQL `SELECT ... FOR UPDATE`: the row) and in how the holder
of a flow learns of a decision: SQLite's holder polls every `SQLITE_POLL_S`;
PostgreSQL's decider sends `NOTIFY hoop_approvals, '<id>'` in the deciding
transaction and a listener thread in each process wakes the holder (the table stays
the record: a missed notification is caught by a poll every `PG_POLL_S`).

Calls are synchronous and serialized by a lock per store, each one short
transaction; the approval stage runs them on worker threads, with a time limit.
Errors of the database become `StateError`; a lost PostgreSQL connection is opened
again on the next call.
"""

from __future__ import annotations

import abc
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg

from hoop_addon.approvals.queue import PendingApproval
from hoop_addon.state.approvals import ApprovalStore, Rules, StateError, kept_s, redact

SQLITE_POLL_S = 0.05
PG_POLL_S = 1.0
CONNECT_TIMEOUT_S = 3
CHANNEL = "hoop_approvals"

COLUMNS = ("id, owner, rule, mode, subject, key, requester, request, created, deadline, keep_s, decisions, "
           "outcome, decided_at, redeemed")
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS hoop_approvals (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, rule TEXT NOT NULL, mode TEXT NOT NULL, subject TEXT,
        key TEXT NOT NULL, requester TEXT NOT NULL, request TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
        deadline DOUBLE PRECISION NOT NULL, keep_s DOUBLE PRECISION NOT NULL, decisions TEXT NOT NULL,
        outcome TEXT, decided_at DOUBLE PRECISION, redeemed INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS hoop_approvals_pending ON hoop_approvals (outcome, created)",
    "CREATE TABLE IF NOT EXISTS hoop_holders (owner TEXT PRIMARY KEY, expires DOUBLE PRECISION NOT NULL)",
    # the tokenize vault (`hoop_addon.state.vault`): keys are HMACs, values AES-GCM sealed
    """CREATE TABLE IF NOT EXISTS hoop_vault (
        sid TEXT NOT NULL, token TEXT NOT NULL, label TEXT NOT NULL, n INTEGER NOT NULL, vkey TEXT NOT NULL,
        sealed TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL, PRIMARY KEY (sid, token), UNIQUE (sid, vkey))""",
    "CREATE INDEX IF NOT EXISTS hoop_vault_expires ON hoop_vault (expires)",
    """CREATE TABLE IF NOT EXISTS hoop_vault_next (
        sid TEXT NOT NULL, label TEXT NOT NULL, n INTEGER NOT NULL, expires DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (sid, label))""",
    "CREATE INDEX IF NOT EXISTS hoop_vault_next_expires ON hoop_vault_next (expires)",
    # rate-limit windows (`hoop_addon.state.counters`): one row per window and slot
    """CREATE TABLE IF NOT EXISTS hoop_counters (
        ident TEXT NOT NULL, slot BIGINT NOT NULL, n DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (ident, slot))""",
    "CREATE INDEX IF NOT EXISTS hoop_counters_expires ON hoop_counters (expires)",
    # MCP tool pins (`hoop_addon.state.pins`)
    """CREATE TABLE IF NOT EXISTS hoop_pins (
        route TEXT NOT NULL, tool TEXT NOT NULL, fingerprint TEXT NOT NULL, pinned_at DOUBLE PRECISION NOT NULL,
        changed TEXT, definition TEXT, changed_at DOUBLE PRECISION, reported INTEGER NOT NULL,
        PRIMARY KEY (route, tool))""",
)
Run = Callable[..., list[tuple[Any, ...]]]


class SQLStore(ApprovalStore):
    """The statements both backends share; subclasses provide `transaction` (a
    context yielding `run(sql, *params) -> rows`), `for_update` and `_notify`."""

    for_update = ""

    def __init__(self, rules: Rules, lease_s: float) -> None:
        super().__init__()
        self.rules, self.lease_s = rules, lease_s
        self.lock = threading.Lock()

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[Run]:
        """A transaction on the store's connection, yielding `run(sql, *params) -> rows`."""

    def _notify(self, run: Run, ids: list[str]) -> None:
        """Wake the holders of `ids` (inside the deciding transaction)."""

    def _item(self, row: tuple[Any, ...]) -> PendingApproval | None:
        (id_, _owner, rule_name, _mode, _subject, key, requester, request, created, deadline, _keep,
         decisions, outcome, decided_at, redeemed) = row
        if (rule := self.rules(rule_name)) is None:
            return None
        return PendingApproval(
            id=id_, rule=rule, requester=orjson.loads(requester), request=orjson.loads(request), key=key,
            created=created, deadline=deadline, decisions=orjson.loads(decisions), outcome=outcome,
            decided_at=decided_at, redeemed=bool(redeemed),
        )

    def _items(self, rows: list[tuple[Any, ...]]) -> list[PendingApproval]:
        return [item for row in rows if (item := self._item(row)) is not None]

    def add(self, item: PendingApproval) -> None:
        with self.transaction() as run:
            run(f"INSERT INTO hoop_approvals ({COLUMNS}) VALUES ({', '.join('?' * 15)})",
                item.id, self.owner, item.rule.name, item.rule.mode, item.requester.get("subject"), item.key,
                orjson.dumps(item.requester).decode(), orjson.dumps(item.request).decode(), item.created,
                item.deadline, kept_s(item), orjson.dumps(item.decisions).decode(), item.outcome, item.decided_at,
                int(item.redeemed))

    def get(self, approval_id: str) -> PendingApproval | None:
        with self.transaction() as run:
            rows = run(f"SELECT {COLUMNS} FROM hoop_approvals WHERE id = ?", approval_id)
        return self._item(rows[0]) if rows else None

    def pending(self) -> list[PendingApproval]:
        with self.transaction() as run:
            return self._items(run(f"SELECT {COLUMNS} FROM hoop_approvals WHERE outcome IS NULL ORDER BY created"))

    def update(self, approval_id: str, change: Callable[[PendingApproval], None]) -> PendingApproval | None:
        with self.transaction() as run:
            rows = run(f"SELECT {COLUMNS} FROM hoop_approvals WHERE id = ?{self.for_update}", approval_id)
            if not rows or (item := self._item(rows[0])) is None:
                return None
            before = item.outcome
            change(item)  # raises: the transaction rolls back, nothing is written
            run("UPDATE hoop_approvals SET decisions = ?, outcome = ?, decided_at = ? WHERE id = ?",
                orjson.dumps(item.decisions).decode(), item.outcome, item.decided_at, approval_id)
            if item.outcome is not None and before is None:
                self._notify(run, [approval_id])
            return item

    def redeem(self, approval_id: str) -> bool:
        with self.transaction() as run:
            return bool(run("UPDATE hoop_approvals SET redeemed = 1 WHERE id = ? AND outcome = 'approved' "
                            "AND redeemed = 0 RETURNING id", approval_id))

    def delete(self, approval_id: str) -> None:
        with self.transaction() as run:
            run("DELETE FROM hoop_approvals WHERE id = ?", approval_id)

    def ticket(self, subject: str, key: str) -> PendingApproval | None:
        with self.transaction() as run:
            rows = run(f"SELECT {COLUMNS} FROM hoop_approvals WHERE mode = 'ticket' AND subject = ? AND key = ? "
                       "AND redeemed = 0 ORDER BY created", subject, key)
        return next(iter(self._items(rows)), None)

    def _close_where(self, run: Run, outcome: str, now: float, where: str, *params: Any) -> list[PendingApproval]:
        rows = run(f"UPDATE hoop_approvals SET outcome = ?, decided_at = ? WHERE outcome IS NULL AND {where} "
                   f"RETURNING {COLUMNS}", outcome, now, *params)
        self._notify(run, [row[0] for row in rows])
        return self._items(rows)

    def expire(self, now: float) -> list[PendingApproval]:
        with self.transaction() as run:
            expired = self._close_where(run, "timeout", now, "deadline <= ?", now)
            run("DELETE FROM hoop_approvals WHERE outcome IS NOT NULL AND decided_at + keep_s <= ?", now)
        return expired

    def shutdown(self, now: float) -> list[PendingApproval]:
        with self.transaction() as run:
            closed = self._close_where(run, "shutdown", now, "owner = ?", self.owner)
            run("DELETE FROM hoop_holders WHERE owner = ?", self.owner)
        return closed

    def heartbeat(self, now: float) -> list[PendingApproval]:
        with self.transaction() as run:
            run("INSERT INTO hoop_holders (owner, expires) VALUES (?, ?) "
                "ON CONFLICT (owner) DO UPDATE SET expires = excluded.expires", self.owner, now + self.lease_s)
            # a row whose owner has no live lease: its process died (kill -9, lost host)
            closed = self._close_where(run, "abandoned", now, "owner NOT IN (SELECT owner FROM hoop_holders "
                                       "WHERE expires > ?)", now)
            run("DELETE FROM hoop_holders WHERE expires <= ?", now)
        return closed

    def decided(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        with self.transaction() as run:
            undecided = {row[0] for row in run(f"SELECT id FROM hoop_approvals WHERE outcome IS NULL AND id IN "
                                               f"({', '.join('?' * len(ids))})", *ids)}
        return set(ids) - undecided


class SQLiteStore(SQLStore):
    """Approvals in an SQLite database file (WAL journal: readers do not block the
    writer; `BEGIN IMMEDIATE`: one writing transaction at a time, across processes).
    Holders poll for decisions every `SQLITE_POLL_S` seconds."""

    poll_s = SQLITE_POLL_S

    def __init__(self, path: Path, rules: Rules, lease_s: float) -> None:
        super().__init__(rules, lease_s)
        self.name = f"sqlite://{path}"
        try:
            self.conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            with self.transaction() as run:
                for statement in SCHEMA:
                    run(statement)
        except sqlite3.Error as exc:
            raise StateError(f"state store {self.name}: {exc}") from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Run]:
        def run(sql: str, *params: Any) -> list[tuple[Any, ...]]:
            return self.conn.execute(sql, params).fetchall()

        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield run
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateError(f"state store {self.name}: {exc}") from None

    def close(self) -> None:
        self.conn.close()


class PostgresStore(SQLStore):
    """Approvals in PostgreSQL (psycopg 3). Decisions lock their row (`FOR UPDATE`)
    and NOTIFY channel `hoop_approvals` with the approval id; `watch` starts a thread
    that LISTENs on its own connection and wakes the holder."""

    poll_s = PG_POLL_S
    for_update = " FOR UPDATE"

    def __init__(self, url: str, rules: Rules, lease_s: float) -> None:
        super().__init__(rules, lease_s)
        self.url, self.name = url, redact(url)
        self.conn: psycopg.Connection[Any] | None = None
        self.stopping = threading.Event()
        self.listener: threading.Thread | None = None
        with self.transaction() as run:
            run("SELECT pg_advisory_xact_lock(7201620)")  # two processes creating the tables at once
            for statement in SCHEMA:
                run(statement)

    def _connect(self) -> psycopg.Connection[Any]:
        # a peer that vanishes (lost host, partition) breaks the connection in seconds
        # rather than at the kernel's default of ~15 minutes
        return psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True,
                               options="-c statement_timeout=5000", keepalives=1, keepalives_idle=5,
                               keepalives_interval=2, keepalives_count=2, tcp_user_timeout=10000)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Run]:
        with self.lock:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = self._connect()
                conn = self.conn

                def run(sql: str, *params: Any) -> list[tuple[Any, ...]]:
                    cursor = conn.execute(sql.replace("?", "%s"), params)
                    return cursor.fetchall() if cursor.description else []

                with conn.transaction():
                    yield run
            except psycopg.Error as exc:
                if self.conn is not None and self.conn.broken:
                    self.conn = None  # reconnect on the next call
                raise StateError(f"state store {self.name}: {str(exc).strip() or type(exc).__name__}") from None

    def _notify(self, run: Run, ids: list[str]) -> None:
        for approval_id in ids:
            run("SELECT pg_notify(?, ?)", CHANNEL, approval_id)

    def watch(self, wake: Callable[[str], None]) -> None:
        def listen() -> None:
            while not self.stopping.is_set():
                try:
                    with self._connect() as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        while not self.stopping.is_set():
                            for note in conn.notifies(timeout=0.5):
                                wake(note.payload)
                except psycopg.Error:
                    self.stopping.wait(PG_POLL_S)  # the store is down: the holder's poll and heartbeat notice

        self.listener = threading.Thread(target=listen, name="hoop-state-listen", daemon=True)
        self.listener.start()

    def close(self) -> None:
        self.stopping.set()
        if self.listener is not None:
            self.listener.join(2.0)
        if self.conn is not None:
            self.conn.close()
