"""The masking engine: detection and redaction of emails, cards and SSNs in text, JSON
(whole documents or JSONPath selections) and server-sent event streams, the evidence it
records, the bodies it refuses, and properties over generated JSON documents."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jsonpath_rfc9535
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hoop_addon.detectors import BUILTIN
from hoop_addon.masking import MaskError, mask_body
from hoop_addon.policy.model import MaskRule

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
SSN = "078-05-1120"
SECRETS = (EMAIL, "ops+alerts@mail.example.org", CARD, "5555-5555-5555-4444", "378282246310005", SSN)


def rule(*paths: str, name: str = "pii", detectors: Sequence[str] = ("email", "payment_card", "us_ssn")) -> MaskRule:
    """A masking rule for both directions over the given JSONPaths (none: everything)."""
    return MaskRule(
        name,
        frozenset({"request", "response"}),
        tuple((p, jsonpath_rfc9535.compile(p)) for p in paths),
        tuple(BUILTIN[d] for d in detectors),
    )


PII = rule()


def masked(body: bytes, content_type: str = "application/json", rules: Sequence[MaskRule] = (PII,)) -> bytes:
    """The body as forwarded: the masked bytes, or the original when nothing changed."""
    new, _ = mask_body(body, content_type, rules, "request")
    return body if new is None else new


def masked_text(text: str) -> str:
    return masked(text.encode(), "text/plain").decode()


class TestDetection:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (f"write to {EMAIL} today", "write to [REDACTED:EMAIL] today"),
            ("cc: ops+alerts@mail.example.org", "cc: [REDACTED:EMAIL]"),
            (f"card {CARD} ok", "card [REDACTED:CARD] ok"),
            ("card 5555-5555-5555-4444.", "card [REDACTED:CARD]."),
            ("amex 378282246310005", "amex [REDACTED:CARD]"),
            (f"ssn {SSN}!", "ssn [REDACTED:SSN]!"),
            (f"{EMAIL}, {CARD}, {SSN}", "[REDACTED:EMAIL], [REDACTED:CARD], [REDACTED:SSN]"),
        ],
    )
    def test_sensitive_values_are_redacted_with_their_label(self, text: str, expected: str) -> None:
        assert masked_text(text) == expected

    @pytest.mark.parametrize(
        "text",
        [
            pytest.param("order 4111111111111112", id="luhn-invalid-16-digits"),
            pytest.param("order 4111 1111 1111 1112", id="luhn-invalid-grouped"),
            pytest.param("id 411111111111", id="12-digits-too-short-for-a-card"),
            pytest.param("ssn 000-12-3456", id="ssn-area-000"),
            pytest.param("ssn 666-12-3456", id="ssn-area-666"),
            pytest.param("ssn 912-34-5678", id="ssn-area-9xx"),
            pytest.param("ssn 123-00-4567", id="ssn-group-00"),
            pytest.param("ssn 123-45-0000", id="ssn-serial-0000"),
            pytest.param("user at example dot com", id="no-email"),
        ],
    )
    def test_lookalikes_are_not_masked(self, text: str) -> None:
        assert mask_body(text.encode(), "text/plain", [PII], "request") == (None, [])

    @pytest.mark.parametrize(
        ("text", "secret"),
        [
            pytest.param(f"card {CARD} 12/26", CARD, id="card-then-expiry"),
            pytest.param("card 4111111111111111 7", "4111111111111111", id="card-then-digit"),
            pytest.param(f"ssn {SSN} 1234", SSN, id="ssn-then-digits"),
        ],
    )
    def test_valid_value_next_to_digits_is_masked(self, text: str, secret: str) -> None:
        assert secret not in masked_text(text)


class TestJson:
    def test_jsonpath_masks_only_selected_nodes(self) -> None:
        body = orjson.dumps(
            {"messages": [{"role": "user", "content": f"mail {EMAIL}"}], "metadata": {"owner": "bob@example.com"}}
        )

        out = orjson.loads(masked(body, rules=[rule("$.messages[*].content")]))

        assert out == {
            "messages": [{"role": "user", "content": "mail [REDACTED:EMAIL]"}],
            "metadata": {"owner": "bob@example.com"},
        }

    def test_rule_without_paths_masks_every_string(self) -> None:
        body = orjson.dumps({"a": EMAIL, "b": [f"card {CARD}", {"c": SSN}], "d": "plain"})

        assert orjson.loads(masked(body)) == {
            "a": "[REDACTED:EMAIL]",
            "b": ["card [REDACTED:CARD]", {"c": "[REDACTED:SSN]"}],
            "d": "plain",
        }

    def test_numbers_under_a_selected_node_are_masked(self) -> None:
        body = b'{"payment": {"card": 4111111111111111, "amount": 12, "paid": true}, "ref": 4111111111111111}'

        out = orjson.loads(masked(body, rules=[rule("$.payment")]))

        assert out == {"payment": {"card": "[REDACTED:CARD]", "amount": 12, "paid": True}, "ref": 4111111111111111}

    def test_escaped_unicode_is_decoded_before_scanning(self) -> None:
        assert masked(b'{"m": "jane.doe\\u0040example.com"}') == b'{"m":"[REDACTED:EMAIL]"}'

    def test_non_json_content_type_is_parsed_as_json_for_a_jsonpath_rule(self) -> None:
        body = orjson.dumps({"input": EMAIL})

        assert masked(body, "text/plain", [rule("$.input")]) == b'{"input":"[REDACTED:EMAIL]"}'

    def test_object_member_names_are_masked_by_a_rule_without_paths(self) -> None:
        assert EMAIL.encode() not in masked(orjson.dumps({"users": {EMAIL: {"role": "admin"}}}))


class TestEvidence:
    def test_evidence_counts_per_detector_and_locates_by_normalized_path(self) -> None:
        body = orjson.dumps(
            {"messages": [{"content": f"{EMAIL} and {CARD}"}, {"content": "x@example.org"}, {"content": "hi"}]}
        )

        _, records = mask_body(body, "application/json", [rule("$.messages[*].content")], "request")

        assert records == [
            {
                "rule": "pii",
                "part": "request",
                "operator": "redact",
                "count": 3,
                "detectors": {"email": 2, "payment_card": 1},
                "where": ["$['messages'][0]['content']", "$['messages'][1]['content']"],
            }
        ]

    def test_evidence_never_contains_the_values(self) -> None:
        body = orjson.dumps({"a": EMAIL, "b": CARD, "c": SSN})

        _, records = mask_body(body, "application/json", [PII], "response")

        dumped = orjson.dumps(records)
        assert records[0]["detectors"] == {"email": 1, "payment_card": 1, "us_ssn": 1}
        assert all(secret.encode() not in dumped for secret in (EMAIL, CARD, SSN, "4111"))

    def test_evidence_is_kept_per_rule(self) -> None:
        rules = [rule("$.a", name="emails", detectors=["email"]), rule("$.b", name="cards", detectors=["payment_card"])]

        _, records = mask_body(orjson.dumps({"a": EMAIL, "b": CARD}), "application/json", rules, "request")

        assert [(r["rule"], r["detectors"], r["where"]) for r in records] == [
            ("emails", {"email": 1}, ["$['a']"]),
            ("cards", {"payment_card": 1}, ["$['b']"]),
        ]

    @pytest.mark.parametrize(
        ("key", "expected"),
        [
            pytest.param("it's", "$['it\\'s']", id="quote"),
            pytest.param("back\\slash", "$['back\\\\slash']", id="backslash"),
            pytest.param("new\nline", "$['new\\nline']", id="control-character"),
        ],
    )
    def test_where_is_an_rfc9535_normalized_path(self, key: str, expected: str) -> None:
        _, records = mask_body(orjson.dumps({key: EMAIL}), "application/json", [PII], "request")

        assert records[0]["where"] == [expected]


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


SPLIT_TEXT = f"contact {EMAIL} now"
DELTA = "$.choices[*].delta.content"


def json_event(piece: str) -> str:
    return "data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}).decode()


def text_event(piece: str) -> str:
    return f"data: {piece}"


def stream(pieces: Sequence[str], event: Callable[[str], str] = json_event) -> bytes:
    """An SSE body: one event per piece, then `[DONE]`."""
    return "".join(f"{event(p)}\n\n" for p in pieces).encode() + b"data: [DONE]\n\n"


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

        assert out.count(b"\n") == out.count(b"\r\n") == body.count(b"\r\n")
        assert streamed_text(out.replace(b"\r", b"")) == "mail [REDACTED:EMAIL]"

    def test_text_data_under_a_rule_with_paths_is_refused(self) -> None:
        with pytest.raises(MaskError, match="selects JSON paths but an event's data is not JSON"):
            mask_body(stream(["contact", "me"], text_event), "text/event-stream", [rule(DELTA)], "response")


# Property tests. Host text has no ASCII digits where a secret is planted: a digit next to
# a card is the known bug of TestDetection.test_valid_value_next_to_digits_is_masked.
plain_text = st.text(st.characters(codec="utf-8"), max_size=24)
digitless_text = st.text(st.characters(codec="utf-8", exclude_characters="0123456789"), max_size=24)


@st.composite
def planted(draw: st.DrawFn) -> str:
    """Text with one secret inserted, space-delimited, at any position."""
    text, secret = draw(digitless_text), draw(st.sampled_from(SECRETS))
    cut = draw(st.integers(0, len(text)))
    return f"{text[:cut]} {secret} {text[cut:]}"


def json_docs(strings: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | strings
    )
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(plain_text, children, max_size=4),
        max_leaves=12,
    )


def shape(doc: Any) -> Any:
    """The containers of a document, with every scalar replaced by None."""
    if isinstance(doc, dict):
        return {k: shape(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [shape(v) for v in doc]
    return None


mixed_docs = json_docs(plain_text | planted())


@settings(max_examples=150, deadline=None)
@given(mixed_docs)
def test_masking_is_idempotent(doc: Any) -> None:
    once = masked(orjson.dumps(doc))

    assert masked(once) == once


@settings(max_examples=150, deadline=None)
@given(mixed_docs)
def test_masked_json_is_valid_json_of_the_same_shape(doc: Any) -> None:
    assert shape(orjson.loads(masked(orjson.dumps(doc)))) == shape(doc)


@settings(max_examples=200, deadline=None)
@given(json_docs(planted()), planted())
def test_planted_secret_never_survives(doc: Any, extra: str) -> None:
    out = masked(orjson.dumps([doc, extra]))

    assert not [secret for secret in SECRETS if secret.encode() in out]
