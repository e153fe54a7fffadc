"""The masking engine: detection and redaction of emails, cards and SSNs in text and
JSON (whole documents or JSONPath selections), the evidence it records, the operators,
and properties over generated JSON documents."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import given, settings

from hoop_addon.masking import engine
from hoop_addon.masking.body import mask_body
from hoop_addon.masking.detectors import Detector
from hoop_addon.masking.engine import MaskContext, MaskError
from hoop_addon.masking.vault import Vault
from tests.support.masking import (
    CARD,
    DELTA,
    EMAIL,
    PII,
    SECRETS,
    SSN,
    json_docs,
    masked,
    masked_text,
    mixed_docs,
    op_rule,
    planted,
    rule,
    shape,
    stream,
)


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

    def test_a_value_several_rules_select_belongs_per_detector_to_the_first_rule_naming_it(self) -> None:
        first = dataclasses.replace(rule("$.a", name="first", detectors=["email"]), operator="partial", keep=3)
        second = rule("$.a", "$.b", name="second", detectors=["email", "payment_card"])
        body = orjson.dumps({"a": f"{EMAIL} {CARD}", "b": EMAIL, "n": 4111111111111111})

        new, records = mask_body(body, "application/json", [first, second], "request")

        assert orjson.loads(new or b"") == {
            "a": "*" * (len(EMAIL) - 3) + "com [REDACTED:CARD]",
            "b": "[REDACTED:EMAIL]",
            "n": 4111111111111111,  # selected by neither rule
        }
        assert [(r["rule"], r["detectors"], r["where"]) for r in records] == [
            ("first", {"email": 1}, ["$['a']"]),
            ("second", {"payment_card": 1, "email": 1}, ["$['a']", "$['b']"]),
        ]

    def test_a_shadow_rule_counts_what_it_would_mask_and_never_weakens_an_enforcing_one(self) -> None:
        watch = dataclasses.replace(rule(name="watch", detectors=["email", "payment_card"]), action="log")
        cards = rule(name="cards", detectors=["payment_card"])
        body = orjson.dumps({"a": f"{EMAIL} {CARD}"})

        new, records = mask_body(body, "application/json", [watch, cards], "request")

        assert orjson.loads(new or b"") == {"a": f"{EMAIL} [REDACTED:CARD]"}  # the card is the enforcing rule's
        assert [(r["rule"], r["detectors"], r.get("shadow")) for r in records] == [
            ("watch", {"email": 1}, True),
            ("cards", {"payment_card": 1}, None),
        ]
        assert mask_body(body, "application/json", [watch], "request")[0] is None  # alone: the body goes as it is

    def test_evidence_never_names_a_member_that_holds_a_detected_value(self) -> None:
        body = orjson.dumps({EMAIL: {"card": CARD}, "note": f'{{"{EMAIL}": "{SSN}"}}'})

        new, records = mask_body(body, "application/json", [PII], "request")

        assert EMAIL.encode() not in new and EMAIL not in orjson.dumps(records).decode()
        assert sorted(records[0]["where"]) == sorted([
            "$['[REDACTED:EMAIL]']['card']",
            "$['note'] (JSON in string: $['[REDACTED:EMAIL]'])",
            "$['note'] (JSON in string: $ (member name))",
            "$ (member name)",
        ])

    @pytest.mark.parametrize("order", ["cards-first", "acct-first"])
    def test_overlapping_values_of_two_rules_are_masked_whole_in_either_order(self, order: str) -> None:
        cards = rule(name="cards", detectors=["payment_card"])
        acct = dataclasses.replace(rule(name="acct"), detectors=(Detector("acct", "ACCT", "(?i)acct[: ]+[0-9]{4}"),))
        rules = [cards, acct] if order == "cards-first" else [acct, cards]

        out = masked_text(f"see acct: {CARD} now", rules)

        assert out == "see [REDACTED:CARD] now" if order == "cards-first" else out == "see [REDACTED:ACCT] now"
        assert "1111" not in out

    @pytest.mark.parametrize("shape", ["text", "json", "stream"])
    def test_a_shadow_match_covering_an_enforced_value_does_not_hide_it(self, shape: str) -> None:
        ssn = rule(DELTA, "$.a", name="ssn", detectors=["us_ssn"])
        trial = dataclasses.replace(rule(DELTA, "$.a", name="trial", detectors=["email"]), action="log")
        value = f"ssn x.{SSN}@example.com ok"
        body, kind = {
            "text": (value.encode(), "text/plain"),
            "json": (orjson.dumps({"a": value}), "application/json"),
            "stream": (stream([value[:9], value[9:]]), "text/event-stream"),
        }[shape]
        if shape == "text":
            ssn, trial = dataclasses.replace(ssn, paths=()), dataclasses.replace(trial, paths=())

        new, records = mask_body(body, kind, [trial, ssn], "response" if shape == "stream" else "request")

        assert new is not None and SSN.encode() not in new and b"[REDACTED:SSN]" in new
        assert [(r["rule"], r.get("shadow")) for r in records] == [("ssn", None)]

    @pytest.mark.parametrize(
        ("key", "expected"),
        [
            pytest.param("it's", "$['it\\'s']", id="quote"),
            pytest.param("back\\slash", "$['back\\\\slash']", id="backslash"),
            pytest.param("new\nline", "$['new\\nline']", id="control-character"),
            pytest.param("bell\x07", "$['bell\\u0007']", id="unnamed-control-character"),
            pytest.param("del\x7f", "$['del\x7f']", id="del-is-not-escaped"),
        ],
    )
    def test_where_is_an_rfc9535_normalized_path(self, key: str, expected: str) -> None:
        _, records = mask_body(orjson.dumps({key: EMAIL}), "application/json", [PII], "request")

        assert records[0]["where"] == [expected]

    @pytest.mark.parametrize("length", [10, 300], ids=["cached", "too-long-to-cache"])
    def test_a_detected_member_name_on_the_path_is_redacted_every_time(self, length: int) -> None:
        # evidence paths are cached per location: a cached one must be as redacted as the first
        prefix = "x" * length + " "
        body = orjson.dumps({prefix + EMAIL: {"note": EMAIL}})

        for _ in range(2):
            _, records = mask_body(body, "application/json", [PII], "request")

            assert {w for r in records for w in r["where"]} == {
                f"$['{prefix}[REDACTED:EMAIL]']['note']", "$ (member name)"}
        assert not any(EMAIL in str(key) for key in engine._PATHS)  # nor kept in the path cache


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


class TestOperators:
    def test_partial_keeps_the_last_characters(self) -> None:
        assert masked(f"card {CARD}".encode(), "text/plain", [op_rule("partial", keep=4)]) == b"card " + b"*" * 15 + b"1111"

    def test_hash_is_a_keyed_stable_pseudonym(self) -> None:
        def hashed(secret: bytes, text: str) -> str:
            new, _ = mask_body(text.encode(), "text/plain", [op_rule("hash")], "request", MaskContext(secret=secret))
            assert new is not None
            return new.decode()

        one, again, other_key = hashed(b"k1", f"a {EMAIL}"), hashed(b"k1", f"b {EMAIL}"), hashed(b"k2", f"a {EMAIL}")
        assert one.startswith("a [EMAIL:") and one[2:] == again[2:] and one != other_key
        assert EMAIL not in one

    def test_hash_without_a_secret_is_refused(self) -> None:
        with pytest.raises(MaskError, match="no masking secret"):
            mask_body(EMAIL.encode(), "text/plain", [op_rule("hash")], "request")

    def test_tokenize_gives_session_tokens_and_restores_them(self) -> None:
        session = Vault().session("s")
        assert session is not None
        context = MaskContext(tokens=session)
        body = orjson.dumps({"a": f"{EMAIL} {CARD}", "b": EMAIL})

        new, records = mask_body(body, "application/json", [op_rule("tokenize")], "request", context)

        assert orjson.loads(new or b"") == {"a": "<EMAIL_1> <CARD_1>", "b": "<EMAIL_1>"}
        assert records[0]["operator"] == "tokenize"
        assert session.restore('{"x":"<EMAIL_1> and <EMAIL_9>"}', escape=True) == (f'{{"x":"{EMAIL} and <EMAIL_9>"}}', 1)
        assert EMAIL not in repr(session) + repr(context)

    def test_vault_is_bounded(self) -> None:
        vault = Vault(max_sessions=2, max_tokens=2)
        first = vault.session("a")
        assert first is not None
        tokens = [first.token("EMAIL", f"u{i}@example.com") for i in range(3)]
        assert first.value(tokens[0]) is None and first.value(tokens[2]) == "u2@example.com"
        vault.session("b"), vault.session("c")
        assert vault.session("a", create=False) is None




class TestBudget:
    """A masking time budget (`MaskContext.deadline`): past it, masking stops with
    `MaskBudgetExceeded` (the stage refuses the flow), buffered bodies and streams alike."""

    def test_a_body_masked_past_its_deadline_raises(self) -> None:
        body = orjson.dumps({"notes": [f"hello {EMAIL}"] * 3})
        late = MaskContext(deadline=0.0)  # time.monotonic() is past 0 already

        with pytest.raises(engine.MaskBudgetExceeded, match="time budget"):
            mask_body(body, "application/json", [PII], "request", late)
        assert mask_body(body, "application/json", [PII], "request", MaskContext(deadline=float("inf")))[0] is not None

    def test_a_stream_piece_masked_past_its_deadline_raises(self) -> None:
        from hoop_addon.masking.sse import EventStreamMasker

        masker = EventStreamMasker([rule(DELTA)], MaskContext(deadline=0.0), engine.Evidence())

        with pytest.raises(engine.MaskBudgetExceeded):
            masker.feed(stream([f"write to {EMAIL}"]))

    def test_a_pattern_too_large_for_its_cost_is_refused_when_defined(self) -> None:
        from hoop_addon.masking.detectors import MAX_PROGRAM_SIZE, DetectorError

        with pytest.raises(DetectorError, match=rf"RE2 program of \d+ instructions, more than {MAX_PROGRAM_SIZE}"):
            Detector("wide", "WIDE", r".{300}x")
        Detector("fits", "FITS", r"[A-Z]{2}[0-9]{6}")
