"""The audit log: one JSON line per decision, for auditors and tools.

Each line ties together who (identity: subject, issuer, groups, token id; never the
token), what (route, method, host, path without query), under which policy (its
SHA-256), what was decided and why, what was masked (rule, detector counts, JSONPath;
never the values) and where the flow was recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


class AuditLog:
    """An append-only JSON Lines file (RFC 8259 objects, one per line, UTF-8).

    `append()` writes and flushes one entry; raises `OSError` when it cannot, and
    `TypeError` when the entry is not JSON-serializable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")

    def append(self, entry: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(entry) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
