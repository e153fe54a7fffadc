"""A local OIDC identity provider for tests: serves a JWKS and mints JWTs.

Plain HTTP on 127.0.0.1 (ephemeral port), in a daemon thread:

* ``GET /jwks.json``: the public signing keys (counted in ``jwks_fetches``).
* ``GET /.well-known/openid-configuration``: ``issuer`` and ``jwks_uri``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt

KeyKind = Literal["RSA", "EC"]
_ALGS: dict[str, str] = {"RSA": "RS256", "EC": "ES256"}


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWK parameters use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(value: int, size: int | None = None) -> str:
    """Big-endian base64url of a non-negative integer, ``size`` bytes if given."""
    return b64url(value.to_bytes(size or (value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class _SigningKey:
    """A private signing key (PKCS#8 PEM) with its kid, kind, alg and public JWK."""

    kid: str
    kind: KeyKind
    alg: str
    private_pem: str
    public_jwk: dict[str, str]

    @staticmethod
    def generate(kind: KeyKind, kid: str) -> _SigningKey:
        """Generate an RSA 2048 (RS256) or EC P-256 (ES256) key.

        Raises:
            ValueError: unknown ``kind``.
        """
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if kind == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            numbers = key.public_key().public_numbers()
            params = {"n": _uint(numbers.n), "e": _uint(numbers.e)}
        elif kind == "EC":
            key = ec.generate_private_key(ec.SECP256R1())
            point = key.public_key().public_numbers()
            params = {"crv": "P-256", "x": _uint(point.x, 32), "y": _uint(point.y, 32)}
        else:
            raise ValueError(f"unknown key kind {kind!r}; expected 'RSA' or 'EC'")
        alg = _ALGS[kind]
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        jwk = {"kty": kind, "kid": kid, "alg": alg, "use": "sig", **params}
        return _SigningKey(kid, kind, alg, pem.decode(), jwk)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the JWKS and discovery document; one connection per request."""

    server: _Server

    def do_GET(self) -> None:
        idp = self.server.idp
        path = self.path.partition("?")[0]
        if path == "/jwks.json":
            idp._count_fetch()
            body = orjson.dumps(idp.jwks())
        elif path == "/.well-known/openid-configuration":
            body = orjson.dumps(
                {
                    "issuer": idp.issuer,
                    "jwks_uri": idp.jwks_url,
                    "id_token_signing_alg_values_supported": sorted(_ALGS.values()),
                }
            )
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Suppress per-request logging to stderr."""


class _Server(http.server.ThreadingHTTPServer):
    """HTTP server on 127.0.0.1 that knows its :class:`LocalIdP`."""

    daemon_threads = True

    def __init__(self, port: int, idp: LocalIdP) -> None:
        self.idp = idp
        super().__init__(("127.0.0.1", port), _Handler)


class LocalIdP:
    """A local OIDC identity provider.

    Starts with two signing keys: RSA 2048 ``"rsa-1"`` (RS256) and EC P-256
    ``"ec-1"`` (ES256).

    Args:
        issuer: the ``iss`` of minted tokens and of the discovery document;
            ``None`` means the server's own base URL ``http://127.0.0.1:<port>``.
        audience: the default ``aud`` of minted tokens.

    Attributes:
        audience: the default ``aud``.
        jwks_fetches: how many times ``/jwks.json`` was served.
    """

    def __init__(self, issuer: str | None = None, audience: str = "hoop-gateway") -> None:
        self._issuer = issuer
        self.audience = audience
        self.jwks_fetches = 0
        self._lock = threading.Lock()
        self._keys: dict[str, _SigningKey] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._last_port = 0
        self.add_key("RSA", "rsa-1")
        self.add_key("EC", "ec-1")


    def start(self) -> Self:
        """Start serving on an ephemeral port (or the previous one, see :meth:`restart`).

        Raises:
            RuntimeError: already started.
        """
        if self._server is not None:
            raise RuntimeError("LocalIdP already started")
        try:
            self._server = _Server(self._last_port, self)
        except OSError:
            self._server = _Server(0, self)
        self._last_port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"local-idp-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def restart(self) -> Self:
        """Stop, then start again on the same port if it can be re-bound."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: never started.
        """
        if not self._last_port:
            raise RuntimeError("LocalIdP not started")
        return self._last_port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``.

        Raises:
            RuntimeError: never started.
        """
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        """The issuer given to the constructor, else :attr:`base_url`.

        Raises:
            RuntimeError: no explicit issuer and never started.
        """
        return self._issuer if self._issuer is not None else self.base_url

    @property
    def jwks_url(self) -> str:
        """URL of the JWKS document.

        Raises:
            RuntimeError: never started.
        """
        return f"{self.base_url}/jwks.json"

    def _count_fetch(self) -> None:
        with self._lock:
            self.jwks_fetches += 1


    def add_key(self, kind: KeyKind, kid: str) -> str:
        """Generate a signing key and publish it from now on; returns ``kid``.

        Raises:
            ValueError: ``kid`` already exists, or unknown ``kind``.
        """
        key = _SigningKey.generate(kind, kid)
        with self._lock:
            if kid in self._keys:
                raise ValueError(f"key {kid!r} already exists")
            self._keys[kid] = key
        return kid

    def remove_key(self, kid: str) -> None:
        """Stop publishing (and signing with) key ``kid``.

        Raises:
            KeyError: no such key.
        """
        with self._lock:
            del self._keys[kid]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWKS: ``{"keys": [jwk, ...]}``."""
        with self._lock:
            keys = list(self._keys.values())
        return {"keys": [dict(key.public_jwk) for key in keys]}

    def write_jwks(self, path: Path) -> None:
        """Write :meth:`jwks` as JSON to ``path``.

        Raises:
            OSError: the file cannot be written.
        """
        Path(path).write_bytes(orjson.dumps(self.jwks(), option=orjson.OPT_INDENT_2))


    def mint(
        self,
        subject: str = "agent-1",
        groups: Sequence[str] = ("agents",),
        *,
        kid: str = "rsa-1",
        audience: str | None = None,
        issuer: str | None = None,
        expires_in: int = 300,
        extra_claims: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        omit: Sequence[str] = (),
    ) -> str:
        """Mint a JWT signed with published key ``kid``.

        Args:
            subject: ``sub``.
            groups: ``groups`` (a JSON array).
            kid: signing key; its alg (RS256/ES256) is used and its kid is set
                in the header.
            audience: ``aud``; default :attr:`audience`.
            issuer: ``iss``; default :attr:`issuer`.
            expires_in: seconds from now to ``exp``; negative gives an
                already-expired token.
            extra_claims: claims added or overriding the standard ones.
            headers: extra JOSE header fields (may override ``kid``/``alg``).
            omit: names of claims to drop (applied last).

        Returns:
            The compact JWS string.

        Raises:
            KeyError: ``kid`` is not a published key.
            RuntimeError: no explicit issuer and the IdP was never started.
        """
        with self._lock:
            key = self._keys[kid]
        return self._sign(
            key, subject, groups, audience, issuer, expires_in, extra_claims, headers, omit
        )

    def _mint_with(self, key: _SigningKey, subject: str, groups: Sequence[str], **claims: Any) -> str:
        """`mint`'s keyword arguments applied with `key`."""
        return self._sign(
            key, subject, groups, claims.get("audience"), claims.get("issuer"), claims.get("expires_in", 300),
            claims.get("extra_claims"), claims.get("headers"), claims.get("omit", ()),
        )

    def mint_with_foreign_key(self, subject: str = "agent-1", groups: Sequence[str] = ("agents",), *, kid: str = "rsa-1", **claims: Any) -> str:
        """Like :meth:`mint` (same keyword arguments), but signed by a fresh unpublished
        key of the same kind as ``kid``, so the header names a published kid and the
        signature does not verify.

        Raises:
            KeyError: ``kid`` is not a published key.
            RuntimeError: no explicit issuer and the IdP was never started.
        """
        with self._lock:
            kind = self._keys[kid].kind
        return self._mint_with(_SigningKey.generate(kind, kid), subject, groups, **claims)

    def _sign(
        self,
        key: _SigningKey,
        subject: str,
        groups: Sequence[str],
        audience: str | None,
        issuer: str | None,
        expires_in: int,
        extra_claims: dict[str, Any] | None,
        headers: dict[str, Any] | None,
        omit: Sequence[str],
    ) -> str:
        """Build the claims and sign them with ``key``; see :meth:`mint`."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer if issuer is not None else self.issuer,
            "sub": subject,
            "aud": audience if audience is not None else self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + expires_in,
            "jti": uuid.uuid4().hex,
            "groups": list(groups),
        }
        claims.update(extra_claims or {})
        for name in omit:
            claims.pop(name, None)
        return jwt.encode(
            claims,
            key.private_pem,
            algorithm=key.alg,
            headers={"kid": key.kid, **(headers or {})},
        )


def hand_made(idp: LocalIdP, header: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS with valid claims for `idp` (subject `mallory`, its audience, five
    minutes to live), `header`, and the signature `sign` gives for the signing input."""
    claims = {"iss": idp.issuer, "sub": "mallory", "aud": idp.audience, "exp": int(time.time()) + 300}
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def hs256_with_rsa_public_key(idp: LocalIdP) -> str:
    """The key-confusion forgery (RFC 8725 §2.1): HS256 keyed with the issuer's RSA
    public key in PEM."""
    rsa_jwk = next(k for k in idp.jwks()["keys"] if k["kid"] == "rsa-1")
    secret = jwk.construct(rsa_jwk, "RS256").to_pem()
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    return hand_made(idp, header, lambda data: hmac.digest(secret, data, hashlib.sha256))
