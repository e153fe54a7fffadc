"""The text detectors read: a value written differently from what they match is
still found, and masked where it was written.

`view(text)` gives the text as its reader sees it, with where each character came
from, for two kinds of writing:

- JSON string escapes (RFC 8259 §7: `\\u0040`, `\\"`, `\\n`, surrogate pairs): a JSON
  document carried as text (a header, a query value, a multipart part, streamed
  tool-call arguments, NDJSON sent as `text/plain`) is read by its recipient decoded;
- Unicode compatibility forms (NFKC, Unicode UAX #15) and invisible characters: NBSP,
  thin and other spaces become a space, fullwidth digits ASCII digits, and zero-width
  characters (ZWSP, ZWNJ, ZWJ, word joiner, BOM, soft hyphen) are dropped, or read as
  a space between two digits (a group separator: an SSN's `078\u200b05\u200b1120`), so
  `4111\u200b1111...` or `4111\u00a01111...` reads as a card number.

Detection runs on the view; spans are mapped back to the original text, which is what
gets replaced (its bytes outside the spans are never touched).
"""

from __future__ import annotations

import functools
import re
import unicodedata

ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u00ad")
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "/": "/"}
_SPECIAL = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"  # a surrogate pair
    r"|\\u[0-9a-fA-F]{4}|\\[\"\\/bfnrt]"
    r"|[^\x00-\x7f]+"
)
_PARTIAL_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?\Z")

View = tuple[str, list[int], list[int]]
"""(the text as read, the original start of each of its characters, the original end)."""


def view(text: str) -> View | None:
    """`text` as its reader sees it (see the module), or None when that is `text`
    itself (the common case costs a scan in C: ASCII without a backslash, or NFKC
    normal with no zero-width character)."""
    if "\\" not in text and (text.isascii() or (unicodedata.is_normalized("NFKC", text) and ZERO_WIDTH.isdisjoint(text))):
        return None
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    for m in _SPECIAL.finditer(text):
        s, e = m.span()
        if s > pos:
            out.append(text[pos:s])
            starts.extend(range(pos, s))
            ends.extend(range(pos + 1, s + 1))
        token = m.group()
        if token[0] == "\\":
            char = _unescape(token)
            if char in ZERO_WIDTH:  # after a digit: a group separator (see below)
                char = " " if out and out[-1][-1:].isdigit() else ""
            elif not char.isascii():
                char = _nfkc(char)
            out.append(char)
            starts.extend([s] * len(char))
            ends.extend([e] * len(char))
        elif unicodedata.is_normalized("NFKC", token) and ZERO_WIDTH.isdisjoint(token):
            out.append(token)
            starts.extend(range(s, e))
            ends.extend(range(s + 1, e + 1))
        else:
            for i, c in enumerate(token, s):
                if c in ZERO_WIDTH:
                    # between digits it separates groups (an SSN's `078\u200b05\u200b1120`), elsewhere nothing
                    if not (out and out[-1][-1:].isdigit() and text[e : e + 1].isdigit() and i == e - 1):
                        continue
                    n = " "
                else:
                    n = _nfkc(c)
                out.append(n)
                starts.extend([i] * len(n))
                ends.extend([i + 1] * len(n))
        pos = e
    if pos < len(text):
        out.append(text[pos:])
        starts.extend(range(pos, len(text)))
        ends.extend(range(pos + 1, len(text) + 1))
    read = "".join(out)
    return None if read == text else (read, starts, ends)


def _unescape(token: str) -> str:
    if token[1] != "u":
        return _ESCAPES[token[1]]
    if len(token) == 12:  # a surrogate pair: one character beyond the BMP
        high, low = int(token[2:6], 16), int(token[8:12], 16)
        return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
    code = int(token[2:6], 16)
    return "\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)  # a lone surrogate cannot be UTF-8


@functools.lru_cache(maxsize=4096)
def _nfkc(c: str) -> str:
    return unicodedata.normalize("NFKC", c)


def unescape(value: str) -> str:
    """`value` with its JSON string escapes decoded (other characters as they are)."""
    return _SPECIAL.sub(lambda m: _unescape(m.group()) if m.group()[0] == "\\" else m.group(), value)


def escape(value: str) -> str:
    """`value` as the content of a JSON string (RFC 8259 §7), for a replacement put
    where an escaped value was."""
    return value.replace("\\", "\\\\").replace('"', '\\"').translate(_CONTROL)


_CONTROL = str.maketrans({chr(c): f"\\u{c:04x}" for c in range(0x20)})


def partial_escape(text: str) -> int | None:
    """Where an escape sequence cut short at the end of `text` (a stream's piece:
    `\\u00`) begins, or None: a stream must not send half of one."""
    m = _PARTIAL_ESCAPE.search(text)
    if m is None:
        return None
    backslashes = len(text[: m.start()]) - len(text[: m.start()].rstrip("\\"))
    return None if backslashes % 2 else m.start()  # `\\\\` is an escaped backslash, complete
