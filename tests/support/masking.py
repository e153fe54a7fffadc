"""Masking rules and bodies for the masking tests: planted values, a rule over
JSONPaths, and the body as the masking stage would forward it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jsonpath_rfc9535
import orjson
from hypothesis import strategies as st

from hoop_addon.masking.body import mask_body
from hoop_addon.masking.detectors import BUILTIN
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
    new, _ = mask_body(body, content_type, rules, "response" if content_type == "text/event-stream" else "request")
    return body if new is None else new


def masked_text(text: str, rules: Sequence[MaskRule] = (PII,)) -> str:
    return masked(text.encode(), "text/plain", rules).decode()


# For property tests. Host text has no ASCII digits where a secret is planted: a digit next to
# a card is the known bug of TestDetection.test_valid_value_next_to_digits_is_masked.
plain_text = st.text(st.characters(codec="utf-8"), max_size=24)
# no NUL: a text body holding one is refused (UTF-16 or binary), see TestShapes
digitless_text = st.text(st.characters(codec="utf-8", exclude_characters="0123456789\x00"), max_size=24)


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


def op_rule(operator: str, *paths: str, **extra: Any) -> MaskRule:
    return dataclasses.replace(rule(*paths), operator=operator, **extra)


# Server-sent events
DELTA = "$.choices[*].delta.content"


def json_event(piece: str) -> str:
    return "data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}).decode()


def text_event(piece: str) -> str:
    return f"data: {piece}"


def stream(pieces: Sequence[str], event: Callable[[str], str] = json_event) -> bytes:
    """An SSE body: one event per piece, then `[DONE]`."""
    return "".join(f"{event(p)}\n\n" for p in pieces).encode() + b"data: [DONE]\n\n"
