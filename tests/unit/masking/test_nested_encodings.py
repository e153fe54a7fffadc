"""Encodings inside other encodings (issue 16, item 2): JSON with `\\u` escapes in a
header, a query value, a multipart JSON part, and NDJSON sent as `text/plain` are read
decoded; the escaped span is what gets replaced, and the result is still valid JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hoop_addon.masking.body import mask_body
from hoop_addon.masking.engine import Evidence, MaskContext, mask_text
from hoop_addon.masking.normalize import view
from tests.support.masking import EMAIL, PII, rule


def escaped(value: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in value)


@pytest.mark.parametrize("written", [
    escaped(EMAIL), EMAIL.replace("@", "\\u0040"), EMAIL.replace(".", "\\u002E"), "jane.doe\\u0040example\\u002ecom",
])
def test_an_escaped_value_in_json_text_is_masked_and_the_json_stays_valid(written: str) -> None:
    header = '{"user":"' + written + '","n":1}'
    out = mask_text(header, [PII], MaskContext(), Evidence(), "header:x-data")
    assert json.loads(out) == {"user": "[REDACTED:EMAIL]", "n": 1}


def test_hash_and_tokenize_see_the_decoded_value() -> None:
    """The operator gets the value itself, so an escaped and a plain occurrence get
    the same pseudonym."""
    hashing = dataclasses.replace(rule(detectors=("email",)), operator="hash")
    context = MaskContext(secret=b"k")
    plain = mask_text(EMAIL, [hashing], context, Evidence(), "x")
    escaped_out = mask_text('"' + escaped(EMAIL) + '"', [hashing], context, Evidence(), "x")
    assert escaped_out == f'"{plain}"'


def test_an_escaped_quote_or_backslash_in_a_replacement_is_escaped_again() -> None:
    partial = dataclasses.replace(rule(detectors=("email",)), operator="partial", keep=6)
    out = mask_text('{"a":"' + escaped('x"@example.com') + '"}', [partial], MaskContext(), Evidence(), "x")
    json.loads(out)  # still JSON


def test_ndjson_sent_as_text_plain_is_masked() -> None:
    body = b'{"a":"x"}\n{"a":"' + escaped(EMAIL).encode() + b'"}\n'
    new, _ = mask_body(body, "text/plain", [PII], "request")
    assert new is not None and [json.loads(ln) for ln in new.splitlines()] == [{"a": "x"}, {"a": "[REDACTED:EMAIL]"}]


def test_a_lone_surrogate_escape_does_not_break_the_scan() -> None:
    assert mask_text('"\\ud800 ' + EMAIL + '"', [PII], MaskContext(), Evidence(), "x") == '"\\ud800 [REDACTED:EMAIL]"'


def test_text_without_escapes_or_compatibility_characters_has_no_view() -> None:
    assert view("plain ascii text") is None and view("déjà vu, 東京") is None
    assert view("a\\u0040b") == ("a@b", [0, 1, 7], [1, 7, 8])
