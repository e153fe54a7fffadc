"""The development token issuer: an offline stand-in for an OIDC provider.

`ensure(home)` creates, once, an EC P-256 signing key and its public JWKS under
`home/dev-issuer/`; the example policy trusts that JWKS for issuer `hoop-dev`, so the
demo works without an IdP. Never trust this issuer in production: anyone who can read
the key can mint any identity.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwk, jwt

from hoop_addon.dev.tls import write_private_key

ISSUER = "hoop-dev"
AUDIENCE = "hoop-gateway"
ALGORITHM = "ES256"


@dataclass(frozen=True, slots=True)
class DevIssuer:
    """Paths of the development issuer's private key (PEM, 0600) and public JWKS, and
    the key id (first 16 base64url chars of the SHA-256 of the public key DER)."""

    key_path: Path
    jwks_path: Path
    kid: str


def ensure(home: Path) -> DevIssuer:
    """Create the development issuer under `home` if absent; return its paths.
    Raises `OSError` when the files cannot be written or read."""
    directory = home / "dev-issuer"
    key_path, jwks_path = directory / "key.pem", directory / "jwks.json"
    if not key_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_private_key(key_path, ec.generate_private_key(ec.SECP256R1()))
    pem = key_path.read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode()[:16]
    public = jwk.construct(pem, ALGORITHM).public_key().to_dict()
    jwks = orjson.dumps({"keys": [{**public, "kid": kid, "use": "sig"}]}, option=orjson.OPT_INDENT_2)
    if not jwks_path.exists() or jwks_path.read_bytes() != jwks:
        jwks_path.write_bytes(jwks)
    return DevIssuer(key_path, jwks_path, kid)


def mint(home: Path, subject: str, groups: list[str], ttl: int = 3600, audience: str = AUDIENCE) -> str:
    """A signed JWT (RFC 7519) for `subject` with a `groups` claim, valid `ttl` seconds."""
    issuer = ensure(home)
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": audience,
        "groups": groups,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, issuer.key_path.read_text(), algorithm=ALGORITHM, headers={"kid": issuer.kid})
