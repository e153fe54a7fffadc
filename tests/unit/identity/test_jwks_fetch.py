"""Fetching JWKS and OIDC discovery documents: redirects only to where the policy itself
could point (https, or http on loopback), one deadline for the whole exchange (a server
dripping a byte at a time is cut off), a size bound, and a clear `JwksError` for each."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from hoop_addon.identity import verifier as verifier_module
from hoop_addon.identity.verifier import MAX_JWKS_BYTES, MAX_REDIRECTS, JwksError, KeySet
from tests.support.idp import LocalIdP


class Handler(http.server.BaseHTTPRequestHandler):
    """`/to?url=U`: 302 to U; `/hops/N`: N more redirects, then `/jwks`; `/drip`:
    a JWKS one byte every 0.2 s; `/huge`: more than MAX_JWKS_BYTES; `/jwks`: the IdP's."""

    idp: LocalIdP

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/to":
            self._redirect(query.removeprefix("url="))
        elif path.startswith("/hops/"):
            left = int(path.rsplit("/", 1)[1])
            self._redirect(f"/hops/{left - 1}" if left else "/jwks")
        elif path == "/drip":
            body = orjson.dumps(self.idp.jwks())
            self._head(len(body))
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/huge":
            body = b'{"keys": [], "pad": "' + b"x" * MAX_JWKS_BYTES + b'"}'
            self._head(len(body))
            self.wfile.write(body)
        else:
            body = orjson.dumps(self.idp.jwks())
            self._head(len(body))
            self.wfile.write(body)

    def _redirect(self, target: str) -> None:
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _head(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with LocalIdP() as idp:
        handler = type("BoundHandler", (Handler,), {"idp": idp})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.shutdown()


def refresh(url: str) -> KeySet:
    keyset = KeySet(url)
    asyncio.run(keyset.refresh())
    return keyset


def test_a_redirect_on_loopback_is_followed(server: str) -> None:
    assert refresh(f"{server}/to?url=/jwks").keys


def test_redirects_are_followed_up_to_the_limit(server: str) -> None:
    assert refresh(f"{server}/hops/{MAX_REDIRECTS - 1}").keys
    with pytest.raises(JwksError, match="redirects"):
        refresh(f"{server}/hops/{MAX_REDIRECTS}")


@pytest.mark.parametrize(
    "target",
    [
        "http://jwks.example.com/keys",  # plain http off loopback
        "http://10.0.0.1/keys",
        "file:///etc/passwd",
        "ftp://127.0.0.1/keys",
        "gopher://127.0.0.1:70/",
        "//evil.example/keys",  # scheme-relative: http off loopback
    ],
)
def test_a_redirect_where_the_policy_could_not_point_is_refused(server: str, target: str) -> None:
    with pytest.raises(JwksError, match="refused"):
        refresh(f"{server}/to?url={target}")


def test_the_whole_fetch_has_one_deadline(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every byte arrives well within any per-read timeout; the total does not."""
    monkeypatch.setattr(verifier_module, "JWKS_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(JwksError, match="cannot read JWKS"):
        refresh(f"{server}/drip")
    assert time.monotonic() - start < 5  # the drip would take minutes


def test_a_document_over_the_size_bound_is_refused(server: str) -> None:
    with pytest.raises(JwksError, match="cannot read JWKS"):
        refresh(f"{server}/huge")


def test_a_slow_fetch_does_not_hold_the_event_loop(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier_module, "JWKS_TIMEOUT_S", 1.0)
    ticks = 0

    async def run() -> None:
        nonlocal ticks
        fetch = asyncio.ensure_future(KeySet(f"{server}/drip").refresh())
        while not fetch.done():
            ticks += 1
            await asyncio.sleep(0.01)
        with pytest.raises(JwksError):
            fetch.result()

    asyncio.run(run())
    assert ticks > 20  # the loop kept running while the JWKS dripped
