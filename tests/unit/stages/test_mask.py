"""The Mask and Restore stages in mitmproxy's test harness: streams through the real
stream callable, query, headers and cookies, WebSocket messages, restoring tokens,
sessions, and planted values through every shape and encoding."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote_plus, unquote, urlencode

import jsonpath_rfc9535
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http, websocket
from mitmproxy.http import Headers
from mitmproxy.net import encoding as encoding_module
from mitmproxy.test import taddons, tflow
from wsproto.frame_protocol import Opcode

from hoop_addon.masking.body import mask_body
from hoop_addon.masking.detectors import Detector
from hoop_addon.masking.engine import MaskContext, MaskError, Scanner
from hoop_addon.masking.vault import Vault
from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.model import MaskRule, Route, Names
from hoop_addon.stages import hoop, mark_admitted
from hoop_addon.stages.mask import Mask, Restore
from tests.support.hooks import call
from tests.support.masking import (
    CARD,
    EMAIL,
    PII,
    SECRETS,
    SSN,
    mixed_docs,
    op_rule,
    planted,
    rule,
    stream,
    text_event,
)

# --- SSE through the Mask stage's real stream callable ----------------------------------

REPLY = f"Sure. Write to {EMAIL} or pay with {CARD}; ref 078-05-1120 ok."
COMPLETIONS = rule("$.choices[*].delta.content", name="completions")


def sse_events(reply: str, piece: int = 8) -> list[bytes]:
    """An OpenAI-style streamed completion of `reply`, `piece` characters per event."""

    def event(delta: dict, finish: str | None = None) -> bytes:
        doc = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    pieces = [reply[i : i + piece] for i in range(0, len(reply), piece)]
    return [event({"role": "assistant", "content": ""}), *(event({"content": p}) for p in pieces), event({}, "stop"), b"data: [DONE]\n\n"]


def gzip_stream(events: list[bytes]) -> bytes:
    z = zlib.compressobj(wbits=31)
    return b"".join(z.compress(e) + z.flush(zlib.Z_SYNC_FLUSH) for e in events) + z.flush()


class Through:
    """A response streamed through `Mask.responseheaders`' callable, as mitmproxy does
    (a context manager: the addon context is set up once for many streams)."""

    def __init__(self, rules: Sequence[MaskRule], encoding: str = "", tokens: dict[str, str] | None = None) -> None:
        self.mask = Mask()
        self.route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), tuple(rules))
        self.tokens = tokens or {}
        self.encoding = encoding
        self.context = taddons.context(self.mask)

    def __enter__(self) -> Through:
        self.context.__enter__().options.add_option("store_streamed_bodies", bool, True, "a core proxy option")
        return self

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)

    def __call__(self, chunks: Sequence[bytes]) -> tuple[bytes, http.HTTPFlow]:
        flow = tflow.tflow()
        flow.request.headers["Content-Type"] = "application/json"
        flow.request.content = orjson.dumps({"v": list(self.tokens.values())})
        mark_admitted(flow, self.route)
        hoop(flow)["identity"] = {"subject": "agent"}
        call(self.mask.request, flow)
        hoop(flow)["forwarded"] = True
        flow.response = tflow.tresp()
        flow.response.headers = Headers(content_type="text/event-stream", **({"content_encoding": self.encoding} if self.encoding else {}))
        self.mask.responseheaders(flow)
        stream = flow.response.stream
        assert callable(stream), "the response must be streamed"
        out = b"".join(b"".join(stream(c)) for c in chunks if c) + b"".join(stream(b""))  # b"": the end
        flow.response.content = out  # store_streamed_bodies: what mitmproxy keeps
        call(self.mask.response, flow)
        return out, flow


def client_text(out: bytes) -> str:
    """What an SSE client reassembles from the delta contents."""
    text = []
    for block in out.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: {"):
                choices = orjson.loads(line[6:])["choices"]
                text.append(choices[0]["delta"].get("content") or "" if choices else "")
    return "".join(text)


EXPECTED = "Sure. Write to [REDACTED:EMAIL] or pay with [REDACTED:CARD]; ref [REDACTED:SSN] ok."


def test_a_streamed_responses_headers_are_masked_before_they_go() -> None:
    """A streamed response's headers reach the client before the `response` hook."""
    named = dataclasses.replace(COMPLETIONS, name="user-header", headers=("x-user-email",))
    mask = Mask()
    with taddons.context(mask):
        flow = tflow.tflow()
        mark_admitted(flow, Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (named,)))
        hoop(flow)["forwarded"] = True
        flow.response = tflow.tresp()
        flow.response.headers = Headers(content_type="text/event-stream", x_user_email=EMAIL)
        mask.responseheaders(flow)
        assert callable(flow.response.stream) and flow.response.headers["x-user-email"] == "[REDACTED:EMAIL]"
        call(mask.response, flow)
    assert [(m["rule"], m["where"]) for m in hoop(flow)["masked"]] == [("user-header", ["header:x-user-email"])]


@pytest.mark.parametrize("encoding", ["", "gzip"])
def test_sse_split_at_every_byte_boundary_through_the_stream_callable(encoding: str) -> None:
    body = b"".join(sse_events(REPLY))
    data = gzip_stream(sse_events(REPLY)) if encoding else body
    with Through([COMPLETIONS], encoding) as through:
        for cut in range(len(data) + 1):
            out, flow = through([data[:cut], data[cut:]])

            assert client_text(out) == EXPECTED, f"cut at {cut}"
            assert not [s for s in (EMAIL, CARD, SSN) if s.encode() in out], f"cut at {cut}"
            assert "content-encoding" not in flow.response.headers
    assert hoop(flow)["masked"] == [
        {"rule": "completions", "part": "response", "operator": "redact", "count": 3,
         "detectors": {"email": 1, "payment_card": 1, "us_ssn": 1}, "where": ["$['choices'][0]['delta']['content']"]}
    ]


@settings(max_examples=60, deadline=None)
@given(planted(), st.integers(1, 12), st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
def test_planted_value_never_survives_a_stream_cut_anywhere(text: str, piece: int, cuts: list[int], gzipped: bool) -> None:
    events = sse_events(text, piece)
    data = gzip_stream(events) if gzipped else b"".join(events)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})

    with Through([COMPLETIONS], "gzip" if gzipped else "") as through:
        out, _ = through([data[a:b] for a, b in zip(bounds, bounds[1:])])

    assert not [s for s in SECRETS if s.encode() in out]
    assert out.endswith(b"data: [DONE]\n\n")


def test_tokens_are_restored_across_every_chunk_boundary_and_recorded_as_tokens() -> None:
    data = b"".join(sse_events("Noted: <EMAIL_1> and <EMAIL_7>.", 5))
    with Through([op_rule("tokenize", "$.v[*]", name="tok")], tokens={"e": EMAIL}) as through:
        for cut in range(len(data) + 1):
            out, flow = through([data[:cut], data[cut:]])

            assert client_text(out) == f"Noted: {EMAIL} and <EMAIL_7>.", f"cut at {cut}"
            assert EMAIL.encode() not in flow.response.content and b"<EMAIL_1>" in flow.response.content


def test_a_recorded_stream_past_the_body_limit_is_ended() -> None:
    """A kept stream (`store_streamed_bodies`) is held in memory until it ends: past
    `hoop_mask_max_body` decoded bytes it is ended (and audited), never kept growing."""
    events = sse_events(REPLY * 40)
    with Through([COMPLETIONS]) as through:
        through.mask.max_body = 2048
        out, flow = through(events)
    assert out.endswith(b"\n\n") and b"event: error" in out and b"unmaskable_response" in out
    assert len(out) < 2048 + 2048  # one piece past the limit, then the error event
    assert hoop(flow)["decision"]["reason"] == "unmaskable_response"
    assert "decoded body exceeds 2048 bytes" in hoop(flow)["decision"]["message"]


def test_a_masking_failure_ends_the_stream_and_is_recorded_as_a_denial(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Scanner, text: str) -> list:
        raise RuntimeError("boom")

    monkeypatch.setattr(Scanner, "spans", broken)
    events = sse_events(REPLY)

    with Through([COMPLETIONS]) as through:
        out, flow = through(events)

    head, data = out.split(b"\n", 1)  # one event, and nothing after it
    assert head == b"event: error" and data.startswith(b"data: ") and data.endswith(b"\n\n") and data.count(b"\n") == 2
    assert orjson.loads(data[6:]) == {"error": "unmaskable_response", "stage": "mask",
                                      "message": "the upstream's stream could not be inspected; the gateway ended it"}
    assert hoop(flow)["decision"]["reason"] == "unmaskable_response"


# --- Query string, headers, cookies; the policy keys ------------------------------------

def test_query_named_headers_and_cookies_are_masked_in_the_request() -> None:
    fields = dataclasses.replace(rule(), body=False, query=True, headers=("x-user",), cookies=("uid",))
    mask = Mask()
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (fields,))
    with taddons.context(mask):
        flow = tflow.tflow()
        flow.request.url = f"https://api.example/v1?q=mail+{EMAIL}&n=1"
        flow.request.headers["X-User"] = EMAIL
        flow.request.headers["X-Other"] = EMAIL
        flow.request.headers["Cookie"] = f"uid={EMAIL}; theme=dark"
        flow.request.content = EMAIL.encode()
        mark_admitted(flow, route)
        hoop(flow)["identity"] = {"subject": "agent"}
        call(mask.request, flow)

    assert flow.request.query["q"] == "mail [REDACTED:EMAIL]" and flow.request.query["n"] == "1"
    assert flow.request.headers["X-User"] == "[REDACTED:EMAIL]" and flow.request.headers["X-Other"] == EMAIL
    assert flow.request.cookies["uid"] == "[REDACTED:EMAIL]" and flow.request.cookies["theme"] == "dark"
    assert flow.request.content == EMAIL.encode()  # body: false
    assert hoop(flow)["masked"][0]["where"] == ["query", "cookie:uid", "header:x-user"]


def _named_fields_flow(cookie: str, header: str, shadow: bool = False) -> http.HTTPFlow:
    """A request with `Cookie: <cookie>` and `X-User: <header>` through a route whose
    rule names cookie `uid` and header `x-user` (body and query not read)."""
    fields = dataclasses.replace(rule(), body=False, headers=("x-user",), cookies=("uid",), action="log" if shadow else "mask")
    mask = Mask()
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (fields,))
    with taddons.context(mask):
        flow = tflow.tflow()
        flow.request.headers["Cookie"] = cookie
        flow.request.headers["X-User"] = header
        mark_admitted(flow, route)
        hoop(flow)["identity"] = {"subject": "agent"}
        call(mask.request, flow)
    return flow


@pytest.mark.parametrize("encoded", [quote_plus(EMAIL), EMAIL.replace("@", "%40").replace(".", "%2e"),
                                     f"mail%3A%20{quote_plus(EMAIL)}%3B%20ok"])
def test_percent_encoded_cookie_and_header_values_are_masked(encoded: str) -> None:
    """A named cookie or header value is read percent-decoded, as a query value is, and
    written back percent-encoded: the recipient decodes the masked text."""
    flow = _named_fields_flow(f"uid={encoded}; theme=dark", encoded)
    cookie, header = flow.request.cookies["uid"], flow.request.headers["X-User"]
    assert "%40" not in cookie.lower() and "%40" not in header.lower() and "@" not in cookie + header
    want = unquote(encoded).replace(EMAIL, "[REDACTED:EMAIL]")
    assert unquote(cookie) == unquote(header) == want
    assert all(c not in cookie for c in ' ";,\\') and flow.request.cookies["theme"] == "dark"
    assert hoop(flow)["masked"][0]["where"] == ["cookie:uid", "header:x-user"]
    assert hoop(flow)["masked"][0]["count"] == 2


def test_cookie_names_match_exactly_and_plain_or_unmasked_values_keep_their_bytes() -> None:
    flow = _named_fields_flow(f"UID={EMAIL}; uid=a%2Fb%20c", "100%25 sure")
    assert flow.request.cookies["UID"] == EMAIL  # RFC 6265: another cookie
    assert flow.request.cookies["uid"] == "a%2Fb%20c" and flow.request.headers["X-User"] == "100%25 sure"
    assert hoop(flow).get("masked", []) == []


def test_a_named_value_that_is_not_utf8_once_decoded_is_refused_unless_shadow() -> None:
    flow = _named_fields_flow("uid=%FFjane.doe%40example.com", "ok")
    assert flow.response is not None and flow.response.status_code == 422
    assert b"cookie:uid is not UTF-8 once percent-decoded" in flow.response.content
    assert b"example" not in flow.response.content
    flow = _named_fields_flow("uid=%FFjane.doe%40example.com", "ok", shadow=True)
    assert flow.response is None and flow.request.cookies["uid"] == "%FFjane.doe%40example.com"


def test_policy_masking_keys(tmp_path: Any) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "detectors:\n"
        "  - {name: badge, pattern: 'B-[0-9]{4}', keywords: [Badge], window: 10, max_length: 6}\n"
        "masking:\n"
        "  - name: r\n"
        "    detectors: [badge, email]\n"
        "    operator: partial\n"
        "    keep: 2\n"
        "    on_invalid_json: text\n"
        "    body: false\n"
        "    query: true\n"
        "    headers: [X-User]\n"
        "    cookies: [uid]\n"
        "  - {name: bad, detectors: [email], operator: scramble}\n"
    )
    with pytest.raises(PolicyError, match=r"p.yaml:14: masking\[1\].operator: .*scramble"):
        load_policy(tmp_path)
    (tmp_path / "p.yaml").write_text((tmp_path / "p.yaml").read_text().replace("operator: scramble", "action: enforce"))
    with pytest.raises(PolicyError, match=r"p.yaml:14: masking\[1\].action: 'enforce' is not one of: mask, log"):
        load_policy(tmp_path)
    (tmp_path / "p.yaml").write_text((tmp_path / "p.yaml").read_text().replace("action: enforce", "action: log"))
    load_policy(tmp_path)
    text = (tmp_path / "p.yaml").read_text().replace("  - {name: bad, detectors: [email], action: log}\n", "")
    (tmp_path / "p.yaml").write_text(text)
    assert load_policy(tmp_path).routes == ()


def test_websocket_text_messages_are_masked_and_an_unmaskable_one_is_dropped() -> None:
    mask = Mask()
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (rule("$.text"),))
    with taddons.context(mask):
        flow = tflow.twebsocketflow()
        mark_admitted(flow, route)
        flow.websocket.messages = [websocket.WebSocketMessage(Opcode.TEXT, True, orjson.dumps({"text": f"hi {EMAIL}"}))]
        mask.websocket_message(flow)
        assert orjson.loads(flow.websocket.messages[-1].content) == {"text": "hi [REDACTED:EMAIL]"}

        flow.websocket.messages.append(websocket.WebSocketMessage(Opcode.TEXT, False, f"not json {EMAIL}".encode()))
        mask.websocket_message(flow)
        assert flow.websocket.messages[-1].dropped and flow.error is not None


@pytest.mark.parametrize(
    ("content", "masked"),
    [(orjson.dumps({"text": f"hi {EMAIL}"}), True), (b"\xff\xfe" + EMAIL.encode(), False)],
    ids=["utf8-json", "not-utf8"],
)
def test_binary_websocket_messages_are_masked_or_dropped(content: bytes, masked: bool) -> None:
    """Binary frames are not a way around the masker: UTF-8 ones are masked like text,
    others cannot be inspected and are dropped with the connection."""
    mask = Mask()
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (rule("$.text"),))
    with taddons.context(mask):
        flow = tflow.twebsocketflow()
        mark_admitted(flow, route)
        flow.websocket.messages = [websocket.WebSocketMessage(Opcode.BINARY, True, content)]
        mask.websocket_message(flow)
        message = flow.websocket.messages[-1]
        if masked:
            assert orjson.loads(message.content) == {"text": "hi [REDACTED:EMAIL]"} and not message.dropped
        else:
            assert message.dropped and flow.error is not None


def test_what_only_shadow_rules_cannot_inspect_goes_on() -> None:
    """Shadow rules do not decide what passes: a body, an event or a binary WebSocket
    message they cannot inspect is not refused because of them."""
    trial = dataclasses.replace(rule("$.messages[*].content", name="trial"), action="log")
    text_rule = rule(name="text")
    assert mask_body(b"not json " + EMAIL.encode(), "text/plain", [trial], "request") == (None, [])
    new, records = mask_body(b"not json " + EMAIL.encode(), "text/plain", [trial, text_rule], "request")
    assert new == b"not json [REDACTED:EMAIL]" and [r["rule"] for r in records] == ["text"]
    with pytest.raises(MaskError):  # an enforcing rule that cannot inspect it still refuses it
        mask_body(b"not json", "text/plain", [dataclasses.replace(trial, action="mask")], "request")
    assert mask_body(stream(["plain", "text"], text_event), "text/event-stream", [trial], "response") == (None, [])

    mask = Mask()
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (trial,))
    with taddons.context(mask):
        flow = tflow.twebsocketflow()
        mark_admitted(flow, route)
        flow.websocket.messages = [websocket.WebSocketMessage(Opcode.BINARY, True, b"\xff\xfe")]
        mask.websocket_message(flow)
        assert not flow.websocket.messages[-1].dropped and flow.error is None


@settings(max_examples=100, deadline=None)
@given(mixed_docs, st.sampled_from(["partial", "hash", "tokenize"]))
def test_every_operator_is_idempotent(doc: Any, operator: str) -> None:
    context = MaskContext(secret=b"k", tokens=Vault().session("s"))

    def once(body: bytes) -> bytes:
        new, _ = mask_body(body, "application/json", [op_rule(operator)], "request", context)
        return body if new is None else new

    first = once(orjson.dumps(doc))
    assert once(first) == first


def shaped(shape: str, secret_text: str) -> tuple[bytes, str]:
    """A request body of `shape` carrying `secret_text`, and its Content-Type."""
    if shape == "json":
        return orjson.dumps({"messages": [{"content": secret_text}]}), "application/json"
    if shape == "json-in-string":
        return orjson.dumps({"arguments": orjson.dumps({"to": secret_text}).decode()}), "application/json"
    if shape == "form":
        return urlencode({"note": secret_text}).encode(), "application/x-www-form-urlencoded"
    if shape == "ndjson":
        return b'{"a": 1}\n' + orjson.dumps({"b": secret_text}) + b"\n", "application/x-ndjson"
    return secret_text.encode(), "text/plain; charset=utf-8"


@settings(max_examples=150, deadline=None)
@given(planted(), st.sampled_from(["json", "json-in-string", "form", "ndjson", "text"]), st.sampled_from(["", "gzip", "deflate", "br", "zstd"]))
def test_planted_value_never_survives_any_shape_or_encoding_through_the_stage(text: str, shape: str, encoding: str) -> None:
    body, content_type = shaped(shape, text)
    mask = Mask()
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (PII,))
    with taddons.context(mask):
        flow = tflow.tflow()
        flow.request.headers["Content-Type"] = content_type
        if encoding:
            flow.request.headers["Content-Encoding"] = encoding
        flow.request.content = body  # encoded per Content-Encoding
        mark_admitted(flow, route)
        hoop(flow)["identity"] = {"subject": "agent"}
        call(mask.request, flow)

    assert flow.response is None, "refused"
    sent = flow.request.raw_content or b""
    plain = encoding_module.decode(sent, encoding) if encoding else sent
    assert not [s for s in SECRETS if s.encode() in plain or quote_plus(s).encode() in plain]
    assert flow.request.headers.get("Content-Encoding", "") == encoding


@pytest.mark.parametrize(("content_type", "reply", "expected"), [
    ("text/plain; charset=utf-8", "hi <EMAIL_1>", f"hi {EMAIL}"),
    ("application/json", '{"m": "hi <EMAIL_1>"}', f'{{"m": "hi {EMAIL}"}}'),
    ("image/png", "hi <EMAIL_1>", "hi <EMAIL_1>"),
])
def test_restore_puts_the_session_values_back_in_a_buffered_response(content_type: str, reply: str, expected: str) -> None:
    mask = Mask()
    tokenize = op_rule("tokenize", "$.v", directions=frozenset({"request"}))
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (tokenize,))
    with taddons.context(mask):
        flow = tflow.tflow()
        flow.request.headers["Content-Type"] = "application/json"
        flow.request.content = orjson.dumps({"v": EMAIL})
        mark_admitted(flow, route)
        hoop(flow)["identity"] = {"subject": "agent"}
        call(mask.request, flow)
        hoop(flow)["forwarded"] = True
        flow.response = tflow.tresp(content=reply.encode())
        flow.response.headers["Content-Type"] = content_type
        mask.responseheaders(flow)
        call(mask.response, flow)
        recorded = flow.response.content
        call(Restore(mask).response, flow)

    assert orjson.loads(flow.request.content) == {"v": "<EMAIL_1>"}
    assert recorded == reply.encode()  # what Record, before Restore, keeps
    assert flow.response.content == expected.encode()


def test_a_session_is_the_connection_or_the_x_hoop_session_header() -> None:
    mask = Mask()
    tokenize = op_rule("tokenize", "$.v", directions=frozenset({"request"}))
    route = Route("r", ("*",), ("*",), frozenset(), Names(frozenset({"g"})), Names(), (tokenize,))

    def send(value: str, label: str | None, subject: str = "agent") -> http.HTTPFlow:
        flow = tflow.tflow()  # a new client connection each time
        flow.request.headers["Content-Type"] = "application/json"
        if label:
            flow.request.headers["X-Hoop-Session"] = label
        flow.request.content = orjson.dumps({"v": value})
        mark_admitted(flow, route)
        hoop(flow)["identity"] = {"subject": subject}
        call(mask.request, flow)
        return flow

    with taddons.context(mask):
        first = send(EMAIL, "s1")
        again = send("other@example.org", "s1")
        elsewhere = send(EMAIL, None)
        impostor = send("x@example.org", "s1", subject="someone-else")

    assert "X-Hoop-Session" not in first.request.headers  # never forwarded
    assert orjson.loads(again.request.content) == {"v": "<EMAIL_2>"}  # same session: numbering continues
    assert orjson.loads(elsewhere.request.content) == {"v": "<EMAIL_1>"}  # another connection: another session
    assert mask.sessions[again].value("<EMAIL_1>") == EMAIL
    assert mask.sessions[impostor].value("<EMAIL_1>") == "x@example.org"  # the label is per identity


def test_a_custom_value_with_spaces_split_anywhere_in_a_stream_is_caught_with_max_length() -> None:
    project = Detector("project", "PROJECT", r"Project Blue Falcon", max_length=19)
    rules = [MaskRule("p", frozenset({"response"}), (("$.choices[*].delta.content", jsonpath_rfc9535.compile("$.choices[*].delta.content")),), (project,))]
    text = "the plan for Project Blue Falcon is ready"
    for piece in range(1, 12):
        out, _ = mask_body(b"".join(sse_events(text, piece)), "text/event-stream", rules, "response")

        assert out is not None and client_text(out) == "the plan for [REDACTED:PROJECT] is ready", f"pieces of {piece}"
