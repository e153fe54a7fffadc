"""Scrubbing known secrets (the gateway's upstream credentials) out of bytes, whole or
streamed: an upstream that echoes the key it was sent (a debug endpoint, an error
message, a request log) must not hand it to the agent or the recording.

Exact byte matching, not a detector: the values are known. Each secret is also looked
for with JSON's escaped `/` (`\\/`). A stream holds back only the longest suffix of a
chunk that could begin a secret, so an event ending in `\\n\\n` is never delayed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

SCRUBBED = "[SCRUBBED]"
"""What a secret is replaced by, here and in recordings (`hoop_addon.evidence.recording`)."""
_REPLACEMENT = SCRUBBED.encode()
MIN_LENGTH = 8
"""Shorter secrets are not looked for: they cannot be told from ordinary text (a
development placeholder), and a real API key is far longer."""


@functools.lru_cache(maxsize=256)  # per route's credential: asked for on every response
def forms(secrets: tuple[str, ...]) -> tuple[bytes, ...]:
    """The byte strings to look for: each secret of at least `MIN_LENGTH` characters,
    in UTF-8 and JSON-escaped, longest first."""
    found: set[bytes] = set()
    for secret in secrets:
        if len(secret) < MIN_LENGTH:
            continue
        raw = secret.encode()
        found |= {raw, raw.replace(b"/", b"\\/")}
    return tuple(sorted((f for f in found if f), key=len, reverse=True))


def scrub(data: bytes, secret_forms: tuple[bytes, ...]) -> tuple[bytes, int]:
    """`data` with every occurrence of `secret_forms` (see `forms`) replaced by
    `[SCRUBBED]`, and how many were."""
    count = 0
    for form in secret_forms:
        if form in data:
            count += data.count(form)
            data = data.replace(form, _REPLACEMENT)
    return data, count


class StreamScrubber:
    """`scrub` of `secret_forms` (see `forms`) over a body fed in chunks: `feed(chunk)`
    returns what may go now, `feed(b"", final=True)` the rest; `count` is how many
    secrets were replaced."""

    def __init__(self, secret_forms: tuple[bytes, ...]) -> None:
        self._forms = secret_forms
        self._window = max((len(f) for f in self._forms), default=1) - 1
        self._firsts = {f[:1] for f in self._forms}
        self._held = b""
        self.count = 0

    def feed(self, chunk: bytes, final: bool = False) -> bytes:
        data, n = scrub(self._held + chunk, self._forms)
        self.count += n
        cut = len(data) if final else self._cut(data)
        self._held = data[cut:]
        return data[:cut]

    def _cut(self, data: bytes) -> int:
        """Where the longest suffix of `data` that begins a secret starts (`len(data)`
        if none does)."""
        start = max(len(data) - self._window, 0)
        candidates = sorted(i for first in self._firsts for i in _positions(data, first, start))
        for i in candidates:
            tail = data[i:]
            if any(form.startswith(tail) for form in self._forms):
                return i
        return len(data)


def _positions(data: bytes, byte: bytes, start: int) -> Iterable[int]:
    i = data.find(byte, start)
    while i >= 0:
        yield i
        i = data.find(byte, i + 1)
