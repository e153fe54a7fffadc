"""End to end: two `hoop serve` processes on two ports ("two hosts") sharing one state
store (a real PostgreSQL, and SQLite) share the `tokenize` vault and the rate-limit
counters, and (PostgreSQL) the MCP tool pins. A token minted through A restores
through B (and B's next value continues A's numbering); a limit of 10 requests a
minute lets exactly 10 of 24 requests through, sent at once through both; a rug pull
A saw is held on B and accepted through B; with the store's server stopped, a request
of a shared session is refused (503 `vault_unavailable`, audited), nothing reaches
the upstream, and `/healthz` names the store."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError

from tests.conftest import UPSTREAM_KEY, write_policy
from tests.e2e.test_mcp import PINNING, RUG_PULL, McpServer, listed, session, start
from tests.e2e.test_shared_approvals import fresh_database, wait_for
from tests.support.idp import LocalIdP
from tests.support.postgres import running_postgres

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256, ES256]
identity:
  token_sources: [authorization, proxy_password]
masking:
  - name: tokenized
    direction: request
    operator: tokenize
    paths:
      - $.messages[*].content
    detectors: [email]
routes:
  - name: llm
    match:
      hosts: [localhost, 127.0.0.1]
      paths: [/v1/*]
      methods: [POST]
    allow:
      groups: [agents]
    masking: [tokenized]
    credential:
      header: Authorization
      value: Bearer ${{HOOP_TEST_UPSTREAM_KEY}}
limits:
  - name: ten-a-minute
    per: [subject]
    when: {{groups: [limited]}}
    requests_per_minute: 10
"""
ANN, BOB = "ann.shared@corp.example", "bob.shared@corp.example"


def serve(work: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], state: str) -> Gateway:
    return Gateway(write_policy(work / "rules", idp, POLICY), work, pki[0].cert_path, serve=True,
                   env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "HOOP_MASK_SECRET": "e2e-shared-gateway-secret"},
                   options={"hoop_state": state})


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP,
         pki: tuple[CA, Path, Path], upstream_server: FakeOpenAI) -> Iterator[tuple[Gateway, Gateway]]:
    """Gateways A and B on one store."""
    work = tmp_path_factory.mktemp(f"state-{request.param}")
    if request.param == "postgresql":
        state = fresh_database(request.getfixturevalue("postgres_url"))
    else:
        state = f"sqlite://{work / 'state.db'}"
    a = serve(work / "a", idp, pki, state).start()
    b = serve(work / "b", idp, pki, state).start()
    yield a, b
    a.stop()
    b.stop()


def client(gateway: Gateway, token: str) -> httpx.Client:
    return httpx.Client(proxy=gateway.proxy(token), verify=ssl.create_default_context(cafile=gateway.ca_cert), timeout=30)


def chat(http: httpx.Client, upstream: FakeOpenAI, content: str, session: str | None = None) -> httpx.Response:
    return http.post(f"{upstream.url}/v1/chat/completions", headers={"X-Hoop-Session": session} if session else {},
                     json={"model": "m", "messages": [{"role": "user", "content": content}]})


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_a_token_minted_through_a_restores_through_b(pair, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    a, b = pair
    token = idp.mint(subject="agent-vault", groups=["agents"])
    session = f"conversation-{secrets.token_hex(4)}"
    with client(a, token) as via_a, client(b, token) as via_b:
        assert ANN in answer(chat(via_a, upstream, f"write to {ANN}", session))
        assert orjson.loads(upstream.received[-1].body)["messages"][0]["content"] == "write to <EMAIL_1>"
        # the model's next answer names the token; B serves that turn and restores it
        assert answer(chat(via_b, upstream, "as agreed: <EMAIL_1>", session)).startswith(f"Echo: as agreed: {ANN}")
        # B's new value continues the session's numbering; A restores B's token
        chat(via_b, upstream, f"and {BOB}", session)
        assert orjson.loads(upstream.received[-1].body)["messages"][0]["content"] == "and <EMAIL_2>"
        assert f"{BOB} and {ANN}" in answer(chat(via_a, upstream, "<EMAIL_2> and <EMAIL_1>", session))
        # another session, or another identity with the same session label: nothing restores
        assert "Echo: <EMAIL_1>." in answer(chat(via_b, upstream, "<EMAIL_1>", "another-session"))
    with client(b, idp.mint(subject="agent-other", groups=["agents"])) as other:
        assert "Echo: <EMAIL_1>." in answer(chat(other, upstream, "<EMAIL_1>", session))
    assert not [r for r in upstream.received if ANN in r.body.decode() or BOB in r.body.decode()]


def test_a_limit_of_ten_a_minute_holds_across_a_and_b(pair, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    a, b = pair
    token = idp.mint(subject=f"agent-{secrets.token_hex(4)}", groups=["agents", "limited"])
    marker = secrets.token_hex(4)
    with client(a, token) as via_a, client(b, token) as via_b, ThreadPoolExecutor(8) as pool:
        sent = [pool.submit(chat, (via_a, via_b)[i % 2], upstream, f"{marker} {i}") for i in range(24)]
        statuses = [future.result().status_code for future in sent]
    assert statuses.count(200) == 10 and statuses.count(429) == 14
    assert len([r for r in upstream.received if marker in r.body.decode()]) == 10
    refused = [e for g in (a, b) for e in g.audit() if e["decision"].get("reason") == "rate_limited"]
    assert len(refused) == 14 and {e["decision"]["rule"] for e in refused} == {"ten-a-minute"}


def test_a_store_lost_refuses_a_shared_session(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path],
                                               upstream: FakeOpenAI) -> None:
    with running_postgres() as server:
        gateway = serve(tmp_path, idp, pki, server.url).start()
        try:
            with client(gateway, idp.mint(subject="agent-lost", groups=["agents"])) as http:
                assert ANN in answer(chat(http, upstream, f"to {ANN}", "s1"))
                server.stop()
                refused = chat(http, upstream, f"again to {ANN} and {BOB}", "s1")
                assert refused.status_code == 503 and refused.json()["error"] == "vault_unavailable"
                assert "postgresql://hoop@127.0.0.1" in refused.json()["message"]
                health = wait_for(lambda: (r := httpx.get(gateway.control_url + "/healthz")).status_code == 503 and r)
                assert any(p.startswith("state store") for p in health.json()["problems"])
                assert not [r for r in upstream.received if BOB in r.body.decode()]
                entry = wait_for(lambda: next((e for e in gateway.audit()
                                               if e["decision"].get("reason") == "vault_unavailable"), None))
                assert entry["status"] == 503
                server.start()  # back: the session's tokens are there again
                wait_for(lambda: httpx.get(gateway.control_url + "/healthz").status_code == 200, timeout=30)
                assert answer(chat(http, upstream, "<EMAIL_1>", "s1")).startswith(f"Echo: {ANN}")
        finally:
            gateway.stop()


def test_a_rug_pull_seen_through_a_is_held_on_b_and_accepted_through_b(tmp_path_factory: pytest.TempPathFactory,
                                                                       idp: LocalIdP, pki, postgres_url: str) -> None:
    """MCP pins (`pinning: hide`) in one PostgreSQL: A lists the tools (pinned), the
    server changes echo's description, A's next listing catches it (audited once); B,
    which never listed it, denies echo's calls and hides it, auditing nothing again;
    an acceptance through B's control API makes echo callable through A."""
    state = fresh_database(postgres_url)
    with McpServer() as server:
        a, url_a = start(tmp_path_factory, idp, pki, server, PINNING, {"hoop_state": state})
        b, url_b = start(tmp_path_factory, idp, pki, server, PINNING, {"hoop_state": state})
        try:
            agent, alice = idp.mint(subject="agent-1", groups=["agents"]), idp.mint(subject="alice", groups=["reviewers"])
            assert session(url_a, agent, listed) == ["delete_bucket", "echo", "lookup_customer"]
            server.describe("echo", RUG_PULL)
            assert session(url_a, agent, listed) == ["delete_bucket", "lookup_customer"]
            (event,) = a.audit(("mcp_tool_changed",))

            async def on_b(s: ClientSession) -> tuple[MCPError, list[str]]:
                with pytest.raises(MCPError) as denied:
                    await s.call_tool("echo", {"text": "hi"})
                return denied.value, await listed(s)

            denied, names = session(url_b, agent, on_b)
            assert denied.message.startswith("tools/call 'echo' denied: its definition changed")
            assert names == ["delete_bucket", "lookup_customer"] and server.calls["echo"] == 0
            assert b.audit(("mcp_tool_changed",)) == []  # reported once, by A
            bearer = {"Authorization": f"Bearer {alice}"}
            (pending,) = httpx.get(f"{b.control_url}/mcp/pins", headers=bearer, timeout=10).json()["changed"]
            assert pending["changed"] == event["new"]
            accepted = httpx.post(f"{b.control_url}/mcp/pins/accept", headers=bearer, timeout=10,
                                  json={"route": "tools", "tool": "echo", "fingerprint": event["new"]})
            assert accepted.status_code == 200
            assert session(url_a, agent, lambda s: s.call_tool("echo", {"text": "back"})).content[0].text == "echo: back"
        finally:
            a.stop()
            b.stop()
