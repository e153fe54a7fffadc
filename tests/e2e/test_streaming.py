"""Event streams on routes that do not mask responses go to the agent chunk by chunk,
as the upstream sends them (LLM tokens, MCP progress notifications), not all at the end;
the recording keeps them, bounded by `hoop_mask_max_body`.

The upstream sends one event, then waits until the test has seen that event at the
agent before it sends the rest: a gateway that buffered the stream would hold the first
event back until the upstream gave up waiting, and the test would see it had."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mitmproxy import io

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from tests.conftest import write_policy
from tests.support.idp import LocalIdP
from tests.support.upstreams import https_server

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256]
masking:
  - name: prompts
    direction: request
    detectors: [email]
routes:
  - name: events
    api: openai
    match:
      hosts: [localhost]
    allow:
      groups: [agents]
    masking: [prompts]
    credential:
      header: Authorization
      value: Bearer ${{HOOP_STREAM_KEY}}
"""
KEY = "sk-stream-upstream-key-0123456789"

FIRST = b'data: {"choices":[{"index":0,"delta":{"content":"first"}}]}\n\n'
REST = b'data: {"choices":[{"index":0,"delta":{"content":" rest"}}]}\n\ndata: [DONE]\n\n'


class Handshake:
    """An HTTPS upstream streaming `FIRST`, waiting (at most 10 s) for `seen`, then
    `REST`; or, on /long, `size` bytes of events at once. `waited_out` tells whether
    it gave up waiting."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.seen, self.waited_out, self.size = threading.Event(), False, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if self.path == "/echo":  # a debug endpoint streaming back the credential it got
                    echoed = self.headers.get("Authorization", "")
                    self._chunk(b'data: {"choices":[{"index":0,"delta":{"content":"you sent ' + echoed.encode() + b'"}}]}\n\n')
                elif self.path == "/long":
                    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 200 + b'"}}]}\n\n'
                    for _ in range(outer.size // len(event) + 1):
                        self._chunk(event)
                else:
                    self._chunk(FIRST)
                    outer.waited_out = not outer.seen.wait(10)
                    self._chunk(REST)
                self.wfile.write(b"0\r\n\r\n")

        self.server, self.url = https_server(Handler, cert, key)


@pytest.fixture(scope="module")
def upstream(pki: tuple[CA, Path, Path]) -> Iterator[Handshake]:
    server = Handshake(pki[1], pki[2])
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def stream_gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("stream-gateway")
    gw = Gateway(write_policy(work / "rules", idp, POLICY), work, pki[0].cert_path, env={"HOOP_STREAM_KEY": KEY},
                 options={"store_streamed_bodies": "true", "hoop_mask_max_body": "64k"})
    gw.start()
    yield gw
    gw.stop()


def _client(gateway: Gateway, idp: LocalIdP) -> httpx.Client:
    trust = ssl.create_default_context(cafile=str(gateway.ca_cert))
    return httpx.Client(proxy=gateway.proxy(idp.mint(subject="streamer", groups=["agents"])), verify=trust, timeout=30)


def _recorded(gateway: Gateway, path: str) -> bytes:
    entries = [e for e in gateway.wait_audit(1) if e.get("path") == path]
    with Path(entries[-1]["recording"]).open("rb") as f:
        flows = [x for x in io.FlowReader(f).stream() if x.request.path == path]
    return flows[-1].response.content


def test_a_stream_no_response_rule_reads_reaches_the_agent_event_by_event(
    stream_gateway: Gateway, upstream: Handshake, idp: LocalIdP
) -> None:
    upstream.seen.clear()
    received = b""
    with _client(stream_gateway, idp) as client, client.stream("POST", f"{upstream.url}/v1/chat", json={"stream": True}) as reply:
        for chunk in reply.iter_raw():
            received += chunk
            if FIRST in received:
                upstream.seen.set()  # the upstream sends the rest only now

    assert reply.status_code == 200
    assert not upstream.waited_out, "the first event reached the agent only when the stream ended"
    assert received == FIRST + REST
    assert _recorded(stream_gateway, "/v1/chat") == FIRST + REST


def test_a_stream_longer_than_the_recording_keeps_ends_with_an_error_event(
    stream_gateway: Gateway, upstream: Handshake, idp: LocalIdP
) -> None:
    upstream.size = 200 * 1024  # hoop_mask_max_body is 64k
    with _client(stream_gateway, idp) as client:
        reply = client.post(f"{upstream.url}/long", json={"stream": True})

    assert reply.status_code == 200
    body = reply.content
    assert len(body) <= 64 * 1024 + 1024
    assert body.rstrip().endswith(b"}") and b"event: error" in body and b"response_too_large" in body
    assert len(_recorded(stream_gateway, "/long")) <= 64 * 1024 + 1024
    denied = [e["decision"] for e in stream_gateway.wait_audit(2) if e.get("path") == "/long"]
    assert denied[-1]["reason"] == "response_too_large"


def test_a_credential_the_upstream_echoes_in_a_passing_stream_never_reaches_the_agent(
    stream_gateway: Gateway, upstream: Handshake, idp: LocalIdP
) -> None:
    """A stream no response rule reads still passes the credential-echo scrubber."""
    with _client(stream_gateway, idp) as client:
        reply = client.post(f"{upstream.url}/echo", json={"stream": True})

    assert reply.status_code == 200
    assert b"you sent Bearer [SCRUBBED]" in reply.content
    assert KEY.encode() not in reply.content
    assert KEY.encode() not in _recorded(stream_gateway, "/echo")
