"""OTLP/HTTP export bodies (traces and logs), masked in the OTLP/JSON shape.

Masking rules read one shape for both OTLP encodings: the proto3 JSON mapping with the
OTLP/JSON exceptions (OpenTelemetry Protocol spec, "OTLP/HTTP" and "JSON Protobuf
Encoding"): lowerCamelCase field names, enums as integers, 64-bit integers as strings,
and trace/span ids as hex strings, not base64. So one JSONPath rule, e.g.
`$..spans[*].attributes[?@.key=='user.email'].value.stringValue`, serves
`application/x-protobuf` (parsed with `opentelemetry-proto`) and `application/json`.

`bytesValue` (base64 in OTLP/JSON) is shown to rules as the text it holds when that is
UTF-8, and written back as bytes; a bytes value that is not UTF-8 cannot be inspected,
so an enforcing rule that selects it refuses the export. Numbers and booleans
(`intValue`, `doubleValue`, `boolValue`) and kvlist and attribute keys are never masked.

Fail closed: a body that does not parse as the export message of its path, or carries
fields this version of opentelemetry-proto does not know, raises `MaskError`; nothing is
forwarded that was not understood. A body nothing was masked in goes on as it came; a
masked one is re-encoded from the message, every other field, id and order unchanged.
"""

from __future__ import annotations

import base64
import binascii
import functools
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from jsonpath_rfc9535 import compile as jsonpath
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from hoop_addon.masking.engine import Evidence, Location, MaskContext, MaskError, leaves, mask_json, unique_members
from hoop_addon.policy.model import MaskRule

#: OTLP/HTTP paths (the spec's defaults, also matched as the end of a longer path: trace
#: stores mount OTLP under a prefix, e.g. `/api/public/otel/v1/traces`) and the
#: (request, response) messages each carries.
SIGNALS: dict[str, tuple[type[Message], type[Message]]] = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
}
PROTOBUF_TYPES = frozenset({"application/x-protobuf", "application/protobuf"})
JSON_TYPE = "application/json"

#: What a rule without paths masks in an OTLP body: every string and bytes value
#: (`AnyValue`, so attribute values of spans, events, links, resources and scopes, array
#: and kvlist items, log bodies) and every other string field of the messages: span and
#: event names, span and link trace states, status and partial-success messages, scope
#: names and versions, schema URLs, log severity texts and event names; never ids, keys,
#: numbers, booleans, timestamps or enums, which a detector could match but the format needs.
STRING_PATHS = (
    "$..stringValue",
    "$..bytesValue",
    "$.resourceSpans[*].scopeSpans[*].spans[*]['name','traceState']",
    "$.resourceSpans[*].scopeSpans[*].spans[*].events[*].name",
    "$.resourceSpans[*].scopeSpans[*].spans[*].links[*].traceState",
    "$.resourceSpans[*].scopeSpans[*].spans[*].status.message",
    "$.resourceLogs[*].scopeLogs[*].logRecords[*]['severityText','eventName']",
    "$['resourceSpans','resourceLogs'][*]['scopeSpans','scopeLogs'][*].scope['name','version']",
    "$['resourceSpans','resourceLogs'][*]['schemaUrl']",
    "$['resourceSpans','resourceLogs'][*]['scopeSpans','scopeLogs'][*]['schemaUrl']",
    "$.partialSuccess.errorMessage",
)
_STRING_QUERIES = tuple((p, jsonpath(p)) for p in STRING_PATHS)
_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def message_for(path: str | None, part: str) -> type[Message] | None:
    """The OTLP export message class a body carries: `path` is the request's URL path
    (query ignored; None: not an HTTP request), `part` "request" or "response". None
    when the path is not an OTLP/HTTP traces or logs endpoint."""
    if not path:
        return None
    path = path.split("?", 1)[0]
    for suffix, messages in SIGNALS.items():
        if path.endswith(suffix):
            return messages[part == "response"]
    return None


def mask_otlp(
    body: bytes, mime: str, message: type[Message], rules: Sequence[MaskRule], context: MaskContext, evidence: Evidence
) -> bytes | None:
    """Mask one OTLP export body (decoded from its content-encoding) of media type
    `mime` (`PROTOBUF_TYPES` or `application/json`) carrying `message` (see
    `message_for`) in its OTLP/JSON shape: rules with paths mask what the paths select,
    rules without mask `STRING_PATHS`; a string holding JSON (GenAI conversation
    attributes) is masked as JSON. Returns the body re-encoded in its own encoding, or
    None when nothing changed: masked text is written into the parsed message, so every
    other field, id and order stays as it came. Evidence records of the rules that masked get
    `"otlp": {"spans" | "log_records": n, "attributes": n}` (how many spans or log records
    and attributes they masked in). Raises `MaskError` for a body that is not a valid
    `message`, and for a rule whose masking made it invalid (a number field masked)."""
    if mime in PROTOBUF_TYPES:
        msg = parse_protobuf(body, message)
    else:
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise MaskError("OTLP/JSON body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise MaskError("OTLP/JSON body is not an object")
        _camel_case(raw)
        msg = parse_json(raw, message)
    doc = to_dict(msg)  # canonical: enum names as numbers, defaults left out
    otlp_rules = [_otlp_rule(r) for r in rules]
    binary = _bytes_as_text(doc)
    if opaque := {location: name for location, (_, _, name) in binary.items() if name is not None}:
        _refuse_opaque(doc, opaque, otlp_rules)
    tally, changed_at = _Tally(evidence), []
    doc, changed = mask_json(doc, otlp_rules, tally, context, changed_at)
    tally.finish("log_records" if "resourceLogs" in doc else "spans")
    if not changed:
        if mime not in PROTOBUF_TYPES:
            unique_members(body)  # forwarded as it is: one value per member name
        return None
    for location in changed_at:  # the edits into the message: what is not text there is refused
        _write(msg, doc, location)
    if mime in PROTOBUF_TYPES:
        return msg.SerializeToString()
    for holder, original, name in binary.values():  # OTLP/JSON bytes are base64
        holder["bytesValue"] = original if name is not None else base64.b64encode(holder["bytesValue"].encode()).decode()
    return orjson.dumps(doc)


def _bytes_as_text(doc: dict) -> dict[Location, tuple[dict, str, str | None]]:
    """Rewrites in place each `bytesValue` of `doc` (OTLP/JSON shape: base64) as the text
    it holds when that is UTF-8, and as "" (nothing a rule could find) when it is not.
    Returns, per location, (the `AnyValue` object, the base64 it had, None for text or,
    for bytes that are not UTF-8, what holds them: `attribute 'k'` (a kvlist item's keys
    after its attribute's: `attribute 'k' > 'item'`), `log record body item 'item'`, or
    `a log record body`)."""
    found: dict[Location, tuple[dict, str, str | None]] = {}
    stack: list[tuple[Any, Location, tuple[str, ...]]] = [(doc, (), ())]
    while stack:
        node, location, keys = stack.pop()
        if isinstance(node, list):
            stack.extend((item, (*location, i), keys) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("key"), str):  # a KeyValue: what its value belongs to
            keys = (*keys, node["key"])
        for name, value in node.items():
            if name == "bytesValue" and isinstance(value, str):
                try:
                    node[name] = base64.b64decode(value).decode("utf-8")
                    found[(*location, name)] = (node, value, None)
                except UnicodeDecodeError:
                    node[name] = ""
                    named = " > ".join(repr(k) for k in keys)
                    held = f"attribute {named}" if "attributes" in location else f"log record body item {named}" if keys else "a log record body"
                    found[(*location, name)] = (node, value, held)
            else:
                stack.append((value, (*location, name), keys))
    return found


def _refuse_opaque(doc: dict, opaque: dict[Location, str], rules: Sequence[MaskRule]) -> None:
    """Raises `MaskError` if an enforcing rule selects one of the `opaque` locations
    (bytes that are not UTF-8, mapped to what holds them): it cannot be inspected. A
    shadow rule never refuses."""
    for rule in rules:
        if rule.shadow:
            continue
        for location, _, _ in leaves(doc, rule, numbers=False):
            if (held := opaque.get(location)) is not None:
                raise MaskError(f"OTLP {held} holds a bytes value that is not UTF-8 and cannot be inspected")


def _write(msg: Message, doc: dict, location: tuple[str | int, ...]) -> None:
    """Sets the string field at `location` (OTLP/JSON names and indexes) of `msg` to the
    value `doc` has there (a bytes field, `bytesValue`, to that text as UTF-8). Raises
    `MaskError` if that is not a singular string or bytes field (an id, a number, a
    renamed field: masking made the export invalid, so it is refused, never forwarded)."""
    try:
        *steps, last = location
        node: Any = msg
        for step in steps:
            if isinstance(node, Message):
                field = node.DESCRIPTOR.fields_by_camelcase_name[step]
                if field.message_type is None:
                    raise KeyError(step)
                node = getattr(node, field.name)
            else:  # a repeated message field
                node = node[step]
            doc = doc[step]
        field = node.DESCRIPTOR.fields_by_camelcase_name[last]
        new = doc[last]
        if field.is_repeated or not isinstance(new, str):
            raise KeyError(last)
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(node, field.name, new)
        elif field.type == FieldDescriptor.TYPE_BYTES and field.name == "bytes_value":  # never an id
            setattr(node, field.name, new.encode())
        else:
            raise KeyError(last)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        where = ".".join(str(s) for s in location) or "(root)"
        raise MaskError(f"a masking rule changed OTLP field {where!r}, which is not text; the export would be invalid") from None


@functools.lru_cache(maxsize=1024)
def _otlp_rule(rule: MaskRule) -> MaskRule:
    """`rule` as it applies to an OTLP body: without paths, the `STRING_PATHS`; the same
    object each time, so the engine's scanner cache keeps hitting."""
    return rule if rule.paths else dataclasses.replace(rule, paths=_STRING_QUERIES)


# Where a masked value is, from its evidence path (`engine.jsonpath`): the span or log
# record, and the first attribute on the way (a kvlist's items belong to their attribute).
_UNIT = re.compile(r"^\$\['resource(?:Spans|Logs)'\]\[\d+\]\['scope(?:Spans|Logs)'\]\[\d+\]\['(?:spans|logRecords)'\]\[\d+\]")
_ATTRIBUTE = re.compile(r"^.*?\['attributes'\]\[\d+\]")


class _Tally(Evidence):
    """Evidence passed on to `outer`, counting per rule the spans (or log records) and
    attributes a value was masked in."""

    def __init__(self, outer: Evidence) -> None:
        super().__init__()
        self.outer = outer
        self.units: dict[str, tuple[set[str], set[str]]] = {}

    def add(self, rule: MaskRule, counts: dict[str, int], where: str) -> None:
        self.outer.add(rule, counts, where)
        if not counts:
            return
        units, attributes = self.units.setdefault(rule.name, (set(), set()))
        if unit := _UNIT.match(where):
            units.add(unit.group())
        if attribute := _ATTRIBUTE.match(where):
            attributes.add(attribute.group())

    def finish(self, unit: str) -> None:
        """Writes the counts to the outer evidence, spans or log records named `unit`."""
        for name, (units, attributes) in self.units.items():
            self.outer.annotate(name, "otlp", {unit: len(units), "attributes": len(attributes)})


def parse_protobuf(body: bytes, message: type[Message]) -> Message:
    """Parses a protobuf body as `message` (an OTLP export request or response class).
    Raises `MaskError` if the body does not parse or carries fields this version of
    opentelemetry-proto does not know (they could not be masked, nor re-encoded)."""
    msg = message()
    try:
        msg.ParseFromString(body)
    except DecodeError:
        raise MaskError("OTLP protobuf body does not parse") from None
    if _has_unknown(msg):
        raise MaskError("OTLP protobuf body carries fields unknown to opentelemetry-proto")
    return msg


def to_dict(msg: Message) -> dict:
    """`msg` in the OTLP/JSON shape: proto3 JSON mapping, enums as integers, hex ids."""
    doc = json_format.MessageToDict(msg, use_integers_for_enums=True)
    _ids(doc, lambda v: base64.b64decode(v).hex())
    return doc


def parse_json(doc: dict, message: type[Message]) -> Message:
    """`doc`, parsed OTLP/JSON (hex ids; they are rewritten in place), as a `message`.
    Raises `MaskError` if it is not one; the error never quotes the body (protobuf's own
    message names fields and values)."""

    def hex_to_b64(v: Any) -> str:
        if not isinstance(v, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", v):
            raise MaskError("OTLP/JSON trace or span id is not a hex string")
        return base64.b64encode(bytes.fromhex(v)).decode()

    _ids(doc, hex_to_b64)
    try:
        return json_format.ParseDict(doc, message())
    except (json_format.ParseError, binascii.Error, TypeError, ValueError, RecursionError):
        raise MaskError(f"not a valid OTLP {message.DESCRIPTOR.name} (a field of unknown name or wrong type)") from None


def _camel_case(doc: Any) -> None:
    """Raises `MaskError` if an object in `doc` has a member name with `_`: OTLP/JSON
    names fields in lowerCamelCase only, while proto3 JSON parsers also take the proto
    names (`resource_spans`), which a rule's `$.resourceSpans` would not select, and a
    parser given both spellings keeps one of them."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if any("_" in k for k in node):
                raise MaskError("OTLP/JSON body names a field in snake_case; OTLP/JSON uses lowerCamelCase")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


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
