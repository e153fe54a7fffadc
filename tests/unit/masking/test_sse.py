"""Server-sent event streams masked event by event: values split across events and
chunks, events without text, line endings, shadow rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import orjson
import pytest

from hoop_addon.masking.body import mask_body
from hoop_addon.masking.engine import MaskError
from hoop_addon.policy.model import MaskRule
from tests.support.masking import (
    CARD,
    DELTA,
    EMAIL,
    PII,
    json_event,
    masked,
    rule,
    stream,
    text_event,
)

SPLIT_TEXT = f"contact {EMAIL} now"


def streamed_text(body: bytes) -> str:
    """The text an SSE client reassembles from the events' delta contents or text data."""
    out = []
    for line in body.decode().split("\n"):
        data = line.removeprefix("data: ")
        if line.startswith("data: ") and data != "[DONE]":
            out.append(orjson.loads(data)["choices"][0]["delta"]["content"] if data.startswith("{") else data)
    return "".join(out)


class TestEventStream:
    @pytest.mark.parametrize(
        ("event", "rules"),
        [pytest.param(json_event, [rule(DELTA)], id="json-deltas"), pytest.param(text_event, [PII], id="text-data")],
    )
    def test_value_split_at_every_boundary_between_two_events_is_masked(
        self, event: Callable[[str], str], rules: list[MaskRule]
    ) -> None:
        for cut in range(len(SPLIT_TEXT) + 1):
            out = masked(stream([SPLIT_TEXT[:cut], SPLIT_TEXT[cut:]], event), "text/event-stream", rules)

            assert streamed_text(out) == "contact [REDACTED:EMAIL] now", f"split at {cut}"
            assert out.endswith(b"\n\ndata: [DONE]\n\n"), f"split at {cut}"

    @pytest.mark.parametrize(
        ("events", "rules"),
        [
            pytest.param(
                ['{"choices":[{"index":0,"delta":{"content":"card 4111 1111 "}}]}', '{"choices":[]}',
                 '{"choices":[{"index":0,"delta":{}}]}', '{"choices":[{"index":0,"delta":{"content":"1111 1111 ok"}}]}',
                 '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'],
                [rule(DELTA)], id="openai-empty-chunks",
            ),
            pytest.param(
                ['{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"mail jane.doe"}}',
                 '{"type": "ping"}', '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"@example.com ok"}}',
                 '{"type":"content_block_stop","index":0}'],
                [PII], id="anthropic-ping",
            ),
            pytest.param(
                ['{"choices":[{"index":0,"text":"mail jane.doe"}]}', '{"choices":[]}', '{"choices":[{"index":0,"text":"@example.com ok"}]}'],
                [PII], id="completions-text",
            ),
            pytest.param(
                ['{"candidates":[{"content":{"parts":[{"text":"card 4111 1111 "}]}}]}',
                 '{"candidates":[{"content":{"parts":[{"text":"1111 1111 ok"}]},"finishReason":"STOP"}]}'],
                [PII], id="gemini-parts",
            ),
        ],
    )
    def test_a_value_split_around_an_event_without_text_is_masked(self, events: list[str], rules: list[MaskRule]) -> None:
        """Pings, usage and role-only chunks pass while the tail stays held; it goes out
        before the event that ends the text, or at the end."""
        body = "".join(f"data: {e}\n\n" for e in events).encode() + b"data: [DONE]\n\n"

        out = masked(body, "text/event-stream", rules)

        assert not [s for s in (CARD, "4111 1111", EMAIL, "@example.com") if s.encode() in out], out
        assert b"[REDACTED:" in out and b"ok" in out and out.endswith(b"data: [DONE]\n\n")

    def test_the_piece_of_the_event_that_ends_the_text_is_not_held(self) -> None:
        """vLLM, Ollama and Groq send the last piece with the finish_reason."""
        body = b'data: {"choices":[{"index":0,"delta":{"content":"to jane.doe@example.com bye"},"finish_reason":"stop"}]}\n\n'
        out = masked(body + b"data: [DONE]\n\n", "text/event-stream", [rule(DELTA)])
        assert out == body.replace(b"jane.doe@example.com", b"[REDACTED:EMAIL]") + b"data: [DONE]\n\n"

    def test_a_tail_goes_out_before_the_event_that_ends_the_text(self) -> None:
        body = stream(["mail jane.doe@example.com and more"]).replace(b"data: [DONE]", b'data: {"type":"message_stop"}')
        out = masked(body, "text/event-stream", [rule(DELTA)])
        assert out.index(b"more") < out.index(b"message_stop")

    def test_comment_event_and_id_lines_are_masked_by_rules_without_paths(self) -> None:
        body = f": debug {EMAIL}\n\nevent: to {EMAIL}\nid: {CARD}\ndata: hello\n\n".encode()

        new, records = mask_body(body, "text/event-stream", [PII], "response")

        assert new is not None and new.startswith(b": debug [REDACTED:EMAIL]\n\nevent: to [REDACTED:EMAIL]\nid: [REDACTED:CARD]\n")
        assert EMAIL.encode() not in new and CARD.encode() not in new
        assert records[0]["where"] == ["event field"]

    def test_a_byte_order_mark_does_not_hide_the_first_event(self) -> None:
        out = masked(b"\xef\xbb\xbf" + stream([f"mail {EMAIL}"]), "text/event-stream", [rule(DELTA)])
        assert EMAIL.encode() not in out and b"[REDACTED:EMAIL]" in out

    def test_value_spread_over_many_events_is_masked_once(self) -> None:
        pieces = [SPLIT_TEXT[i : i + 3] for i in range(0, len(SPLIT_TEXT), 3)]

        new, records = mask_body(stream(pieces), "text/event-stream", [rule(DELTA)], "response")

        assert new is not None and streamed_text(new) == "contact [REDACTED:EMAIL] now"
        assert records[0]["detectors"] == {"email": 1}
        assert records[0]["where"] == ["$['choices'][0]['delta']['content']"]

    def test_stream_without_sensitive_data_is_unchanged(self) -> None:
        assert mask_body(stream(["hello ", "world"]), "text/event-stream", [rule(DELTA)], "response") == (None, [])

    def test_crlf_line_endings_are_kept(self) -> None:
        body = stream(["mail jane.doe@exa", "mple.com"]).replace(b"\n", b"\r\n")

        out = masked(body, "text/event-stream", [rule(DELTA)])

        assert out.count(b"\n") == out.count(b"\r\n")  # a held tail's extra event keeps CRLF too
        assert streamed_text(out.replace(b"\r", b"")) == "mail [REDACTED:EMAIL]"

    def test_a_shadow_rule_leaves_a_split_value_in_the_stream_and_counts_it(self) -> None:
        watch = dataclasses.replace(rule(DELTA, name="watch"), action="log")
        body = stream([SPLIT_TEXT[:12], SPLIT_TEXT[12:]])

        new, records = mask_body(body, "text/event-stream", [watch], "response")

        assert new is None  # the stream went out as the upstream sent it
        assert [(r["rule"], r["detectors"], r["shadow"]) for r in records] == [("watch", {"email": 1}, True)]

    def test_text_data_under_a_rule_with_paths_is_refused(self) -> None:
        with pytest.raises(MaskError, match="selects JSON paths but an event's data is not JSON"):
            mask_body(stream(["contact", "me"], text_event), "text/event-stream", [rule(DELTA)], "response")




@pytest.mark.parametrize("text", ["echo: hello", f"customer {EMAIL}", f"{EMAIL} then more"])
def test_a_jsonrpc_message_is_masked_whole_in_its_own_event(text: str) -> None:
    """MCP's streamable HTTP sends each JSON-RPC message as one event: nothing of a
    result is held back for a later event, which the client would drop as a second
    answer to the same id."""
    message = {"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": text}], "isError": False}}
    body = b"event: message\ndata: " + orjson.dumps(message) + b"\n\n"
    out = masked(body, "text/event-stream", [rule("$.result.content[*].text")])
    events = [e for e in out.decode().split("\n\n") if e]
    assert len(events) == 1
    got = orjson.loads(events[0].split("data: ", 1)[1])["result"]["content"][0]["text"]
    assert got == text.replace(EMAIL, "[REDACTED:EMAIL]")
