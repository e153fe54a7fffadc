"""Metrics and health on the control port, after real traffic through the gateway."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.support.idp import LocalIdP


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0.0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_metrics_count_decisions_and_never_hold_secrets(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    before = httpx.get(f"{gateway.control_url}/metrics").text
    token = idp.mint(groups=["agents"])
    ca = ssl.create_default_context(cafile=str(gateway.ca_cert))
    with httpx.Client(proxy=gateway.proxy(token), verify=ca, trust_env=False) as client:
        assert client.post(f"{upstream.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "me@example.com"}]}).status_code == 200
    with httpx.Client(proxy=gateway.proxy(idp.mint(expires_in=-60)), verify=ca, trust_env=False) as client:
        with pytest.raises(httpx.ProxyError):
            client.get(f"{upstream.url}/v1/models")

    response = httpx.get(f"{gateway.control_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = response.text
    assert metric(after, "hoop_requests_total", route="llm", outcome="allow") == metric(before, "hoop_requests_total", route="llm", outcome="allow") + 1
    assert metric(after, "hoop_jwt_failures_total", reason="expired") == metric(before, "hoop_jwt_failures_total", reason="expired") + 1
    refused = {"stage": "identity", "reason": "expired"}
    assert metric(after, "hoop_refusals_total", **refused) == metric(before, "hoop_refusals_total", **refused) + 1
    assert metric(after, "hoop_masked_values_total", rule="pii-in", part="request") >= 1
    assert metric(after, "hoop_stage_seconds_count", stage="Identify", hook="requestheaders") >= 1
    for secret in (token, UPSTREAM_KEY, "me@example.com"):
        assert secret not in after


def test_one_log_line_per_decision_without_secrets(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    token = idp.mint(subject="logged-agent", groups=["agents"])
    ca = ssl.create_default_context(cafile=str(gateway.ca_cert))
    with httpx.Client(proxy=gateway.proxy(token), verify=ca, trust_env=False) as client:
        assert client.post(f"{upstream.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "me@example.com"}]}).status_code == 200
        assert client.get(f"{upstream.url}/v2/unrouted").status_code == 403
    gateway.wait_audit(0)
    deadline = time.monotonic() + 5
    while len(lines := [line for line in gateway.output.splitlines() if "subject=logged-agent" in line]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    allowed, refused = (line.split("hoop decision ", 1)[1] for line in lines)
    assert re.fullmatch(r"flow=\S+ subject=logged-agent route=llm outcome=allow stage=- reason=- status=200 masked=[1-9][0-9]*", allowed), allowed
    assert re.fullmatch(r"flow=\S+ subject=logged-agent route=- outcome=deny stage=route reason=no_route status=403 masked=0", refused), refused
    for secret in (token, UPSTREAM_KEY, "me@example.com"):
        assert secret not in gateway.output


def test_health_ok_when_enforcing(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.control_url}/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert metric(httpx.get(f"{gateway.control_url}/metrics").text, "hoop_enforcing") == 1.0


def test_health_fails_while_jwks_was_never_fetched(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    """An issuer whose JWKS URL never answered: the gateway runs (and refuses its
    tokens), and health says enforcement cannot work."""
    dead = POLICY.replace("jwks: {jwks}", "jwks: http://127.0.0.1:9/jwks.json")  # port 9: nothing listens
    rules = write_policy(tmp_path / "rules", idp, dead)
    gateway = Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        response = httpx.get(f"{gateway.control_url}/healthz")
        assert response.status_code == 503
        assert response.json() == {"status": "failing", "problems": [f"issuer {idp.issuer}: JWKS never fetched"]}
        assert metric(httpx.get(f"{gateway.control_url}/metrics").text, "hoop_enforcing") == 0.0
    finally:
        gateway.stop()
