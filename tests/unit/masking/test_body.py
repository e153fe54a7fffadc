"""Bodies by media type: JSON, forms, NDJSON, text; encodings and limits; the bodies
masking refuses."""

from __future__ import annotations

import gzip

import orjson
import pytest
from mitmproxy.net import encoding as encoding_module

from hoop_addon.masking.body import FORM_TYPE, mask_body
from hoop_addon.masking.codec import Decoder, decode
from hoop_addon.masking.engine import MaskError
from hoop_addon.policy.model import MaskRule
from tests.support.masking import (
    CARD,
    EMAIL,
    PII,
    masked,
    op_rule,
    rule,
)


class TestRefusals:
    @pytest.mark.parametrize(
        ("body", "content_type", "rules"),
        [
            pytest.param(b'{"input": "jane.doe@example.com"', "application/json", [PII], id="truncated-json"),
            pytest.param(b"input=jane.doe@example.com", "text/plain", [rule("$.input")], id="text-under-jsonpath"),
            pytest.param(b"input=jane.doe@example.com", "application/vnd.api+json", [PII], id="+json-not-json"),
        ],
    )
    def test_body_a_rule_cannot_parse_as_json_is_refused(self, body: bytes, content_type: str, rules: list[MaskRule]) -> None:
        with pytest.raises(MaskError, match="^body is not valid JSON") as caught:
            mask_body(body, content_type, rules, "request")

        assert "jane" not in str(caught.value)

    @pytest.mark.parametrize(
        ("content_type", "message"),
        [
            ("text/plain", "body is not UTF-8 text"),
            ("text/event-stream", "body is not UTF-8 text"),
            ("application/json", "body is not valid JSON"),
        ],
    )
    def test_non_utf8_body_is_refused(self, content_type: str, message: str) -> None:
        with pytest.raises(MaskError, match=f"^{message}"):
            mask_body(b"\xff\xfe jane.doe@example.com", content_type, [PII], "request")

    def test_empty_body_or_no_rules_is_left_alone(self) -> None:
        assert mask_body(b"", "application/json", [PII], "request") == (None, [])
        assert mask_body(b"\xff not json", "application/json", [], "request") == (None, [])


class TestShapes:
    def test_form_fields_are_selected_by_name(self) -> None:
        body = f"email={EMAIL}&note=card+{CARD.replace(' ', '+')}&x=1".encode()

        out = masked(body, "application/x-www-form-urlencoded", [rule("$.email")])

        assert out == b"email=%5BREDACTED%3AEMAIL%5D&note=card+4111+1111+1111+1111&x=1"

    def test_ndjson_is_masked_line_by_line(self) -> None:
        body = b'{"a": "jane.doe@example.com"}\n{"b": 1}\n\n{"c": "078-05-1120"}\n'

        out = masked(body, "application/x-ndjson")

        assert out.split(b"\n") == [b'{"a":"[REDACTED:EMAIL]"}', b'{"b": 1}', b"", b'{"c":"[REDACTED:SSN]"}', b""]

    @pytest.mark.parametrize(
        "content_type", ["text/plain", "", "text/json", "application/x-www-form-urlencoded", "text/event-stream", "application/json, text/plain"]
    )
    def test_a_json_body_is_read_as_json_whatever_its_declared_type(self, content_type: str) -> None:
        """Read as text, `\\u0040` would hide the `@` from the detector, but not from an
        upstream that parses the body; and a request is no event stream."""
        body = b'{"messages": [{"content": "mail jane.doe\\u0040example.com"}]}'

        for rules in ([PII], [rule("$.messages[*].content")]):
            out, _ = mask_body(body, content_type, rules, "request")
            assert orjson.loads(out or b"") == {"messages": [{"content": "mail [REDACTED:EMAIL]"}]}, (content_type, rules)

    def test_a_bom_before_json_is_skipped(self) -> None:
        assert orjson.loads(masked(b"\xef\xbb\xbf" + orjson.dumps({"a": EMAIL}), "text/plain")) == {"a": "[REDACTED:EMAIL]"}

    def test_text_that_only_starts_like_json_is_masked_as_text(self) -> None:
        assert masked(f"{{name}} wrote from {EMAIL}".encode(), "text/plain") == b"{name} wrote from [REDACTED:EMAIL]"

    @pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16"])
    def test_a_utf16_text_body_is_refused(self, encoding: str) -> None:
        """Without a BOM, UTF-16 is valid UTF-8 with a NUL in every other byte."""
        with pytest.raises(MaskError, match="NUL" if encoding == "utf-16-le" else "not UTF-8"):
            mask_body(f"mail {EMAIL}".encode(encoding), "text/plain", [PII], "request")

    @pytest.mark.parametrize(
        ("body", "content_type", "paths"),
        [
            (b'{"content": "jane.doe@example.com", "content": "hi"}', "application/json", ("$.content",)),
            (b'{"args": "{\\"to\\": \\"jane.doe@example.com\\", \\"to\\": \\"x\\"}"}', "application/json", ("$.args",)),
            (b'{"a": 1}\n{"b": "jane.doe@example.com", "b": 2}\n', "application/x-ndjson", ()),
        ],
        ids=["body", "json-in-string", "ndjson"],
    )
    def test_a_repeated_member_name_is_refused(self, body: bytes, content_type: str, paths: tuple[str, ...]) -> None:
        """orjson keeps the last of repeated names, other parsers the first: a body
        forwarded as it is must not carry a value that was never inspected."""
        with pytest.raises(MaskError, match="repeats a member name"):
            mask_body(body, content_type, [rule(*paths)], "request")

    def test_unmasked_json_goes_as_it_is(self) -> None:
        """Re-encoding would turn integers beyond 64 bits into floats and break a
        client's body signature."""
        body = b'{"w": 12345678901234567890, "x": 123456789012345678901234567890, "t": "hi"}'
        assert mask_body(body, "application/json", [PII], "request") == (None, [])

    def test_a_form_that_is_json_is_masked_as_both(self) -> None:
        as_form = b'{"a":"b=4111%201111%201111%201111"}'
        assert b"4111" not in masked(as_form, FORM_TYPE, [PII])
        as_json = b'{"note": "mail jane.doe\\u0040example.com"}'
        assert orjson.loads(masked(as_json, FORM_TYPE, [rule("$.note")])) == {"note": "mail [REDACTED:EMAIL]"}

    def test_invalid_json_falls_back_to_text_when_the_rule_says_so(self) -> None:
        body = b'{"input": "jane.doe@example.com"'

        assert masked(body, "application/json", [op_rule("redact", "$.input", on_invalid_json="text")]) == b'{"input": "[REDACTED:EMAIL]"'
        with pytest.raises(MaskError, match="not valid JSON"):
            mask_body(body, "application/json", [rule("$.input")], "request")

    def test_json_inside_a_string_is_masked_as_json(self) -> None:
        args = orjson.dumps({"to": "jane.doe\\u0040example.com".encode().decode("unicode_escape"), "n": 1}).decode()
        body = orjson.dumps({"tool_calls": [{"function": {"arguments": args}}]})

        out = orjson.loads(masked(body, rules=[rule("$.tool_calls[*].function.arguments")]))

        assert orjson.loads(out["tool_calls"][0]["function"]["arguments"]) == {"to": "[REDACTED:EMAIL]", "n": 1}

    def test_nesting_deeper_than_the_limit_is_refused(self) -> None:
        with pytest.raises(MaskError, match="nested deeper"):
            mask_body(b"[" * 200 + b"]" * 200, "application/json", [PII], "request")

    def test_decompression_bomb_is_refused(self) -> None:
        bomb = gzip.compress(b" " * 20_000_000)
        with pytest.raises(MaskError, match="exceeds 1000000 bytes"):
            decode(bomb, "gzip", 1_000_000)

    @pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
    def test_encoded_bodies_decode_in_any_chunks(self, encoding: str) -> None:
        body = orjson.dumps({"a": EMAIL}) * 100
        data = encoding_module.encode(body, encoding)
        decoder = Decoder(encoding, 10**6)

        assert b"".join(decoder.feed(data[i : i + 5]) for i in range(0, len(data), 5)) + decoder.feed(b"") == body

    @pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
    @pytest.mark.parametrize("chunk", [5, 10**6], ids=["chunked", "whole"])
    def test_data_after_the_end_of_the_stream_is_refused(self, encoding: str, chunk: int) -> None:
        """A second gzip member (or zstd frame) is read by Python's gzip and by
        mitmproxy: a decoder stopping at the first would leave it uninspected."""
        data = encoding_module.encode(b"hello ", encoding) + encoding_module.encode(f"mail {EMAIL}".encode(), encoding)
        decoder = Decoder(encoding, 10**6)
        with pytest.raises(MaskError):
            for i in range(0, len(data), chunk):
                decoder.feed(data[i : i + chunk])
            decoder.feed(b"")


