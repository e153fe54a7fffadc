"""SigV4 signing routes (`aws_sigv4`): aws-chunked de-chunking, the checksums asked
for and recomputed, signatures botocore verifies, and a masked response's checksums."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Iterator

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from mitmproxy.test import taddons, tflow

from hoop_addon.masking.detectors import BUILTIN
from hoop_addon.policy.model import Credential, MaskRule, Names, Route
from hoop_addon.providers import aws
from hoop_addon.stages import hoop, mark_admitted
from hoop_addon.stages.credentials import AwsUnsign, InjectCredential
from hoop_addon.stages.mask import Mask
from tests.support.hooks import call

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEYS = aws.AwsSigV4("AKIDEXAMPLE", SECRET, "us-east-1", "s3")
PII = MaskRule("pii", frozenset({"request", "response"}), (), (BUILTIN["email"],))
ROUTE = Route("bucket", ("*",), ("/*",), frozenset(), Names(frozenset({"agents"})), Names(), (PII,),
              Credential("Authorization", "", secrets=(SECRET,), aws=KEYS))
BODY = b'{"note": "from jane.doe@example.com"}'
MASKED = b'{"note":"from [REDACTED:EMAIL]"}'


def crc32(body: bytes) -> str:
    return base64.b64encode((zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def chunked(payload: bytes, trailer: str) -> bytes:
    """`payload` as boto3 sends it over HTTPS: STREAMING-UNSIGNED-PAYLOAD-TRAILER."""
    return b"%x\r\n%s\r\n0\r\n%s\r\n\r\n" % (len(payload), payload, trailer.encode())


class TestPure:
    def test_dechunk_gives_payload_and_trailers(self):
        body = b"5;chunk-signature=ab\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:AAAA\r\n\r\n"
        assert aws.dechunk(body) == (b"hello world", {"x-amz-checksum-crc32": "AAAA"})

    @pytest.mark.parametrize("body", [b"", b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhel", b"5\r\nhello0\r\n\r\n", b"0\r\nnocolon\r\n"])
    def test_malformed_chunking_is_refused(self, body):
        with pytest.raises(aws.SigningError):
            aws.dechunk(body)

    def test_requested_checksums(self):
        headers = {"X-Amz-Trailer": "x-amz-checksum-crc32", "x-amz-sdk-checksum-algorithm": "SHA256",
                   "x-amz-checksum-mode": "ENABLED", "Content-MD5": "x"}
        assert aws.requested_checksums(headers, {"x-amz-checksum-crc32": "A"}) == {"crc32", "sha256", "md5"}
        assert aws.checksum_headers(headers) == ["x-amz-sdk-checksum-algorithm"]  # the mode is kept

    def test_checksums_of_the_masked_body(self):
        got = aws.checksums({"crc32", "sha256", "md5", "crc32c"}, MASKED)
        assert got == {"x-amz-checksum-crc32": crc32(MASKED),
                       "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(MASKED).digest()).decode(),
                       "Content-MD5": base64.b64encode(hashlib.md5(MASKED).digest()).decode()}  # crc32c: dropped

    def test_response_checksums_recomputed_or_dropped(self):
        headers = {"x-amz-checksum-crc32": "old", "x-amz-checksum-crc32c": "old", "x-amz-checksum-type": "FULL_OBJECT"}
        assert aws.response_checksums(headers, MASKED) == {"x-amz-checksum-crc32": crc32(MASKED), "x-amz-checksum-crc32c": None}
        assert aws.response_checksums({"x-amz-checksum-sha1": "abc-3"}, MASKED) == {"x-amz-checksum-sha1": None}  # composite

    def test_presigned(self):
        assert aws.presigned(["X-Amz-Signature", "x"]) and aws.presigned(["AWSAccessKeyId"]) and not aws.presigned(["prefix"])

    def test_signature_is_the_one_botocore_computes(self):
        """Same request, same clock: botocore's own S3 signer over the payload hash agrees."""
        url, host, headers = "https://s3.amazonaws.com/b/k%20x.json?x-id=PutObject", "s3.amazonaws.com", {"content-type": "application/json"}
        signed = aws.sign("PUT", url, host, headers, MASKED, KEYS)
        assert signed["X-Amz-Content-SHA256"] == hashlib.sha256(MASKED).hexdigest()
        want = AWSRequest(method="PUT", url=url, data=MASKED, headers={**headers, "host": host, "X-Amz-Date": signed["X-Amz-Date"]})
        signer = S3SigV4Auth(Credentials(KEYS.access_key_id, SECRET), "s3", "us-east-1")
        want.headers["X-Amz-Content-SHA256"] = hashlib.sha256(MASKED).hexdigest()
        want.context["timestamp"] = signed["X-Amz-Date"]
        string = signer.string_to_sign(want, signer.canonical_request(want))
        assert signed["Authorization"].endswith("Signature=" + signer.signature(string, want))
        assert SECRET not in repr(signed)


@pytest.fixture
def chain() -> Iterator[tuple[AwsUnsign, Mask, InjectCredential]]:
    mask = Mask()
    stages = (AwsUnsign(), mask, InjectCredential(mask))
    with taddons.context(*stages):
        yield stages


def _through(chain, flow):
    mark_admitted(flow, ROUTE)
    hoop(flow)["identity"] = {"subject": "agent"}
    for stage in chain:
        call(stage.request, flow)
    return flow


def test_an_aws_chunked_upload_is_dechunked_masked_checksummed_and_signed(chain):
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "PUT", "/traces/run.json"
    flow.request.headers.update({
        "Content-Encoding": "aws-chunked", "X-Amz-Content-SHA256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "X-Amz-Trailer": "x-amz-checksum-crc32", "X-Amz-Decoded-Content-Length": str(len(BODY)),
        "Authorization": "AWS4-HMAC-SHA256 Credential=AGENT/..., Signature=agent", "X-Amz-Security-Token": "agent-token",
        "Content-Type": "application/json",
    })
    flow.request.raw_content = chunked(BODY, f"x-amz-checksum-crc32:{crc32(BODY)}")
    _through(chain, flow)
    request = flow.request
    assert flow.response is None and request.raw_content == MASKED
    assert "Content-Encoding" not in request.headers and "X-Amz-Trailer" not in request.headers
    assert "X-Amz-Security-Token" not in request.headers and "agent" not in request.headers["Authorization"]
    assert request.headers["x-amz-checksum-crc32"] == crc32(MASKED)
    assert request.headers["X-Amz-Content-SHA256"] == hashlib.sha256(MASKED).hexdigest()
    assert request.headers["Content-Length"] == str(len(MASKED))
    assert "SignedHeaders=content-type;host;x-amz-checksum-crc32;x-amz-content-sha256;x-amz-date," in request.headers["Authorization"]


def test_a_masked_response_gets_its_checksum_recomputed(chain):
    unsign, mask, inject = chain
    flow = _through(chain, tflow.tflow())
    flow.response = tflow.tresp(content=BODY)
    flow.response.headers.update({"Content-Type": "application/json", "x-amz-checksum-crc32": crc32(BODY),
                                  "x-amz-checksum-crc64nvme": "AAAAAAAAAAA="})
    call(mask.response, flow)
    inject.response(flow)
    assert flow.response.content == MASKED
    assert flow.response.headers["x-amz-checksum-crc32"] == crc32(MASKED)
    assert "x-amz-checksum-crc64nvme" not in flow.response.headers


def test_a_response_masked_as_it_streams_loses_its_checksums(chain):
    """An NDJSON object is masked as it streams: its masked bytes are not known when the
    headers go, so no `x-amz-checksum-*` (or Content-MD5) can vouch for them: dropped."""
    unsign, mask, inject = chain
    flow = _through(chain, tflow.tflow())
    flow.response = tflow.tresp(content=b"")
    flow.response.headers.update({"Content-Type": "application/x-ndjson", "x-amz-checksum-crc32": crc32(BODY),
                                  "Content-MD5": "x", "x-amz-checksum-mode": "ENABLED"})
    mask.responseheaders(flow)
    inject.responseheaders(flow)
    assert callable(flow.response.stream)
    assert "x-amz-checksum-crc32" not in flow.response.headers and "Content-MD5" not in flow.response.headers
    assert flow.response.headers["x-amz-checksum-mode"] == "ENABLED"  # names no algorithm, vouches for nothing


@pytest.mark.parametrize(("path", "body", "reason"), [
    ("/b/k?X-Amz-Credential=A&X-Amz-Signature=s", b"", "presigned_url"),
    ("/b/k", b"5\r\nhel", "unsignable_request"),
])
def test_refusals(chain, path, body, reason):
    flow = tflow.tflow()
    flow.request.path = path
    flow.request.headers["Content-Encoding"] = "aws-chunked"
    flow.request.raw_content = body
    _through(chain, flow)
    assert flow.response.status_code == 400 and reason in flow.response.text
