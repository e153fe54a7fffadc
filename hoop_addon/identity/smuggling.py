"""Finding a gateway token wherever an agent put it (pure: no mitmproxy).

A gateway token is a bearer credential for the gateway itself: the upstream (or whoever
reads its logs) must never get it, in any header, cookie or body, whole, in pieces, or
in a form it can trivially be read back from. Two searches, over the text as sent and
over each reading of it (`readings`):

- any token of a trusted issuer: the signing input of a compact JWS (RFC 7515 §7.1:
  `BASE64URL(header) . BASE64URL(payload)`, whatever follows it: an altered signature is
  still the token to anyone who strips the addition) whose payload names an issuer the
  policy trusts (`holds_token`);
- the caller's own token (`Fingerprint`): any `PIECE`-character piece of its signature,
  as sent, hex-encoded or base64-encoded at any offset, so that of a token cut in two
  (one half per header) the part that completes it is found, whichever it is.

The readings: percent-decoded (RFC 3986 §2.1: any character may be escaped, and `%25`
escapes the escape), JSON escapes decoded (`\\u0065yJ`), base64 (RFC 4648 §4, §5, in a
Basic password or a header of its own) and hex (RFC 4648 §8) decoded, nested up to
`MAX_DEPTH` decodings (`%2565yJ`, base64 of base64). A decoding is tried only where it
could spell a signing input's `eyJ` (the text has it, or one of its letters escaped, or
its base64 at any offset, once or twice, or the hex of either), so that a text, most
often a body on every request's path, is decoded only when it may hold an encoded token.

Limits, by construction: a token cut in three or more parts, each too short to be found
(in a body, or in headers that are not adjacent: adjacent header values are searched
joined too); a part re-encoded in a body without a trace of `eyJ` (percent-escaped,
say); and any transformation beyond these decodings (reversed, encrypted). Bind tokens
to the gateway (`aud`) and keep them short-lived: a token read off upstream is then
worth little.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator
from urllib.parse import unquote_to_bytes

import orjson
import re2

SIGNING_INPUT = re.compile(rb"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}")
"""A JWS's header and payload: the header is a JSON object, so it begins `eyJ` (`{"`)."""
MAX_TOKEN_BYTES = 16 * 1024
MAX_DEPTH = 4
"""Most decodings applied one over the other (`%252565` is three percent-decodings)."""
READING_FACTOR = 16
"""All readings of a text together may be this many times its size (plus 4 KiB); a
text whose readings grow past that is treated as holding a token (bounded work)."""
PIECE = 16
"""Length, in characters, of the pieces of a caller's token's signature looked for (96
random bits: no other text holds one)."""

# RE2, linear: Python's re scans runs at about 20 MB/s
_BASE64_RUN = re2.compile(rb"[A-Za-z0-9+/_-]{24,}={0,2}")
_HEX_RUN = re2.compile(rb"[0-9A-Fa-f]{32,}")
_TEXT_RUN = re2.compile(rb"[\x20-\x7e]{24,}")
"""What of a decoded text is read on: an encoded token decodes to printable ASCII at
every level, and random bytes (a base64 image decoded) almost never hold 24 in a row."""
_JSON_ESCAPE = re.compile(rb"\\u[0-9A-Fa-f]{4}|\\/")


def _base64_cores(text: bytes) -> set[bytes]:
    """The parts of `text`'s base64 encodings (both alphabets) that do not depend on
    where in a longer base64 text it begins, nor on the bytes around it: at each of the
    3 offsets, the characters whose 6 bits all come from `text`."""
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + text + b"\0\0")
        first = -(-8 * offset // 6)  # the first character whose bits all lie in `text`
        last = 8 * (offset + len(text)) // 6  # one past the last such character
        if core := encoded[first:last]:
            cores |= {core, core.replace(b"+", b"-").replace(b"/", b"_")}
    return cores


def _traces(levels: int) -> set[bytes]:
    """What `eyJ` becomes through up to `levels` encodings, base64 (at any offset, both
    alphabets) and hex (both cases) in any order: the literals a text holding an
    encoded signing input must contain. Deeper traces shorter than 4 characters are
    left out (they would gate most long base64 texts)."""
    found = level = {b"eyJ"}
    for depth in range(levels):
        level = {
            t for text in level
            for t in (*_base64_cores(text), text.hex().encode(), text.hex().upper().encode())
            if len(t) >= (3 if depth == 0 else 4)
        }
        found = found | level
    return found


# Where a text may hold an encoded signing input: a trace of `eyJ` (`_traces`), or a
# letter of it percent-escaped (or a `%25` escaping the escape) or JSON-escaped, or an
# escaped backslash. All in one RE2 pass (about 500 MB/s; Python's re takes 50-100 us
# on 8 KB for each alternation): a text with none of them is read only as sent.
_TRACES = _traces(MAX_DEPTH - 1)
_TRACE = re2.compile(b"|".join(re2.escape(t) for t in sorted(_TRACES)))
_ANY_GATE = re2.compile(_TRACE.pattern + rb"|%(?:65|79|4[Aa]|25)|\\u00(?:65|79|4[Aa])|\\\\")


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


class Fingerprint:
    """What of one caller's token (`token`, a compact JWS, str) is looked for beside its
    signing input: every `PIECE`-character piece of its signature, cut at fixed places,
    as is, in hex (both cases) and as the offset-free base64 cores of the piece
    (`_base64_cores`, both alphabets); and the base64 cores of the whole token. A part
    of the signature of at least `2 * PIECE - 1` characters holds a whole piece. So a
    token cut in two always leaves one part found: the one holding the signing input
    (`holds_token`), or the one holding the most of the signature. The signature is
    random, so no other text holds a piece of it (the header and claims are shared by
    many tokens). One RE2 alternation of literals: a search is one pass over the text
    (about 500 MB/s)."""

    def __init__(self, token: str) -> None:
        raw = token.encode()
        signature = raw.rpartition(b".")[2]
        forms = _base64_cores(raw)
        for i in range(0, len(signature) - PIECE + 1, PIECE):
            piece = signature[i:i + PIECE]
            forms |= {piece, piece.hex().encode(), piece.hex().upper().encode(), *_base64_cores(piece)}
        forms = {f for f in forms if len(f) >= PIECE}
        self._search = re2.compile(b"|".join(re2.escape(f) for f in sorted(forms))).search if forms else None

    def found_in(self, text: bytes) -> bool:
        """True when `text` (one reading, bytes) holds a piece of the token in a form."""
        return self._search is not None and self._search(text) is not None


def holds_token(
    data: bytes, trusted: Callable[[str], bool], fingerprint: Fingerprint | None = None
) -> bool:
    """True when `data` (a header value or a decoded body, bytes) holds, in any of its
    `readings`, a token of an issuer `trusted(issuer)` accepts, or a piece of the
    caller's token (`fingerprint`), or whose readings add up to more than
    `READING_FACTOR` times its size (it cannot be searched in bounded time: treated as
    holding one)."""
    budget = READING_FACTOR * len(data) + 4096
    for text in readings(data):
        budget -= len(text)
        if budget < 0:
            return True
        if fingerprint is not None and fingerprint.found_in(text):
            return True
        for m in SIGNING_INPUT.finditer(text) if b"eyJ" in text else ():
            if (issuer := issuer_of(m.group())) is not None and trusted(issuer):
                return True
    return False


def readings(data: bytes) -> Iterator[bytes]:
    """`data`, then each text a decoding an agent could have applied gives, breadth
    first, up to `MAX_DEPTH` decodings deep; each distinct text once."""
    yield data
    seen = {data}
    frontier = [data]
    for _ in range(MAX_DEPTH):
        deeper = []
        for text in frontier:
            for decoded in _decodings(text):
                if decoded not in seen:
                    seen.add(decoded)
                    deeper.append(decoded)
                    yield decoded
        if not deeper:
            return
        frontier = deeper


def _decodings(text: bytes) -> Iterator[bytes]:
    """The texts one decoding of `text` gives, where it may hold a trace of `eyJ`."""
    if _ANY_GATE.search(text) is None:
        return
    if b"%" in text:
        yield unquote_to_bytes(text)
    if b"\\" in text:
        yield _JSON_ESCAPE.sub(_unescape, text.replace(b"\\\\", b"\\"))
    if _TRACE.search(text) is None:
        return
    # the run patterns cost a pass each (about 20 MB/s): run only past the gates
    for run in _HEX_RUN.finditer(text):
        digits = run.group()
        if _TRACE.search(digits):
            for start in (0, 1):  # the run may begin with a hex-looking character of the text around it
                decoded = binascii.unhexlify(digits[start:start + (len(digits) - start) // 2 * 2])
                yield from (m.group() for m in _TEXT_RUN.finditer(decoded))
    for run in _BASE64_RUN.finditer(text):
        chunk = run.group().rstrip(b"=")
        if not _TRACE.search(chunk):
            continue
        for start in range(4):  # the run may begin with characters of the text around it
            part = chunk[start:]
            part = part[:len(part) - (len(part) % 4 == 1)]  # a lone last character decodes to nothing
            for alphabet in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    decoded = alphabet(part + b"=" * (-len(part) % 4))
                except (binascii.Error, ValueError):
                    continue
                yield from (m.group() for m in _TEXT_RUN.finditer(decoded))


def _unescape(m: re.Match[bytes]) -> bytes:
    escape = m.group()
    if escape == b"\\/":
        return b"/"
    return chr(int(escape[2:], 16)).encode("utf-8", "replace")


def encoded_forms(token: str) -> tuple[bytes, ...]:
    """The offset-free base64 cores of `token` (both alphabets), longest first: a text
    holding one holds the token base64-encoded (RFC 4648 §4, §5)."""
    return tuple(sorted(_base64_cores(token.encode()), key=len, reverse=True))
