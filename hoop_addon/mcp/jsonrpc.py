"""Strict JSON-RPC 2.0 parsing of MCP request bodies (streamable HTTP, POST).

Parses exactly as strictly as the gateway must: a message the MCP server could read
differently from the gateway (a repeated member name, an id of an odd type) is refused,
never forwarded half-checked. Standards: JSON-RPC 2.0 (jsonrpc.org/specification),
RFC 8259, MCP revisions 2025-11-25 and 2026-07-28 (Mcp-Method / Mcp-Name headers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from hoop_addon.masking.engine import MaskError, unique_members

# Methods whose params name the governed target, and the member that names it.
TARGET_MEMBER = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}

# The methods a client sends a server, in MCP revisions 2025-11-25 and 2026-07-28
# (the spec's ClientRequest and ClientNotification unions; tasks/* of 2025-11-25).
CLIENT_METHODS = frozenset({
    "initialize", "ping", "server/discover", "subscriptions/listen", "completion/complete", "logging/setLevel",
    "tools/list", "tools/call", "prompts/list", "prompts/get",
    "resources/list", "resources/templates/list", "resources/read", "resources/subscribe", "resources/unsubscribe",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
    "notifications/initialized", "notifications/cancelled", "notifications/progress", "notifications/roots/list_changed",
})

# The requests a server sends a client (the spec's ServerRequest union, 2025-11-25,
# tasks/* included) and the notifications it sends (ServerNotification, 2025-11-25 and
# 2026-07-28): what may reach a client on an answer stream or the GET stream.
SERVER_REQUESTS = frozenset({
    "ping", "sampling/createMessage", "elicitation/create", "roots/list",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
})
SERVER_NOTIFICATIONS = frozenset({
    "notifications/cancelled", "notifications/progress", "notifications/message",
    "notifications/resources/updated", "notifications/resources/list_changed", "notifications/tools/list_changed",
    "notifications/prompts/list_changed", "notifications/elicitation/complete", "notifications/tasks/status",
    "notifications/subscriptions/acknowledged",
})

# JSON-RPC 2.0 error codes (§5.1).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600


class JsonRpcError(ValueError):
    """A body or message that is not valid JSON-RPC 2.0: `code` is the JSON-RPC error
    code to answer with, `message` says why in words an agent can act on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message from a client. `kind` is "request" (has an id),
    "notification" (no id) or "response" (a client's answer to a server request);
    `id` is str, int, float or None (absent and null differ: see `has_id`);
    `target` is the tool/prompt name or resource URI for governed methods, else None."""

    kind: str
    method: str | None
    id: Any
    has_id: bool
    params: dict[str, Any] | list[Any] | None
    target: str | None
    raw: dict[str, Any]


def _message(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise JsonRpcError(INVALID_REQUEST, "a JSON-RPC message must be an object")
    if obj.get("jsonrpc") != "2.0" or type(obj.get("jsonrpc")) is not str:
        raise JsonRpcError(INVALID_REQUEST, 'member "jsonrpc" must be exactly "2.0"')
    has_id = "id" in obj
    mid = obj.get("id")
    # bool is an int subclass in Python: JSON true/false are not valid ids.
    if has_id and (isinstance(mid, bool) or not isinstance(mid, (str, int, float, type(None)))):
        raise JsonRpcError(INVALID_REQUEST, 'member "id" must be a string, a number or null')
    if "method" not in obj:
        if not has_id or ("result" in obj) == ("error" in obj):
            raise JsonRpcError(INVALID_REQUEST, 'a message needs "method", or an "id" with exactly one of "result"/"error"')
        return Message("response", None, mid, True, None, None, obj)
    method = obj["method"]
    if not isinstance(method, str):
        raise JsonRpcError(INVALID_REQUEST, 'member "method" must be a string')
    params = obj.get("params")
    if "params" in obj and not isinstance(params, (dict, list)):
        raise JsonRpcError(INVALID_REQUEST, 'member "params" must be an object or an array')
    target = None
    if (member := TARGET_MEMBER.get(method)) is not None:
        if not isinstance(params, dict) or not isinstance(params.get(member), str):
            raise JsonRpcError(INVALID_REQUEST, f'{method} needs params.{member} as a string')
        target = params[member]
        args = params.get("arguments")
        if args is not None and not isinstance(args, dict):
            raise JsonRpcError(INVALID_REQUEST, f"{method} params.arguments must be an object")
    return Message("request" if has_id else "notification", method, mid, has_id, params, target, obj)


def _document(raw: bytes, what: str) -> Any:
    """`raw` read as JSON, refused (`JsonRpcError` -32700, naming `what`) when it is not
    UTF-8 JSON or repeats a member name (a server reads the last of them)."""
    try:
        doc = orjson.loads(raw)
        unique_members(raw)
    except orjson.JSONDecodeError:
        raise JsonRpcError(PARSE_ERROR, f"{what} is not valid UTF-8 JSON") from None
    except MaskError as e:
        raise JsonRpcError(PARSE_ERROR, str(e)) from None
    return doc


def parse_body(raw: bytes) -> tuple[list[Message], bool]:
    """Parse a POST body `raw` (UTF-8 JSON bytes) into `(messages, is_batch)`.

    Raises `JsonRpcError` with code -32700 for invalid JSON or a repeated member name,
    -32600 for an empty batch or any invalid message: one bad item refuses the whole body,
    so nothing is forwarded half-checked.
    """
    doc = _document(raw, "the body")
    if isinstance(doc, list):
        if not doc:
            raise JsonRpcError(INVALID_REQUEST, "an empty batch is not a valid JSON-RPC request")
        return [_message(item) for item in doc], True
    return [_message(doc)], False


def parse_message(raw: bytes) -> Message:
    """Parse one JSON-RPC message `raw` (UTF-8 JSON bytes: an SSE event's data, which
    carries exactly one message since revision 2025-06-18 dropped batching) as strictly
    as `parse_body`. Raises `JsonRpcError` (-32700 invalid JSON or a repeated member
    name, -32600 a batch or an invalid message)."""
    doc = _document(raw, "the message")
    if isinstance(doc, list):
        raise JsonRpcError(INVALID_REQUEST, "an event carries one JSON-RPC message, not a batch")
    return _message(doc)


def check_headers(messages: list[Message], is_batch: bool, mcp_method: str | None, mcp_name: str | None) -> None:
    """Refuse a body its `Mcp-Method` / `Mcp-Name` headers (MCP 2026-07-28; None when
    absent) disagree with, since the server or an intermediary may route on either.

    The headers describe one message, so a batch with them present is refused; an absent
    header is accepted (revision 2025-11-25 does not send them). Raises `JsonRpcError`
    (-32600) naming both values.
    """
    if mcp_method is None and mcp_name is None:
        return
    if is_batch:
        raise JsonRpcError(INVALID_REQUEST, "Mcp-Method/Mcp-Name headers cannot describe a batch")
    msg = messages[0]
    if mcp_method is not None and mcp_method != msg.method:
        raise JsonRpcError(INVALID_REQUEST, f"header Mcp-Method {mcp_method!r} disagrees with body method {msg.method!r}")
    if mcp_name is not None and mcp_name != msg.target:
        raise JsonRpcError(INVALID_REQUEST, f"header Mcp-Name {mcp_name!r} disagrees with body target {msg.target!r}")


_REVISION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # MCP revisions are dates; our own fixed pattern


def check_version(value: str | None) -> str | None:
    """The revision an `MCP-Protocol-Version` request header (streamable HTTP, MCP
    2025-06-18 on; None when absent) names, e.g. "2025-11-25". Raises `JsonRpcError`
    (-32600) for a value that is not a revision date, which the server would refuse
    too (and which the audit log would otherwise carry as the client wrote it)."""
    if value is not None and not _REVISION.fullmatch(value):
        raise JsonRpcError(INVALID_REQUEST, "header MCP-Protocol-Version must be a revision date (YYYY-MM-DD)")
    return value


def error_response(mid: Any, code: int, message: str) -> dict[str, Any]:
    """A JSON-RPC 2.0 error response object for request id `mid` (None when unknown)."""
    return {"jsonrpc": "2.0", "id": mid, "error": {"code": code, "message": message}}


# A server-defined code (JSON-RPC 2.0 §5.1 reserves -32000..-32099 for them): the
# gateway refused the call.
REFUSED = -32001


def refusal(note: dict[str, Any], status: int, reason: str, message: str, stage: str) -> tuple[int, bytes] | None:
    """A gateway refusal of an MCP POST as JSON-RPC expects it, or None to answer with
    the HTTP refusal (nothing in the body is a request that awaits an answer).

    `note` is the MCP stage's `hoop.mcp`: `{"invalid": code}` for a body that is not
    valid JSON-RPC (answered HTTP 400 with one error, id null, as the streamable-HTTP
    transport asks), else `{"batch": bool, "calls": [{"method", "id", "has_id", "message"?}]}`:
    each request (a call with a method and an id: a client's answer to the server, with
    no method, awaits no answer) gets an error response carrying its id (code `REFUSED`; its own
    `message` when the stage gave it one, else `message`), with HTTP 200, since MCP
    clients report an HTTP error status as a transport failure and drop the reason.
    `status`, `reason` and `stage` go into each error's `data`. Returns (HTTP status,
    UTF-8 JSON body)."""
    if (code := note.get("invalid")) is not None:
        return 400, orjson.dumps(error_response(None, code, message))
    answers = []
    for call in note.get("calls") or ():
        if call.get("has_id") and call.get("method") is not None:
            answer = error_response(call["id"], REFUSED, call.get("message") or message)
            answer["error"]["data"] = {"reason": reason, "stage": stage, "status": status}
            answers.append(answer)
    if not answers:
        return None
    return 200, orjson.dumps(answers if note.get("batch") else answers[0])
