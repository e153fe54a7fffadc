"""Session recordings: one mitmproxy flow file per session, masked and scrubbed.

The files are plain mitmproxy flow dumps (tnetstring records), so stock
`mitmproxy -r`, `mitmweb -r` and `mitmdump -nr` open them. Flows are written as the
chain left them (bodies already masked) after the headers that carried identity tokens
or upstream credentials are replaced with `[SCRUBBED]`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from mitmproxy import http, io

ALWAYS_SCRUBBED = ("Authorization", "Proxy-Authorization")
SCRUBBED = "[SCRUBBED]"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def scrubbed(flow: http.HTTPFlow, headers: Iterable[str] = ()) -> http.HTTPFlow:
    """A copy of `flow` whose request headers named here or in `ALWAYS_SCRUBBED`
    (case-insensitive) have their values replaced by `[SCRUBBED]`."""
    copy = flow.copy()
    for name in (*ALWAYS_SCRUBBED, *headers):
        if name in copy.request.headers:
            copy.request.headers[name] = SCRUBBED
    return copy


class SessionRecording:
    """An open session's flow file, `DIRECTORY/<session_id>.mitm`.

    `session_id` is `<UTC start>-<subject, filename-safe, <= 40 chars>-<8 hex>`.
    `add()` appends one flow and flushes it to the OS, so a crash of the gateway loses
    no flow already added. Raises `OSError` when the file cannot be written.
    """

    def __init__(self, directory: Path, subject: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.session_id = f"{stamp}-{_UNSAFE.sub('_', subject)[:40]}-{uuid.uuid4().hex[:8]}"
        self.path = directory / f"{self.session_id}.mitm"
        self._file = open(self.path, "xb")
        self._writer = io.FlowWriter(self._file)
        self.flows = 0

    def add(self, flow: http.HTTPFlow, scrub: Iterable[str] = ()) -> None:
        """Append a scrubbed copy of `flow` (see `scrubbed`)."""
        self._writer.add(scrubbed(flow, scrub))
        self._file.flush()
        self.flows += 1

    def close(self) -> None:
        self._file.close()
