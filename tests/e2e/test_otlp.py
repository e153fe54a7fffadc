"""Trace stores: the real OpenTelemetry SDK exports spans through the real gateway
(`hoop serve --reverse`, the base-URL mode an exporter's `endpoint` uses) to a local
OTLP/HTTP collector (`FakeOpenAI`'s `/v1/traces`, which parses what it gets with
opentelemetry-proto). Protobuf, gzip-encoded protobuf and OTLP/JSON: planted values
in the named attributes and anywhere a no-path rule looks are masked; ids, every other
attribute and field arrive byte-identical; the recording and the audit line hold no
planted value; a body that cannot be decoded is refused, never forwarded."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests
from mitmproxy import io
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from hoop_addon.dev.gateway import Gateway, free_port
from hoop_addon.dev.upstream import FakeOpenAI
from hoop_addon.masking.otlp import parse_json, parse_protobuf, to_dict
from tests.conftest import write_policy
from tests.support.agents import assert_absent, header, recorded_bytes
from tests.support.idp import LocalIdP

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256, ES256]
identity:
  token_sources: [authorization]
masking:
  - name: genai
    direction: request
    otlp_attributes: [gen_ai.input.messages, user.email, "llm.input_messages.*"]
    detectors: [email, payment_card]
  - name: ssn-anywhere
    direction: request
    detectors: [us_ssn, aws_access_key_id]
routes:
  - name: traces
    match: {{hosts: [localhost], paths: [/v1/traces, /v1/logs], methods: [POST]}}
    allow: {{groups: [agents]}}
    masking: [genai, ssn-anywhere]
  - name: metrics             # no block rule reads its bodies: masking alone refuses protobuf
    match: {{hosts: [localhost], paths: [/v1/metrics], methods: [POST]}}
    allow: {{groups: [agents]}}
    masking: [ssn-anywhere]
block:
  - name: no-keys-in-traces
    when:
      routes: [traces]
      json:
        - path: "$..attributes[?@.key=='gen_ai.input.messages'].value.stringValue"
          matches: 'BEGIN [A-Z ]*PRIVATE KEY'
    reason: a private key in a conversation trace
"""

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trace_agent.py"
EMAIL, CARD, SSN = "jane.doe@example.com", "4111 1111 1111 1111", "078-05-1120"
PLANTED = (EMAIL, CARD, SSN, "ops@corp.example")
MASKED_KEYS = {"gen_ai.input.messages", "user.email", "llm.input_messages.0.message.content"}
CONVERSATION = [
    {"role": "system", "content": "You help with billing."},
    {"role": "user", "content": f"I am {EMAIL}, card {CARD}"},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki, upstream_server: FakeOpenAI) -> Iterator[tuple[Gateway, str]]:
    """`hoop serve --reverse <collector>@PORT`: the gateway, and the exporter's base URL."""
    work = tmp_path_factory.mktemp("otlp")
    port = free_port()
    gw = Gateway(write_policy(work / "rules", idp, POLICY), work, pki[0].cert_path, serve=True,
                 args=["--reverse", f"{upstream_server.url}@{port}"])
    gw.start()
    yield gw, f"http://127.0.0.1:{port}"
    gw.stop()


def _spans() -> tuple:
    """Spans as an instrumented agent makes them, with the real SDK: a GenAI chat span
    (the conversation as JSON in `gen_ai.input.messages`), an OpenInference LLM span, a
    child with an event and an error status; and the SDK's own encoding of them."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "billing-agent", "host.user": "clean-user"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("agent.instrumentation", "1.0")
    with tracer.start_as_current_span("chat gpt-4o") as chat:
        chat.set_attribute("gen_ai.input.messages", json.dumps(CONVERSATION))
        chat.set_attribute("gen_ai.request.model", "gpt-4o")
        chat.set_attribute("gen_ai.usage.input_tokens", 4111111111111111)  # Luhn-valid: a number stays a number
        chat.set_attribute("user.email", EMAIL)
        chat.set_attribute("contact.note", "write to ops@corp.example")  # not a named attribute: left as it is
        chat.set_attribute("tags", ["billing", "vip"])
        with tracer.start_as_current_span("llm") as llm:
            llm.set_attribute("llm.input_messages.0.message.content", f"card {CARD}")
            llm.add_event("retry", {"reason": f"ssn {SSN} rejected", "attempt": 2})
            llm.set_status(Status(StatusCode.ERROR, f"lookup of {SSN} failed"))
    provider.shutdown()
    spans = memory.get_finished_spans()
    return spans, encode_spans(spans)


def _attrs(span) -> dict:
    return {a.key: a.value for a in span.attributes}


def _check_masked(sent: ExportTraceServiceRequest, got: ExportTraceServiceRequest) -> None:
    """`got` is `sent` with exactly the planted values masked."""
    assert len(got.resource_spans) == len(sent.resource_spans) == 1
    assert got.resource_spans[0].resource == sent.resource_spans[0].resource
    sent_spans = sent.resource_spans[0].scope_spans[0].spans
    got_spans = got.resource_spans[0].scope_spans[0].spans
    assert got.resource_spans[0].scope_spans[0].scope == sent.resource_spans[0].scope_spans[0].scope
    assert [s.name for s in got_spans] == ["llm", "chat gpt-4o"]
    for s, g in zip(sent_spans, got_spans, strict=True):
        # ids, times, kind, links, order: byte-identical once the masked texts are set aside
        s, g = copy.deepcopy(s), copy.deepcopy(g)
        for span in (s, g):
            kept = [a for a in span.attributes if a.key not in MASKED_KEYS]
            del span.attributes[:]
            span.attributes.extend(kept)
            span.status.message = ""
            for event in span.events:
                del event.attributes[:]
        assert g.SerializeToString() == s.SerializeToString()
    llm, chat = (_attrs(s) for s in got_spans)
    assert chat["user.email"].string_value == "[REDACTED:EMAIL]"
    messages = json.loads(chat["gen_ai.input.messages"].string_value)
    assert messages == [CONVERSATION[0], {"role": "user", "content": "I am [REDACTED:EMAIL], card [REDACTED:CARD]"}]
    assert chat["contact.note"].string_value == "write to ops@corp.example"
    assert chat["gen_ai.usage.input_tokens"].int_value == 4111111111111111
    assert llm["llm.input_messages.0.message.content"].string_value == "card [REDACTED:CARD]"
    event = got_spans[0].events[0]
    assert {a.key: a.value for a in event.attributes}["reason"].string_value == "ssn [REDACTED:SSN] rejected"
    assert {a.key: a.value for a in event.attributes}["attempt"].int_value == 2
    assert got_spans[0].status.message == "lookup of [REDACTED:SSN] failed"


def _recorded_requests(gw: Gateway) -> list[bytes]:
    """The decoded request bodies of every recorded flow."""
    bodies = []
    for part in sorted(gw.recordings.glob("*.mitm")):
        with part.open("rb") as f:
            bodies += [flow.request.get_content() for flow in io.FlowReader(f).stream()]
    return bodies


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_sdk_protobuf_export_is_masked_and_stays_valid(base, upstream: FakeOpenAI, idp: LocalIdP, compression) -> None:
    gw, url = base
    token = idp.mint(groups=["agents"])
    spans, sent = _spans()
    before = len(gw.audit())
    exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", headers={"Authorization": f"Bearer {token}"},
                                compression=compression, timeout=10)
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    exporter.shutdown()

    (received,) = upstream.received
    assert received.path == "/v1/traces"
    assert header(received, "Content-Type") == "application/x-protobuf"
    body = received.body
    if compression is Compression.Gzip:
        assert header(received, "Content-Encoding") == "gzip"
        body = gzip.decompress(body)
    got = parse_protobuf(body, ExportTraceServiceRequest)  # valid, no unknown fields
    _check_masked(sent, got)
    assert_absent(body, PLANTED[:3])
    assert all(token not in v for _, v in received.headers)

    entry = gw.wait_audit(before + 1)[-1]
    assert entry["decision"]["outcome"] == "allow"
    counts = {m["rule"]: (m["count"], m["otlp"]) for m in entry["masked"]}
    assert counts == {"genai": (4, {"spans": 2, "attributes": 3}), "ssn-anywhere": (2, {"spans": 1, "attributes": 1})}
    with Path(entry["recording"]).open("rb") as f:
        (flow,) = [x for x in io.FlowReader(f).stream() if x.id == entry["flow"]]
    assert parse_protobuf(flow.request.get_content(), ExportTraceServiceRequest) == got  # as forwarded
    for data in (*_recorded_requests(gw), recorded_bytes(gw)):
        assert_absent(data, (*PLANTED[:3], token))


def test_otlp_json_export_is_masked_like_protobuf(base, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """The same spans as OTLP/JSON (hex ids): the same rules mask the same values."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    _, sent = _spans()
    before = len(gw.audit())
    body = orjson.dumps(to_dict(sent))
    reply = requests.post(f"{url}/v1/traces", data=body, timeout=10,
                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    assert reply.status_code == 200, reply.text
    (received,) = upstream.received
    assert_absent(received.body, PLANTED[:3])
    got = parse_json(orjson.loads(received.body), ExportTraceServiceRequest)
    _check_masked(sent, got)
    entry = gw.wait_audit(before + 1)[-1]
    assert {m["rule"]: m["otlp"] for m in entry["masked"]} == {"genai": {"spans": 2, "attributes": 3},
                                                               "ssn-anywhere": {"spans": 1, "attributes": 1}}
    for data in (*_recorded_requests(gw), recorded_bytes(gw)):
        assert_absent(data, PLANTED[:3])


def test_a_block_rule_reads_the_protobuf_export_as_otlp_json(base, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    gw, url = base
    token = idp.mint(groups=["agents"])
    before = len(gw.audit())
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("agent").start_as_current_span("chat") as span:
        span.set_attribute("gen_ai.input.messages", json.dumps([{"role": "user", "content": "-----BEGIN RSA PRIVATE KEY----- x"}]))
    exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.FAILURE
    exporter.shutdown()
    assert upstream.received == []
    entry = gw.wait_audit(before + 1)[-1]
    assert entry["decision"]["outcome"] == "deny" and entry["decision"]["rule"] == "no-keys-in-traces"


AWS_KEY, BYTES_EMAIL = "AKIAIOSFODNN7EXAMPLE", "bytes.user@example.org"  # not an email the other tests look for


def _bytes_export(value: bytes, named: bytes | None = None) -> ExportTraceServiceRequest:
    """The SDK's spans with `bytesValue` attributes: `blob` = `value` (only a no-path
    rule reads it) on the first span, and `user.email` (a named attribute) = `named`
    (default `value`) on the second."""
    _, sent = _spans()
    spans = sent.resource_spans[0].scope_spans[0].spans
    spans[0].attributes.append(KeyValue(key="blob", value=AnyValue(bytes_value=value)))
    spans[1].attributes.append(KeyValue(key="user.email", value=AnyValue(bytes_value=value if named is None else named)))
    return sent


@pytest.mark.parametrize("encoding", ["protobuf", "gzip", "json"])
def test_a_bytes_value_is_masked_as_its_text(base, upstream: FakeOpenAI, idp: LocalIdP, encoding) -> None:
    """A UTF-8 `bytesValue` holding an AWS key and an email is masked at the collector
    (as bytes; base64 in OTLP/JSON) and in the recording, by the named-attribute rule
    and by the no-path rule."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    sent = _bytes_export(f"key {AWS_KEY} for {BYTES_EMAIL}".encode())
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-protobuf"}
    body = sent.SerializeToString()
    if encoding == "gzip":
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    elif encoding == "json":
        body, headers["Content-Type"] = orjson.dumps(to_dict(sent)), "application/json"
    before = len(gw.audit())
    reply = requests.post(f"{url}/v1/traces", data=body, headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    (received,) = upstream.received
    got_body = gzip.decompress(received.body) if encoding == "gzip" else received.body
    got = (parse_json(orjson.loads(got_body), ExportTraceServiceRequest) if encoding == "json"
           else parse_protobuf(got_body, ExportTraceServiceRequest))
    spans = got.resource_spans[0].scope_spans[0].spans
    assert _attrs(spans[0])["blob"].bytes_value == f"key [REDACTED:AWS_KEY] for {BYTES_EMAIL}".encode()  # us_ssn, aws only
    assert _attrs(spans[1])["user.email"].bytes_value == b"key [REDACTED:AWS_KEY] for [REDACTED:EMAIL]"
    entry = gw.wait_audit(before + 1)[-1]
    assert entry["decision"]["outcome"] == "allow"
    for data in (*_recorded_requests(gw), recorded_bytes(gw), got_body):
        assert_absent(data, (AWS_KEY, base64.b64encode(f"key {AWS_KEY}".encode()).decode()[:16]))
    recorded = [b for b in _recorded_requests(gw) if b"blob" in b]
    assert recorded and all(AWS_KEY.encode() not in b for b in recorded)


def test_a_bytes_value_that_is_not_utf8_is_refused_under_a_whole_body_rule(base, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """`blob` holds bytes that are not UTF-8: the no-path rule cannot inspect them, so the
    export is refused (422) naming the attribute, never its value; nothing is forwarded."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    before = len(gw.audit())
    body = _bytes_export(b"\xff" + SSN.encode(), named=b"nobody").SerializeToString()
    reply = requests.post(f"{url}/v1/traces", data=body, timeout=10,
                          headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {token}"})
    assert reply.status_code == 422, reply.text
    assert "'blob' holds a bytes value that is not UTF-8" in reply.text and SSN not in reply.text
    assert upstream.received == []
    entry = gw.wait_audit(before + 1)[-1]
    assert entry["decision"]["outcome"] == "deny" and entry["decision"]["reason"] == "unmaskable_request"
    assert_absent(recorded_bytes(gw), (SSN,))


@pytest.mark.parametrize(("path", "ctype", "body", "status"), [
    pytest.param("/v1/traces", "application/x-protobuf", b"\x0a\x30" + EMAIL.encode(), 422, id="protobuf-that-does-not-parse"),
    pytest.param("/v1/traces", "application/json", b'{"resource_spans": [{"note": "%s"}]}' % EMAIL.encode(), 422,
                 id="json-that-is-not-otlp"),
    pytest.param("/v1/metrics", "application/x-protobuf", b"\x0a\x02" + EMAIL.encode(), 415, id="protobuf-not-traces-or-logs"),
])
def test_bodies_the_codec_cannot_read_are_refused(base, upstream: FakeOpenAI, idp: LocalIdP, path, ctype, body, status) -> None:
    gw, url = base
    token = idp.mint(groups=["agents"])
    reply = requests.post(f"{url}{path}", data=body, timeout=10,
                          headers={"Content-Type": ctype, "Authorization": f"Bearer {token}"})
    assert reply.status_code == status, reply.text
    assert EMAIL not in reply.text
    assert upstream.received == []  # nothing was forwarded
    assert_absent(recorded_bytes(gw), (EMAIL,))


def test_the_example_agent_exports_through_the_gateway_by_otel_environment(base, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """README, "Governing trace stores": `examples/trace_agent.py`, configured only by
    OpenTelemetry's environment variables (gzip), gets its spans masked into the collector."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{token}",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}
    run = subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(run.stdout) == {"exported": "SUCCESS", "spans": 2}, run.stderr
    (received,) = upstream.received
    got = parse_protobuf(gzip.decompress(received.body), ExportTraceServiceRequest)
    attrs = {a.key: a.value.string_value for s in got.resource_spans[0].scope_spans[0].spans for a in s.attributes}
    assert attrs["user.email"] == "[REDACTED:EMAIL]"
    assert json.loads(attrs["gen_ai.input.messages"]) == [{"role": "user", "content": "I am [REDACTED:EMAIL], card [REDACTED:CARD]"}]
