"""Request text made inert for people: what approvers read (a CLI listing, a webhook
message, mitmproxy's command output, log lines) comes from the request and its
requester, and must not drive their terminal or reorder what they see.

`inert(text)` replaces every character that controls rather than shows: C0 controls
(ESC starts ANSI/VT100 escape sequences, CR/LF/TAB forge lines), DEL, C1 controls
(U+0080..U+009F: NEL and the 8-bit CSI among them), the Unicode line and paragraph
separators, and the bidirectional formatting characters of Unicode UAX #9 (U+061C,
U+200E/F, U+202A..U+202E, U+2066..U+2069: "Trojan Source", CVE-2021-42574). Each
becomes its visible escape (`\\x1b`, `\\u202e`), so an approver sees that it was there.
"""

from __future__ import annotations

import re

_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def inert(value: object) -> str:
    """`str(value)` with every control, separator and bidi character replaced by its
    escape (`\\x1b`, `\\x85`, `\\u202e`); a backslash stays as it is."""
    return _CONTROLS.sub(_escape, str(value))
