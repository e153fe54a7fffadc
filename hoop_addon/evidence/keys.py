"""Ed25519 signing keys and the canonical JSON that recordings and the audit log sign.

A key pair is two PEM files: `NAME.key` (PKCS#8 private key, mode 0600) and `NAME.pub`
(SubjectPublicKeyInfo). A key id is the SHA-256 (hex) of the raw 32-byte public key
(RFC 8032 encoding), so it names the key without trusting any file name.

Signatures are Ed25519 (RFC 8032) over `canonical(obj)`: JSON with keys sorted, no
whitespace, UTF-8. For the values hoop writes (objects, arrays, strings, integers,
booleans, null; no floats) it is byte-for-byte the RFC 8785 (JCS) form.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class KeyFileError(Exception):
    """A key file is missing, unreadable or not an Ed25519 key. `str()` names the file."""


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of `obj` (sorted keys, compact, UTF-8): what is hashed
    and signed. Raises `TypeError` for values outside JSON."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS, default=_reject)


def _reject(value: Any) -> Any:
    raise TypeError(f"not canonical JSON: {type(value).__name__}")


def sha256(data: bytes) -> str:
    """SHA-256 of `data`, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def key_id(public: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw public key bytes."""
    return sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


@dataclass(frozen=True)
class Signer:
    """A private key and its id. `sign(obj)` returns the base64 Ed25519 signature of
    `canonical(obj)`."""

    private: Ed25519PrivateKey
    key_id: str

    def sign(self, obj: Any) -> str:
        return base64.b64encode(self.private.sign(canonical(obj))).decode()


def generate(path: Path) -> tuple[Path, Path, str]:
    """Write a new key pair to `path` (the private key) and `path` with suffix `.pub`.

    The private key file is created with mode 0600 and never overwritten (raises
    `FileExistsError`). Returns (private path, public path, key id).
    """
    private = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path = path.with_suffix(".pub")
    public_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path, public_path, key_id(private.public_key())


def load_signer(path: Path) -> Signer:
    """Read a PEM Ed25519 private key. Raises `KeyFileError` naming the file."""
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key")
    return Signer(private, key_id(private.public_key()))


class TrustedKeys:
    """The public keys a verifier trusts, by key id (several, for rotation).

    `check(obj, key_id, signature)` returns None when `signature` (base64) is a valid
    Ed25519 signature of `canonical(obj)` by the trusted key `key_id`, else the reason:
    `"unsigned"`, `"unknown key <id>"` or `"bad signature"`.
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey] = ()) -> None:
        self.keys = {key_id(k): k for k in keys}

    @classmethod
    def load(cls, paths: Iterable[Path]) -> TrustedKeys:
        """Read PEM public keys (or private keys, whose public half is used). Raises
        `KeyFileError` naming the file."""
        keys = []
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
            try:
                key: Any = serialization.load_pem_public_key(data)
            except ValueError:
                try:
                    key = serialization.load_pem_private_key(data, password=None).public_key()
                except (ValueError, TypeError):
                    raise KeyFileError(f"{path}: not a PEM Ed25519 key") from None
            if not isinstance(key, Ed25519PublicKey):
                raise KeyFileError(f"{path}: not an Ed25519 key")
            keys.append(key)
        return cls(keys)

    def check(self, obj: Any, key: str | None, signature: str | None) -> str | None:
        if not key or not signature:
            return "unsigned"
        if not isinstance(key, str) or not isinstance(signature, str):
            return "malformed signature or key_id (not a string)"
        public = self.keys.get(key)
        if public is None:
            return f"unknown key {key[:16]}"
        try:
            public.verify(base64.b64decode(signature, validate=True), canonical(obj))
        except (InvalidSignature, ValueError):
            return "bad signature"
        return None
