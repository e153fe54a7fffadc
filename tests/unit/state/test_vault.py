"""The shared tokenize vault against SQLite and a real PostgreSQL: several "processes"
(one store object each, with its own connection) on one database. Tokens minted by
one restore on another; the same value gets one token even when processes mint it at
once; nothing in the tables is readable without the secret; sessions, TTL and the
per-label bound scope tokens as in memory; a stopped server raises `StateError`. The
per-token cost of each backend (memory included) is printed, never asserted."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from hoop_addon.masking.vault import Vault
from hoop_addon.state.approvals import StateError
from hoop_addon.state.sql import SQLStore
from hoop_addon.state.url import open_store
from hoop_addon.state.vault import SharedVault
from tests.support.postgres import running_postgres

SECRET = b"gateway-secret-for-tests"
KEY = ("header", "agent-7", "conversation-1")


def fresh_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'state.db'}"
    base = request.getfixturevalue("postgres_url")
    name = f"v_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], SQLStore]]:
    """A factory of stores on one fresh database: each call is another process."""
    url = fresh_url(request.param, tmp_path, request)
    made: list[SQLStore] = []

    def make() -> SQLStore:
        made.append(store := open_store(url, lambda name: None))  # type: ignore[arg-type]
        return store

    yield make
    for store in made:
        store.close()


def test_a_token_minted_by_one_process_restores_on_another(stores) -> None:
    a, b = SharedVault(stores(), SECRET), SharedVault(stores(), SECRET)
    minted = a.session(KEY)
    assert minted.token("EMAIL", "ann@corp.example") == "<EMAIL_1>"
    assert minted.token("EMAIL", "bob@corp.example") == "<EMAIL_2>"
    assert minted.token("EMAIL", "ann@corp.example") == "<EMAIL_1>"
    other = b.session(KEY)
    assert other.restore("to <EMAIL_2> and <EMAIL_1>, not <EMAIL_3>") == (
        "to bob@corp.example and ann@corp.example, not <EMAIL_3>", 2)
    # B mints the next number, and A's view learns it on refresh
    assert other.token("EMAIL", "cy@corp.example") == "<EMAIL_3>"
    assert other.token("EMAIL", "ann@corp.example") == "<EMAIL_1>"  # known: no new token
    assert minted.unknown("<EMAIL_3>")
    minted.refresh()
    assert not minted.unknown("<EMAIL_3>") and minted.value("<EMAIL_3>") == "cy@corp.example"


def test_sessions_are_scoped_by_identity_and_label(stores) -> None:
    vault = SharedVault(stores(), SECRET)
    vault.session(KEY).token("EMAIL", "ann@corp.example")
    for other in (("header", "agent-8", "conversation-1"), ("header", "agent-7", "conversation-2"),
                  ("mcp", "agent-7", "conversation-1")):
        assert vault.session(other).restore("<EMAIL_1>") == ("<EMAIL_1>", 0)
        assert vault.session(other).token("EMAIL", "zed@corp.example") == "<EMAIL_1>"  # numbered on its own
    assert vault.session(KEY).value("<EMAIL_1>") == "ann@corp.example"


def test_two_processes_minting_at_once_agree_on_every_token(stores) -> None:
    """Threads of two processes mint overlapping values: each value ends with one
    token, each token with one value, and every view restores all of them."""
    vaults = [SharedVault(stores(), SECRET) for _ in range(2)]
    values = [f"user{i}@corp.example" for i in range(40)]
    seen: list[dict[str, str]] = []
    errors: list[BaseException] = []

    def mint(vault: SharedVault, order: list[str]) -> None:
        try:
            session = vault.session(KEY)
            seen.append({value: session.token("EMAIL", value) for value in order})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=mint, args=(vaults[i % 2], values[::1 if i % 2 else -1])) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(view == seen[0] for view in seen)
    assert len(set(seen[0].values())) == len(values)
    check = vaults[1].session(KEY)
    assert all(check.value(token) == value for value, token in seen[0].items())


def test_the_tables_hold_no_plaintext_and_open_with_the_secret_only(stores) -> None:
    store = stores()
    session = SharedVault(store, SECRET).session(KEY)
    session.token("EMAIL", "ann@corp.example")
    session.token("PHONE", "+1 555 0100")
    with store.transaction() as run:
        rows = run("SELECT * FROM hoop_vault") + run("SELECT * FROM hoop_vault_next")
    dump = repr(rows)
    for plain in ("ann@corp.example", "+1 555 0100", "agent-7", "conversation-1"):
        assert plain not in dump
    assert len(rows) == 4
    with pytest.raises(StateError, match="does not open"):
        SharedVault(store, b"another secret").open(session.sid, "<EMAIL_1>", rows[0][5])
    # another secret names sessions differently: it finds nothing, restores nothing
    assert SharedVault(store, b"another secret").session(KEY).restore("<EMAIL_1>") == ("<EMAIL_1>", 0)


def test_a_sealed_value_moved_to_another_row_does_not_open(stores) -> None:
    store = stores()
    session = SharedVault(store, SECRET).session(KEY)
    session.token("EMAIL", "ann@corp.example")
    session.token("EMAIL", "bob@corp.example")
    with store.transaction() as run:
        (sealed,), = run("SELECT sealed FROM hoop_vault WHERE token = '<EMAIL_2>'")
        run("UPDATE hoop_vault SET sealed = ? WHERE token = '<EMAIL_1>'", sealed)
    with pytest.raises(StateError, match="does not open"):
        SharedVault(store, SECRET).session(KEY)


def test_tokens_expire_after_the_ttl_and_a_label_keeps_its_newest(stores) -> None:
    now = [1_700_000_000.0]
    vault = SharedVault(stores(), SECRET, max_tokens=3, ttl_s=60, clock=lambda: now[0])
    session = vault.session(KEY)
    for i in range(5):
        session.token("EMAIL", f"u{i}@corp.example")
    assert sorted(vault.session(KEY)._by_token) == ["<EMAIL_3>", "<EMAIL_4>", "<EMAIL_5>"]
    now[0] += 61
    assert len(vault.session(KEY)) == 0
    assert vault.session(KEY).token("EMAIL", "u0@corp.example") == "<EMAIL_1>"  # the expired session starts afresh


def test_drop_forgets_a_session_on_every_process(stores) -> None:
    a, b = SharedVault(stores(), SECRET), SharedVault(stores(), SECRET)
    a.session(KEY).token("EMAIL", "ann@corp.example")
    b.drop(KEY)
    assert len(a.session(KEY)) == 0


def test_a_stopped_server_raises_state_error() -> None:
    with running_postgres() as server:
        store = open_store(server.url, lambda name: None)  # type: ignore[arg-type]
        session = SharedVault(store, SECRET).session(KEY)
        server.stop()
        with pytest.raises(StateError, match="state store postgresql://hoop@127.0.0.1"):
            session.token("EMAIL", "ann@corp.example")
        with pytest.raises(StateError):
            session.refresh()
        store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
def test_per_token_cost(kind: str, tmp_path: Path, request: pytest.FixtureRequest, capsys) -> None:
    """What minting a new token and loading a session cost per backend (printed)."""
    n = 300
    if kind == "memory":
        session = Vault().session(KEY)
        load: Callable[[], object] = lambda: Vault().session(KEY)  # noqa: E731
    else:
        store = open_store(fresh_url(kind, tmp_path, request), lambda name: None)  # type: ignore[arg-type]
        request.addfinalizer(store.close)
        vault = SharedVault(store, SECRET)
        session = vault.session(KEY)
        load = lambda: vault.session(KEY)  # noqa: E731
    started = time.perf_counter()
    tokens = [session.token("EMAIL", f"user{i}@corp.example") for i in range(n)]
    mint_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for _ in range(20):
        load()
    load_ms = (time.perf_counter() - started) / 20 * 1e3
    assert len(set(tokens)) == n
    with capsys.disabled():
        print(f"\nvault {kind}: {mint_us:.1f} us per new token; loading a session of {n} tokens {load_ms:.2f} ms")
