"""End to end: identity and access through the real gateway (mitmdump subprocess), with
tokens minted by local IdPs holding real RSA and EC keys.

Forged tokens (one per RFC 8725 item) are refused with 401/407 and the upstream
receives nothing; keys rotate, the IdP goes down and unknown `kid`s flood in without a
restart; several issuers are trusted at once; routes admit by group, subject, client
id and scope; the gateway injects upstream credentials of every kind, and neither the
agent's token nor the credential reaches the recording, the audit log or mitmdump's
output.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.support.agents import agent_client, assert_absent, chat, header, recorded_bytes
from tests.support.idp import LocalIdP, hand_made, hs256_with_rsa_public_key


@pytest.fixture(scope="module")
def attacker() -> Iterator[LocalIdP]:
    """An IdP nobody trusts; counts fetches of its JWKS (a token's `jku` must never cause one)."""
    with LocalIdP() as provider:
        yield provider


# RFC 8725 (JWT BCP) and RFC 7519, one forged or non-conforming token per item.
FORGERIES: dict[str, tuple[Any, str]] = {
    "alg-none-unsigned": (lambda idp, bad: hand_made(idp, {"alg": "none"}, lambda _: b""), "malformed"),
    "alg-none-signed": (lambda idp, bad: hand_made(idp, {"alg": "none"}, lambda _: b"x"), "algorithm_not_allowed"),
    "hs256-keyed-with-rsa-public-key": (lambda idp, bad: hs256_with_rsa_public_key(idp), "algorithm_not_allowed"),
    "alg-outside-allow-list": (lambda idp, bad: hand_made(idp, {"alg": "RS512", "kid": "rsa-1"}, lambda _: b"x"), "algorithm_not_allowed"),
    "kid-of-a-key-of-another-type": (lambda idp, bad: idp.mint(kid="rsa-1", headers={"kid": "ec-1"}), "unknown_key"),
    "jku-to-attacker-keys": (
        lambda idp, bad: bad.mint(issuer=idp.issuer, headers={"kid": "attacker", "jku": bad.jwks_url}), "unknown_key"
    ),
    "x5u-to-attacker-keys": (
        lambda idp, bad: bad.mint(issuer=idp.issuer, headers={"kid": "attacker", "x5u": bad.jwks_url}), "unknown_key"
    ),
    "embedded-jwk": (
        lambda idp, bad: bad.mint(issuer=idp.issuer, headers={"jwk": next(k for k in bad.jwks()["keys"] if k["kid"] == "rsa-1")}),
        "bad_signature",
    ),
    "embedded-x5c": (lambda idp, bad: bad.mint(issuer=idp.issuer, headers={"x5c": ["MIIBfake"]}), "bad_signature"),
    "foreign-rsa-key": (lambda idp, bad: idp.mint_with_foreign_key(kid="rsa-1"), "bad_signature"),
    "foreign-ec-key": (lambda idp, bad: idp.mint_with_foreign_key(kid="ec-1"), "bad_signature"),
    "kid-over-256-chars": (lambda idp, bad: idp.mint(headers={"kid": "k" * 257}), "malformed"),
    "crit-header": (lambda idp, bad: idp.mint(headers={"crit": ["exp"], "exp": 1}), "crit_not_understood"),
    "no-exp": (lambda idp, bad: idp.mint(omit=["exp"]), "invalid_claims"),
    "expired-beyond-leeway": (lambda idp, bad: idp.mint(expires_in=-31), "expired"),
    "nbf-beyond-leeway": (lambda idp, bad: idp.mint(extra_claims={"nbf": int(time.time()) + 60}), "not_yet_valid"),
    "iat-beyond-leeway": (lambda idp, bad: idp.mint(extra_claims={"iat": int(time.time()) + 60}), "not_yet_valid"),
    "issuer-not-exact": (lambda idp, bad: idp.mint(issuer=idp.issuer + "/"), "untrusted_issuer"),
    "no-aud": (lambda idp, bad: idp.mint(omit=["aud"]), "wrong_audience"),
    "other-aud": (lambda idp, bad: idp.mint(audience="another-api"), "wrong_audience"),
    "over-size-cap": (lambda idp, bad: idp.mint(extra_claims={"pad": "x" * 8192}), "too_large"),
    "two-segments": (lambda idp, bad: idp.mint().rsplit(".", 1)[0], "malformed"),
    "four-segments": (lambda idp, bad: idp.mint() + ".e30", "malformed"),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_bearer_token_is_refused_with_401(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, attacker: LocalIdP, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    make, reason = FORGERIES[name]
    token = make(idp, attacker)
    fetches = attacker.jwks_fetches
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch) as client:
        r = client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi"), headers={"Authorization": f"Bearer {token}"})
    assert (r.status_code, r.json()["error"]) == (401, reason)
    assert upstream.received == []
    assert attacker.jwks_fetches == fetches  # keys named by the token are never fetched
    entry = gateway.wait_audit(before + 1)[-1]
    assert entry["decision"]["reason"] == reason and entry["identity"] is None
    assert_absent(json.dumps(entry) + gateway.output, (token,))


@pytest.mark.parametrize("name", ["hs256-keyed-with-rsa-public-key", "embedded-jwk", "jku-to-attacker-keys", "no-exp"])
def test_forged_proxy_password_is_refused_with_407(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, attacker: LocalIdP, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    make, reason = FORGERIES[name]
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch, proxy_token=make(idp, attacker)) as client:
        with pytest.raises(httpx.ProxyError, match="407"):
            client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi"))
    assert upstream.received == []
    assert gateway.wait_audit(before + 1)[-1]["decision"]["reason"] == reason
    # what a client that shows only the CONNECT's answer sees: the reason, in the
    # challenge and in the JSON body
    status, head, body = raw_connect(gateway, make(idp, attacker))
    assert status == 407 and f'error_description="{reason}"' in head.get("proxy-authenticate", ""), head
    assert orjson.loads(body)["error"] == reason


def raw_connect(gateway: Gateway, token: str) -> tuple[int, dict[str, str], bytes]:
    """Send one CONNECT with `token` as the proxy password; (status, lower-cased
    headers, body) of the answer."""
    credentials = base64.b64encode(f"agent:{token}".encode()).decode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
                     f"Proxy-Authorization: Basic {credentials}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
            dict(line.lower().split(b": ", 1) for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]).get(b"content-length", b"0")
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_token_in_query_string_is_refused_and_scrubbed(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = idp.mint()
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch) as client:
        r = client.post(
            f"{upstream.url}/v1/chat/completions?access_token={token}&model=x",
            json=chat("hi"),
            headers={"Authorization": f"Bearer {idp.mint()}"},
        )
    assert (r.status_code, r.json()["error"]) == (401, "token_in_query")
    assert upstream.received == []
    entry = gateway.wait_audit(before + 1)[-1]
    assert entry["decision"]["reason"] == "token_in_query"
    assert_absent(json.dumps(entry) + gateway.output, (token, token.split(".")[2]))


# A second gateway: several issuers, access tokens only for agents, admission by
# client id and scope, Proxy-Authorization: Bearer, and each kind of injected credential.
MULTI = """\
version: 1
issuers:
  - name: humans
    issuer: {humans}
    audience: hoop-gateway
    jwks: {humans_jwks}
    groups_claim: realm_access.roles
    refetch_cooldown: 1
  - name: agents
    issuer: {agents}               # no jwks: OIDC discovery
    audience: hoop-gateway
    typ: at+jwt
    refetch_cooldown: 3600
  - name: enc-keys
    issuer: {enc}
    audience: hoop-gateway
    jwks: enc-jwks.json
identity:
  token_sources: [authorization, proxy_bearer]
routes:
  - name: models
    match: {{hosts: [localhost], paths: [/v1/models]}}
    allow: {{client_ids: ['agents:batch-agent'], scopes: ['agents:models:read']}}
  - name: chat
    match: {{hosts: [localhost], paths: [/v1/chat/*]}}
    allow: {{groups: ['humans:engineers'], subjects: ['humans:svc-reporter']}}
    credential: {{bearer: '${{HOOP_E2E_KEY}}'}}
  - name: kind-header
    match: {{hosts: [localhost], paths: [/kind/header]}}
    allow: {{groups: ['agents:agents', 'enc-keys:agents']}}
    credential: {{header: x-api-key, value: '${{HOOP_E2E_KEY}}'}}
  - name: kind-basic
    match: {{hosts: [localhost], paths: [/kind/basic]}}
    allow: {{groups: ['agents:agents', 'enc-keys:agents']}}
    credential: {{basic: {{username: svc-trace, password: '${{file:trace-store.pw}}'}}}}
  - name: kind-query              # /v1/echo: the fake upstream's 404 page would echo the URL
    match: {{hosts: [127.0.0.1], paths: [/v1/echo]}}
    allow: {{groups: ['agents:agents', 'enc-keys:agents']}}
    credential: {{query: key, value: '${{file:gemini.key}}'}}
"""
E2E_KEY = "sk-e2e-header-key-5d41402abc4b2a76"
FILE_PASSWORD = "trace-store-password-7e1a"
FILE_QUERY_KEY = "AIza-e2e-query-key-9f86d081884c"


@pytest.fixture(scope="module")
def humans() -> Iterator[LocalIdP]:
    with LocalIdP() as provider:
        yield provider


@pytest.fixture(scope="module")
def agents() -> Iterator[LocalIdP]:
    with LocalIdP() as provider:
        yield provider


@pytest.fixture(scope="module")
def enc() -> LocalIdP:
    """An issuer whose JWKS file publishes its RSA key for encryption (`use: enc`)."""
    return LocalIdP(issuer="https://enc-keys.example")


@pytest.fixture(scope="module")
def multi(
    tmp_path_factory: pytest.TempPathFactory,
    humans: LocalIdP,
    agents: LocalIdP,
    enc: LocalIdP,
    pki: tuple[CA, Path, Path],
    upstream_server: FakeOpenAI,
) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("multi")
    rules = work / "rules"
    rules.mkdir()
    keys = enc.jwks()
    for key in keys["keys"]:
        key["use"] = "enc" if key["kid"] == "rsa-1" else "sig"
    (rules / "enc-jwks.json").write_bytes(orjson.dumps(keys))
    (rules / "trace-store.pw").write_text(FILE_PASSWORD + "\n")
    (rules / "gemini.key").write_text(FILE_QUERY_KEY + "\n")
    (rules / "policy.yaml").write_text(
        MULTI.format(humans=humans.issuer, humans_jwks=humans.jwks_url, agents=agents.issuer, enc=enc.issuer)
    )
    gw = Gateway(rules, work, pki[0].cert_path, env={"HOOP_E2E_KEY": E2E_KEY})
    gw.start()
    yield gw
    gw.stop()


def agent_token(agents: LocalIdP, **claims: Any) -> str:
    """An RFC 9068 access token from the agents' IdP."""
    extra = {"client_id": "batch-agent", "scope": "models:read", **claims}
    return agents.mint("batch-agent", ("agents",), kid="ec-1", headers={"typ": "at+jwt"}, extra_claims=extra)


def human_token(humans: LocalIdP, roles: list[str], **kwargs: Any) -> str:
    return humans.mint("alice", (), extra_claims={"realm_access": {"roles": roles}}, **kwargs)


def call(gw: Gateway, monkeypatch: pytest.MonkeyPatch, url: str, token: str, method: str = "POST", **kwargs: Any) -> httpx.Response:
    with agent_client(gw, monkeypatch) as client:
        return client.request(method, url, headers={"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}, **kwargs)


def test_several_issuers_admit_by_group_client_id_and_scope(
    multi: Gateway, upstream: FakeOpenAI, humans: LocalIdP, agents: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = upstream.url
    human = human_token(humans, ["engineers"])
    assert call(multi, monkeypatch, f"{base}/v1/chat/completions", human, json=chat("hi")).status_code == 200
    assert call(multi, monkeypatch, f"{base}/v1/models", agent_token(agents), "GET").status_code != 403
    assert [r.path for r in upstream.received] == ["/v1/chat/completions", "/v1/models"]
    upstream.clear()

    refused = {
        "human-on-agents-route": call(multi, monkeypatch, f"{base}/v1/models", human, "GET"),
        "agent-without-scope": call(multi, monkeypatch, f"{base}/v1/models", agent_token(agents, scope="chat:write"), "GET"),
        "other-client": call(multi, monkeypatch, f"{base}/v1/models", agent_token(agents, client_id="web-ui"), "GET"),
        "human-without-role": call(multi, monkeypatch, f"{base}/v1/chat/completions", human_token(humans, ["sales"]), json=chat("x")),
        # the agents' IdP mints the humans' group and subject names: they are not the humans'
        "agent-minting-a-humans-group": call(multi, monkeypatch, f"{base}/v1/chat/completions",
                                             agent_token(agents, groups=["engineers"]), json=chat("x")),
        "agent-minting-a-humans-subject": call(multi, monkeypatch, f"{base}/v1/chat/completions",
                                               agent_token(agents, sub="svc-reporter"), json=chat("x")),
    }
    for name, r in refused.items():
        route = "models" if "chat" not in str(r.request.url) else "chat"
        assert (r.status_code, r.json()) == (
            403,
            {"error": "not_admitted", "message": f"this identity is not admitted to route '{route}'", "stage": "route"},
        ), name
    assert upstream.received == []


def test_issuer_requiring_access_tokens_refuses_id_tokens(
    multi: Gateway, upstream: FakeOpenAI, agents: LocalIdP, enc: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    id_token = agents.mint("batch-agent", kid="ec-1", extra_claims={"client_id": "batch-agent", "scope": "models:read"})
    r = call(multi, monkeypatch, f"{upstream.url}/v1/models", id_token, "GET")
    assert (r.status_code, r.json()["error"]) == (401, "wrong_token_type")
    # A key the JWKS publishes for encryption (`use: enc`) never verifies a signature.
    r = call(multi, monkeypatch, f"{upstream.url}/kind/header", enc.mint(kid="rsa-1"), json={})
    assert (r.status_code, r.json()["error"]) == (401, "unknown_key")
    assert call(multi, monkeypatch, f"{upstream.url}/kind/header", enc.mint(kid="ec-1"), json={}).status_code == 404
    assert [r.path for r in upstream.received] == ["/kind/header"]


def test_proxy_authorization_bearer_binds_the_tunnel(
    multi: Gateway, upstream: FakeOpenAI, humans: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = human_token(humans, ["engineers"])
    monkeypatch.setenv("SSL_CERT_FILE", str(multi.ca_cert))
    proxy = httpx.Proxy(multi.proxy(), headers={"Proxy-Authorization": f"Bearer {token}"})
    with httpx.Client(proxy=proxy, timeout=10) as client:
        replies = [client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi")) for _ in range(2)]
    assert [r.status_code for r in replies] == [200, 200]
    assert len(upstream.received) == 2
    for received in upstream.received:
        assert header(received, "Proxy-Authorization") is None
        assert header(received, "Authorization") == f"Bearer {E2E_KEY}"
    # Basic proxy credentials are not among this policy's token sources.
    with agent_client(multi, monkeypatch, proxy_token=token) as client:
        with pytest.raises(httpx.ProxyError, match="407"):
            client.get(f"{upstream.url}/v1/models")


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("header", lambda r: header(r, "x-api-key") == E2E_KEY and header(r, "Authorization") is None and r.path == "/kind/header?q=1"),
        ("basic", lambda r: header(r, "Authorization") == "Basic " + base64.b64encode(f"svc-trace:{FILE_PASSWORD}".encode()).decode()),
        ("query", lambda r: r.path == f"/v1/echo?key={FILE_QUERY_KEY}&q=1" and header(r, "Authorization") is None),
    ],
)
def test_injected_credential_reaches_only_the_upstream(
    multi: Gateway, upstream: FakeOpenAI, idp: LocalIdP, agents: LocalIdP, monkeypatch: pytest.MonkeyPatch, kind: str, check: Any
) -> None:
    token = agent_token(agents)
    before = len(multi.audit())
    # The agent's own attempt at the credential, where this kind puts it, is replaced.
    query = "key=agent-fake-key&q=1" if kind == "query" else "q=1"
    headers = {"x-api-key": "agent-fake-key"} if kind == "header" else {}
    url = f"{upstream.url.replace('localhost', '127.0.0.1')}/v1/echo" if kind == "query" else f"{upstream.url}/kind/{kind}"
    r = call(multi, monkeypatch, f"{url}?{query}", token, headers=headers, json={"hello": "world"})
    assert r.status_code == (200 if kind == "query" else 404)  # 404: what matters is what the upstream received
    (received,) = upstream.received
    assert check(received)
    assert_absent(repr(received), (token, "agent-fake-key"))
    entry = multi.wait_audit(before + 1)[-1]
    basic = base64.b64encode(f"svc-trace:{FILE_PASSWORD}".encode()).decode()
    # Prefixes too: mitmdump shortens long URLs in its output ("...?key=AIza-e2e-…").
    secrets = (token.split(".")[2], E2E_KEY, FILE_PASSWORD, FILE_QUERY_KEY, basic) + (FILE_QUERY_KEY[:8], E2E_KEY[:8], basic[:8])
    assert entry["credential"] == ("query:key" if kind == "query" else "x-api-key" if kind == "header" else "Authorization")
    assert_absent(json.dumps(entry) + multi.output, secrets)
    assert_absent(recorded_bytes(multi), secrets)


def test_credential_injection_with_the_agent_sending_only_its_jwt(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = idp.mint(subject="agent-only-jwt")
    with agent_client(gateway, monkeypatch) as client:
        r = client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi"), headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    (received,) = upstream.received
    assert header(received, "Authorization") == f"Bearer {UPSTREAM_KEY}"
    assert_absent(repr(received), (token,))
    assert_absent(recorded_bytes(gateway) + gateway.output.encode(), (token, UPSTREAM_KEY))
    assert_absent(b"".join(json.dumps(e).encode() for e in gateway.audit()), (token, UPSTREAM_KEY))


def test_key_rotation_idp_outage_and_recovery_without_restart(
    multi: Gateway, upstream: FakeOpenAI, humans: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{upstream.url}/v1/chat/completions"
    # Rotation: a new kid is fetched on first sight (the issuer's cooldown is 1 s).
    kid = humans.add_key("EC", f"ec-rotated-{time.time_ns()}")
    time.sleep(1.1)
    fetches = humans.jwks_fetches
    assert call(multi, monkeypatch, url, human_token(humans, ["engineers"], kid=kid), json=chat("hi")).status_code == 200
    assert humans.jwks_fetches == fetches + 1

    # Outage: known keys keep working; an unknown kid cannot be fetched and is refused.
    humans.stop()
    try:
        assert call(multi, monkeypatch, url, human_token(humans, ["engineers"], kid=kid), json=chat("hi")).status_code == 200
        time.sleep(1.1)
        r = call(multi, monkeypatch, url, humans.mint(headers={"kid": "never-published"}), json=chat("hi"))
        assert (r.status_code, r.json()["error"]) == (401, "unknown_key")
        before = len(multi.audit())
        assert call(multi, monkeypatch, url, human_token(humans, ["engineers"]), json=chat("hi")).status_code == 200
        entry = multi.wait_audit(before + 1)[-1]
        assert entry["identity"]["subject"] == "alice" and entry["identity"]["jwks_stale"] is True
    finally:
        humans.start()
    time.sleep(1.1)
    # Recovery: the next refetch succeeds and the audit no longer flags stale keys.
    assert call(multi, monkeypatch, url, humans.mint(headers={"kid": "still-unknown"}), json=chat("hi")).status_code == 401
    before = len(multi.audit())
    assert call(multi, monkeypatch, url, human_token(humans, ["engineers"]), json=chat("hi")).status_code == 200
    assert "jwks_stale" not in multi.wait_audit(before + 1)[-1]["identity"]


def test_flood_of_unknown_kids_does_not_refetch_within_the_cooldown(
    multi: Gateway, upstream: FakeOpenAI, agents: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = [agents.mint(headers={"kid": f"ghost-{i}", "typ": "at+jwt"}) for i in range(40)]
    fetches = agents.jwks_fetches
    monkeypatch.setenv("HTTPS_PROXY", multi.proxy())
    monkeypatch.setenv("SSL_CERT_FILE", str(multi.ca_cert))

    def attempt(token: str) -> int:
        with httpx.Client(timeout=10) as client:
            return client.get(f"{upstream.url}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(attempt, tokens))
    assert statuses == [401] * 40
    assert agents.jwks_fetches == fetches
    assert upstream.received == []


def test_proxy_only_policy_challenges_a_connect_without_credentials(
    tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only proxy credentials accepted, a CONNECT without them is answered 407
    at once (not let through to fail inside the tunnel), and a bearer token inside is
    never consulted."""
    rules = write_policy(tmp_path / "rules", idp, POLICY.replace("[authorization, proxy_password]", "[proxy_password]"))
    gateway = Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        with agent_client(gateway, monkeypatch) as client:
            with pytest.raises(httpx.ProxyError, match="407"):
                client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi"),
                            headers={"Authorization": f"Bearer {idp.mint(groups=['agents'])}"})
        entry = gateway.wait_audit(1)[-1]
        assert (entry["event"], entry["status"], entry["decision"]["reason"]) == ("connect", 407, "missing")
        with agent_client(gateway, monkeypatch, proxy_token=idp.mint(groups=["agents"])) as client:
            assert client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi")).status_code == 200
    finally:
        gateway.stop()
    assert len(upstream.received) == 1


@pytest.mark.parametrize("target", [b"/v1/chat/\xff", b"/v1/chat/completions"], ids=["path", "header"])
def test_request_that_is_not_utf8_is_refused(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, target: bytes) -> None:
    """Raw bytes in an origin-form request inside the TLS tunnel: refused 400 before any
    stage reads them (a surrogate would otherwise break the audit line or the recording
    of a request already forwarded)."""
    import socket
    import ssl

    token = base64.b64encode(f"agent:{idp.mint(groups=['agents'])}".encode())
    extra = b"X-Trace: caf\xe9\r\n" if target.endswith(b"completions") else b""
    before = len(gateway.audit())
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        raw.sendall(b"CONNECT localhost:%d HTTP/1.1\r\nHost: localhost\r\nProxy-Authorization: Basic %s\r\n\r\n" % (upstream.port, token))
        assert raw.recv(65536).startswith(b"HTTP/1.1 200")
        with ssl.create_default_context(cafile=str(gateway.ca_cert)).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + extra
                        + b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert b'"malformed_request"' in reply
    assert upstream.received == []
    assert gateway.wait_audit(before + 1)[-1]["decision"]["reason"] == "malformed_request"


def test_gateway_token_in_authorization_never_travels_upstream(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identity from the proxy password, and a gateway JWT also in Authorization, on a
    route that injects no credential: the JWT is removed, not forwarded."""
    other = idp.mint(subject="someone-else", groups=["agents"])
    with agent_client(gateway, monkeypatch, proxy_token=idp.mint(groups=["admins"])) as client:
        client.get(f"{upstream.url}/v1/admin/users", headers={"Authorization": f"Bearer {other}"})
    (received,) = upstream.received
    assert header(received, "Authorization") is None
    assert_absent(repr(received.headers), (other,))
