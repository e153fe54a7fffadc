"""Rate limits and budgets end to end: a burst beyond the limit gets 429 with
Retry-After and never reaches the upstream; the usage a streamed completion reports
counts against the token budget; a shadow limit refuses nothing."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.e2e.test_approvals import wait_for
from tests.support.agents import chat
from tests.support.idp import LocalIdP

LIMITS = """\
limits:
  - name: burst
    when: {{groups: [agents]}}
    requests_per_minute: 3
  - name: daily-tokens
    per: [subject]
    when: {{groups: [budgeted]}}
    tokens_per_day: 400
  - name: watch
    per: []
    requests_per_minute: 1
    action: log
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("limits")
    policy = (POLICY + LIMITS).replace("      groups: [agents]\n    masking: [pii-in, pii-out]",
                                       "      groups: [agents, budgeted]\n    masking: [pii-in, pii-out]")
    gw = Gateway(write_policy(work / "rules", idp, policy), work, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY})
    gw.start()
    yield gw
    gw.stop()


def client(gateway: Gateway, token: str) -> httpx.Client:
    return httpx.Client(proxy=gateway.proxy(token), verify=ssl.create_default_context(cafile=str(gateway.ca_cert)),
                        trust_env=False, timeout=10)


def of(gateway: Gateway, subject: str, count: int) -> list[dict]:
    """The audit entries of `subject`'s flows, once there are `count`."""
    mine = lambda: [e for e in gateway.audit() if (e.get("identity") or {}).get("subject") == subject]  # noqa: E731
    wait_for(lambda: len(mine()) >= count)
    return mine()


def test_a_burst_beyond_the_limit_gets_429_with_retry_after(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    with client(gateway, idp.mint(subject="bursty", groups=["agents"])) as c:
        statuses = [c.post(f"{upstream.url}/v1/chat/completions", json=chat("hi")) for _ in range(5)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]
    refused = statuses[-1]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.json()["error"] == "rate_limited" and "'burst'" in refused.json()["message"]
    assert len(upstream.received) == 3  # the refused ones never left the gateway
    with client(gateway, idp.mint(subject="calm", groups=["agents"])) as c:  # counted per subject
        assert c.post(f"{upstream.url}/v1/chat/completions", json=chat("hi")).status_code == 200
    entries = [e for e in gateway.wait_audit(0) if (e.get("identity") or {}).get("subject") == "bursty"]
    assert [e["decision"].get("rule") for e in entries if e["status"] == 429] == ["burst", "burst"]
    assert all(any(s["rule"] == "watch" for s in e["decision"].get("shadow", [])) for e in entries[1:])  # shadow: counted only


def test_a_streamed_completions_usage_counts_against_the_token_budget(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    with client(gateway, idp.mint(subject="spender", groups=["budgeted"])) as c:
        codes = []
        for _ in range(20):
            with c.stream("POST", f"{upstream.url}/v1/chat/completions", json={**chat("x" * 40, stream=True), "stream_options": {"include_usage": True}}) as r:
                r.read()
                codes.append(r.status_code)
            if codes[-1] != 200:
                break
    assert codes[-1] == 429, codes
    entries = [e for e in gateway.wait_audit(len(codes)) if (e.get("identity") or {}).get("subject") == "spender"]
    passed = [e["usage"] for e in entries if e["status"] == 200]
    # each streamed answer's reported usage was read as it passed, and charged
    assert len(passed) == len(codes) - 1 and all(u["completion"] > 0 and u["prompt"] > 0 for u in passed), passed
    spent = sum(u["prompt"] + u["completion"] for u in passed)
    last = passed[-1]
    # the last one was admitted on its estimate (its completion is known only after it),
    # and the refused one, the same body, did not fit
    assert spent - last["prompt"] - last["completion"] + last["prompt_estimate"] <= 400 < spent + last["prompt_estimate"]


def test_a_stream_that_reports_no_usage_is_charged_what_passed(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """An OpenAI stream without `stream_options.include_usage` reports no usage: its
    completion is charged the estimate of the bytes that passed (bytes / 4), marked
    `completion_estimated`, so leaving the option out does not make answers free."""
    with client(gateway, idp.mint(subject="no-usage", groups=["budgeted"])) as c:
        codes, received = [], []
        for _ in range(20):
            with c.stream("POST", f"{upstream.url}/v1/chat/completions", json=chat("x" * 40, stream=True)) as r:
                received.append(r.read())
                codes.append(r.status_code)
            if codes[-1] != 200:
                break
    assert codes[-1] == 429, codes
    entries = of(gateway, "no-usage", len(codes))
    passed = [e["usage"] for e in entries if e["status"] == 200]
    assert len(passed) == len(codes) - 1
    for usage, body in zip(passed, received, strict=False):
        assert b"data: [DONE]" in body and b'"usage"' not in body  # nothing reported
        assert usage["completion_estimated"] is True and usage["prompt"] is None
        assert usage["completion"] == (len(body) + 3) // 4, (usage, len(body))  # what the client got, bytes / 4
    spent = sum(u["prompt_estimate"] + u["completion"] for u in passed)
    last = passed[-1]
    assert spent - last["completion"] <= 400 < spent + last["prompt_estimate"]


def test_a_gemini_json_array_stream_reports_its_usage(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """`streamGenerateContent` without `alt=sse` answers one pretty-printed JSON array
    whose items' `usageMetadata` are cumulative: the last counts are charged, thinking
    tokens as output (the echo endpoint answers with the body it is sent)."""
    items = [{"candidates": [{"content": {"parts": [{"text": "a" * 30}]}}],
              "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3}},
             {"candidates": [{"content": {"parts": [{"text": "b" * 30}]}}],
              "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 50, "thoughtsTokenCount": 20}}]
    body = ("[" + ",\r\n".join(json.dumps(i, indent=2) for i in items) + "]").encode()
    with client(gateway, idp.mint(subject="gemini", groups=["budgeted"])) as c:
        r = c.post(f"{upstream.url}/v1/echo", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.content == body
    (entry,) = of(gateway, "gemini", 1)
    assert entry["usage"] == {"prompt_estimate": (len(body) + 3) // 4, "prompt": 7, "completion": 70, "completion_estimated": False}
