"""OTLP codec: protobuf <-> OTLP/JSON shape (hex ids), fail closed on bodies it cannot read."""

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from hoop_addon.masking.engine import MaskError
from hoop_addon.masking.otlp import decode_protobuf, encode_protobuf, validate_json

TRACE_ID = bytes(range(16))
SPAN_ID = bytes(range(8, 16))


def _traces() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="svc")))
    span = rs.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.parent_span_id = TRACE_ID, SPAN_ID, SPAN_ID[::-1]
    span.name, span.kind, span.start_time_unix_nano = "chat", 3, 1_700_000_000_000_000_001
    span.attributes.append(KeyValue(key="user.email", value=AnyValue(string_value="a@b.example")))
    span.attributes.append(KeyValue(key="n", value=AnyValue(int_value=-7)))
    link = span.links.add()
    link.trace_id, link.span_id = TRACE_ID[::-1], SPAN_ID
    return req


def test_traces_decode_to_otlp_json_shape_with_hex_ids():
    doc = decode_protobuf(_traces().SerializeToString(), "/v1/traces")
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == TRACE_ID.hex() and span["spanId"] == SPAN_ID.hex()
    assert span["parentSpanId"] == SPAN_ID[::-1].hex()
    assert span["links"][0]["traceId"] == TRACE_ID[::-1].hex()
    assert span["kind"] == 3  # OTLP/JSON: enums as integers
    assert span["attributes"][0] == {"key": "user.email", "value": {"stringValue": "a@b.example"}}


def test_round_trip_is_byte_identical_and_edits_land():
    body = _traces().SerializeToString()
    doc = decode_protobuf(body, "/v1/traces")
    assert encode_protobuf(doc, "/v1/traces") == body
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][0]["value"]["stringValue"] = "[MASKED]"
    out = ExportTraceServiceRequest.FromString(encode_protobuf(doc, "/v1/traces"))
    want = _traces()
    want.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.string_value = "[MASKED]"
    assert out == want


def test_logs_ids_are_hex():
    req = ExportLogsServiceRequest()
    rec = req.resource_logs.add().scope_logs.add().log_records.add()
    rec.trace_id, rec.span_id = TRACE_ID, SPAN_ID
    rec.body.string_value = "hello"
    body = req.SerializeToString()
    doc = decode_protobuf(body, "/v1/logs")
    got = doc["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    assert got["traceId"] == TRACE_ID.hex() and got["body"] == {"stringValue": "hello"}
    assert encode_protobuf(doc, "/v1/logs") == body


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x10short", b"{\"resourceSpans\": []}"])
def test_undecodable_protobuf_is_refused(body):
    with pytest.raises(MaskError):
        decode_protobuf(body, "/v1/traces")


def test_unknown_fields_are_refused():
    body = _traces().SerializeToString() + b"\xf8\x3f\x01"  # field 1023, varint: unknown
    with pytest.raises(MaskError, match="unknown"):
        decode_protobuf(body, "/v1/traces")


def test_otlp_json_is_validated():
    validate_json({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": TRACE_ID.hex()}]}]}]}, "/v1/traces")
    for bad in ([], {"resourceSpans": "x"}, {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}):
        with pytest.raises(MaskError):
            validate_json(bad, "/v1/traces")
    with pytest.raises(MaskError):
        decode_protobuf(b"", "/v1/metrics")
