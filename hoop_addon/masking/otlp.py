"""OTLP/HTTP export bodies (traces and logs) as the OTLP/JSON shape, and back.

Masking rules read one shape for both OTLP encodings: the proto3 JSON mapping with the
OTLP/JSON exceptions (OpenTelemetry Protocol spec, "JSON Protobuf Encoding"): lowerCamelCase
field names, enums as integers, and trace/span ids as hex strings, not base64. Protobuf
bodies (`application/x-protobuf`) are parsed with `opentelemetry-proto`; a body that does
not parse raises `MaskError` (fail closed: nothing is forwarded that was not understood).

Not yet wired into the masking stage (see the issue-18 report).
"""

from __future__ import annotations

import base64
import binascii
import copy
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from hoop_addon.masking.engine import MaskError

#: OTLP/HTTP paths and the request message each carries.
MESSAGES: dict[str, type[Message]] = {
    "/v1/traces": ExportTraceServiceRequest,
    "/v1/logs": ExportLogsServiceRequest,
}

_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _items(obj: Any, key: str) -> list[dict]:
    """`obj[key]` as a list of objects; `MaskError` if the shape is not OTLP's."""
    items = obj.get(key, []) if isinstance(obj, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise MaskError(f"OTLP body: '{key}' is not a list of objects")
    return items


def _ids(doc: Any, convert) -> None:
    """Rewrites the id fields of spans, span links and log records in place with `convert`."""
    for rs in _items(doc, "resourceSpans"):
        for ss in _items(rs, "scopeSpans"):
            for span in _items(ss, "spans"):
                for holder in (span, *_items(span, "links")):
                    for key in _ID_KEYS:
                        if key in holder:
                            holder[key] = convert(holder[key])
    for rl in _items(doc, "resourceLogs"):
        for sl in _items(rl, "scopeLogs"):
            for rec in _items(sl, "logRecords"):
                for key in _ID_KEYS:
                    if key in rec:
                        rec[key] = convert(rec[key])


def _message(path: str) -> type[Message]:
    try:
        return MESSAGES[path]
    except KeyError:
        raise MaskError(f"'{path}' is not an OTLP/HTTP traces or logs path") from None


def decode_protobuf(body: bytes, path: str) -> dict:
    """Parses a protobuf export request for OTLP path `path` (`/v1/traces` or `/v1/logs`)
    into the OTLP/JSON shape (a dict). Raises `MaskError` if the body does not parse or
    carries fields this version of opentelemetry-proto does not know (they could not be
    masked, nor re-encoded faithfully)."""
    msg = _message(path)()
    try:
        msg.ParseFromString(body)
    except DecodeError as e:
        raise MaskError(f"OTLP protobuf body does not parse: {e}") from None
    if _has_unknown(msg):
        raise MaskError("OTLP protobuf body carries fields unknown to opentelemetry-proto")
    doc = json_format.MessageToDict(msg, use_integers_for_enums=True)
    _ids(doc, lambda v: base64.b64decode(v).hex())
    return doc


def encode_protobuf(doc: dict, path: str) -> bytes:
    """Serialises an OTLP/JSON-shaped dict (hex ids) back to protobuf for OTLP path `path`.
    Raises `MaskError` if `doc` is not a valid export request (e.g. a rule wrote a
    non-string into a string field)."""
    return _parse_json(doc, path).SerializeToString()


def _parse_json(doc: dict, path: str) -> Message:
    def hex_to_b64(v: Any) -> str:
        if not isinstance(v, str):
            raise MaskError("OTLP/JSON id is not a hex string")
        try:
            return base64.b64encode(bytes.fromhex(v)).decode()
        except ValueError:
            raise MaskError("OTLP/JSON id is not a hex string") from None

    doc = copy.deepcopy(doc)
    _ids(doc, hex_to_b64)
    try:
        return json_format.ParseDict(doc, _message(path)())
    except (json_format.ParseError, binascii.Error, TypeError, ValueError) as e:
        raise MaskError(f"not a valid OTLP export request: {e}") from None


def validate_json(doc: Any, path: str) -> None:
    """Checks that an OTLP/JSON body (already parsed JSON) is a valid export request for
    `path`; raises `MaskError` if not, so a body that is not OTLP is refused, not forwarded."""
    if not isinstance(doc, dict):
        raise MaskError("OTLP/JSON body is not an object")
    _parse_json(doc, path)


def _has_unknown(msg: Message) -> bool:
    """True if `msg` or any nested message kept unknown fields."""
    if len(UnknownFieldSet(msg)):
        return True
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        if field.message_type.GetOptions().map_entry:
            continue
        if any(_has_unknown(v) for v in items):
            return True
    return False
