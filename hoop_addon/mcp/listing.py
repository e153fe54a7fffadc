"""Filter a `tools/list` response so that an identity sees only the tools it may call.

The response is the body of the POST that carried the request: one JSON-RPC message
(`application/json`) or a server-sent event stream (`text/event-stream`, the
streamable-HTTP transport; WHATWG HTML §9.2 event stream format) whose events' data
are JSON-RPC messages. Anything that cannot be read so is refused, never passed on
unfiltered (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from hoop_addon.masking.engine import MaskError, unique_members
from hoop_addon.mcp.jsonrpc import INVALID_REQUEST, PARSE_ERROR, JsonRpcError
from hoop_addon.mcp.stream import event_data

_LINE = re.compile(r"\r\n|\r|\n")


def _load(data: bytes) -> Any:
    try:
        doc = orjson.loads(data)
        unique_members(data)
    except (orjson.JSONDecodeError, MaskError) as exc:
        raise JsonRpcError(PARSE_ERROR, f"the response is not valid JSON: {exc}") from None
    return doc


def _filter_message(doc: Any, visible: Callable[[dict[str, Any]], bool], hidden: list[str]) -> bool:
    """Remove the tools `visible` refuses from `doc` if it is a response carrying a tool
    list (`result.tools`), asking it once per tool; True when it changed. Raises
    `JsonRpcError` for a tool list that is not a list of objects with a string `name`."""
    if not isinstance(doc, dict) or not isinstance(doc.get("result"), dict) or "tools" not in doc["result"]:
        return False
    tools = doc["result"]["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise JsonRpcError(INVALID_REQUEST, "result.tools is not a list of tools with names")
    shown = [visible(t) for t in tools]
    kept = [t for t, show in zip(tools, shown) if show]
    hidden.extend(t["name"] for t, show in zip(tools, shown) if not show)
    doc["result"]["tools"] = kept
    return len(kept) != len(tools)


def _visit_events(text: str, visit: Callable[[Any], bool]) -> str | None:
    """Give each JSON-RPC message of the event stream `text` to `visit`, which may change
    it in place and says so; the stream re-encoded with the changed messages, or None
    when none changed. An event's data lines are joined (newline) and read as one
    message; events without data (comments, `retry`, priming events) pass as they are."""
    lines = _LINE.split(text)
    out: list[str] = []
    changed = False
    event: list[str] = []
    for line in lines + [""]:
        if line:
            event.append(line)
            continue
        if not event:
            continue
        if (data := event_data(event)) is not None:
            doc = _load(data.encode())
            if visit(doc):
                changed = True
                event = [ln for ln in event if not (ln.startswith("data:") or ln == "data")]
                event.append("data: " + orjson.dumps(doc).decode())
        out.append("\n".join(event) + "\n\n")
        event = []
    return "".join(out) if changed else None


def _visit_body(body: bytes, mime: str, visit: Callable[[Any], bool]) -> bytes | None:
    """Give each JSON-RPC message of response `body` (decoded bytes) of media type
    `mime` (`application/json`: one message or a batch's answers; `text/event-stream`)
    to `visit` (see `_visit_events`); the body re-encoded, or None when unchanged.
    Raises `JsonRpcError` for a body of another type, not UTF-8, not JSON (or
    repeating a member name)."""
    if mime == "application/json":
        doc = _load(body)
        changed = any([visit(d) for d in doc]) if isinstance(doc, list) else visit(doc)
        return orjson.dumps(doc) if changed else None
    if mime == "text/event-stream":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonRpcError(PARSE_ERROR, "the event stream is not UTF-8") from None
        new = _visit_events(text, visit)
        return new.encode() if new is not None else None
    raise JsonRpcError(PARSE_ERROR, f"a response of type {mime or '(none)'!r} cannot be read as JSON-RPC")


def filter_tools_list(
    body: bytes, mime: str, visible: Callable[[dict[str, Any]], bool]
) -> tuple[bytes | None, list[str]]:
    """Filter the tool lists in response `body` (decoded bytes) of media type `mime`
    (`application/json` or `text/event-stream`, lower case, no parameters): keep the
    tools `visible` accepts (it gets each tool object, with a string `name`, once).
    Returns (the new body, or None when nothing was removed; the names removed). Raises
    `JsonRpcError` for a body of another type, not UTF-8, not JSON (or repeating a
    member name), or with a malformed tool list."""
    hidden: list[str] = []
    return _visit_body(body, mime, lambda doc: _filter_message(doc, visible, hidden)), hidden


def negotiated_version(body: bytes, mime: str) -> str | None:
    """The protocol version an `initialize` answer `body` (decoded bytes, `mime` as for
    `filter_tools_list`) gives: its `result.protocolVersion` (MCP lifecycle), or None
    when it has none. Raises `JsonRpcError` for a body that cannot be read."""
    found: list[str] = []

    def visit(doc: Any) -> bool:
        result = doc.get("result") if isinstance(doc, dict) else None
        if isinstance(result, dict) and isinstance(version := result.get("protocolVersion"), str):
            found.append(version)
        return False

    _visit_body(body, mime, visit)
    return found[0] if found else None
