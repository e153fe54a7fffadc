"""OTLP/HTTP export bodies: protobuf <-> OTLP/JSON shape (hex ids), masked in that shape
for both encodings; fail closed on bodies the codec cannot read."""

from __future__ import annotations

import base64
import copy
import dataclasses
import random

import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from hoop_addon.masking.body import UnsupportedMedia, mask_body
from hoop_addon.masking.engine import MaskError
from hoop_addon.masking.otlp import message_for, parse_json, parse_protobuf, to_dict
from tests.support.masking import PII, rule

def decode_protobuf(body: bytes, cls) -> dict:
    return to_dict(parse_protobuf(body, cls))


def encode_protobuf(doc: dict, cls) -> bytes:
    return parse_json(copy.deepcopy(doc), cls).SerializeToString()


TRACE_ID = bytes(range(16))
SPAN_ID = bytes(range(8, 16))
PROTOBUF = "application/x-protobuf"
MASK = "[REDACTED:EMAIL]"


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


class TestCodec:
    def test_traces_decode_to_otlp_json_shape_with_hex_ids(self):
        doc = decode_protobuf(_traces().SerializeToString(), ExportTraceServiceRequest)
        span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        assert span["traceId"] == TRACE_ID.hex() and span["spanId"] == SPAN_ID.hex()
        assert span["parentSpanId"] == SPAN_ID[::-1].hex()
        assert span["links"][0]["traceId"] == TRACE_ID[::-1].hex()
        assert span["kind"] == 3  # OTLP/JSON: enums as integers
        assert span["attributes"][0] == {"key": "user.email", "value": {"stringValue": "a@b.example"}}

    def test_round_trip_is_byte_identical_and_edits_land(self):
        body = _traces().SerializeToString()
        doc = decode_protobuf(body, ExportTraceServiceRequest)
        assert encode_protobuf(doc, ExportTraceServiceRequest) == body
        doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][0]["value"]["stringValue"] = "[MASKED]"
        out = ExportTraceServiceRequest.FromString(encode_protobuf(doc, ExportTraceServiceRequest))
        want = _traces()
        want.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.string_value = "[MASKED]"
        assert out == want

    def test_logs_ids_are_hex(self):
        req = ExportLogsServiceRequest()
        rec = req.resource_logs.add().scope_logs.add().log_records.add()
        rec.trace_id, rec.span_id = TRACE_ID, SPAN_ID
        rec.body.string_value = "hello"
        body = req.SerializeToString()
        doc = decode_protobuf(body, ExportLogsServiceRequest)
        got = doc["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
        assert got["traceId"] == TRACE_ID.hex() and got["body"] == {"stringValue": "hello"}
        assert encode_protobuf(doc, ExportLogsServiceRequest) == body

    @pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x10short", b"{\"resourceSpans\": []}"])
    def test_undecodable_protobuf_is_refused(self, body):
        with pytest.raises(MaskError):
            decode_protobuf(body, ExportTraceServiceRequest)

    def test_unknown_fields_are_refused(self):
        body = _traces().SerializeToString() + b"\xf8\x3f\x01"  # field 1023, varint: unknown
        with pytest.raises(MaskError, match="unknown"):
            decode_protobuf(body, ExportTraceServiceRequest)

    @pytest.mark.parametrize(("path", "part", "want"), [
        ("/v1/traces", "request", "ExportTraceServiceRequest"),
        ("/api/public/otel/v1/traces?x=1", "request", "ExportTraceServiceRequest"),
        ("/v1/traces", "response", "ExportTraceServiceResponse"),
        ("/v1/logs", "request", "ExportLogsServiceRequest"),
        ("/v1/metrics", "request", None), ("/v1/tracesx", "request", None), (None, "request", None),
    ])
    def test_message_by_path(self, path, part, want):
        found = message_for(path, part)
        assert (found.DESCRIPTOR.name if found else None) == want


# A seeded generator of export requests: every place a string can be, each string planted
# with an email or not, and the request as masking must leave it, built side by side.
_KINDS = ("plain", "pii", "json-pii", "json-plain")


class _Gen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.seen: set[str] = set()

    def text(self, where: str) -> tuple[str, str]:
        """(the value sent, the value masking must forward)."""
        kind = self.rng.choice(_KINDS)
        self.seen.add(f"{where}:{kind}")
        self.n += 1
        email = f"user{self.n}@pii.example"
        if kind == "plain":
            return f"value {self.n} 1700000000000000001", f"value {self.n} 1700000000000000001"
        if kind == "pii":
            return f"from {email} ok", f"from {MASK} ok"
        doc = [{"role": "user", "content": f"mail {email}" if kind == "json-pii" else "hi"}, {"n": self.n}]
        want = [{"role": "user", "content": f"mail {MASK}" if kind == "json-pii" else "hi"}, {"n": self.n}]
        return orjson.dumps(doc).decode(), orjson.dumps(want).decode()

    def value(self, where: str, depth: int = 0) -> tuple[AnyValue, AnyValue]:
        choice = self.rng.randrange(6 if depth < 2 else 4)
        if choice == 0:
            return AnyValue(int_value=4111111111111111), AnyValue(int_value=4111111111111111)  # a Luhn-valid number
        if choice == 1:
            return AnyValue(double_value=1.5), AnyValue(double_value=1.5)
        if choice == 2:  # UTF-8 bytes are masked as the text they hold
            self.seen.add(f"{where}:bytes")
            self.n += 1
            return AnyValue(bytes_value=f"jane{self.n}@pii.example".encode()), AnyValue(bytes_value=MASK.encode())
        if choice == 3:
            sent, want = self.text(where)
            return AnyValue(string_value=sent), AnyValue(string_value=want)
        sent, want = AnyValue(), AnyValue()
        if choice == 4:
            self.seen.add(f"{where}:array")
            for _ in range(self.rng.randrange(1, 4)):
                a, b = self.value(where + "[]", depth + 1)
                sent.array_value.values.append(a)
                want.array_value.values.append(b)
        else:
            self.seen.add(f"{where}:kvlist")
            for i in range(self.rng.randrange(1, 4)):
                a, b = self.value(where + "{}", depth + 1)
                sent.kvlist_value.values.append(KeyValue(key=f"k{i}", value=a))
                want.kvlist_value.values.append(KeyValue(key=f"k{i}", value=b))
        return sent, want

    def attributes(self, sent, want, where: str) -> None:
        for i in range(self.rng.randrange(0, 4)):
            key = self.rng.choice(["gen_ai.input.messages", "user.email", "input.value", f"attr.{i}"])
            a, b = self.value(where)
            sent.append(KeyValue(key=key, value=a))
            want.append(KeyValue(key=key, value=b))

    def traces(self) -> tuple[ExportTraceServiceRequest, ExportTraceServiceRequest]:
        sent, want = ExportTraceServiceRequest(), ExportTraceServiceRequest()
        for _ in range(self.rng.randrange(1, 3)):
            rs, rw = sent.resource_spans.add(), want.resource_spans.add()
            self.attributes(rs.resource.attributes, rw.resource.attributes, "resource")
            for _ in range(self.rng.randrange(1, 3)):
                ss, sw = rs.scope_spans.add(), rw.scope_spans.add()
                ss.scope.name = sw.scope.name = "openinference.instrumentation"
                for _ in range(self.rng.randrange(1, 4)):
                    span, spw = ss.spans.add(), sw.spans.add()
                    ids = self.rng.randbytes(16), self.rng.randbytes(8), self.rng.randbytes(8)
                    for s in (span, spw):
                        s.trace_id, s.span_id, s.parent_span_id = ids
                        s.start_time_unix_nano, s.end_time_unix_nano = 1_700_000_000_000_000_001, 4111111111111111
                        s.kind = 3
                    span.name, spw.name = self.text("span.name")
                    span.status.message, spw.status.message = self.text("status.message")
                    span.status.code = spw.status.code = 2
                    self.attributes(span.attributes, spw.attributes, "span")
                    for _ in range(self.rng.randrange(0, 3)):
                        ev, evw = span.events.add(), spw.events.add()
                        ev.name, evw.name = self.text("event.name")
                        ev.time_unix_nano = evw.time_unix_nano = 1_700_000_000_000_000_002
                        self.attributes(ev.attributes, evw.attributes, "event")
                    for _ in range(self.rng.randrange(0, 2)):
                        link, lw = span.links.add(), spw.links.add()
                        link.trace_id = lw.trace_id = self.rng.randbytes(16)
                        link.span_id = lw.span_id = self.rng.randbytes(8)
                        self.attributes(link.attributes, lw.attributes, "link")
        return sent, want

    def logs(self) -> tuple[ExportLogsServiceRequest, ExportLogsServiceRequest]:
        sent, want = ExportLogsServiceRequest(), ExportLogsServiceRequest()
        rl, rw = sent.resource_logs.add(), want.resource_logs.add()
        self.attributes(rl.resource.attributes, rw.resource.attributes, "resource")
        sl, sw = rl.scope_logs.add(), rw.scope_logs.add()
        for _ in range(self.rng.randrange(1, 5)):
            rec, recw = sl.log_records.add(), sw.log_records.add()
            rec.trace_id = recw.trace_id = self.rng.randbytes(16)
            rec.time_unix_nano = recw.time_unix_nano = 1_700_000_000_000_000_003
            rec.severity_text = recw.severity_text = "INFO"
            a, b = self.value("log.body")
            rec.body.CopyFrom(a)
            recw.body.CopyFrom(b)
            self.attributes(rec.attributes, recw.attributes, "log")
        return sent, want


SEEDS = range(300)


def test_generated_exports_are_masked_everywhere_and_nothing_else_changes():
    """300 seeded trace and log exports, protobuf and OTLP/JSON: every planted email is
    masked wherever a string can be (attribute values of spans, events, links and resources,
    array and kvlist items, JSON in a string, log bodies, span and event names, status
    messages, UTF-8 bytes values); ids, numbers (Luhn-valid ones too), keys and order are
    unchanged."""
    coverage: set[str] = set()
    masked_exports = 0
    for seed in SEEDS:
        gen = _Gen(seed)
        for (sent, want), path in ((gen.traces(), "/v1/traces"), (gen.logs(), "/v1/logs")):
            cls = type(sent)
            body = sent.SerializeToString()
            new, records = mask_body(body, PROTOBUF, [PII], "request", path=path)
            got = body if new is None else new
            assert cls.FromString(got) == want, seed
            if new is None:
                assert sent == want
            else:
                masked_exports += 1
                assert b"@pii.example" not in got and records[0]["rule"] == "pii"
            # OTLP/JSON: the same rule, the same result
            jbody = orjson.dumps(decode_protobuf(body, cls))
            new, _ = mask_body(jbody, "application/json", [PII], "request", path=path)
            got = orjson.loads(jbody if new is None else new)
            assert encode_protobuf(got, cls) == want.SerializeToString(), seed
        coverage |= gen.seen
    places = {"span.name", "status.message", "event.name", "resource", "span", "event", "link", "log.body", "log"}
    want_cover = {f"{p}:{k}" for p in places for k in _KINDS} | {f"{p}:{k}" for p in places - {"span.name", "status.message", "event.name"} for k in ("array", "kvlist", "bytes")}
    assert want_cover <= coverage, sorted(want_cover - coverage)
    assert masked_exports > len(SEEDS)  # most exports held a planted value
    print(f"OTLP generator: {len(SEEDS)} seeds x 2 signals x 2 encodings, {len(coverage)} place/kind pairs covered, {masked_exports} masked exports")


def _span_doc(body: bytes) -> dict:
    return decode_protobuf(body, ExportTraceServiceRequest)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]


class TestRules:
    def test_a_jsonpath_rule_selects_one_attribute_in_both_encodings(self):
        req = _traces()
        span = req.resource_spans[0].scope_spans[0].spans[0]
        span.attributes.append(KeyValue(key="other", value=AnyValue(string_value="c@d.example")))
        only = rule("$..spans[*].attributes[?@.key=='user.email'].value.stringValue")
        new, records = mask_body(req.SerializeToString(), PROTOBUF, [only], "request", path="/v1/traces")
        attrs = {a["key"]: a["value"] for a in _span_doc(new)["attributes"]}
        assert attrs["user.email"] == {"stringValue": MASK} and attrs["other"] == {"stringValue": "c@d.example"}
        assert records[0]["otlp"] == {"spans": 1, "attributes": 1}
        jbody = orjson.dumps(decode_protobuf(req.SerializeToString(), ExportTraceServiceRequest))
        jnew, _ = mask_body(jbody, "application/json; charset=utf-8", [only], "request", path="/v1/traces")
        assert encode_protobuf(orjson.loads(jnew), ExportTraceServiceRequest) == new

    def test_evidence_counts_spans_and_attributes_never_values(self):
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.append(KeyValue(key="host.user", value=AnyValue(string_value="r@s.example")))
        for i in range(3):
            span = rs.scope_spans.add().spans.add() if i == 0 else rs.scope_spans[0].spans.add()
            span.attributes.append(KeyValue(key="a", value=AnyValue(string_value=f"x{i}@y.example and z{i}@y.example")))
            if i == 2:
                span.events.add(name="mail e@f.example")
        _, records = mask_body(req.SerializeToString(), PROTOBUF, [PII], "request", path="/v1/traces")
        (record,) = records
        assert record["count"] == 8 and record["otlp"] == {"spans": 3, "attributes": 4}
        assert "example" not in orjson.dumps(records).decode()

    def test_a_masked_response_message_is_masked(self):
        resp = ExportTraceServiceResponse()
        resp.partial_success.rejected_spans = 2
        resp.partial_success.error_message = "rejected spans of ops@corp.example"
        new, _ = mask_body(resp.SerializeToString(), PROTOBUF, [PII], "response", path="/v1/traces")
        got = ExportTraceServiceResponse.FromString(new)
        assert got.partial_success.error_message == f"rejected spans of {MASK}" and got.partial_success.rejected_spans == 2

    def test_nothing_masked_forwards_the_body_as_it_came(self):
        req = _traces()
        req.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.string_value = "nobody"
        body = req.SerializeToString()
        assert mask_body(body, PROTOBUF, [PII], "request", path="/v1/traces") == (None, [])
        jbody = orjson.dumps(decode_protobuf(body, ExportTraceServiceRequest), option=orjson.OPT_INDENT_2)
        assert mask_body(jbody, "application/json", [PII], "request", path="/v1/traces")[0] is None

    def test_base64_ids_are_not_otlp_json(self):
        # proto3's own JSON mapping writes ids in base64; OTLP/JSON in hex
        with pytest.raises(MaskError, match="hex"):
            mask_body(json_format.MessageToJson(_traces()).encode(), "application/json", [PII], "request", path="/v1/traces")


def _with_bytes(value: bytes, key: str = "blob") -> ExportTraceServiceRequest:
    req = _traces()
    req.resource_spans[0].scope_spans[0].spans[0].attributes.append(KeyValue(key=key, value=AnyValue(bytes_value=value)))
    return req


class TestBytesValues:
    """`bytesValue` is masked as the UTF-8 text it holds; bytes that are not UTF-8 cannot
    be inspected, so an enforcing rule that selects them refuses the export."""

    @pytest.mark.parametrize("selector", [(), ("$..attributes[?@.key=='blob'].value.bytesValue",)], ids=["whole", "path"])
    def test_utf8_bytes_are_masked_in_protobuf_and_in_json(self, selector):
        req = _with_bytes(b"key AKIAIOSFODNN7EXAMPLE of jane@bytes.example")
        aws = rule(*selector, name="aws", detectors=("email", "aws_access_key_id"))
        new, records = mask_body(req.SerializeToString(), PROTOBUF, [aws], "request", path="/v1/traces")
        got = {a.key: a.value for a in ExportTraceServiceRequest.FromString(new).resource_spans[0].scope_spans[0].spans[0].attributes}
        assert got["blob"] == AnyValue(bytes_value=b"key [REDACTED:AWS_KEY] of [REDACTED:EMAIL]")
        assert got["user.email"].string_value == (MASK if not selector else "a@b.example")
        assert records[0]["otlp"] == {"spans": 1, "attributes": 2 if not selector else 1}
        assert records[0]["where"][-1].endswith("['bytesValue']")
        jbody = orjson.dumps(decode_protobuf(req.SerializeToString(), ExportTraceServiceRequest))
        jnew, _ = mask_body(jbody, "application/json", [aws], "request", path="/v1/traces")
        assert b"AKIA" not in base64.b64decode(orjson.loads(jnew)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][2]["value"]["bytesValue"])
        assert encode_protobuf(orjson.loads(jnew), ExportTraceServiceRequest) == new  # base64 again, the same bytes

    def test_an_otlp_attributes_path_selects_bytes(self):
        from hoop_addon.policy.loader import otlp_attribute_path

        path = otlp_attribute_path("blob", None, None)
        new, _ = mask_body(_with_bytes(b"jane@bytes.example").SerializeToString(), PROTOBUF, [rule(path)], "request", path="/v1/traces")
        assert {a["key"]: a["value"] for a in _span_doc(new)["attributes"]}["blob"] == {"bytesValue": base64.b64encode(MASK.encode()).decode()}

    def test_bytes_nothing_is_masked_in_stay_byte_identical(self):
        req = _with_bytes(b"nothing here")
        req.resource_spans[0].scope_spans[0].spans[0].attributes.append(KeyValue(key="raw", value=AnyValue(bytes_value=b"\xff\x00")))
        one = rule("$..attributes[?@.key=='user.email'].value.stringValue")
        new, _ = mask_body(req.SerializeToString(), PROTOBUF, [one], "request", path="/v1/traces")
        got = {a.key: a.value for a in ExportTraceServiceRequest.FromString(new).resource_spans[0].scope_spans[0].spans[0].attributes}
        assert got["raw"].bytes_value == b"\xff\x00" and got["blob"].bytes_value == b"nothing here"
        assert got["user.email"].string_value == MASK
        jbody = orjson.dumps(decode_protobuf(req.SerializeToString(), ExportTraceServiceRequest))
        jnew, _ = mask_body(jbody, "application/json", [one], "request", path="/v1/traces")
        assert encode_protobuf(orjson.loads(jnew), ExportTraceServiceRequest) == new

    @pytest.mark.parametrize("mime", [PROTOBUF, "application/json"])
    def test_bytes_that_are_not_utf8_under_an_enforcing_rule_are_refused_by_key(self, mime):
        req = _with_bytes(b"\xffjane@bytes.example", key="payload.raw")
        body = req.SerializeToString() if mime == PROTOBUF else orjson.dumps(decode_protobuf(req.SerializeToString(), ExportTraceServiceRequest))
        with pytest.raises(MaskError, match="attribute 'payload.raw' holds a bytes value that is not UTF-8") as caught:
            mask_body(body, mime, [PII], "request", path="/v1/traces")
        assert "example" not in str(caught.value)

    def test_kvlist_item_and_log_body_are_named(self):
        req = _traces()
        kv = AnyValue()
        kv.kvlist_value.values.append(KeyValue(key="inner", value=AnyValue(bytes_value=b"\xfe")))
        req.resource_spans[0].scope_spans[0].spans[0].attributes.append(KeyValue(key="outer", value=kv))
        with pytest.raises(MaskError, match="attribute 'outer' > 'inner' holds"):
            mask_body(req.SerializeToString(), PROTOBUF, [PII], "request", path="/v1/traces")
        logs = ExportLogsServiceRequest()
        logs.resource_logs.add().scope_logs.add().log_records.add().body.bytes_value = b"\xfe"
        with pytest.raises(MaskError, match="a log record body holds"):
            mask_body(logs.SerializeToString(), PROTOBUF, [PII], "request", path="/v1/logs")
        body = logs.resource_logs[0].scope_logs[0].log_records[0].body
        body.kvlist_value.values.append(KeyValue(key="raw", value=AnyValue(bytes_value=b"\xfe")))
        with pytest.raises(MaskError, match="log record body item 'raw' holds"):
            mask_body(logs.SerializeToString(), PROTOBUF, [PII], "request", path="/v1/logs")

    def test_not_utf8_bytes_no_enforcing_rule_selects_pass(self):
        req = _with_bytes(b"\xff\x00")
        other = rule("$..attributes[?@.key=='user.email'].value.stringValue")
        shadow = dataclasses.replace(PII, name="watch", action="log")
        new, records = mask_body(req.SerializeToString(), PROTOBUF, [other, shadow], "request", path="/v1/traces")
        got = {a.key: a.value for a in ExportTraceServiceRequest.FromString(new).resource_spans[0].scope_spans[0].spans[0].attributes}
        assert got["blob"].bytes_value == b"\xff\x00" and got["user.email"].string_value == MASK


def test_a_rule_without_paths_masks_every_string_field_of_traces_and_logs():
    """The string fields beside `AnyValue`s: trace states, scope names and versions,
    schema URLs, log severity texts and event names; ids and numbers untouched."""
    req = _traces()
    rs = req.resource_spans[0]
    rs.schema_url = rs.scope_spans[0].schema_url = "https://s.example/?by=a@b.example"
    rs.scope_spans[0].scope.name, rs.scope_spans[0].scope.version = "lib a@b.example", "1 a@b.example"
    span = rs.scope_spans[0].spans[0]
    span.trace_state = span.links[0].trace_state = "vendor=a@b.example"
    new, _ = mask_body(req.SerializeToString(), PROTOBUF, [PII], "request", path="/v1/traces")
    got = ExportTraceServiceRequest.FromString(new)
    assert b"a@b.example" not in new and got.resource_spans[0].scope_spans[0].spans[0].trace_id == TRACE_ID
    assert got.resource_spans[0].scope_spans[0].spans[0].trace_state == MASK  # "=" may be in an address
    assert got.resource_spans[0].scope_spans[0].scope.version == f"1 {MASK}"
    logs = ExportLogsServiceRequest()
    rl = logs.resource_logs.add()
    rl.schema_url = "https://s.example/a@b.example"
    sl = rl.scope_logs.add()
    sl.scope.name = "a@b.example"
    rec = sl.log_records.add(severity_text="a@b.example", event_name="login a@b.example", severity_number=9)
    rec.trace_id = TRACE_ID
    new, _ = mask_body(logs.SerializeToString(), PROTOBUF, [PII], "request", path="/v1/logs")
    got = ExportLogsServiceRequest.FromString(new).resource_logs[0].scope_logs[0].log_records[0]
    assert b"a@b.example" not in new and got.event_name == f"login {MASK}" and got.severity_number == 9
    assert got.trace_id == TRACE_ID


class TestRefusals:
    def test_protobuf_on_another_path_is_binary(self):
        with pytest.raises(UnsupportedMedia):
            mask_body(_traces().SerializeToString(), PROTOBUF, [PII], "request", path="/v1/metrics")
        with pytest.raises(UnsupportedMedia):
            mask_body(_traces().SerializeToString(), PROTOBUF, [PII], "request")

    @pytest.mark.parametrize(("body", "mime", "match"), [
        (b"\x0a\x05hello a@b.example", PROTOBUF, "does not parse"),
        (b'{"resource_spans": [{"scope_spans": [{"spans": [{"name": "a@b.example"}]}]}]}', "application/json", "snake_case"),
        (b'{"resourceSpans": [{"a@b.example": 1}]}', "application/json", "not a valid OTLP"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "a@b.example"}]}]}]}', "application/json", "hex"),
        (b'[{"name": "a@b.example"}]', "application/json", "not an object"),
        (b'{"resourceSpans": [', "application/json", "not valid JSON"),
    ])
    def test_bodies_that_are_not_otlp_are_refused_without_quoting_them(self, body, mime, match):
        with pytest.raises(MaskError, match=match) as caught:
            mask_body(body, mime, [PII], "request", path="/v1/traces")
        assert "example" not in str(caught.value)

    def test_a_rule_that_would_break_a_number_is_refused_not_forwarded(self):
        # intValue is a string in OTLP/JSON; a rule selecting it masks a Luhn-valid number
        req = _traces()
        req.resource_spans[0].scope_spans[0].spans[0].attributes[1].value.int_value = 4111111111111111
        numbers = rule("$..intValue")
        with pytest.raises(MaskError, match="intValue', which is not text"):
            mask_body(req.SerializeToString(), PROTOBUF, [numbers], "request", path="/v1/traces")

    def test_repeated_member_in_unmasked_otlp_json_is_refused(self):
        body = b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "a", "name": "b"}]}]}]}'
        with pytest.raises(MaskError, match="repeats"):
            mask_body(body, "application/json", [PII], "request", path="/v1/traces")
