"""Masking an HTTP body by its media type: JSON, forms, NDJSON, server-sent events,
OTLP/HTTP exports (`hoop_addon.masking.otlp`) and text, each read as its recipient will read it and masked with the engine
(`hoop_addon.masking.engine`); SSE through the stream masker (`hoop_addon.masking.sse`).
Pure: bytes in, bytes out, no mitmproxy.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from hoop_addon.masking import otlp
from hoop_addon.masking.engine import Evidence, MaskContext, MaskError, mask_json, mask_text, unique_members
from hoop_addon.masking.sse import EventStreamMasker
from hoop_addon.policy.model import MaskRule

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"})
FORM_TYPE = "application/x-www-form-urlencoded"
_BOM = b"\xef\xbb\xbf"

def mask_body(
    body: bytes,
    content_type: str,
    rules: Sequence[MaskRule],
    part: str,
    context: MaskContext | None = None,
    path: str | None = None,
) -> tuple[bytes | None, list[dict[str, Any]]]:
    """Mask a decoded HTTP body.

    `content_type` is the raw header value; `part` is "request" or "response" (for the
    evidence); `context` carries the `hash` secret and `tokenize` session; `path` is the
    request's URL path (None: not an HTTP exchange, e.g. a WebSocket message). Returns
    (the body to forward, or None to forward `body` as it is; the evidence records).

    How the body is read: on an OTLP/HTTP traces or logs path (`otlp.message_for`),
    protobuf and JSON bodies as the export message, in the OTLP/JSON shape (see
    `otlp.mask_otlp`); `text/event-stream` responses event by event; NDJSON line by
    line; JSON when declared so, when a rule selects JSONPath, or when the body looks
    like JSON (`{` or `[` first) and parses, whatever its declared type; forms as
    fields (and, if unchanged but JSON, as JSON too); anything else as UTF-8 text. A
    JSON document is re-encoded only when masked; one forwarded as it is must not
    repeat a member name (parsers differ on which value counts).

    Raises `MaskError` when an enforcing rule cannot inspect the body: not a valid OTLP
    export on an OTLP path, a binary type otherwise (`UnsupportedMedia`), not UTF-8 or
    holding NUL characters (UTF-16, binary), not JSON although declared JSON or a rule
    selects JSONPath (unless every rule says `on_invalid_json: text`), a repeated
    member name, nested deeper than `MAX_DEPTH`. Shadow rules (`action: log`) do not
    decide what passes: when one of them cannot inspect the body, the body is masked
    without them.
    """
    rules = [r for r in rules if r.body]
    if not body or not rules:
        return None, []
    context = context or MaskContext()
    try:
        return _mask_body(body, content_type, rules, part, context, path)
    except MaskError:
        enforcing = [r for r in rules if not r.shadow]
        if len(enforcing) == len(rules):
            raise
        return _mask_body(body, content_type, enforcing, part, context, path) if enforcing else (None, [])


def _mask_body(
    body: bytes, content_type: str, rules: Sequence[MaskRule], part: str, context: MaskContext, path: str | None
) -> tuple[bytes | None, list[dict[str, Any]]]:
    """`mask_body` for non-empty `rules`."""
    evidence = Evidence()
    mime = content_type.split(";", 1)[0].strip().lower()
    message = otlp.message_for(path, part)
    if message is not None and (mime in otlp.PROTOBUF_TYPES or mime == otlp.JSON_TYPE):
        new = otlp.mask_otlp(body, mime, message, rules, context, evidence)
    else:
        new = _mask_into(body, content_type, rules, part, context, evidence)
    return new, evidence.records(part)


def _mask_into(
    body: bytes, content_type: str, rules: Sequence[MaskRule], part: str, context: MaskContext, evidence: Evidence,
    depth: int = 0,
) -> bytes | None:
    """The masked `body` of media type `content_type` (raw header value), or None when
    unchanged; what was masked goes to `evidence`. `depth` counts enclosing multiparts."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if is_binary(mime):
        raise UnsupportedMedia(mime)
    if mime.startswith("multipart/"):
        return _mask_multipart(body, content_type, rules, part, context, evidence, depth)
    if mime == "text/event-stream" and part == "response":  # a request is not a stream of events
        masker = EventStreamMasker(rules, context, evidence)
        new = masker.feed(body, final=True)
        # Only the pieces moved between events when nothing was masked: keep the original.
        return new if masker.masked or masker.restored else None
    declared_json = mime == "application/json" or mime.endswith("+json") or (mime != FORM_TYPE and any(r.paths for r in rules))
    if mime in NDJSON_TYPES and part == "response":  # a stream of pieces (Ollama): a value may span lines
        masker = EventStreamMasker(rules, context, evidence, framing="ndjson")
        new = masker.feed(body, final=True)
        return new if masker.masked or masker.restored else None
    if mime in NDJSON_TYPES:
        new = _mask_ndjson(body, rules, context, evidence)
    elif mime == FORM_TYPE:
        # JSON labelled a form: its recipient may read it as JSON (escapes decoded) or as a form
        new = _mask_json_body(body, rules, context, evidence, strict=False)[1] if _json_shaped(body) else None
        if new is None:
            new = _mask_form(_text(body), rules, context, evidence)
    elif declared_json or _json_shaped(body):
        # JSON whatever the declared type: read as text, an escaped `\u0040` would hide an
        # `@` from a recipient that parses it.
        is_json, new = _mask_json_body(body, rules, context, evidence, strict=declared_json)
        if not is_json:
            new = _mask_plain(body, rules, context, evidence, part)
    else:
        new = _mask_plain(body, rules, context, evidence, part)
    return new


class UnsupportedMedia(MaskError):
    """A body of a binary media type (`media_type`) that masking would have to read:
    no codec for it, and it is never rewritten as text."""

    def __init__(self, media_type: str) -> None:
        super().__init__(f"a body of type '{media_type}' is binary and cannot be inspected; no codec reads it")
        self.media_type = media_type


_BINARY_TYPES = frozenset({
    "application/octet-stream", "application/x-protobuf", "application/protobuf", "application/vnd.google.protobuf",
    "application/pdf", "application/zip", "application/gzip", "application/x-gzip", "application/x-tar",
    "application/x-7z-compressed", "application/x-bzip2", "application/zstd", "application/wasm",
    "application/msgpack", "application/x-msgpack", "application/vnd.msgpack", "application/cbor",
    "application/vnd.apache.avro", "application/avro", "application/vnd.apache.parquet", "application/java-archive",
    "application/x-sqlite3", "application/vnd.apache.arrow.stream", "application/vnd.apache.arrow.file",
})
_BINARY_PREFIXES = ("image/", "audio/", "video/", "font/", "application/grpc")
_BINARY_SUFFIXES = ("+proto", "+protobuf", "+cbor", "+msgpack", "+zip", "+gzip")


def is_binary(mime: str) -> bool:
    """Whether a media type (lower case, no parameters) is binary: protobuf and gRPC
    (`application/grpc`, `+proto`), `application/octet-stream`, images (not SVG, which
    is XML text), audio, video, fonts, PDF, archives, MessagePack, CBOR, Avro, Parquet."""
    if mime in _BINARY_TYPES or mime.endswith(_BINARY_SUFFIXES):
        return True
    return mime.startswith(_BINARY_PREFIXES) and mime != "image/svg+xml"


MAX_MULTIPART_DEPTH = 4
"""Deepest nesting of multipart bodies inspected; deeper ones are refused."""


def _boundary(content_type: str) -> bytes:
    """The `boundary` parameter of a multipart Content-Type (RFC 2046 §5.1.1)."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if 1 <= len(value) <= 70:
                return value.encode()
    raise MaskError("multipart body has no valid boundary parameter")


def _mask_multipart(
    body: bytes, content_type: str, rules: Sequence[MaskRule], part: str, context: MaskContext, evidence: Evidence,
    depth: int,
) -> bytes | None:
    """A multipart body (RFC 2046 §5.1, RFC 7578 form-data): each part by its own
    Content-Type (a JSON part as JSON, a nested multipart as multipart), its content
    decoded from `Content-Transfer-Encoding: base64` first and re-encoded after; the
    part headers (a filename) as text by the rules without paths. A binary part
    (`is_binary`) is passed untouched: no codec reads it. Bytes outside what was
    masked, the preamble and the epilogue stay as they are. Raises `MaskError` on a
    missing boundary or closing delimiter, bad base64, or nesting deeper than
    `MAX_MULTIPART_DEPTH`."""
    if depth >= MAX_MULTIPART_DEPTH:
        raise MaskError(f"multipart bodies are nested deeper than {MAX_MULTIPART_DEPTH} levels")
    delimiter = b"--" + _boundary(content_type)
    start = 0 if body.startswith(delimiter) else body.find(b"\r\n" + delimiter) + 2
    if start < 2 and not body.startswith(delimiter):
        raise MaskError("multipart body has no part")
    segments = body[start + len(delimiter) :].split(b"\r\n" + delimiter)
    out: list[bytes] = []  # the segments between delimiters, masked
    changed = closed = False
    whole = [r for r in rules if not r.paths]
    for segment in segments:
        if closed or segment.startswith(b"--"):  # the closing delimiter, then the epilogue: kept
            closed = True
            out.append(segment)
            continue
        line_end = segment.find(b"\r\n")
        head_end = segment.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if head_end < 0:
            raise MaskError("a multipart part has no header section end")
        head, content = segment[line_end:head_end], segment[head_end + 4 :]
        headers = {}
        for line in _text(head).split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        new_head = _mask_plain(head, whole, context, evidence, f"{part} multipart header") if whole else None
        new_content = _mask_part(content, headers, rules, part, context, evidence, depth)
        changed |= new_head is not None or new_content is not None
        out.append(segment[:line_end] + (new_head or head) + b"\r\n\r\n" + (content if new_content is None else new_content))
    if not closed:
        raise MaskError("multipart body has no closing delimiter (truncated)")
    return body[:start] + delimiter + (b"\r\n" + delimiter).join(out) if changed else None


def _mask_part(
    content: bytes, headers: dict[str, str], rules: Sequence[MaskRule], part: str, context: MaskContext,
    evidence: Evidence, depth: int,
) -> bytes | None:
    """One multipart part's content masked by its own type and transfer encoding, or None."""
    ctype = headers.get("content-type", "text/plain")
    if is_binary(ctype.split(";", 1)[0].strip().lower()):
        return None  # no codec reads it, and no rule applies to it: passed untouched
    encoding = headers.get("content-transfer-encoding", "").lower()
    if encoding == "base64":
        try:
            decoded = base64.b64decode(b"".join(content.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MaskError("a multipart part's base64 content is invalid") from None
        new = _mask_into(decoded, ctype, rules, part, context, evidence, depth + 1)
        if new is None:
            return None
        encoded = base64.b64encode(new)
        if b"\n" in content:  # line-wrapped as MIME does (RFC 2045 §6.8: at most 76 characters)
            encoded = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
        return encoded
    return _mask_into(content, ctype, rules, part, context, evidence, depth + 1)


def _mask_json_body(
    body: bytes, rules: Sequence[MaskRule], context: MaskContext, evidence: Evidence, strict: bool
) -> tuple[bool, bytes | None]:
    """(whether `body` is JSON, the masked body or None when unchanged). A UTF-8 BOM is
    skipped, as Python's json does. Not JSON: `MaskError` when `strict` (unless every
    rule says `on_invalid_json: text`). An unchanged body goes as it is, so it must not
    repeat a member name (see `_unique_members`)."""
    try:
        doc = orjson.loads(body[3:] if body.startswith(_BOM) else body)
    except orjson.JSONDecodeError as exc:
        if strict and not all(r.on_invalid_json == "text" for r in rules):
            raise MaskError(f"body is not valid JSON ({exc.args[0].split(':')[0]})") from None
        return False, None
    doc, changed = mask_json(doc, rules, evidence, context)
    if changed:
        return True, orjson.dumps(doc)
    unique_members(body)
    return True, None


def _mask_plain(body: bytes, rules: Sequence[MaskRule], context: MaskContext, evidence: Evidence, where: str) -> bytes | None:
    text = _text(body)
    masked = mask_text(text, rules, context, evidence, where)
    return masked.encode() if masked != text else None


def _mask_form(text: str, rules: Sequence[MaskRule], context: MaskContext, evidence: Evidence) -> bytes | None:
    """An `application/x-www-form-urlencoded` body (WHATWG URL §5) masked as the
    object {name: [values...]}, so `$.email` selects the `email` field."""
    doc: dict[str, list[str]] = {}
    for name, value in parse_qsl(text, keep_blank_values=True):
        doc.setdefault(name, []).append(value)
    doc, changed = mask_json(doc, rules, evidence, context)
    return urlencode([(k, v) for k, values in doc.items() for v in values]).encode() if changed else None


def _mask_ndjson(body: bytes, rules: Sequence[MaskRule], context: MaskContext, evidence: Evidence) -> bytes | None:
    """Newline-delimited JSON: each non-empty line is a document."""
    lines = body.split(b"\n")
    changed = False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise MaskError(f"NDJSON line {i + 1} is not valid JSON") from None
        doc, line_changed = mask_json(doc, rules, evidence, context)
        if line_changed:
            lines[i] = orjson.dumps(doc) + (b"\r" if line.endswith(b"\r") else b"")
            changed = True
        else:
            unique_members(line)  # left as it is: see `_mask_json_body`
    return b"\n".join(lines) if changed else None


def _json_shaped(body: bytes) -> bool:
    """Whether `body` starts like a JSON object or array (after whitespace or a BOM)."""
    return body.lstrip(b" \t\r\n")[:1] in (b"{", b"[") or body.startswith(_BOM)


def _text(body: bytes) -> str:
    """`body` as UTF-8 text. Raises `MaskError` if it is not UTF-8, or holds a NUL: valid
    UTF-8, but the mark of UTF-16 or binary data, which no detector would match."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MaskError("body is not UTF-8 text") from None
    if "\x00" in text:
        raise MaskError("body holds NUL characters (UTF-16 or binary) and cannot be inspected as text")
    return text
