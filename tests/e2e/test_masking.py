"""End to end masking: the openai SDK through the real gateway, plain and streamed.

Asserts on what the upstream received, what the agent got, what was recorded and
audited: prompts and tool-call arguments masked on the way up; completions (and
streamed tool-call arguments, gzip-encoded and cut at arbitrary byte boundaries)
masked on the way down; `tokenize` round trip; an injected masker failure refuses the
request before anything reaches the upstream.
"""

from __future__ import annotations

import http.server
import json
import ssl
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from hoop_addon.dev.gateway import ROOT, Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import write_policy
from tests.support.idp import LocalIdP
from tests.support.upstreams import https_server

EMAIL, CARD = "jane.doe@example.com", "4242 4242 4242 4242"
PLANTED = ("help@upstream.example", "4111 1111 1111 1111")  # in every FakeOpenAI reply
TOOL_ARGS = json.dumps({"to": "bob.smith@example.org", "card": "5555 5555 5555 4444", "subject": "hello"})

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256, ES256]
masking:
  - name: prompts
    direction: request
    paths:
      - $.messages[*].content
      - $.messages[*].tool_calls[*].function.arguments
    detectors: [email, payment_card]
  - name: prompts-tokenized
    direction: request
    operator: tokenize
    paths:
      - $.messages[*].content
    detectors: [email, payment_card]
  - name: completions
    direction: response
    paths:
      - $.choices[*].message.content
      - $.choices[*].delta.content
      - $.choices[*].message.tool_calls[*].function.arguments
      - $.choices[*].delta.tool_calls[*].function.arguments
    detectors: [email, payment_card]
routes:
  - name: redacting
    match:
      hosts: [localhost]
      paths: [/v1/*, /length/v1/*]
    allow:
      groups: [agents]
    masking: [prompts, completions]
  - name: tokenizing
    match:
      hosts: [127.0.0.1]
      paths: [/v1/*]
    allow:
      groups: [agents]
    masking: [prompts-tokenized, completions]
"""


def _tool_call_stream() -> list[bytes]:
    """A streamed completion whose tool-call arguments arrive 5 characters at a time."""

    def event(delta: dict, finish: str | None = None) -> bytes:
        doc = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "send_mail", "arguments": ""}}
    events = [event({"role": "assistant", "content": None, "tool_calls": [call]})]
    for i in range(0, len(TOOL_ARGS), 5):
        events.append(event({"tool_calls": [{"index": 0, "function": {"arguments": TOOL_ARGS[i : i + 5]}}]}))
    return [*events, event({}, "tool_calls"), b"data: [DONE]\n\n"]


class ScriptedUpstream:
    """An HTTPS upstream that answers every POST with `_tool_call_stream()`, gzip
    encoded (flushed per event) and sent in 7-byte HTTP chunks; under `/length/`,
    in one piece with a Content-Length instead."""

    def __init__(self, cert: Path, key: Path) -> None:

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                gz = zlib.compressobj(wbits=31)
                body = b"".join(gz.compress(e) + gz.flush(zlib.Z_SYNC_FLUSH) for e in _tool_call_stream()) + gz.flush()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Encoding", "gzip")
                if self.path.startswith("/length/"):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(body), 7):
                    piece = body[i : i + 7]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

        self.server, self.url = https_server(Handler, cert, key)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def masking_gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("masking-gateway")
    gw = Gateway(write_policy(work / "rules", idp, POLICY), work, pki[0].cert_path, options={"store_streamed_bodies": "true"})
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def scripted(pki: tuple[CA, Path, Path]) -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream(pki[1], pki[2])
    yield server
    server.close()


def sdk(gateway: Gateway, idp: LocalIdP, base_url: str, subject: str) -> openai.OpenAI:
    """The openai SDK, through the gateway, with the agent's token as its API key."""
    token = idp.mint(subject=subject, groups=["agents"])
    trust = ssl.create_default_context(cafile=str(gateway.ca_cert))
    http_client = httpx.Client(proxy=gateway.proxy(), verify=trust, timeout=10)
    return openai.OpenAI(base_url=base_url, api_key=token, http_client=http_client, max_retries=0)


def recorded(gateway: Gateway) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(gateway.recordings.rglob("*")) if p.is_file())


def assert_absent(data: bytes | str, values: tuple[str, ...]) -> None:
    data = data.encode() if isinstance(data, str) else data
    for value in values:
        assert value.encode() not in data, f"{value!r} leaked"


def messages(prompt: str) -> list[dict]:
    """A conversation with a tool call whose JSON arguments hold PII."""
    call = {"id": "call_1", "type": "function", "function": {"name": "send_mail", "arguments": TOOL_ARGS}}
    return [
        {"role": "user", "content": "mail bob please"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sent"},
        {"role": "user", "content": prompt},
    ]


ARGS_PII = ("bob.smith@example.org", "5555 5555 5555 4444")


def test_sdk_prompt_tool_call_arguments_and_completion_masked(masking_gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    client = sdk(masking_gateway, idp, f"{upstream.url}/v1", "mask-plain")
    before = len(masking_gateway.audit())

    reply = client.chat.completions.create(model="m", messages=messages(f"mail {EMAIL} card {CARD}"))

    (received,) = upstream.received
    sent = orjson.loads(received.body)
    assert sent["messages"][3]["content"] == "mail [REDACTED:EMAIL] card [REDACTED:CARD]"
    arguments = json.loads(sent["messages"][1]["tool_calls"][0]["function"]["arguments"])  # still JSON
    assert arguments == {"to": "[REDACTED:EMAIL]", "card": "[REDACTED:CARD]", "subject": "hello"}
    assert_absent(received.body, (EMAIL, CARD, *ARGS_PII))
    content = reply.choices[0].message.content
    assert "[REDACTED:EMAIL]" in content and "[REDACTED:CARD]" in content
    assert_absent(content, PLANTED)
    entry = masking_gateway.wait_audit(before + 1)[-1]
    masked = {(m["rule"], m["part"]): m for m in entry["masked"]}
    assert masked["prompts", "request"]["detectors"] == {"email": 2, "payment_card": 2}
    assert "$['messages'][1]['tool_calls'][0]['function']['arguments'] (JSON in string: $['to'])" in masked["prompts", "request"]["where"]
    assert masked["completions", "response"]["count"] >= 2
    assert_absent(orjson.dumps(entry), (EMAIL, CARD, *ARGS_PII, *PLANTED))


def test_sdk_streamed_completion_masked_and_recorded_masked(masking_gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    client = sdk(masking_gateway, idp, f"{upstream.url}/v1", "mask-stream")
    before = len(masking_gateway.audit())

    chunks = list(client.chat.completions.create(model="m", messages=messages(f"mail {EMAIL}"), stream=True))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Echo: mail [REDACTED:EMAIL]. Reach support at [REDACTED:EMAIL] or card [REDACTED:CARD].")
    entry = masking_gateway.wait_audit(before + 1)[-1]
    response = next(m for m in entry["masked"] if m["part"] == "response")
    assert response["detectors"] == {"email": 1, "payment_card": 1}
    assert response["where"] == ["$['choices'][0]['delta']['content']"]
    data = recorded(masking_gateway)
    assert b"[REDACTED:EMAIL]" in data  # the masked stream is what is stored
    assert_absent(data, (EMAIL, *PLANTED, *ARGS_PII))


@pytest.mark.parametrize("framing", ["", "/length"], ids=["chunked", "content-length"])
def test_streamed_tool_call_arguments_masked_across_gzip_chunks(masking_gateway: Gateway, scripted: ScriptedUpstream, idp: LocalIdP, framing: str) -> None:
    client = sdk(masking_gateway, idp, f"{scripted.url}{framing}/v1", "mask-tools")

    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], stream=True))

    arguments = "".join(
        call.function.arguments or "" for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()
    )
    assert json.loads(arguments) == {"to": "[REDACTED:EMAIL]", "card": "[REDACTED:CARD]", "subject": "hello"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert_absent(recorded(masking_gateway), ARGS_PII)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_tokenize_round_trip(masking_gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, stream: bool) -> None:
    client = sdk(masking_gateway, idp, f"https://127.0.0.1:{upstream.port}/v1", f"tokens-{stream}")
    prompt = f"mail {EMAIL} card {CARD}"

    result = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in result if c.choices)
    else:
        text = result.choices[0].message.content

    (received,) = upstream.received
    assert orjson.loads(received.body)["messages"][0]["content"] == "mail <EMAIL_1> card <CARD_1>"
    assert text.startswith(f"Echo: {prompt}. Reach support at [REDACTED:EMAIL]")  # restored; the upstream's own masked
    data = recorded(masking_gateway)
    assert b"<EMAIL_1>" in data  # the recording keeps the tokens, never the values
    assert_absent(data, (EMAIL, CARD, *PLANTED))


SHADOW_POLICY = POLICY.replace("""routes:
""", """  - name: watch-emails
    direction: both
    action: log
    paths:
      - $.messages[*].content
      - $.choices[*].message.content
    detectors: [email, payment_card]
routes:
""").replace("masking: [prompts, completions]", "masking: [watch-emails]")


def test_a_shadow_masking_rule_forwards_values_and_audits_what_it_would_mask(tmp_path: Path, upstream: FakeOpenAI, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    gw = Gateway(write_policy(tmp_path / "rules", idp, SHADOW_POLICY), tmp_path, pki[0].cert_path).start()
    try:
        client = sdk(gw, idp, f"{upstream.url}/v1", "mask-shadow")
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"mail {EMAIL}"}])
        (entry,) = gw.wait_audit(1)
        metrics = httpx.get(f"{gw.control_url}/metrics").text
    finally:
        gw.stop()

    (received,) = upstream.received
    assert orjson.loads(received.body)["messages"][0]["content"] == f"mail {EMAIL}"  # not masked: shadow mode
    assert EMAIL in reply.choices[0].message.content
    shadow = {(m["part"], m["rule"]): (m["detectors"], m["shadow"]) for m in entry["masked"]}
    assert shadow == {
        ("request", "watch-emails"): ({"email": 1}, True),
        ("response", "watch-emails"): ({"email": 2, "payment_card": 1}, True),  # the echo and the planted reply
    }
    assert 'hoop_shadow_matches_total{kind="masking",rule="watch-emails"} 4.0' in metrics
    assert "hoop_masked_values_total{" not in metrics  # nothing was masked
    assert "subject=mask-shadow route=redacting outcome=allow stage=- reason=- status=200 masked=0" in gw.output


def test_injected_masking_failure_refuses_the_request(tmp_path: Path, upstream: FakeOpenAI, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    gw = Gateway(write_policy(tmp_path / "rules", idp, POLICY), tmp_path, pki[0].cert_path)
    gw.argv += ["-s", str(ROOT / "tests" / "e2e" / "mask_fault.py")]
    gw.start()
    try:
        client = sdk(gw, idp, f"{upstream.url}/v1", "mask-fault")
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"mail {EMAIL}"}])
        (entry,) = gw.wait_audit(1)
    finally:
        gw.stop()

    assert upstream.received == []
    assert refused.value.response.json() == {
        "error": "unmaskable_request", "message": "request could not be inspected: masking failed (RuntimeError)", "stage": "mask",
    }
    assert entry["decision"]["outcome"] == "deny" and entry["decision"]["reason"] == "unmaskable_request"
    assert_absent(orjson.dumps(entry), (EMAIL,))


def test_gateway_refuses_to_stream_large_bodies_past_the_masker(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    gw = Gateway(write_policy(tmp_path / "rules", idp, POLICY), tmp_path, pki[0].cert_path, options={"stream_large_bodies": "1m"})

    status, output = gw.run_to_exit()

    assert status == 1 and "stream_large_bodies is not supported" in output
