"""A bug in any stage fails closed. mitmproxy logs an addon's exception and runs the
next addons, which would forward a flow half-enforced; the Stage base refuses it."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import ROOT, Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import UPSTREAM_KEY, write_policy
from tests.support.idp import LocalIdP

PLANTED = "jane.doe@example.com"


def faulty_gateway(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], fault: str) -> Gateway:
    gateway = Gateway(write_policy(tmp_path / "rules", idp), tmp_path, pki[0].cert_path,
                      env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "HOOP_FAULT": fault})
    gateway.argv += ["-s", str(ROOT / "tests" / "e2e" / "stage_fault.py")]
    return gateway.start()


def post(gateway: Gateway, idp: LocalIdP, url: str) -> httpx.Response:
    ca = ssl.create_default_context(cafile=str(gateway.ca_cert))
    with httpx.Client(proxy=gateway.proxy(idp.mint(groups=["agents"])), verify=ca, trust_env=False, timeout=10) as client:
        return client.post(url, json={"messages": [{"role": "user", "content": PLANTED}]})


def test_a_bug_before_the_upstream_refuses_the_request(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI) -> None:
    gateway = faulty_gateway(tmp_path, idp, pki, "route")
    try:
        r = post(gateway, idp, f"{upstream.url}/v1/chat/completions")
        entry = gateway.wait_audit(1)[-1]
    finally:
        gateway.stop()
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "the gateway could not process this request; it was not forwarded", "stage": "admit"}
    assert upstream.received == []
    assert entry["decision"]["reason"] == "internal_error"
    assert "injected stage failure" in gateway.output and PLANTED not in gateway.output


def test_a_bug_after_the_upstream_withholds_the_response(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI) -> None:
    gateway = faulty_gateway(tmp_path, idp, pki, "record")
    try:
        with pytest.raises(httpx.RemoteProtocolError):
            post(gateway, idp, f"{upstream.url}/v1/chat/completions")
    finally:
        gateway.stop()
    assert len(upstream.received) == 1  # it was forwarded (masked); its answer was not delivered
    assert PLANTED.encode() not in upstream.received[0].body
