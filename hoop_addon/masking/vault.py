"""The `tokenize` operator's vault: value <-> `<LABEL_n>` tokens per session, in memory.

A session is the traffic of one identity on one client connection, or of one identity
under one `X-Hoop-Session` header value or MCP session (the stage decides the key). Tokens are given
in the request, sent upstream instead of the value, and restored in the responses of
the same session only. The vault is bounded (sessions and tokens per session, least
recently used first out), lives only in this process and never appears in metadata,
recordings, logs or `repr`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable

import orjson

TOKEN = re.compile(r"<[A-Z][A-Z0-9_]*_[0-9]+>")  # our own fixed, linear pattern


class TokenSession:
    """The tokens of one session: at most `max_tokens`, oldest forgotten first (a
    forgotten token is simply not restored; its number is never reused)."""

    __slots__ = ("_by_value", "_by_token", "_next", "_max")

    def __init__(self, max_tokens: int) -> None:
        self._by_value: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._by_token: dict[str, str] = {}
        self._next: dict[str, int] = {}
        self._max = max_tokens

    def __repr__(self) -> str:
        return f"<TokenSession {len(self._by_token)} tokens>"

    def __len__(self) -> int:
        return len(self._by_token)

    def token(self, label: str, value: str) -> str:
        """The token for `value` detected as `label` (the same value gets the same
        token within the session): `<LABEL_n>`, n from 1."""
        key = (label, value)
        if (token := self._by_value.get(key)) is not None:
            self._by_value.move_to_end(key)
            return token
        n = self._next.get(label, 0) + 1
        self._next[label] = n
        token = f"<{label}_{n}>"
        self._by_value[key] = token
        self._by_token[token] = value
        while len(self._by_value) > self._max:
            _, old = self._by_value.popitem(last=False)
            del self._by_token[old]
        return token

    def value(self, token: str) -> str | None:
        """The value behind `token`, or None if this session never gave it."""
        return self._by_token.get(token)

    def restore(self, text: str, escape: bool = False) -> tuple[str, int]:
        """`text` with this session's tokens replaced by their values (JSON-string
        escaped with `escape`, for raw JSON text), and how many were replaced."""
        if not self._by_token or "<" not in text:
            return text, 0
        count = 0

        def swap(m: re.Match[str]) -> str:
            nonlocal count
            value = self._by_token.get(m.group())
            if value is None:
                return m.group()
            count += 1
            return _json_escape(value) if escape else value

        return TOKEN.sub(swap, text), count


def _json_escape(value: str) -> str:
    return orjson.dumps(value).decode()[1:-1]


class Vault:
    """Token sessions by key, at most `max_sessions` (least recently used dropped)."""

    def __init__(self, max_sessions: int = 1024, max_tokens: int = 4096) -> None:
        self._sessions: OrderedDict[Hashable, TokenSession] = OrderedDict()
        self._max_sessions, self._max_tokens = max_sessions, max_tokens

    def __repr__(self) -> str:
        return f"<Vault {len(self._sessions)} sessions>"

    def session(self, key: Hashable, create: bool = True) -> TokenSession | None:
        """The session for `key`, created if `create` (else None when unknown)."""
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        elif create:
            session = self._sessions[key] = TokenSession(self._max_tokens)
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        return session

    def drop(self, match: tuple[Hashable, ...]) -> None:
        """Forget the sessions whose key starts with `match` (a closed connection)."""
        for key in [k for k in self._sessions if isinstance(k, tuple) and k[: len(match)] == match]:
            del self._sessions[key]
