"""End to end: real clients (httpx, the openai SDK, curl) through HTTPS_PROXY with TLS
interception, the real gateway (mitmdump subprocess), a real HTTPS upstream and IdP.

Each test asserts on what the upstream received, what the client got back, what was
recorded and what was audited.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mitmproxy import io

from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import UPSTREAM_KEY
from hoop_addon.dev.gateway import MITMDUMP, ROOT, Gateway
from tests.support.agents import agent_client, assert_absent, chat, header, recorded_bytes
from tests.support.idp import LocalIdP

PROMPT_PII = ("jane.doe@example.com", "4242 4242 4242 4242")
REPLY_PII = ("help@upstream.example", "4111 1111 1111 1111")  # planted by the fake upstream


def test_httpx_bearer_request_and_response_masked(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
    token = idp.mint(subject="agent-httpx", groups=["agents"])
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch) as client:
        r = client.post(
            f"{upstream.url}/v1/chat/completions",
            json=chat(f"mail {PROMPT_PII[0]}, card {PROMPT_PII[1]}"),
            headers={"Authorization": f"Bearer {token}"},
        )
    assert r.status_code == 200
    reply = r.json()["choices"][0]["message"]["content"]
    assert "[REDACTED:EMAIL]" in reply and "[REDACTED:CARD]" in reply
    assert_absent(r.content, PROMPT_PII + REPLY_PII)

    (received,) = upstream.received
    assert json.loads(received.body)["messages"][0]["content"] == "mail [REDACTED:EMAIL], card [REDACTED:CARD]"
    assert header(received, "Authorization") == f"Bearer {UPSTREAM_KEY}"  # the gateway's credential, not the agent's token
    assert_absent(repr(received.headers), (token,))

    entry = gateway.wait_audit(before + 1)[-1]
    assert entry["identity"]["subject"] == "agent-httpx" and entry["identity"]["groups"] == ["agents"]
    assert entry["route"] == "llm" and entry["decision"] == {"outcome": "allow"} and entry["status"] == 200
    counts = {(m["rule"], m["part"]): m["detectors"] for m in entry["masked"]}
    assert counts == {("pii-in", "request"): {"email": 1, "payment_card": 1}, ("pii-out", "response"): {"email": 1, "payment_card": 1}}
    assert_absent(json.dumps(entry), PROMPT_PII + REPLY_PII + (token, UPSTREAM_KEY))

    recording = Path(entry["recording"])
    (flow,) = list(io.FlowReader(recording.open("rb")).stream())
    assert flow.request.headers["Authorization"] == "[SCRUBBED]"
    assert b"[REDACTED:EMAIL]" in flow.request.content and b"[REDACTED:EMAIL]" in flow.response.content
    assert_absent(recorded_bytes(gateway), PROMPT_PII + REPLY_PII + (token, UPSTREAM_KEY))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "sse"])
@pytest.mark.parametrize("mode", ["proxy_password", "bearer"])
def test_openai_sdk_agent(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, mode: str, stream: bool) -> None:
    """The shipped example agent (official openai SDK), configured only by environment."""
    token = idp.mint(subject=f"sdk-{mode}", groups=["agents"])
    env = {
        **os.environ,
        "HTTPS_PROXY": gateway.proxy(token if mode == "proxy_password" else None),
        "SSL_CERT_FILE": str(gateway.ca_cert),
        "OPENAI_BASE_URL": f"{upstream.url}/v1",
        "OPENAI_API_KEY": token if mode == "bearer" else "the-agent-holds-no-real-key",
    }
    env.pop("NO_PROXY", None)
    args = [sys.executable, str(ROOT / "examples" / "agent.py")] + (["--stream"] if stream else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    content = json.loads(done.stdout)["content"]
    assert content.count("[REDACTED:EMAIL]") == 2 and content.count("[REDACTED:CARD]") == 2
    assert_absent(content, PROMPT_PII + REPLY_PII)

    (received,) = upstream.received
    assert_absent(received.body, PROMPT_PII)
    assert json.loads(received.body).get("stream", False) is stream
    assert header(received, "Authorization") == f"Bearer {UPSTREAM_KEY}"
    assert_absent(recorded_bytes(gateway), PROMPT_PII + REPLY_PII + (token, UPSTREAM_KEY))


def test_curl_through_the_gateway(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    token = idp.mint(subject="agent-curl", groups=["agents"])
    done = subprocess.run(
        ["curl", "-sS", "--proxy", gateway.proxy(), "--proxy-user", f"agent:{token}", "--cacert", str(gateway.ca_cert),
         "-H", "Content-Type: application/json", "--data", json.dumps(chat(f"I am {PROMPT_PII[0]}")),
         f"{upstream.url}/v1/chat/completions"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "[REDACTED:EMAIL]" in done.stdout
    assert_absent(done.stdout, PROMPT_PII + REPLY_PII)
    (received,) = upstream.received
    assert b"[REDACTED:EMAIL]" in received.body


def _tokens(idp: LocalIdP) -> dict[str, str]:
    return {
        "expired": idp.mint(groups=["agents"], expires_in=-120),
        "wrong_audience": idp.mint(groups=["agents"], audience="someone-else"),
        "untrusted_issuer": idp.mint(groups=["agents"], issuer="https://evil.example"),
        "bad_signature": idp.mint_with_foreign_key(groups=["agents"]),
        "malformed": "not-a-jwt",
    }


@pytest.mark.parametrize("reason", ["missing", "expired", "wrong_audience", "untrusted_issuer", "bad_signature", "malformed"])
def test_bearer_refused_with_401(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch, reason: str) -> None:
    token = _tokens(idp).get(reason)
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch) as client:
        r = client.post(
            f"{upstream.url}/v1/chat/completions",
            json=chat(PROMPT_PII[0]),
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="hoop"')
    assert r.json()["error"] == reason and r.json()["stage"] == "identity"
    assert upstream.received == []
    entry = gateway.wait_audit(before + 1)[-1]
    assert entry["decision"]["reason"] == reason and entry["status"] == 401 and entry["recording"] is None


@pytest.mark.parametrize("reason", ["expired", "wrong_audience", "untrusted_issuer", "bad_signature", "malformed"])
def test_proxy_password_refused_with_407_on_connect(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch, reason: str) -> None:
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch, proxy_token=_tokens(idp)[reason]) as client:
        with pytest.raises(httpx.ProxyError, match="407"):
            client.post(f"{upstream.url}/v1/chat/completions", json=chat("hi"))
    assert upstream.received == []
    entry = gateway.wait_audit(before + 1)[-1]
    assert entry["event"] == "connect" and entry["status"] == 407 and entry["decision"]["reason"] == reason


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/v1/admin/users", "not_admitted"), ("/internal/metrics", "no_route")],
)
def test_route_admission_refused_with_403(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch, path: str, reason: str) -> None:
    with agent_client(gateway, monkeypatch, proxy_token=idp.mint(groups=["agents"])) as client:
        r = client.post(f"{upstream.url}{path}", json=chat("hi"))
    assert r.status_code == 403 and r.json()["error"] == reason
    assert upstream.received == []


def test_admitted_group_reaches_admin_route(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
    with agent_client(gateway, monkeypatch, proxy_token=idp.mint(groups=["admins"])) as client:
        r = client.get(f"{upstream.url}/v1/admin/users")
    assert r.status_code == 404  # the fake upstream has no such page: what matters is that it was asked
    assert [x.path for x in upstream.received] == ["/v1/admin/users"]


def test_body_the_rules_cannot_inspect_is_refused(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
    with agent_client(gateway, monkeypatch, proxy_token=idp.mint(groups=["agents"])) as client:
        r = client.post(
            f"{upstream.url}/v1/chat/completions",
            content=b'{"messages": [{"content": "' + PROMPT_PII[0].encode() + b'"',  # truncated JSON
            headers={"Content-Type": "application/json"},
        )
    assert r.status_code == 422 and r.json()["error"] == "unmaskable_request"
    assert upstream.received == []


def test_recording_opens_with_stock_mitmdump(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch) -> None:
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch, proxy_token=idp.mint(subject="agent-replay", groups=["agents"])) as client:
        assert client.post(f"{upstream.url}/v1/chat/completions", json=chat("hello")).status_code == 200
    recording = gateway.wait_audit(before + 1)[-1]["recording"]
    done = subprocess.run([str(MITMDUMP), "-n", "-r", recording, "--flow-detail", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"POST {upstream.url}/v1/chat/completions" in done.stdout
    assert "200 OK" in done.stdout


def test_a_credential_the_upstream_echoes_never_reaches_the_agent(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake upstream answers `whoami` with the Authorization header it received, in
    the reply and in a header, as a debug endpoint would: the agent, the recording and
    the audit get `[SCRUBBED]`."""
    before = len(gateway.audit())
    with agent_client(gateway, monkeypatch, proxy_token=idp.mint(subject="agent-echo", groups=["agents"])) as client:
        r = client.post(f"{upstream.url}/v1/chat/completions", json=chat("whoami"))
    assert r.status_code == 200
    (received,) = upstream.received
    assert header(received, "Authorization") == f"Bearer {UPSTREAM_KEY}"  # the upstream did get it
    assert r.json()["choices"][0]["message"]["content"] == "You sent Authorization: Bearer [SCRUBBED] ."
    assert r.headers["X-Echo-Authorization"] == "Bearer [SCRUBBED]"
    assert_absent(r.content + repr(r.headers).encode(), (UPSTREAM_KEY,))
    entry = gateway.wait_audit(before + 1)[-1]
    assert_absent(recorded_bytes(gateway), (UPSTREAM_KEY,))
    (flow,) = list(io.FlowReader(Path(entry["recording"]).open("rb")).stream())
    assert flow.metadata["hoop"]["credential_echoed"] == 2


def raw_exchange(gateway: Gateway, request: bytes, connect: str | None = None, token: str | None = None,
                 server_hostname: str | None = None) -> bytes:
    """What the gateway answers to `request`, sent as bytes: through a `CONNECT connect`
    tunnel (TLS with `server_hostname` as SNI, when given) or as plain-HTTP proxying,
    with `token` as the proxy password."""
    import socket
    import ssl

    auth = b"Proxy-Authorization: Basic %s\r\n" % base64.b64encode(f"agent:{token}".encode()) if token else b""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        conn: socket.socket = raw
        if connect is not None:
            raw.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (connect.encode(), connect.encode(), auth))
            assert raw.recv(65536).startswith(b"HTTP/1.1 200")
            if server_hostname is not None:
                conn = ssl.create_default_context(cafile=str(gateway.ca_cert)).wrap_socket(raw, server_hostname=server_hostname)
        else:
            request = request.replace(b"\r\n", b"\r\n" + auth, 1)
        conn.sendall(request)
        reply = b""
        try:
            while chunk := conn.recv(65536):
                reply += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
    return reply


def test_non_canonical_path_is_refused_before_route_matching(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """`/v1/admin/../chat/completions` must not be judged as one route and served as
    another: refused with 400, the upstream receives nothing."""
    reply = raw_exchange(
        gateway, b"GET /v1/admin/../chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        connect=f"localhost:{upstream.port}", token=idp.mint(groups=["admins"]), server_hostname="localhost",
    )
    assert reply.startswith(b"HTTP/1.1 400") and b'"non_canonical_path"' in reply, reply[:300]
    assert upstream.received == []


@pytest.mark.parametrize(
    ("connect", "sni", "host"),
    [("127.0.0.1", "tenant-b.example", "127.0.0.1:{port}"), ("localhost", "localhost", "tenant-b.example")],
    ids=["sni", "host-header"],
)
def test_a_request_naming_another_server_gets_no_credential(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, connect: str, sni: str, host: str
) -> None:
    """A tunnel to an admitted host whose TLS server name or Host header names another
    server (a tenant of the same CDN): mitmproxy would pass both on, and the front end
    would route the request, credential and all, to that server. Refused with 421."""
    reply = raw_exchange(
        gateway,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        % host.format(port=upstream.port).encode(),
        connect=f"{connect}:{upstream.port}", token=idp.mint(groups=["agents"]), server_hostname=sni,
    )
    assert reply.startswith(b"HTTP/1.1 421") and b'"misdirected_request"' in reply, reply[:300]
    assert upstream.received == []


@pytest.mark.parametrize(
    ("target", "status", "reason"),
    [
        ("http://127.1:{port}/v1/chat/completions", 400, "non_canonical_host"),
        ("http://2130706433:{port}/v1/chat/completions", 400, "non_canonical_host"),
        ("http://llm.remote.test/v1/chat/completions", 403, "cleartext_credential"),
    ],
    ids=["short-ipv4", "integer-ipv4", "cleartext-credential"],
)
def test_plain_http_targets_refused_before_any_connection(
    gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, target: str, status: int, reason: str
) -> None:
    """Another spelling of 127.0.0.1 matches no route written for it (a wildcard route
    would admit it), and a credential is never sent in clear beyond this machine."""
    url = target.format(port=upstream.port).encode()
    host = url.split(b"/")[2]
    reply = raw_exchange(
        gateway, b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}" % (url, host),
        token=idp.mint(groups=["agents"]),
    )
    assert reply.startswith(b"HTTP/1.1 %d" % status) and f'"{reason}"'.encode() in reply, reply[:300]
    assert upstream.received == []


def test_a_second_authorization_header_is_refused(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """Only one Authorization header would be checked and removed: a gateway token in a
    second one would travel upstream."""
    token = idp.mint(groups=["agents"])
    reply = raw_exchange(
        gateway,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:%d\r\nAuthorization: Basic eDp5\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}" % (upstream.port, token.encode()),
        connect=f"localhost:{upstream.port}", token=token, server_hostname="localhost",
    )
    assert reply.startswith(b"HTTP/1.1 400") and b'"malformed_request"' in reply, reply[:300]
    assert upstream.received == []


def test_a_tunnel_carrying_no_http_reaches_nothing(gateway: Gateway, idp: LocalIdP) -> None:
    """A CONNECT without credentials is let through when tokens may come inside the
    tunnel; bytes that are not HTTP must not then be relayed as raw TCP, unauthenticated
    and unaudited (mitmproxy's `rawtcp`, which the gateway turns off)."""
    import socket
    import threading

    accepted: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as echo:
        echo.settimeout(3)

        def serve() -> None:
            try:
                conn, _ = echo.accept()
            except OSError:
                return
            with conn:
                accepted.append(conn.recv(65536))
                conn.sendall(accepted[-1])

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        reply = raw_exchange(gateway, b"\x00\x01binary, not HTTP\r\n\r\n", connect=f"127.0.0.1:{echo.getsockname()[1]}")
        server.join(5)
    assert accepted == [] and reply.startswith(b"HTTP/1.1 400"), (accepted, reply[:300])  # mitmproxy: not HTTP
