"""Finding a gateway token wherever an agent put it (pure: no mitmproxy).

A gateway token is a bearer credential for the gateway itself: the upstream (or whoever
reads its logs) must never get it, in any header, cookie or body, whole or in a form
it can trivially be read back from. What counts as holding one: the signing input of a
compact JWS (RFC 7515 §7.1: `BASE64URL(header) . BASE64URL(payload)`, whatever follows
it: an altered signature is still the token to anyone who strips the addition) whose
payload names an issuer the policy trusts, found in the text as sent, percent-decoded
(RFC 3986 §2.1: any character may be escaped), with JSON escapes decoded (`\\u0065yJ`),
or base64-decoded (RFC 4648 §4 and §5, in a Basic password or a header of its own).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from urllib.parse import unquote_to_bytes

import orjson

SIGNING_INPUT = re.compile(rb"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}")
"""A JWS's header and payload: the header is a JSON object, so it begins `eyJ` (`{"`)."""
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/_-]{24,}={0,2}")
_JSON_ESCAPE = re.compile(rb"\\u[0-9A-Fa-f]{4}|\\/")
_PERCENT_EYJ = re.compile(rb"%(?:65|79|4[Aa])")  # `e`, `y` or `J` percent-encoded
_JSON_EYJ = re.compile(rb"\\u00(?:65|79|4[Aa])")  # `e`, `y` or `J` as a JSON escape
MAX_TOKEN_BYTES = 16 * 1024


def issuer_of(signing_input: bytes) -> str | None:
    """The `iss` claim of a JWS signing input's payload (unverified), or None when the
    payload is not a base64url JSON object with a string `iss`."""
    parts = signing_input.split(b".")
    if len(parts) < 2 or len(parts[1]) > MAX_TOKEN_BYTES:
        return None
    payload = parts[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None


def holds_token(data: bytes, trusted: Callable[[str], bool], base64_runs: bool = True) -> bool:
    """True when `data` (a header value or a decoded body, bytes) holds a gateway token
    in any of the forms above: `trusted(issuer)` tells whether an `iss` is one the
    policy trusts. `base64_runs`: also decode every run of 24 or more base64 characters
    (header values; a body is checked in full only as sent, percent- and JSON-decoded,
    and for the base64 of a known token with `holds_encoded`)."""
    return any(
        (issuer := issuer_of(m.group())) is not None and trusted(issuer)
        for text in _readings(data, base64_runs)
        for m in SIGNING_INPUT.finditer(text)
    )


def _readings(data: bytes, base64_runs: bool) -> Iterator[bytes]:
    """`data` as sent and as each decoding an agent could have applied reads it. A
    decoding is tried only where it could produce a signing input's `eyJ` (the text
    has it already, or one of its letters escaped), so a body on every request's path
    is decoded only when it may hold an encoded token."""
    yield data
    if b"%" in data and (b"eyJ" in data or _PERCENT_EYJ.search(data)):
        yield unquote_to_bytes(data)
    if b"\\" in data and (b"eyJ" in data or _JSON_EYJ.search(data)):
        yield _JSON_ESCAPE.sub(_unescape, data)
    if base64_runs:
        for run in _BASE64_RUN.finditer(data):
            chunk = run.group().rstrip(b"=")
            for alphabet in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    yield alphabet(chunk + b"=" * (-len(chunk) % 4))
                except (binascii.Error, ValueError):
                    continue


def _unescape(m: re.Match[bytes]) -> bytes:
    escape = m.group()
    if escape == b"\\/":
        return b"/"
    return chr(int(escape[2:], 16)).encode("utf-8", "replace")


def encoded_forms(token: str) -> tuple[bytes, ...]:
    """The parts of `token`'s base64 encodings (standard and URL-safe alphabets) that do
    not depend on where in a longer base64 text it begins: for each of the 3 offsets,
    the encoding of the token with its first and last partial groups cut off. A text
    holding one of them holds the token base64-encoded (RFC 4648 §4, §5)."""
    raw = token.encode()
    found = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        start = 4 * ((offset + 2) // 3)  # the groups that mix in the bytes before the token
        end = 4 * ((offset + len(raw)) // 3)  # the last group the token fills
        core = encoded[start:end]
        found += [core, core.replace(b"+", b"-").replace(b"/", b"_")]
    return tuple(sorted(set(found), key=len, reverse=True))


def holds_encoded(data: bytes, forms: tuple[bytes, ...]) -> bool:
    """True when `data` holds one of `encoded_forms(token)`."""
    return any(form in data for form in forms)
