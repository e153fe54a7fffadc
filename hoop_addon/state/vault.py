"""The `tokenize` vault in a shared state store: a token minted by one gateway process
restores on every other process sharing the store (SQLite or PostgreSQL).

Only sessions that can span processes live here: those named by an `X-Hoop-Session`
header or an MCP session id (a client connection's session stays in its process's
memory, `hoop_addon.masking.vault.Vault`). Nothing in the tables is readable without
the gateway secret (`hoop_mask_secret`), from which HKDF-SHA256 (RFC 5869) derives two
keys: one HMAC-SHA256 key naming sessions (`sid`, of the session key: identity and
session label) and values (`vkey`, so that the same value gets the same token), and one
AES-256-GCM key (NIST SP 800-38D) sealing each value under a random 96-bit nonce, with
`sid` and the token as associated data (a sealed value moved to another row does not
open).

A flow loads its session once (`SharedVault.session`: one SELECT), masks with it and
mints through it: a value the session has no token for yet is one transaction
(`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` on the session's counter per label,
then `INSERT ... ON CONFLICT DO NOTHING` on the value: two processes minting the same
value at once agree on one token). Tokens expire `ttl_s` after they were minted, and a
session keeps at most `max_tokens` per label (the oldest go first, as in memory).
Every call may raise `StateError`; the caller fails closed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hoop_addon.masking.vault import TOKEN, TokenSession
from hoop_addon.state.approvals import StateError

if TYPE_CHECKING:
    from hoop_addon.state.sql import SQLStore

VAULT_TTL_S = 86_400.0
"""Seconds a token minted in a shared session restores (then it is forgotten)."""


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


class SharedVault:
    """Token sessions in `store` (an SQL state store), sealed with keys derived from
    `secret` (bytes, the gateway secret). `max_tokens` bounds a session's tokens per
    label; `ttl_s` is how long a token restores; `clock` gives Unix seconds."""

    def __init__(self, store: SQLStore, secret: bytes, max_tokens: int = 4096, ttl_s: float = VAULT_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.max_tokens, self.ttl_s, self.clock = store, max_tokens, ttl_s, clock
        self._index = _derive(secret, b"hoop vault v1 index")
        self._seal = AESGCM(_derive(secret, b"hoop vault v1 seal"))

    def __repr__(self) -> str:
        return f"<SharedVault {self.store.name}>"

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._index, orjson.dumps(parts), hashlib.sha256).hexdigest()

    def sid(self, key: Hashable) -> str:
        """The store's name of session `key` (a tuple of strings and None)."""
        return self._mac("session", *(str(part) for part in key))  # type: ignore[attr-defined]

    def seal(self, sid: str, token: str, value: str) -> str:
        """`value` sealed for row (`sid`, `token`): base64 of nonce + AES-GCM ciphertext."""
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self._seal.encrypt(nonce, value.encode(), f"{sid} {token}".encode())).decode()

    def open(self, sid: str, token: str, sealed: str) -> str:
        """The value `seal` sealed. Raises `StateError` when it does not open (another
        secret, a row tampered with or moved)."""
        raw = base64.b64decode(sealed)
        try:
            return self._seal.decrypt(raw[:12], raw[12:], f"{sid} {token}".encode()).decode()
        except InvalidTag:
            raise StateError(f"state store {self.store.name}: a vault entry does not open with this gateway's "
                             "secret (hoop_mask_secret differs between processes?)") from None

    def session(self, key: Hashable) -> SharedSession:
        """Session `key` as the store holds it now (a fresh object: use it for one flow)."""
        sid = self.sid(key)
        session = SharedSession(self, sid)
        session.refresh()
        return session

    def drop(self, key: Hashable) -> None:
        """Forget session `key` on every process (the client ended it)."""
        sid = self.sid(key)
        with self.store.transaction() as run:
            run("DELETE FROM hoop_vault WHERE sid = ?", sid)
            run("DELETE FROM hoop_vault_next WHERE sid = ?", sid)


class SharedSession(TokenSession):
    """One flow's view of a shared session: the tokens the store held when it was
    loaded, plus those minted through it. `token` mints in the store (blocking: call
    it off the event loop); `refresh` reads tokens minted elsewhere since."""

    __slots__ = ("vault", "sid")

    def __init__(self, vault: SharedVault, sid: str) -> None:
        super().__init__(vault.max_tokens)
        self.vault, self.sid = vault, sid

    def __repr__(self) -> str:
        return f"<SharedSession {len(self._by_token)} tokens>"

    def _learn(self, label: str, value: str, token: str) -> None:
        self._by_value[(label, value)] = token
        self._by_token[token] = value

    def refresh(self) -> None:
        """Read every live token of the session from the store. Raises `StateError`."""
        vault = self.vault
        with vault.store.transaction() as run:
            rows = run("SELECT token, label, sealed FROM hoop_vault WHERE sid = ? AND expires > ? ORDER BY n",
                       self.sid, vault.clock())
        for token, label, sealed in rows:
            self._learn(label, vault.open(self.sid, token, sealed), token)

    def unknown(self, text: str) -> bool:
        """Whether `text` holds a token-shaped string this view cannot restore (it may
        have been minted elsewhere since the flow loaded the session)."""
        return "<" in text and any(m.group() not in self._by_token for m in TOKEN.finditer(text))

    def token(self, label: str, value: str) -> str:
        """The session's token for `value` detected as `label`, minted in the store if
        it has none (the same value gets the same token on every process). Raises
        `StateError` when the store fails."""
        if (token := self._by_value.get((label, value))) is not None:
            return token
        vault = self.vault
        now = vault.clock()
        vkey = vault._mac("value", label, value)
        with vault.store.transaction() as run:
            # what expired goes first: an expired value is minted anew, an expired session numbered afresh
            run("DELETE FROM hoop_vault WHERE expires <= ?", now)
            run("DELETE FROM hoop_vault_next WHERE expires <= ?", now)
            (n,), = run("INSERT INTO hoop_vault_next (sid, label, n, expires) VALUES (?, ?, 1, ?) "
                        "ON CONFLICT (sid, label) DO UPDATE SET n = hoop_vault_next.n + 1, expires = excluded.expires "
                        "RETURNING n", self.sid, label, now + vault.ttl_s)
            token = f"<{label}_{n}>"
            if not run("INSERT INTO hoop_vault (sid, token, label, n, vkey, sealed, expires) VALUES (?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (sid, vkey) DO NOTHING RETURNING token",
                       self.sid, token, label, n, vkey, vault.seal(self.sid, token, value), now + vault.ttl_s):
                # another process minted this value a moment ago: its token is the one (our n stays unused)
                (token,), = run("SELECT token FROM hoop_vault WHERE sid = ? AND vkey = ?", self.sid, vkey)
            run("DELETE FROM hoop_vault WHERE sid = ? AND label = ? AND n <= ?", self.sid, label, n - vault.max_tokens)
        self._learn(label, value, token)
        return token
