"""The Mask and Restore stages with a shared state store (a real PostgreSQL): two
stage instances, each with its own store connection, act as two gateway processes.
A header session's tokens minted through one restore through the other; a
connection's session stays in memory; a store that is down, or a missing secret,
refuses the request (503 `vault_unavailable`) and nothing unmasked is left in it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import orjson
import psycopg
import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from hoop_addon.policy.model import Names, Route
from hoop_addon.stages import hoop, mark_admitted
from hoop_addon.stages.mask import Mask, Restore
from hoop_addon.state.sql import SQLStore
from hoop_addon.state.url import open_store
from tests.support.hooks import call
from tests.support.masking import EMAIL, op_rule
from tests.support.postgres import running_postgres

OTHER = "bob.other@example.org"
TOKENIZE = op_rule("tokenize", "$.v", directions=frozenset({"request"}))
ROUTE = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (TOKENIZE,))


SECRET = b"the gateway secret"


def process(store: SQLStore) -> Mask:
    return Mask(lambda: store)


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    name = f"m_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield postgres_url.rsplit("/", 1)[0] + "/" + name


def send(mask: Mask, value: str, label: str | None = "conversation-1") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.headers["Content-Type"] = "application/json"
    if label:
        flow.request.headers["X-Hoop-Session"] = label
    flow.request.content = orjson.dumps({"v": value})
    mark_admitted(flow, ROUTE)
    hoop(flow)["identity"] = {"subject": "agent"}
    call(mask.request, flow)
    return flow


def answer(mask: Mask, flow: http.HTTPFlow, reply: str) -> str:
    hoop(flow)["forwarded"] = True
    flow.response = tflow.tresp(content=reply.encode())
    flow.response.headers["Content-Type"] = "text/plain"
    mask.responseheaders(flow)
    call(mask.response, flow)
    call(Restore(mask).response, flow)
    return flow.response.get_text()


def test_tokens_minted_through_one_process_restore_through_the_other(database: str) -> None:
    store_a, store_b = open_store(database, lambda n: None), open_store(database, lambda n: None)  # type: ignore[arg-type]
    a, b = process(store_a), process(store_b)  # type: ignore[arg-type]
    try:
        with taddons.context(a):  # one mitmproxy context; b needs no options of its own
            a.secret = b.secret = SECRET  # as `hoop_mask_secret` would set it
            on_a = send(a, EMAIL)
            assert orjson.loads(on_a.request.content) == {"v": "<EMAIL_1>"}
            on_b = send(b, OTHER)
            assert orjson.loads(on_b.request.content) == {"v": "<EMAIL_2>"}  # one numbering across processes
            assert orjson.loads(send(b, EMAIL).request.content) == {"v": "<EMAIL_1>"}  # the same value, the same token
            assert answer(b, on_b, "to <EMAIL_1> and <EMAIL_2>") == f"to {EMAIL} and {OTHER}"
            # A's flow loaded the session before B minted <EMAIL_2>: Restore reads the store again
            assert answer(a, on_a, "to <EMAIL_2>") == f"to {OTHER}"
            # a connection's session (no header) is this process's own, as in memory
            local = send(a, EMAIL, label=None)
            assert orjson.loads(local.request.content) == {"v": "<EMAIL_1>"}
            with store_a.transaction() as run:
                assert run("SELECT count(*) FROM hoop_vault") == [(2,)]
    finally:
        store_a.close()
        store_b.close()


def test_a_store_that_is_down_refuses_the_request() -> None:
    with running_postgres() as server:
        store = open_store(server.url, lambda n: None)  # type: ignore[arg-type]
        mask = process(store)  # type: ignore[arg-type]
        try:
            with taddons.context(mask):
                mask.secret = SECRET
                held = send(mask, EMAIL)
                server.stop()
                refused = send(mask, OTHER)
                assert refused.response is not None and refused.response.status_code == 503
                body = orjson.loads(refused.response.content)
                assert body["error"] == "vault_unavailable" and "postgresql://hoop@127.0.0.1" in body["message"]
                assert hoop(refused)["decision"]["reason"] == "vault_unavailable"
                # restoring a token the flow never loaded: it stays a token (nothing is guessed)
                assert answer(mask, held, "<EMAIL_1> and <EMAIL_9>") == f"{EMAIL} and <EMAIL_9>"
        finally:
            store.close()


def test_without_a_secret_a_shared_session_is_refused(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOOP_MASK_SECRET", raising=False)  # the default hoop_mask_secret: unset
    store = open_store(database, lambda n: None)  # type: ignore[arg-type]
    mask = process(store)  # type: ignore[arg-type]
    try:
        with taddons.context(mask):
            flow = send(mask, EMAIL)
        assert flow.response is not None and flow.response.status_code == 503
        assert "hoop_mask_secret" in orjson.loads(flow.response.content)["message"]
    finally:
        store.close()
