"""A throwaway local certificate authority for development and tests.

All keys are EC P-256; certificates are signed with ECDSA-SHA256 and written
as PEM files. Private key files are created with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
# Tolerates small clock skew between the issuer and the verifier.
BACKDATE = datetime.timedelta(minutes=1)


@dataclass(frozen=True)
class CA:
    """Paths of a CA certificate and its private key (both PEM)."""

    cert_path: pathlib.Path
    key_path: pathlib.Path


def write_private_key(path: pathlib.Path, key: PrivateKeyTypes) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to ``path`` with mode 0600.

    Raises:
        OSError: the file cannot be written.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    # O_CREAT's mode does not apply to a file that already existed.
    os.chmod(path, 0o600)


def make_ca(directory: pathlib.Path, name: str = "hoop dev CA") -> CA:
    """Create, or load if already present, a self-signed CA in ``directory``.

    Args:
        directory: where ``ca.pem`` and ``ca-key.pem`` live; created if missing.
        name: the CA's subject common name (used only when creating).

    Returns:
        The :class:`CA` pointing at ``directory/ca.pem`` and
        ``directory/ca-key.pem``. If both files exist they are reused as they
        are (not validated); otherwise both are (re)written.

    Raises:
        OSError: the directory or files cannot be created or written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = CA(directory / "ca.pem", directory / "ca-key.pem")
    if ca.cert_path.exists() and ca.key_path.exists():
        return ca

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    write_private_key(ca.key_path, key)
    ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


def _san(hostname: str) -> x509.GeneralName:
    """Map ``hostname`` to an IP SAN if it parses as an IP address, else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname)


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """AuthorityKeyIdentifier matching ``ca_cert``'s SubjectKeyIdentifier.

    Falls back to hashing the CA public key for a CA without that extension.
    """
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def issue_server_cert(
    ca: CA,
    hostnames: Sequence[str],
    directory: pathlib.Path,
    stem: str = "server",
) -> tuple[pathlib.Path, pathlib.Path]:
    """Issue a TLS server certificate for ``hostnames``, signed by ``ca``.

    Args:
        ca: the issuing CA (its files must exist).
        hostnames: non-empty; DNS names and/or IP address literals. The first
            one is also the subject common name.
        directory: output directory; created if missing.
        stem: output file name stem.

    Returns:
        ``(cert_path, key_path)``: ``directory/<stem>.pem`` (the leaf
        certificate only) and ``directory/<stem>-key.pem`` (mode 0600).
        Existing files are overwritten. Validity is one year.

    Raises:
        ValueError: ``hostnames`` is empty, or the CA files are not valid PEM.
        OSError: a file cannot be read or written.
    """
    if not hostnames:
        raise ValueError("hostnames must not be empty")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key_path}: expected an EC private key")

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hostnames]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}-key.pem"
    write_private_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
