"""Stream splits that leaked (issue 16, item 1): a PEM key cut inside its END line, a
keyword-gated key whose keyword went out in an earlier piece, multi-line data events
with CRLF or CR line ends, `\\u`-escaped streamed tool-call arguments, and NDJSON
streams (Ollama) with a value split across lines. Every cut position is tried."""

from __future__ import annotations

import json

import orjson
import pytest

from hoop_addon.masking.body import mask_body
from hoop_addon.masking.engine import Evidence, MaskContext
from hoop_addon.masking.sse import EventStreamMasker
from tests.support.masking import EMAIL, rule

PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\nVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u\n-----END RSA PRIVATE KEY-----"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ALL = rule(detectors=("email", "payment_card", "pem_private_key", "aws_secret_access_key"))


def feed(body: bytes, framing: str = "sse", cuts: int = 7) -> bytes:
    """`body` through the stream masker in `cuts`-byte network chunks."""
    masker = EventStreamMasker([ALL], MaskContext(), Evidence(), framing=framing)
    out = b"".join(masker.feed(body[i : i + cuts]) for i in range(0, len(body), cuts))
    return out + masker.feed(b"", final=True)


def deltas(pieces: list[str], eol: str = "\n") -> bytes:
    return "".join(
        f"data: {orjson.dumps({'choices': [{'index': 0, 'delta': {'content': p}}]}).decode()}{eol}{eol}" for p in pieces
    ).encode() + f"data: [DONE]{eol}{eol}".encode()


def content(body: bytes) -> str:
    """The delta text an SSE client reassembles (any line ends)."""
    text = body.decode().replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for event in text.split("\n\n"):
        data = "\n".join(ln[5:].removeprefix(" ") for ln in event.split("\n") if ln.startswith("data:"))
        if data and data != "[DONE]":
            out.append(json.loads(data)["choices"][0]["delta"].get("content") or "")
    return "".join(out)


@pytest.mark.parametrize("end_cut", range(len("-----END RSA PRIVATE KEY-----") + 1))
def test_a_pem_key_cut_inside_its_end_line_is_masked(end_cut: int) -> None:
    text = f"key: {PEM} done"
    cut = text.index("-----END") + end_cut
    out = content(feed(deltas([text[:cut], text[cut:]])))
    assert out == "key: [REDACTED:PRIVATE_KEY] done"


@pytest.mark.parametrize("gap", ["=", ": ", '": "', " = '"])
def test_a_keyword_sent_in_an_earlier_piece_still_gates_the_key_in_the_next(gap: str) -> None:
    text = f"aws_secret_access_key{gap}{AWS_SECRET} ok"
    for cut in range(1, len(text)):
        out = content(feed(deltas([text[:cut], text[cut:]])))
        assert AWS_SECRET not in out and "[REDACTED:AWS_SECRET]" in out, cut


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"])
def test_an_event_whose_json_spans_several_data_lines_passes_with_every_line_end(eol: str) -> None:
    doc = {"choices": [{"index": 0, "delta": {"content": f"mail {EMAIL} now"}}]}
    lines = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode().split("\n")
    body = ("".join(f"data: {ln}{eol}" for ln in lines) + eol + f"data: [DONE]{eol}{eol}").encode()
    for cuts in (1, 2, 7, len(body)):
        out = feed(body, cuts=cuts)
        assert content(out) == "mail [REDACTED:EMAIL] now", cuts


def _escaped(value: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in value)


def test_escaped_tool_call_arguments_are_masked_at_every_split() -> None:
    args = '{"to":"' + _escaped(EMAIL) + '","n":1}'
    for cut in range(1, len(args)):
        events = [
            {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}]}
            for p in (args[:cut], args[cut:])
        ]
        body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        out = feed(body)
        joined = "".join(
            json.loads(line[6:])["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
            for line in out.decode().split("\n") if line.startswith("data: {")
        )
        assert json.loads(joined) == {"to": "[REDACTED:EMAIL]", "n": 1}, cut


def ollama(pieces: list[str]) -> bytes:
    lines = [{"model": "m", "message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
    return b"".join(orjson.dumps(line) + b"\n" for line in [*lines, {"model": "m", "done": True, "eval_count": 3}])


def test_an_ndjson_stream_with_a_value_split_across_lines_is_masked() -> None:
    text = f"mail {EMAIL} or card 4111 1111 1111 1111 ok"
    for cut in range(1, len(text)):
        out = feed(ollama([text[:cut], text[cut:]]), framing="ndjson")
        lines = [json.loads(ln) for ln in out.decode().splitlines()]
        assert "".join(ln.get("message", {}).get("content", "") for ln in lines) == "mail [REDACTED:EMAIL] or card [REDACTED:CARD] ok", cut
        assert lines[-1] == {"model": "m", "done": True, "eval_count": 3}


def test_a_buffered_ndjson_response_without_values_is_forwarded_byte_for_byte() -> None:
    assert mask_body(ollama(["hello ", "world"]), "application/x-ndjson", [ALL], "response") == (None, [])


def test_a_buffered_ndjson_response_is_masked_as_a_stream() -> None:
    new, _ = mask_body(ollama([f"mail {EMAIL[:6]}", f"{EMAIL[6:]} ok"]), "application/x-ndjson", [ALL], "response")
    assert new is not None and EMAIL[6:].encode() not in new and b"[REDACTED:EMAIL]" in new


# A path to an object, or a rule without paths: its text fields, known or not, are one
# text across events; the strings that name or type the event (`type`, `role`, ids)
# stay in their own events, whole.
CONTAINER_STREAMS = {
    "anthropic $.delta": ("$.delta", lambda i, p: {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": p}}),
    "openai $.choices[*].delta": ("$.choices[*].delta", lambda i, p: {"id": "c1", "choices": [
        {"index": 0, "delta": ({"role": "assistant"} if i == 0 else {}) | {"content": p}}]}),
    "openai $": ("$", lambda i, p: {"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": p}}]}),
    # a text field no list knows (DeepSeek's reasoning): still one text across events
    "deepseek $.choices[*].delta": ("$.choices[*].delta", lambda i, p: {"id": "c1", "model": "deepseek-reasoner",
                                    "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": p}}]}),
    "deepseek, no path": (None, lambda i, p: {"id": "c1", "model": "deepseek-reasoner",
                          "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": p}}]}),
}


@pytest.mark.parametrize("name", sorted(CONTAINER_STREAMS))
def test_a_path_to_an_object_streams_its_text_and_keeps_its_other_strings_in_place(name: str) -> None:
    path, event = CONTAINER_STREAMS[name]
    text = f"write to {EMAIL} today"
    tried = 0
    for a in range(1, len(text) - 1):
        for b in range(a + 1, len(text)):
            pieces = [text[:a], text[a:b], text[b:]]
            docs = [event(i, p) for i, p in enumerate(pieces)]
            body = "".join(f"data: {orjson.dumps(d).decode()}\n\n" for d in docs).encode()
            masker = EventStreamMasker([rule(path) if path else rule()], MaskContext(), Evidence())
            out = masker.feed(body) + masker.feed(b"", final=True)
            got = [orjson.loads(line[6:]) for line in out.decode().split("\n") if line.startswith("data: ")]
            streamed = "".join(_text(g) for g in got)
            assert streamed == "write to [REDACTED:EMAIL] today", (name, a, b)
            for original, masked in zip(docs, got, strict=False):  # structure of each event kept
                assert _structure(masked) == _structure(original), (name, a, b)
            tried += 1
    assert tried == (len(text) - 2) * (len(text) - 1) // 2


def _text(doc: dict) -> str:
    if "delta" in doc:
        return doc["delta"]["text"]
    delta = doc["choices"][0]["delta"]
    return delta.get("content", delta.get("reasoning_content", ""))


def _structure(doc: dict) -> dict:
    """The event without its streamed text."""
    copy = json.loads(json.dumps(doc))
    if "delta" in copy:
        copy["delta"]["text"] = ""
    else:
        delta = copy["choices"][0]["delta"]
        delta["content" if "content" in delta else "reasoning_content"] = ""
    return copy
