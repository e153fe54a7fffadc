"""S3 trace buckets with the gateway holding the AWS keys (`aws_sigv4` credential):
boto3 holding no credentials (UNSIGNED) goes through the real gateway's forward proxy
to moto's S3 with IAM authentication on, behind a layer that checks, as real S3 does,
that the payload hash and every checksum header match the body that arrived
(`tests.support.s3`). Plain HTTP (boto3 sends a CRC32 header) and HTTPS (boto3 sends
`aws-chunked` with a trailing checksum): put, get back with checksum validation on,
list, multipart upload; a read held for a reviewer (access review) and then masked and
recorded; a wrong gateway-held secret is refused by moto; the agent never sees the keys;
the recordings hold no secret and no signature."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import botocore
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from hoop_addon.dev.gateway import Gateway
from tests.conftest import write_policy
from tests.support.agents import assert_absent, recorded_bytes
from tests.support.idp import LocalIdP
from tests.support.s3 import CheckedS3

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256, ES256]
identity:
  token_sources: [proxy_password]
masking:
  - name: pii
    detectors: [email, payment_card]
approvals:
  - name: trace-read-review
    when: {{routes: [reviewed-reads]}}
    approvers: {{groups: [reviewers]}}
    timeout: 60
    mode: hold
routes:
  - name: reviewed-reads           # reads of these buckets wait for a reviewer
    match: {{hosts: [localhost], paths: ["/reviewed-*"], methods: [GET]}}
    allow: {{groups: [agents]}}
    masking: [pii]
    credential: &aws-keys            # the same keys on both routes
      aws_sigv4:
        access_key_id: ${{HOOP_TEST_AWS_KEY_ID}}
        secret_access_key: ${{HOOP_TEST_AWS_SECRET}}
        region: us-east-1
        service: s3
  - name: trace-bucket
    match: {{hosts: [localhost]}}
    allow: {{groups: [agents]}}
    masking: [pii]
    credential: *aws-keys
"""
EMAIL, CARD = "jane.doe@example.com", "4111 1111 1111 1111"
TRACE = {"trace_id": "t-1", "steps": [{"role": "user", "content": f"I am {EMAIL}, card {CARD}"},
                                     {"role": "tool", "content": "lookup ok"}]}
MASKED = {"trace_id": "t-1", "steps": [{"role": "user", "content": "I am [REDACTED:EMAIL], card [REDACTED:CARD]"},
                                      {"role": "tool", "content": "lookup ok"}]}


@pytest.fixture(scope="module", params=["http", "https"])
def s3(request, pki) -> Iterator[tuple[CheckedS3, str, str]]:
    """The checked S3 (plain HTTP or HTTPS with the test CA), an IAM user's key pair, IAM on."""
    ca, cert, key = pki
    tls = request.param == "https"
    with CheckedS3(cert, key) if tls else CheckedS3() as server:
        key_id, secret = server.user(f"gateway-{request.param}", verify=str(ca.cert_path) if tls else True)
        server.authenticate()
        yield server, key_id, secret


def _gateway(tmp_path_factory, idp: LocalIdP, pki, key_id: str, secret: str) -> Gateway:
    work = tmp_path_factory.mktemp("s3")
    gw = Gateway(write_policy(work / "rules", idp, POLICY), work, pki[0].cert_path, serve=True,
                 env={"HOOP_TEST_AWS_KEY_ID": key_id, "HOOP_TEST_AWS_SECRET": secret})
    return gw.start()


@pytest.fixture(scope="module")
def gateway_s3(s3, tmp_path_factory, idp: LocalIdP, pki) -> Iterator[tuple[Gateway, CheckedS3, str, str]]:
    server, key_id, secret = s3
    gw = _gateway(tmp_path_factory, idp, pki, key_id, secret)
    yield gw, server, key_id, secret
    gw.stop()


def _agent(gw: Gateway, server: CheckedS3, token: str):
    """boto3 as an agent: no credentials at all, the gateway as its proxy."""
    proxy = gw.proxy(token)
    config = Config(signature_version=botocore.UNSIGNED, proxies={"http": proxy, "https": proxy},
                    s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", config=config, verify=str(gw.ca_cert))


def _secrets_absent(gw: Gateway, server: CheckedS3, key_id: str, secret: str) -> None:
    signatures = [a.headers["authorization"].rsplit("Signature=", 1)[-1] for a in server.received if "authorization" in a.headers]
    assert signatures
    assert_absent(recorded_bytes(gw), (secret, key_id, EMAIL, CARD, *signatures))


def test_put_get_list_through_the_gateway(gateway_s3, idp: LocalIdP) -> None:
    gw, server, key_id, secret = gateway_s3
    server.clear()
    agent = _agent(gw, server, idp.mint(groups=["agents"]))
    bucket = f"traces-{server.scheme}"
    agent.create_bucket(Bucket=bucket)
    put = agent.put_object(Bucket=bucket, Key="run-1.json", Body=json.dumps(TRACE).encode(), ContentType="application/json")
    assert "ResponseMetadata" in put
    (upload,) = [a for a in server.received if a.method == "PUT" and a.path.startswith(f"/{bucket}/run-1.json")]
    assert upload.problems == () and json.loads(upload.body) == MASKED  # masked, de-chunked, hash and checksum match
    if server.scheme == "https":
        assert "x-amz-checksum-crc32" in upload.headers  # the trailer boto3 sent, now a header for the masked body
    got = agent.get_object(Bucket=bucket, Key="run-1.json", ChecksumMode="ENABLED")
    assert json.loads(got["Body"].read()) == MASKED  # read back, checksum validated: no FlexibleChecksumError
    listed = agent.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == ["run-1.json"]
    assert all(a.problems == () for a in server.received)
    _secrets_absent(gw, server, key_id, secret)


def test_multipart_upload_is_masked_part_by_part(gateway_s3, idp: LocalIdP) -> None:
    gw, server, key_id, secret = gateway_s3
    agent = _agent(gw, server, idp.mint(groups=["agents"]))
    bucket = f"big-{server.scheme}"
    agent.create_bucket(Bucket=bucket)
    first = (f"step by {EMAIL}\n" + "x" * 1023 + "\n").encode() * 5200  # > 5 MiB once masked
    last = f"done, card {CARD}\n".encode()
    upload = agent.create_multipart_upload(Bucket=bucket, Key="run.log")["UploadId"]
    parts = []
    for number, body in enumerate((first, last), start=1):
        etag = agent.upload_part(Bucket=bucket, Key="run.log", UploadId=upload, PartNumber=number, Body=body)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    agent.complete_multipart_upload(Bucket=bucket, Key="run.log", UploadId=upload, MultipartUpload={"Parts": parts})
    data = agent.get_object(Bucket=bucket, Key="run.log")["Body"].read()
    assert data.count(b"[REDACTED:EMAIL]") == 5200 and b"done, card [REDACTED:CARD]" in data
    assert_absent(data, (EMAIL, CARD))
    assert all(a.problems == () for a in server.received)


def test_an_object_written_around_the_gateway_is_masked_on_read(gateway_s3, idp: LocalIdP, pki) -> None:
    """GetObject responses are masked like any response. (moto sends no stored
    x-amz-checksum-* back on GET, so their recomputation for a masked body is checked in
    tests/unit/stages/test_aws.py.)"""
    gw, server, key_id, secret = gateway_s3
    direct = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=key_id,
                          aws_secret_access_key=secret, verify=str(pki[0].cert_path),
                          config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"))
    bucket = f"legacy-{server.scheme}"
    direct.create_bucket(Bucket=bucket)
    direct.put_object(Bucket=bucket, Key="old.json", Body=json.dumps(TRACE).encode(), ContentType="application/json")
    agent = _agent(gw, server, idp.mint(groups=["agents"]))
    got = agent.get_object(Bucket=bucket, Key="old.json", ChecksumMode="ENABLED")
    assert json.loads(got["Body"].read()) == MASKED
    assert_absent(repr(got["ResponseMetadata"]), (secret, key_id))


def test_presigned_urls_are_refused(gateway_s3, idp: LocalIdP) -> None:
    gw, server, _, _ = gateway_s3
    server.clear()
    proxy = gw.proxy(idp.mint(groups=["agents"]))
    reply = requests.get(f"{server.url}/traces/run-1.json?X-Amz-Credential=AKIA&X-Amz-Signature=abc", timeout=10,
                         proxies={"http": proxy, "https": proxy}, verify=str(gw.ca_cert))
    assert reply.status_code == 400 and reply.json()["error"] == "presigned_url"
    assert server.received == []


def test_a_wrong_gateway_held_secret_is_refused_by_s3(s3, tmp_path_factory, idp: LocalIdP, pki) -> None:
    server, key_id, _ = s3
    gw = _gateway(tmp_path_factory, idp, pki, key_id, "not-the-secret-key-0123456789")
    try:
        agent = _agent(gw, server, idp.mint(groups=["agents"]))
        with pytest.raises(ClientError) as caught:
            agent.list_objects_v2(Bucket="traces")
        assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    finally:
        gw.stop()


def test_a_read_of_a_reviewed_bucket_waits_for_a_reviewer_and_comes_back_masked(gateway_s3, idp: LocalIdP, pki) -> None:
    """Access review on reads: a GetObject on the `reviewed-reads` route is held until a
    reviewer approves it through the control API; the object then reaches the agent
    masked, and the recording keeps the masked read with its approval."""
    import concurrent.futures

    import httpx
    from mitmproxy import io

    from tests.e2e.test_approvals import api, pending, request_entry

    gw, server, key_id, secret = gateway_s3
    direct = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=key_id,
                          aws_secret_access_key=secret, verify=str(pki[0].cert_path),
                          config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"))
    bucket = f"reviewed-{server.scheme}"
    direct.create_bucket(Bucket=bucket)
    direct.put_object(Bucket=bucket, Key="run-7.json", Body=json.dumps(TRACE).encode(), ContentType="application/json")
    server.clear()
    agent = _agent(gw, server, idp.mint(subject="trace-reader", groups=["agents"]))
    alice = idp.mint(subject="alice", groups=["reviewers"])

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        read = pool.submit(lambda: agent.get_object(Bucket=bucket, Key="run-7.json")["Body"].read())
        (item,) = pending(gw, alice)
        assert not any(a.method == "GET" for a in server.received)  # held: S3 has not been asked
        assert item["rule"] == "trace-read-review" and item["request"]["url"].endswith(f"/{bucket}/run-7.json")
        assert api(gw, "POST", f"/approvals/{item['id']}/approve", alice, {"reason": "incident INC-7"}).status_code == 200
        data = read.result(timeout=30)

    assert json.loads(data) == MASKED
    entry = request_entry(gw, item["id"])
    approval = entry["decision"]["approval"]
    assert approval["status"] == "approved" and [(d["approver"], d["reason"]) for d in approval["decisions"]] == [
        ("alice", "incident INC-7")]
    with open(entry["recording"], "rb") as f:
        (flow,) = [x for x in io.FlowReader(f).stream() if x.request.path.startswith(f"/{bucket}/run-7.json")]
    assert json.loads(flow.response.content) == MASKED
    assert_absent(recorded_bytes(gw), (EMAIL, CARD, secret))
    assert httpx.get(f"{gw.control_url}/healthz").status_code == 200
