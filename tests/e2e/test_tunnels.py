"""A CONNECT tunnel's identity, request by request: the issuer's leeway applies on
CONNECT and inside the tunnel alike, and a tunnel does not outlive the removal of its
token's signing key from the issuer's JWKS."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY
from tests.support.agents import chat
from tests.support.idp import LocalIdP

LEEWAY = 30


@pytest.fixture(scope="module")
def rotating() -> Iterator[LocalIdP]:
    with LocalIdP() as provider:
        yield provider


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, rotating: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("tunnels")
    rules = work / "rules"
    rules.mkdir()
    text = POLICY.replace("    algorithms: [RS256, ES256]\n", f"    algorithms: [RS256, ES256]\n    leeway: {LEEWAY}\n    refetch_cooldown: 1\n")
    (rules / "policy.yaml").write_text(text.format(issuer=rotating.issuer, jwks=rotating.jwks_url))
    gateway = Gateway(rules, work, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True)
    gateway.start()
    yield gateway
    gateway.stop()


def client(gw: Gateway, token: str) -> httpx.Client:
    """One client, one connection: every request goes through the same tunnel."""
    return httpx.Client(proxy=gw.proxy(token), verify=ssl.create_default_context(cafile=str(gw.ca_cert)),
                        trust_env=False, timeout=10, limits=httpx.Limits(max_connections=1))


@pytest.mark.parametrize("expired_ago, admitted", [(LEEWAY - 20, True), (LEEWAY + 20, False)])
def test_the_leeway_is_the_same_on_connect_and_inside_the_tunnel(
    gw: Gateway, rotating: LocalIdP, upstream: FakeOpenAI, expired_ago: int, admitted: bool
) -> None:
    token = rotating.mint(expires_in=-expired_ago)
    with client(gw, token) as agent:
        if not admitted:
            with pytest.raises(httpx.ProxyError, match="407"):
                agent.post(f"{upstream.url}/v1/chat/completions", json=chat("hi"))
            assert upstream.received == []
            return
        for _ in range(3):  # the CONNECT, then requests inside the tunnel
            assert agent.post(f"{upstream.url}/v1/chat/completions", json=chat("hi")).status_code == 200
    assert len(upstream.received) == 3


def test_a_tunnel_ends_when_its_key_leaves_the_jwks(gw: Gateway, rotating: LocalIdP, upstream: FakeOpenAI) -> None:
    kid = rotating.add_key("RSA", "leaving")
    time.sleep(1.1)  # past the refetch cooldown: the gateway fetches the new key on first use
    with client(gw, rotating.mint("tunnelled", kid=kid)) as agent:
        assert agent.post(f"{upstream.url}/v1/chat/completions", json=chat("before")).status_code == 200
        rotating.remove_key(kid)
        time.sleep(1.1)
        with client(gw, rotating.mint(headers={"kid": "ghost"})) as other:  # makes the gateway refetch
            with pytest.raises(httpx.ProxyError, match="407"):
                other.post(f"{upstream.url}/v1/chat/completions", json=chat("x"))
        upstream.clear()

        refused = agent.post(f"{upstream.url}/v1/chat/completions", json=chat("after"))

    assert (refused.status_code, refused.json()["error"]) == (407, "unknown_key")
    assert upstream.received == []
    entry = gw.wait_audit(1)[-1]
    assert entry["decision"]["reason"] == "unknown_key" and entry["identity"] is None
