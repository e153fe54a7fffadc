"""What end-to-end tests do as an agent: an httpx client configured only through the
environment, a chat request, and what the upstream and the recordings received."""

from __future__ import annotations

import httpx
import pytest

from hoop_addon.dev.gateway import Gateway


def agent_client(gateway: Gateway, monkeypatch: pytest.MonkeyPatch, proxy_token: str | None = None) -> httpx.Client:
    """An httpx client configured only through the environment, as an agent would be."""
    monkeypatch.setenv("HTTPS_PROXY", gateway.proxy(proxy_token))
    monkeypatch.setenv("SSL_CERT_FILE", str(gateway.ca_cert))
    return httpx.Client(timeout=10)


def chat(content: str, stream: bool = False) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "stream": stream}


def header(received, name: str) -> str | None:
    """A header the upstream received, by case-insensitive name."""
    return next((v for k, v in received.headers if k.lower() == name.lower()), None)


def recorded_bytes(gateway: Gateway) -> bytes:
    """Every recording, manifest and the audit log (not a manifest's `.tmp` being
    written: it is renamed over the manifest a moment later)."""
    return b"".join(p.read_bytes() for p in sorted(gateway.recordings.iterdir()) if p.suffix != ".tmp")


def assert_absent(haystack: bytes | str, needles: tuple[str, ...]) -> None:
    data = haystack.encode() if isinstance(haystack, str) else haystack
    for needle in needles:
        assert needle.encode() not in data, f"{needle!r} leaked"
