"""Bearer token -> verified `Identity`, following RFC 7519 (JWT) and RFC 8725 (JWT BCP).

python-jose does the signature and time-claim checks; this module enforces around it
what python-jose leaves open: the algorithm comes from the issuer's allow-list, is
always asymmetric (no HS*/none: RFC 8725 §2.1, §3.1) and must fit the key's
`kty`/`alg`/`crv`/`use`/`key_ops` (RFC 8725 §3.1, RFC 7517 §4.2-4.3), keys come only
from the configured JWKS or OIDC discovery (the token's `jwk`/`jku`/`x5u`/`x5c` headers
are never consulted), `exp` and `aud` are required, `crit` is refused (RFC 7515
§4.1.11), `typ` is enforced where the issuer requires access tokens (RFC 8725 §3.11,
RFC 9068), and the token's size and shape are checked before anything is decoded.
Every caller goes through `Verifier.verify`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError

if TYPE_CHECKING:  # the policy loader imports this module
    from hoop_addon.policy.model import Issuer

MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 1 << 20
MAX_KID_CHARS = 256
JWKS_TIMEOUT_S = 5.0
REFETCH_COOLDOWN_S = 30.0
JWKS_MAX_AGE_S = 3600.0
DISCOVERY_PATH = "/.well-known/openid-configuration"
_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")
# The only algorithms ever verified, with the key each needs (RFC 7518 §3.3, §3.4).
_KEY_FOR_ALG = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
}
logger = logging.getLogger("hoop")


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
    client_id: str | None = None
    scopes: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()  # the token's `aud`, for resource binding (RFC 8707); not recorded

    def record(self) -> dict[str, Any]:
        """The JSON-safe form written to `flow.metadata` and the audit log."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "groups": list(self.groups),
            "client_id": self.client_id,
            "scopes": list(self.scopes),
            "token_id": self.token_id,
        }


class KeySet:
    """The signing keys of one issuer (RFC 7517), from a JWKS file path, an http(s)
    URL, or, when `source` is None, OpenID Connect Discovery 1.0 from `issuer`.

    `refresh()` re-reads the source (a URL within one `JWKS_TIMEOUT_S` deadline, on the
    event loop: nothing blocks) and keeps the last good key set if the source fails
    (`stale` is then True until a refresh succeeds); `find(kid)` refetches at most once
    per `cooldown` seconds when a `kid` is unknown (key rotation without a restart, no
    refetch storm), or when the keys are older than `JWKS_MAX_AGE_S` (revoked keys drop
    out). A key that a refresh leaves unchanged stays the same object, so `current(kid,
    key)` tells in O(1) whether a key a token was verified with is still published.
    """

    def __init__(
        self,
        source: str | None,
        *,
        issuer: str = "",
        cooldown: float = REFETCH_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.issuer = issuer
        self.cooldown = cooldown
        self.keys: dict[str, dict[str, Any]] = {}
        self.stale = False
        self._clock = clock
        self._last_fetch = float("-inf")
        self._last_good = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def remote(self) -> bool:
        """True when the keys come over the network (a URL or OIDC discovery)."""
        return self.source is None or self.source.startswith(("http://", "https://"))

    def read_file(self) -> None:
        """Read a file JWKS now (blocking, local). Raises `JwksError`."""
        self._take(_parse_json(_read_file(self.source or ""), "JWKS", self.source or ""))

    async def refresh(self) -> None:
        """Re-read the JWKS. Raises `JwksError`; the previous keys stay in use then."""
        self._last_fetch = self._clock()
        try:
            if not self.remote:
                return self.read_file()
            deadline = time.monotonic() + JWKS_TIMEOUT_S  # one deadline for discovery and the JWKS
            uri = self.source or await self._discover(deadline)
            self._take(_parse_json(await _fetch(uri, "JWKS", deadline), "JWKS", uri))
        except JwksError as exc:
            self.stale = bool(self.keys)
            if self.stale:
                logger.warning(f"hoop: {exc}; keeping the {len(self.keys)} key(s) last fetched")
            raise

    def _take(self, doc: Any) -> None:
        try:
            found = {str(k.get("kid", "")): k for k in doc["keys"] if isinstance(k, dict) and k.get("kty") in ("RSA", "EC")}
        except (KeyError, TypeError):
            raise JwksError(f"JWKS {self.source or self.issuer} is not a JSON Web Key Set") from None
        old = self.keys
        # unchanged keys keep their identity (see `current`); a changed or removed one does not
        self.keys = {kid: old[kid] if old.get(kid) == key else key for kid, key in found.items()}
        self.stale, self._last_good = False, self._clock()

    async def _discover(self, deadline: float) -> str:
        """The `jwks_uri` of the issuer's discovery document (OIDC Discovery 1.0 §4),
        whose `issuer` must be ours exactly (§4.3)."""
        url = self.issuer.rstrip("/") + DISCOVERY_PATH
        doc = _parse_json(await _fetch(url, "OIDC discovery document", deadline), "OIDC discovery document", url)
        uri = doc.get("jwks_uri") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
            raise JwksError(f"OIDC discovery document of {self.issuer} names another issuer")
        if not isinstance(uri, str) or not key_url_allowed(uri):
            raise JwksError(f"OIDC discovery document of {self.issuer} has no https jwks_uri")
        return uri

    async def prime(self) -> None:
        """Fetch the keys until a fetch succeeds, once per `cooldown` seconds (start-up
        in the background: the gateway serves meanwhile, refusing only this issuer's
        tokens). Returns at once when keys are there."""
        while not self.keys:
            async with self._lock:
                if self.keys:
                    return
                try:
                    await self.refresh()
                    return
                except JwksError as exc:
                    logger.warning(f"hoop: issuer {self.issuer}: {exc}; its tokens are refused until it answers")
            await asyncio.sleep(self.cooldown)

    def current(self, kid: str, key: dict[str, Any]) -> bool:
        """True when `key` is still this issuer's key `kid` (not removed or replaced by a
        refresh) and the keys are not older than `JWKS_MAX_AGE_S`."""
        return self.keys.get(kid) is key and self._clock() - self._last_good < JWKS_MAX_AGE_S

    async def find(self, kid: str) -> dict[str, Any] | None:
        """The JWK with this `kid` ("" for a token without one), refetching once per
        cooldown when it is unknown or the keys are old. Returns None when there is no
        such key."""
        now = self._clock()
        if kid in self.keys and now - self._last_good < JWKS_MAX_AGE_S:
            return self.keys[kid]
        async with self._lock:  # a fetch under way (start-up, another flow) is waited for
            if now - self._last_fetch >= self.cooldown and (kid not in self.keys or now - self._last_good >= JWKS_MAX_AGE_S):
                try:
                    await self.refresh()
                except JwksError:
                    pass  # keep the last good keys; the caller reports the unknown kid
        return self.keys.get(kid)


def key_url_allowed(url: str) -> bool:
    """True for an https URL, or a plain http one on loopback (tests, sidecars): where
    JWKS and OIDC discovery documents may be fetched from."""
    if url.startswith("https://"):
        return True
    host = urllib.parse.urlsplit(url).hostname or ""
    if not url.startswith("http://") or not host:
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3


async def _fetch(url: str, what: str, deadline: float) -> bytes:
    """GET `url` (at most `MAX_JWKS_BYTES`), following at most `MAX_REDIRECTS`
    redirects, each only to a URL `key_url_allowed` accepts (the policy loader's own
    rule: a redirect must not lead where the policy could not), the whole exchange
    finished by `deadline` (`time.monotonic()` seconds): a server that answers one
    byte a second is cut off there. Raises `JwksError` naming the URL (never a body)."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

    client = AsyncHTTPClient(force_instance=True, max_body_size=MAX_JWKS_BYTES)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            request = HTTPRequest(
                url, follow_redirects=False, connect_timeout=remaining, request_timeout=remaining,
                headers={"Accept": "application/json"}, decompress_response=False,
            )
            try:
                answer = await client.fetch(request, raise_error=False)
            except (HTTPClientError, OSError, ValueError) as exc:  # no answer: refused, reset, timed out, too large
                raise JwksError(f"cannot read {what} {url}: {exc}") from None
            if answer.code in _REDIRECTS:
                target = urllib.parse.urljoin(url, answer.headers.get("Location", ""))
                if not key_url_allowed(target):
                    raise JwksError(f"{what} {url} redirects to {target[:200]!r}: not https (nor http on loopback), refused")
                url = target
                continue
            if answer.code == 200:
                return answer.body
            raise JwksError(f"cannot read {what} {url}: HTTP {answer.code}")
        else:
            raise JwksError(f"{what} {url}: more than {MAX_REDIRECTS} redirects")
    finally:
        client.close()
    raise JwksError(f"{what} {url} was not read within {JWKS_TIMEOUT_S:g} s")


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_JWKS_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise JwksError(f"cannot read JWKS {path}: {exc}") from None


def _parse_json(raw: bytes, what: str, source: str) -> Any:
    """The JSON document `raw` read from `source`. Raises `JwksError` naming the
    source (never the document)."""
    if len(raw) > MAX_JWKS_BYTES:
        raise JwksError(f"{what} {source} is larger than {MAX_JWKS_BYTES} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise JwksError(f"{what} {source} is not JSON") from None


def _key_fits(key: dict[str, Any], alg: str) -> bool:
    """RFC 8725 §3.1 / RFC 7517 §4: the key may verify `alg`: its `kty` (and, for EC,
    `crv`) is the one `alg` needs, its own `alg` (if any) is `alg`, its `use` (if any)
    is `sig` and its `key_ops` (if any) include `verify`."""
    kty, crv = _KEY_FOR_ALG[alg]
    ops = key.get("key_ops")
    return (
        key.get("kty") == kty
        and (crv is None or key.get("crv") == crv)
        and key.get("alg", alg) == alg
        and key.get("use", "sig") == "sig"
        and (ops is None or (isinstance(ops, list) and "verify" in ops))
    )


class Verifier:
    """Verifies bearer tokens against the trusted issuers of a policy.

    `verify(token)` returns an `Identity` or raises `TokenError`. Verified tokens are
    cached by SHA-256 until they expire (at most `cache_size` entries, least recently
    used dropped first), so a repeat costs one hash and a dict lookup; a cached token
    whose signing key a JWKS refetch removed or replaced is verified again (and so
    refused, `unknown_key`).
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
        # token digest -> (identity, the key set and kid it was verified under, the key)
        self._cache: OrderedDict[bytes, tuple[Identity, KeySet, str, dict[str, Any]]] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def load(cls, issuers: Sequence[Issuer]) -> Verifier:
        """Build a verifier; read the issuers' JWKS files (a file that cannot be read
        is a configuration error: `JwksError`). JWKS URLs and OIDC discovery are
        fetched later, on the event loop (`fetch`, `prime`, or a token's first use)."""
        keysets = {}
        for issuer in issuers:
            keyset = KeySet(issuer.jwks, issuer=issuer.issuer, cooldown=issuer.refetch_cooldown)
            if not keyset.remote:
                keyset.read_file()
            keysets[issuer.issuer] = keyset
        return cls(issuers, keysets)

    async def fetch(self) -> None:
        """Fetch the keys of every remote issuer that has none yet, concurrently, once;
        an issuer that does not answer is logged (its tokens are refused meanwhile)."""
        waiting = [k for k in self.keysets.values() if k.remote and not k.keys]
        for keyset, failure in zip(waiting, await asyncio.gather(*(k.refresh() for k in waiting), return_exceptions=True)):
            if isinstance(failure, JwksError):
                logger.warning(f"hoop: issuer {keyset.issuer}: {failure}; its tokens are refused until it answers")
            elif isinstance(failure, BaseException):
                raise failure

    async def prime(self) -> None:
        """Fetch every remote issuer's keys until each has answered (see `KeySet.prime`)."""
        await asyncio.gather(*(k.prime() for k in self.keysets.values() if k.remote))

    def keys_stale(self, issuer: str) -> bool:
        """True when the last JWKS refresh of `issuer` failed and older keys are in use."""
        return (keyset := self.keysets.get(issuer)) is not None and keyset.stale

    def trusts_issuer(self, issuer: str) -> bool:
        """True when `issuer` (an `iss` claim, unverified) is one this policy trusts: a
        token naming it is a gateway token, which must never travel upstream
        (`hoop_addon.identity.smuggling`)."""
        return issuer in self.issuers

    async def verify(self, token: str) -> Identity:
        """Verify `token` (compact JWS) and return who it identifies.

        Raises `TokenError` with reason: `too_large`, `malformed`, `untrusted_issuer`,
        `algorithm_not_allowed`, `crit_not_understood`, `wrong_token_type`,
        `unknown_key`, `bad_signature`, `expired`, `not_yet_valid`, `wrong_audience`,
        `invalid_claims`.
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("too_large", f"token is longer than {MAX_TOKEN_BYTES} bytes")
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        if (cached := self._cache.get(digest)) is not None:
            identity, keyset, kid, key = cached
            issuer = self.issuers[identity.issuer]
            if identity.expires_at + issuer.leeway > now and keyset.current(kid, key):
                self._cache.move_to_end(digest)
                return identity
            del self._cache[digest]
        self._cache[digest] = entry = await self._verify(token, now)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return entry[0]

    async def _verify(self, token: str, now: float) -> tuple[Identity, KeySet, str, dict[str, Any]]:
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
        if not isinstance(alg, str) or alg not in issuer.algorithms or alg not in _KEY_FOR_ALG:
            raise TokenError("algorithm_not_allowed", f"algorithm {str(alg)[:20]!r} is not allowed for this issuer")
        if "crit" in header:
            raise TokenError("crit_not_understood", "token has critical header parameters")
        if issuer.token_type is not None and not _is_type(header.get("typ"), issuer.token_type):
            raise TokenError("wrong_token_type", f"this issuer's tokens must have typ {issuer.token_type!r} (access tokens only)")
        kid = header.get("kid", "")
        if not isinstance(kid, str) or len(kid) > MAX_KID_CHARS:
            raise TokenError("malformed", "token kid is not a short string")
        keyset = self.keysets[issuer.issuer]
        key = await keyset.find(kid)
        if key is None or not _key_fits(key, alg):
            raise TokenError("unknown_key", "no trusted signing key matches the token's kid and algorithm")
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
        return _identity(claims, issuer, now), keyset, kid, key


def _is_type(typ: Any, expected: str) -> bool:
    """RFC 7515 §4.1.9: media types compare case-insensitively, `application/` optional."""
    if not isinstance(typ, str):
        return False
    return typ.lower().removeprefix("application/") == expected.lower().removeprefix("application/")


_SCOPE_CLAIMS = ("scope", "scp")  # space-separated by definition (RFC 6749 §3.3)


def _words(value: Any, separated: bool = True) -> tuple[str, ...]:
    """A claim holding strings: a list (Okta `scp`, `groups`), or a string: with
    `separated`, space-separated names (RFC 6749 §3.3 `scope`), else one name (a group
    called `Domain Admins` is not the group `Admins`); anything else gives ()."""
    if isinstance(value, str):
        # RFC 6749 §3.3: delimited by the space character (%x20) only; other Unicode
        # whitespace is part of a name (`a\u2003admin` is not the scope `admin`)
        return tuple(w for w in value.split(" ") if w) if separated else (value,)
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _identity(claims: dict[str, Any], issuer: Issuer, now: float) -> Identity:
    """Check what python-jose does not (exp present, aud, iat) and map the claims."""
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise TokenError("invalid_claims", "token has no numeric exp (expiry is required)")
    for name in ("nbf", "iat"):
        # RFC 7519 §4.1.4-4.1.6: NumericDate, a JSON number; python-jose takes `int()`
        # of anything, so "123" or true would pass its checks
        if name in claims and (isinstance(claims[name], bool) or not isinstance(claims[name], (int, float))):
            raise TokenError("invalid_claims", f"token claim {name} is not a JSON number")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []
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
    # The configured claim, else RFC 9068 §2.2 `client_id`, else OIDC `azp`; scopes from
    # `scope` (RFC 9068 §2.2.3) or `scp` (Okta, Azure AD).
    names = (issuer.client_id_claim,) if issuer.client_id_claim else ("client_id", "azp")
    client_id = next((c for c in map(claims.get, names) if isinstance(c, str) and c), None)
    scopes = _words(claims["scope"] if "scope" in claims else claims.get("scp"))
    jti = claims.get("jti")
    return Identity(
        subject, issuer.issuer, _words(groups, separated=issuer.groups_claim in _SCOPE_CLAIMS), jti if isinstance(jti, str) else None, int(exp), client_id, scopes,
        tuple(audiences),
    )
