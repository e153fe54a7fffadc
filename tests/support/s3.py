"""A local S3 for the SigV4 tests: moto's server app, served as `ThreadedMotoServer`
serves it (werkzeug, moto's request handler), with IAM authentication on (a bad SigV4
signature is refused), behind a checking layer that does what moto does not and real
S3 does: the X-Amz-Content-SHA256, Content-MD5 and every `x-amz-checksum-*` header
must match the body that arrived (else 400, as S3's XAmzContentSHA256Mismatch /
BadDigest), and an `aws-chunked` body is refused (the gateway must have de-chunked it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from moto import settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

_DIGESTS = {
    "crc32": lambda b: (zlib.crc32(b) & 0xFFFFFFFF).to_bytes(4, "big"),
    "sha1": lambda b: hashlib.sha1(b).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
}


@dataclass(frozen=True)
class Arrived:
    """One request as the S3 server received it: method, path (with query), headers
    (lower-case names), body, and what the checking layer found wrong (empty: nothing)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    problems: tuple[str, ...]


def problems(headers: dict[str, str], body: bytes) -> list[str]:
    """What real S3 would refuse in a request's integrity headers (lower-case names)."""
    found = []
    declared = headers.get("x-amz-content-sha256")
    if declared is not None and declared not in ("UNSIGNED-PAYLOAD",) and declared != hashlib.sha256(body).hexdigest():
        found.append("x-amz-content-sha256 does not match the body")
    if "aws-chunked" in headers.get("content-encoding", "") or (declared or "").startswith("STREAMING-"):
        found.append("aws-chunked body")
    if (md5 := headers.get("content-md5")) is not None and md5 != base64.b64encode(hashlib.md5(body).digest()).decode():
        found.append("content-md5 does not match the body")
    for name, value in headers.items():
        algorithm = name.removeprefix("x-amz-checksum-")
        if name.startswith("x-amz-checksum-") and algorithm not in ("type", "mode"):
            if algorithm not in _DIGESTS:
                found.append(f"{name} cannot be checked here")
            elif value != base64.b64encode(_DIGESTS[algorithm](body)).decode():
                found.append(f"{name} does not match the body")
    return found


class CheckedS3:
    """The server (start/stop as a context manager). `url` is its base URL; over
    HTTPS with `cert`/`key`. `received` lists every request (`Arrived`), oldest first.
    `user(name)` creates an IAM user allowed s3:* and returns its (key id, secret)
    before IAM authentication is switched on (`authenticate()`)."""

    def __init__(self, cert: Path | None = None, key: Path | None = None) -> None:
        self.app = DomainDispatcherApplication(create_backend_app)
        self.received: list[Arrived] = []
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", 0, self._checked, True, request_handler=MotoRequestHandler,
                                   ssl_context=(str(cert), str(key)) if cert else None)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.scheme = "https" if cert else "http"
        self._saved = (settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count)

    @property
    def url(self) -> str:
        return f"{self.scheme}://localhost:{self._server.server_port}"

    def __enter__(self) -> CheckedS3:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._thread.join()
        settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = self._saved

    def user(self, name: str, verify: str | bool = True) -> tuple[str, str]:
        """An IAM user allowed every S3 action, with an access key: (key id, secret).
        Called before `authenticate()` (it is itself unauthenticated)."""
        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1", verify=verify,
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def authenticate(self) -> None:
        """From now on every request needs a valid SigV4 signature of a known key."""
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0

    def clear(self) -> None:
        with self._lock:
            self.received.clear()

    def _checked(self, environ: dict[str, Any], start_response: Any) -> Any:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        path = environ.get("PATH_INFO", "") + (f"?{environ['QUERY_STRING']}" if environ.get("QUERY_STRING") else "")
        found = tuple(problems(headers, body))
        with self._lock:
            self.received.append(Arrived(environ["REQUEST_METHOD"], path, headers, body, found))
        if found:
            payload = f"<Error><Code>BadDigest</Code><Message>{'; '.join(found)}</Message></Error>".encode()
            start_response("400 Bad Request", [("Content-Type", "application/xml"), ("Content-Length", str(len(payload)))])
            return [payload]
        environ["wsgi.input"] = io.BytesIO(body)
        return self.app(environ, start_response)
