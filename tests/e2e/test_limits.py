"""Rate limits and budgets end to end: a burst beyond the limit gets 429 with
Retry-After and never reaches the upstream; the usage a streamed completion reports
counts against the token budget; a shadow limit refuses nothing."""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
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
from tests.support.upstreams import https_server

LIMITS = """\
limits:
  - name: burst
    when: {{groups: [agents]}}
    requests_per_minute: 3
  - name: daily-tokens
    per: [subject]
    when: {{groups: [budgeted]}}
    tokens_per_day: 400
    default_output_tokens: 40
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
    # the last one was admitted on its estimate and reservation (its completion is known
    # only after it), and the refused one, the same body, did not fit
    need = last["prompt_estimate"] + last["output_reserved"]
    assert last["output_reserved"] == 40  # no max_tokens: the limit's default_output_tokens
    assert spent - last["prompt"] - last["completion"] + need <= 400 < spent + need


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
    need = last["prompt_estimate"] + last["output_reserved"]
    assert spent - last["prompt_estimate"] - last["completion"] + need <= 400 < spent + need


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
    assert entry["usage"] == {"prompt_estimate": (len(body) + 3) // 4, "output_reserved": 40, "prompt": 7, "completion": 70,
                              "completion_estimated": False}


class HeldUpstream:
    """A local HTTPS chat endpoint that holds every answer until `release` is set, so
    that requests are in flight at once: it answers with the usage of a model that
    used all of `max_tokens`. `/v1/drop` reads the request and closes the connection
    without an answer."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.arrived: list[bytes] = []
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                owner.arrived.append(body)
                owner.release.wait(30)
                usage = {"prompt_tokens": len(body) // 4, "completion_tokens": json.loads(body)["max_tokens"]}
                answer = json.dumps({"choices": [{"message": {"content": "ok"}}], "usage": usage}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server, self.url = https_server(Handler, cert, key, host="127.0.0.1")

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held(pki: tuple[CA, Path, Path]) -> Iterator[HeldUpstream]:
    upstream = HeldUpstream(pki[1], pki[2])
    yield upstream
    upstream.stop()


def test_concurrent_requests_cannot_together_pass_a_budget(gateway: Gateway, held: HeldUpstream, idp: LocalIdP) -> None:
    """20 requests at once, each declaring max_tokens 60 and each answered as using all
    of it: each reserves its prompt estimate and bound as it is admitted, so only as
    many as fit go upstream, and the tokens spent stay within the budget (400) plus one
    request's bound (before, all whose prompts fit were admitted: 17, spending ~1400)."""
    token = idp.mint(subject="crowd", groups=["budgeted"])
    body = json.dumps({**chat("hi"), "max_tokens": 60}).encode()
    statuses: list[int] = []

    def send() -> None:
        with client(gateway, token) as c:
            statuses.append(c.post(f"{held.url}/v1/chat/completions", content=body,
                                   headers={"Content-Type": "application/json"}, timeout=60).status_code)

    threads = [threading.Thread(target=send) for _ in range(20)]
    for t in threads:
        t.start()
    wait_for(lambda: len(held.arrived) + statuses.count(429) == 20, timeout=30)  # all in flight or refused
    held.release.set()
    for t in threads:
        t.join(60)
    estimate = (len(body) + 3) // 4
    assert len(held.arrived) == 400 // (estimate + 60) >= 1, (len(held.arrived), estimate)
    assert sorted(statuses) == [200] * len(held.arrived) + [429] * (20 - len(held.arrived))
    entries = of(gateway, "crowd", 20)
    passed = [e["usage"] for e in entries if e["status"] == 200]
    spent = sum(u["prompt"] + u["completion"] for u in passed)
    assert all(u["completion"] == 60 and u["output_reserved"] == 60 for u in passed), passed
    assert spent <= 400 + 60, spent
    refused = [e for e in entries if e["status"] == 429]
    assert all(e["decision"]["rule"] == "daily-tokens" for e in refused)


def test_a_failed_request_gives_its_reservation_back(gateway: Gateway, held: HeldUpstream, idp: LocalIdP) -> None:
    """Requests whose upstream drops the connection use no output: each releases its
    reservation (only its prompt estimate stays charged), so a request that needs all
    the budget left still fits; had one reservation leaked, it would not."""
    token = idp.mint(subject="dropped", groups=["budgeted"])
    drop = json.dumps({**chat("hi"), "max_tokens": 60}).encode()
    with client(gateway, token) as c:
        codes = [c.post(f"{held.url}/v1/drop", content=drop, headers={"Content-Type": "application/json"}).status_code
                 for _ in range(4)]
        assert codes == [502] * 4, codes
        used = 4 * ((len(drop) + 3) // 4)
        probe = json.dumps({**chat("hi"), "max_tokens": 100}).encode()  # same length as the request below
        rest = 400 - used - (len(probe) + 3) // 4
        fits = json.dumps({**chat("hi"), "max_tokens": rest}).encode()
        too_much = json.dumps({**chat("hi"), "max_tokens": rest + 1}).encode()
        assert len(fits) == len(too_much) == len(probe), (fits, too_much)
        refused = c.post(f"{held.url}/v1/chat/completions", content=too_much, headers={"Content-Type": "application/json"})
        assert refused.status_code == 429, refused.text
        held.release.set()
        admitted = c.post(f"{held.url}/v1/chat/completions", content=fits, headers={"Content-Type": "application/json"})
        assert admitted.status_code == 200, admitted.text
    entries = of(gateway, "dropped", 6)
    assert [e["usage"]["completion"] for e in entries[:4]] == [0] * 4
