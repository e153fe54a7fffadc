"""AWS Signature Version 4 for a route whose credential the gateway holds (pure).

The agent sends unsigned (or self-signed) requests; the gateway removes whatever
signature, payload hash and checksum the agent's client computed for the body it sent
(`strip`), masks the body, then recomputes the checksums the client asked for over the
masked body (`checksums`) and signs last (`sign`, botocore's `SigV4Auth`, or
`S3SigV4Auth` for S3, always with the payload's SHA-256: AWS docs, "Signature Version 4
signing process" and "Authenticating Requests: Using the Authorization Header").

`aws-chunked` uploads (`STREAMING-*` payloads, what boto3 sends over HTTPS, with a
trailing checksum) are de-chunked first (`dechunk`) and signed as one payload.
"""

from __future__ import annotations

import base64
import hashlib
import types
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


class SigningError(Exception):
    """A request the gateway cannot sign as the route requires (message says why; never
    a secret nor body content)."""


@dataclass(frozen=True, slots=True)
class AwsSigV4:
    """The gateway-held AWS credential of a route: access key pair (and STS session
    token), the signing `region` (e.g. `us-east-1`) and `service` (e.g. `s3`)."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str
    service: str
    session_token: str | None = field(default=None, repr=False)


#: Request headers that carry the agent's signature or vouch for the body it sent:
#: removed before masking, so none of them is forwarded for a body they do not match.
SIGNATURE_HEADERS = (
    "Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256",
    "X-Amz-Decoded-Content-Length", "X-Amz-Trailer", "Content-MD5",
)
#: Checksums S3 accepts (`x-amz-checksum-<name>`) that the gateway recomputes; others
#: (crc32c, crc64nvme need a native library) are dropped, so S3 checks none it could not vouch for.
_COMPUTED = {
    "md5": lambda body: hashlib.md5(body).digest(),  # Content-MD5 (RFC 1864)
    "crc32": lambda body: (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big"),
    "sha1": lambda body: hashlib.sha1(body).digest(),
    "sha256": lambda body: hashlib.sha256(body).digest(),
}
_CHECKSUM = "x-amz-checksum-"
# x-amz-checksum-type (FULL_OBJECT / COMPOSITE) and x-amz-checksum-mode (ENABLED: send the
# checksum back) name no algorithm and vouch for no body: they are kept.
_NOT_ALGORITHMS = {"type", "mode"}
_PRESIGNED = ("x-amz-signature", "x-amz-credential", "signature", "awsaccesskeyid")


def presigned(query_names: Iterable[str]) -> bool:
    """Whether a request's query parameters (names) carry a signature (a presigned URL,
    SigV4 or SigV2 query authentication): such a request is refused on a signing route."""
    return any(name.lower() in _PRESIGNED for name in query_names)


def chunked(headers: Mapping[str, str]) -> bool:
    """Whether a request body is `aws-chunked` (its Content-Encoding, or a `STREAMING-*`
    X-Amz-Content-SHA256). `headers` maps names in any case (mitmproxy's `Headers`)."""
    encodings = [e.strip().lower() for e in headers.get("content-encoding", "").split(",")]
    return "aws-chunked" in encodings or headers.get("x-amz-content-sha256", "").upper().startswith("STREAMING-")


def codings_after_dechunk(headers: Mapping[str, str]) -> str:
    """The Content-Encoding of an `aws-chunked` body once dechunked: the other codings
    it names, in order, joined by commas ("" when none)."""
    codings = [e.strip() for e in headers.get("content-encoding", "").split(",")]
    return ",".join(e for e in codings if e and e.lower() != "aws-chunked")


def dechunk(body: bytes) -> tuple[bytes, dict[str, str]]:
    """The payload of an `aws-chunked` body (`<hex size>[;chunk-signature=...]\\r\\n<data>\\r\\n`
    ..., a zero-size chunk, then trailer lines `name:value` and an empty line), and its
    trailers (lower-case names). Chunk signatures are not checked: the gateway signs
    anew. Raises `SigningError` on a malformed or truncated body."""
    parts: list[bytes] = []
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise SigningError("aws-chunked body is truncated (no chunk header)")
        try:
            size = int(body[pos:end].split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise SigningError("aws-chunked body has an invalid chunk size") from None
        pos = end + 2
        if size < 0:
            raise SigningError("aws-chunked body has an invalid chunk size")
        if size == 0:
            break
        if body[pos + size : pos + size + 2] != b"\r\n":
            raise SigningError("aws-chunked body is truncated (a chunk is short)")
        parts.append(body[pos : pos + size])
        pos += size + 2
    trailers: dict[str, str] = {}
    for line in body[pos:].split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise SigningError("aws-chunked body has a malformed trailer")
        trailers[name.strip().lower()] = value.strip()
    return b"".join(parts), trailers


def requested_checksums(headers: Mapping[str, str], trailers: Mapping[str, str] = {}) -> set[str]:
    """The checksum algorithms (lower case: crc32, sha256, ...) the client sent or
    announced for the body: `x-amz-checksum-*` headers and trailers, `x-amz-trailer`,
    `x-amz-sdk-checksum-algorithm`."""
    found = {n.lower()[len(_CHECKSUM):] for n in (*headers.keys(), *trailers) if n.lower().startswith(_CHECKSUM)}
    for name in headers.get("x-amz-trailer", "").split(","):
        if name.strip().lower().startswith(_CHECKSUM):
            found.add(name.strip().lower()[len(_CHECKSUM):])
    if algorithm := headers.get("x-amz-sdk-checksum-algorithm", "").strip().lower():
        found.add(algorithm)
    found -= _NOT_ALGORITHMS
    if "content-md5" in (n.lower() for n in headers.keys()):
        found.add("md5")
    return found


def checksums(algorithms: Iterable[str], body: bytes) -> dict[str, str]:
    """The `x-amz-checksum-<algorithm>` headers (base64 of the big-endian digest) of
    `body` for those of `algorithms` the gateway computes (crc32, sha1, sha256; `md5`
    gives Content-MD5)."""
    return {
        "Content-MD5" if a == "md5" else f"{_CHECKSUM}{a}": base64.b64encode(_COMPUTED[a](body)).decode()
        for a in sorted(algorithms) if a in _COMPUTED
    }


def checksum_headers(names: Iterable[str]) -> list[str]:
    """Those of header `names` that are `x-amz-checksum-*` values or announce one."""
    return [
        n for n in names
        if n.lower().startswith(_CHECKSUM) and n.lower()[len(_CHECKSUM):] not in _NOT_ALGORITHMS
        or n.lower() == "x-amz-sdk-checksum-algorithm"
    ]


def response_checksums(headers: Mapping[str, str], body: bytes) -> dict[str, str | None]:
    """For a response body that the gateway changed (masked): each `x-amz-checksum-*`
    header of `headers` recomputed over `body`, or None (to drop it) when the gateway
    cannot compute it or it is a multipart object's composite checksum (`...-3`)."""
    out: dict[str, str | None] = {}
    for name in headers.keys():
        algorithm = name.lower().removeprefix(_CHECKSUM)
        if not name.lower().startswith(_CHECKSUM) or algorithm in _NOT_ALGORITHMS:
            continue
        composite = "-" in headers.get(name, "")
        out[name] = None if composite or algorithm not in _COMPUTED or algorithm == "md5" else checksums([algorithm], body)[f"{_CHECKSUM}{algorithm}"]
    return out


def sign(method: str, url: str, host: str, headers: Mapping[str, str], body: bytes, credential: AwsSigV4) -> dict[str, str]:
    """The headers that sign a request (Authorization, X-Amz-Date,
    X-Amz-Content-SHA256 for S3: the body's SHA-256, and X-Amz-Security-Token with a
    session token). `url` is the request URL as sent (percent-encoding kept), `host` its Host
    header, `headers` the other headers that are signed (Content-Type, Content-MD5, the
    x-amz-* ones: callers pass what they forward unchanged)."""
    request = AWSRequest(method=method.upper(), url=url, data=body, headers={**headers, "host": host})
    # S3: always sign the payload hash (botocore would send UNSIGNED-PAYLOAD over HTTPS)
    request.context["client_config"] = types.SimpleNamespace(s3={"payload_signing_enabled": True})
    signer = S3SigV4Auth if credential.service == "s3" else SigV4Auth
    signer(Credentials(credential.access_key_id, credential.secret_access_key, credential.session_token),
           credential.service, credential.region).add_auth(request)
    wanted = ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token")
    return {name: request.headers[name] for name in wanted if name in request.headers}
