"""Bearer token -> verified `Identity`, following RFC 7519 (JWT) and RFC 8725 (JWT BCP).

python-jose does the signature and time-claim checks; this module enforces around it
what python-jose leaves open: the algorithm comes from the issuer's allow-list and must
fit the key's `kty`/`alg`/`use` (RFC 8725 §3.1, §3.2), keys come only from the
configured JWKS (the token's `jwk`/`jku`/`x5u`/`x5c` headers are never consulted),
`exp` and `aud` are required, `crit` is refused (RFC 7515 §4.1.11), and the token's
size and shape are checked before anything is decoded. Every caller goes through
`Verifier.verify`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError

from hoop_addon.policy.model import Issuer

MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 1 << 20
MAX_KID_CHARS = 256
JWKS_TIMEOUT_S = 5.0
REFETCH_COOLDOWN_S = 30.0
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")
_KTY = {"RS": "RSA", "ES": "EC"}


class TokenError(Exception):
    """A token was refused. `reason` is a short machine code (`expired`,
    `bad_signature`, ...) fit for logs and metrics; `str()` is a human sentence that
    never contains the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class JwksError(Exception):
    """A JWKS could not be read or parsed (message says which source and why)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller. Times are Unix seconds. Never holds the token itself."""

    subject: str
    issuer: str
    groups: tuple[str, ...]
    token_id: str | None
    expires_at: int

    def record(self) -> dict[str, Any]:
        """The JSON-safe form written to `flow.metadata` and the audit log."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "groups": list(self.groups),
            "token_id": self.token_id,
        }


class KeySet:
    """The signing keys of one issuer, from a JWKS file path or http(s) URL (RFC 7517).

    `refresh()` (blocking, seconds-bounded) re-reads the source and keeps the last good
    key set if the source fails; `find(kid)` refetches at most once per
    `REFETCH_COOLDOWN_S` seconds when a `kid` is unknown (key rotation without a restart,
    no refetch storm).
    """

    def __init__(self, source: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.keys: dict[str, dict[str, Any]] = {}
        self._clock = clock
        self._last_fetch = float("-inf")
        self._lock = asyncio.Lock()

    def refresh(self) -> None:
        """Re-read the JWKS. Raises `JwksError`; the previous keys stay in use then."""
        self._last_fetch = self._clock()
        try:
            if self.source.startswith(("http://", "https://")):
                with urllib.request.urlopen(self.source, timeout=JWKS_TIMEOUT_S) as resp:
                    raw = resp.read(MAX_JWKS_BYTES + 1)
            else:
                with open(self.source, "rb") as fh:
                    raw = fh.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            raise JwksError(f"cannot read JWKS {self.source}: {exc}") from None
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksError(f"JWKS {self.source} is larger than {MAX_JWKS_BYTES} bytes")
        try:
            doc = orjson.loads(raw)
            keys = {
                str(k.get("kid", "")): k
                for k in doc["keys"]
                if isinstance(k, dict) and k.get("use", "sig") == "sig" and k.get("kty") in ("RSA", "EC")
            }
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise JwksError(f"JWKS {self.source} is not a JSON Web Key Set") from None
        self.keys = keys

    async def find(self, kid: str) -> dict[str, Any] | None:
        """The JWK with this `kid` ("" for a token without one), refetching once per
        cooldown when it is unknown. Returns None when there is no such key."""
        if kid in self.keys:
            return self.keys[kid]
        async with self._lock:
            if kid not in self.keys and self._clock() - self._last_fetch >= REFETCH_COOLDOWN_S:
                try:
                    await asyncio.to_thread(self.refresh)
                except JwksError:
                    pass  # keep the last good keys; the caller reports the unknown kid
        return self.keys.get(kid)


class Verifier:
    """Verifies bearer tokens against the trusted issuers of a policy.

    `verify(token)` returns an `Identity` or raises `TokenError`. Verified tokens are
    cached by SHA-256 until they expire (at most `cache_size` entries, least recently
    used dropped first), so a repeat costs one hash and a dict lookup.
    """

    def __init__(
        self,
        issuers: Sequence[Issuer],
        keysets: dict[str, KeySet],
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        self.keysets = keysets
        self._clock = clock
        self._cache: OrderedDict[bytes, Identity] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def load(cls, issuers: Sequence[Issuer]) -> Verifier:
        """Build a verifier and read every issuer's JWKS once.

        A JWKS file that cannot be read is a configuration error (`JwksError`); a JWKS
        URL that does not answer is retried after the refetch cooldown, and its tokens
        are refused meanwhile (fail closed).
        """
        keysets = {}
        for issuer in issuers:
            keyset = KeySet(issuer.jwks)
            try:
                keyset.refresh()
            except JwksError:
                if not issuer.jwks.startswith(("http://", "https://")):
                    raise
            keysets[issuer.issuer] = keyset
        return cls(issuers, keysets)

    async def verify(self, token: str) -> Identity:
        """Verify `token` (compact JWS) and return who it identifies.

        Raises `TokenError` with reason: `too_large`, `malformed`, `untrusted_issuer`,
        `algorithm_not_allowed`, `crit_not_understood`, `unknown_key`, `bad_signature`,
        `expired`, `not_yet_valid`, `wrong_audience`, `invalid_claims`.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("too_large", f"token is longer than {MAX_TOKEN_BYTES} bytes")
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        if (cached := self._cache.get(digest)) is not None:
            if cached.expires_at > now:
                self._cache.move_to_end(digest)
                return cached
            del self._cache[digest]
        identity = await self._verify(token, now)
        self._cache[digest] = identity
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return identity

    async def _verify(self, token: str, now: float) -> Identity:
        segments = token.split(".")
        if len(segments) != 3 or not all(_SEGMENT.match(s) for s in segments):
            raise TokenError("malformed", "token is not a compact JWS (three base64url segments)")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.get_unverified_claims(token)
        except JWTError:
            raise TokenError("malformed", "token header or payload is not valid JSON") from None
        issuer = self.issuers.get(unverified.get("iss")) if isinstance(unverified.get("iss"), str) else None
        if issuer is None:
            raise TokenError("untrusted_issuer", "token issuer is not trusted")
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise TokenError("algorithm_not_allowed", f"algorithm {alg!r} is not allowed for this issuer")
        if "crit" in header:
            raise TokenError("crit_not_understood", "token has critical header parameters")
        kid = header.get("kid", "")
        if not isinstance(kid, str) or len(kid) > MAX_KID_CHARS:
            raise TokenError("malformed", "token kid is not a short string")
        key = await self.keysets[issuer.issuer].find(kid)
        if key is None or key.get("kty") != _KTY[alg[:2]] or key.get("alg", alg) != alg:
            raise TokenError("unknown_key", "no trusted key matches the token's kid and algorithm")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=issuer.issuer,
                options={"verify_aud": False, "leeway": issuer.leeway},
            )
        except ExpiredSignatureError:
            raise TokenError("expired", "token has expired") from None
        except JWTClaimsError as exc:
            reason = "not_yet_valid" if "nbf" in str(exc) or "iat" in str(exc) else "invalid_claims"
            raise TokenError(reason, f"token claims are invalid: {exc}") from None
        except JWTError:
            raise TokenError("bad_signature", "token signature does not verify") from None
        except (OverflowError, ValueError, TypeError):  # python-jose's int() of exp/nbf/iat
            raise TokenError("invalid_claims", "token time claims are not finite numbers") from None
        return _identity(claims, issuer, now)


def _identity(claims: dict[str, Any], issuer: Issuer, now: float) -> Identity:
    """Check what python-jose does not (exp present, aud, iat) and map the claims."""
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise TokenError("invalid_claims", "token has no numeric exp (expiry is required)")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not set(audiences) & set(issuer.audiences):
        raise TokenError("wrong_audience", "token audience is not this gateway")
    iat = claims.get("iat")
    if isinstance(iat, (int, float)) and iat > now + issuer.leeway:
        raise TokenError("not_yet_valid", "token was issued in the future")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenError("invalid_claims", "token has no subject")
    groups: Any = claims
    for part in issuer.groups_claim.split("."):
        groups = groups.get(part) if isinstance(groups, dict) else None
    if isinstance(groups, str):
        groups = groups.split()
    groups = tuple(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else ()
    jti = claims.get("jti")
    return Identity(subject, issuer.issuer, groups, jti if isinstance(jti, str) else None, int(exp))
