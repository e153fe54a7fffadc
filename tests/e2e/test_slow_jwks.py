"""A JWKS that drips (one byte a second) at start-up: the gateway serves at once, the
other issuer's tokens work, the slow issuer's are refused within the fetch deadline,
`/healthz` says why, and SIGTERM stops the process meanwhile."""

from __future__ import annotations

import http.server
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import UPSTREAM_KEY
from tests.support.agents import chat
from tests.support.idp import LocalIdP

POLICY = """\
version: 1
issuers:
  - {{name: fast, issuer: {fast}, audience: hoop-gateway, jwks: {fast_jwks}}}
  - {{name: slow, issuer: https://slow-idp.example, audience: hoop-gateway, jwks: {slow_jwks}}}
routes:
  - name: llm
    match: {{hosts: [localhost], paths: [/v1/*]}}
    allow: {{groups: ['fast:agents', 'slow:agents']}}
    credential: {{header: Authorization, value: 'Bearer ${{HOOP_TEST_UPSTREAM_KEY}}'}}
"""


class Drip(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(1)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def drip() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()


def test_a_slow_jwks_at_start_up_freezes_nothing(
    tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI, drip: str
) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "policy.yaml").write_text(POLICY.format(fast=idp.issuer, fast_jwks=idp.jwks_url, slow_jwks=drip))
    gw = Gateway(tmp_path / "rules", tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    gw.start()
    try:
        slow = LocalIdP(issuer="https://slow-idp.example")  # never started: only its keys sign
        ca = ssl.create_default_context(cafile=str(gw.ca_cert))
        with httpx.Client(proxy=gw.proxy(), verify=ca, trust_env=False, timeout=20) as agent:
            url = f"{upstream.url}/v1/chat/completions"
            fast = agent.post(url, json=chat("hi"), headers={"Authorization": f"Bearer {idp.mint()}"})
            started = time.monotonic()
            refused = agent.post(url, json=chat("hi"), headers={"Authorization": f"Bearer {slow.mint()}"})
            waited = time.monotonic() - started
        health = httpx.get(f"{gw.control_url}/healthz", timeout=5)
        assert fast.status_code == 200 and len(upstream.received) == 1
        assert (refused.status_code, refused.json()["error"]) == (401, "unknown_key")
        assert waited < 15, waited  # the 5 s fetch deadline, not the drip's 100,000 s
        assert health.status_code == 503 and "issuer https://slow-idp.example: JWKS never fetched" in health.json()["problems"]

        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(15) is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
    finally:
        gw.stop()
