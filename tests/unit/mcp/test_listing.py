"""tools/list answers filtered per identity (JSON and event streams), refusals in
JSON-RPC's shape, and what cannot be read refused rather than passed on."""

from __future__ import annotations

import random

import orjson
import pytest

from hoop_addon.mcp.jsonrpc import INVALID_REQUEST, PARSE_ERROR, REFUSED, JsonRpcError, refusal
from hoop_addon.mcp.listing import filter_tools_list, negotiated_version

TOOLS = [{"name": "echo", "inputSchema": {}}, {"name": "delete_bucket", "description": "x"}, {"name": "get_user"}]


def listing(mid=1, tools=TOOLS) -> dict:
    return {"jsonrpc": "2.0", "id": mid, "result": {"tools": tools, "nextCursor": "c2"}}


def visible(tool: dict) -> bool:
    return tool["name"] != "delete_bucket"


def names(doc: dict) -> list[str]:
    return [t["name"] for t in doc["result"]["tools"]]


def test_json_answer_loses_the_hidden_tools_and_keeps_the_rest() -> None:
    new, hidden = filter_tools_list(orjson.dumps(listing()), "application/json", visible)
    doc = orjson.loads(new)
    assert names(doc) == ["echo", "get_user"] and hidden == ["delete_bucket"]
    assert doc["result"]["nextCursor"] == "c2" and doc["result"]["tools"][0] == TOOLS[0]


def test_nothing_hidden_leaves_the_bytes_as_they_are() -> None:
    assert filter_tools_list(orjson.dumps(listing()), "application/json", lambda n: True) == (None, [])
    error = orjson.dumps({"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "no"}})
    assert filter_tools_list(error, "application/json", visible) == (None, [])


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_event_stream_answer_is_filtered_event_by_event(newline: str) -> None:
    note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "delete_bucket"}}
    events = [": comment", "id: 0\ndata:", f"event: message\nid: 7\ndata: {orjson.dumps(listing()).decode()}",
              f"event: message\ndata: {orjson.dumps(note).decode()}"]
    body = (newline * 2).join(e.replace("\n", newline) for e in events) + newline * 2
    new, hidden = filter_tools_list(body.encode(), "text/event-stream", visible)
    out = new.decode().split("\n\n")
    assert hidden == ["delete_bucket"] and out[0] == ": comment" and out[1] == "id: 0\ndata:"
    assert out[2].startswith("event: message\nid: 7\ndata: ") and names(orjson.loads(out[2].split("data: ", 1)[1])) == ["echo", "get_user"]
    assert orjson.loads(out[3].split("data: ", 1)[1]) == note  # not a tool list: unchanged


def test_a_tool_list_split_over_data_lines_is_read_whole() -> None:
    text = orjson.dumps(listing()).decode()
    cut = text.index('"result"')  # the data lines are joined with a newline: JSON whitespace here
    body = f"data: {text[:cut]}\ndata: {text[cut:]}\n\n".encode()
    new, hidden = filter_tools_list(body, "text/event-stream", visible)
    assert hidden == ["delete_bucket"] and names(orjson.loads(new.decode().split("data: ", 1)[1])) == ["echo", "get_user"]


def test_every_tool_list_of_a_body_is_filtered_whatever_its_id() -> None:
    body = "".join(f"data: {orjson.dumps(listing(mid)).decode()}\n\n" for mid in (1, "other")).encode()
    new, hidden = filter_tools_list(body, "text/event-stream", visible)
    assert hidden == ["delete_bucket"] * 2 and b"delete_bucket" not in new


@pytest.mark.parametrize(("body", "mime", "code"), [
    (b"{not json", "application/json", PARSE_ERROR),
    (b'{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"delete_bucket"}]}}', "application/json", PARSE_ERROR),
    (orjson.dumps(listing(tools={"name": "x"})), "application/json", INVALID_REQUEST),
    (orjson.dumps(listing(tools=[{"name": 3}])), "application/json", INVALID_REQUEST),
    (orjson.dumps(listing(tools=["echo"])), "application/json", INVALID_REQUEST),
    (b"data: {oops\n\n", "text/event-stream", PARSE_ERROR),
    (b"data: \xff\n\n", "text/event-stream", PARSE_ERROR),
    (orjson.dumps(listing()), "text/html", PARSE_ERROR),
    (orjson.dumps(listing()), "", PARSE_ERROR),
])
def test_what_cannot_be_read_is_refused(body: bytes, mime: str, code: int) -> None:
    with pytest.raises(JsonRpcError) as caught:
        filter_tools_list(body, mime, visible)
    assert caught.value.code == code


def test_seeded_streams_never_leak_a_hidden_tool() -> None:
    """Random event streams mixing tool lists, notifications, comments and priming
    events, with random line endings: no hidden tool survives, every visible one does."""
    rng = random.Random(19)
    lists = 0
    for _ in range(300):
        events, expected = [], []
        for _ in range(rng.randint(1, 6)):
            kind = rng.choice(["list", "note", "comment", "prime"])
            if kind == "list":
                tools = [{"name": rng.choice(["echo", "delete_bucket", "get_user", "x"])} for _ in range(rng.randint(0, 5))]
                expected.append([t["name"] for t in tools if visible(t)])
                events.append(f"event: message\ndata: {orjson.dumps(listing(rng.randint(0, 9), tools)).decode()}")
                lists += 1
            elif kind == "note":
                events.append('data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}')
            elif kind == "comment":
                events.append(": keep-alive")
            else:
                events.append("id: 1\ndata:")
        newline = rng.choice(["\n", "\r\n", "\r"])
        body = "".join(e.replace("\n", newline) + newline * 2 for e in events).encode()
        new, _ = filter_tools_list(body, "text/event-stream", visible)
        text = (new or body).decode().replace("\r\n", "\n").replace("\r", "\n")
        got = [names(orjson.loads(line[6:])) for line in text.split("\n") if line.startswith("data: {") and '"tools"' in line]
        assert got == expected and "delete_bucket" not in text
    assert lists > 200  # coverage of the generator: most runs carry tool lists


def test_refusal_answers_each_request_of_a_batch_with_its_id() -> None:
    note = {"batch": True, "calls": [
        {"method": "tools/call", "id": 1, "has_id": True, "message": "tools/call 'x' denied by rule 'r': no"},
        {"method": "notifications/progress", "id": None, "has_id": False},
        {"method": None, "id": 5, "has_id": True},  # the client's answer to a server request awaits no answer
        {"method": "ping", "id": "b", "has_id": True},
    ]}
    status, body = refusal(note, 403, "mcp_denied", "batch refused", "mcp")
    answers = orjson.loads(body)
    assert status == 200 and [a["id"] for a in answers] == [1, "b"]
    assert [a["error"]["message"] for a in answers] == ["tools/call 'x' denied by rule 'r': no", "batch refused"]
    assert answers[0]["error"]["code"] == REFUSED and answers[0]["error"]["data"] == {"reason": "mcp_denied", "stage": "mcp", "status": 403}


def test_refusal_of_a_single_request_invalid_body_and_notification() -> None:
    status, body = refusal({"batch": False, "calls": [{"method": "ping", "id": 7, "has_id": True}]}, 503, "approvals_full", "full", "approve")
    assert status == 200 and orjson.loads(body)["id"] == 7 and orjson.loads(body)["error"]["message"] == "full"
    status, body = refusal({"invalid": PARSE_ERROR}, 400, "invalid_jsonrpc", "not JSON", "mcp")
    assert (status, orjson.loads(body)) == (400, {"jsonrpc": "2.0", "id": None, "error": {"code": PARSE_ERROR, "message": "not JSON"}})
    assert refusal({"batch": False, "calls": [{"id": None, "has_id": False}]}, 403, "r", "m", "mcp") is None


@pytest.mark.parametrize("mime", ["application/json", "text/event-stream"])
def test_the_negotiated_version_is_read_from_an_initialize_answer(mime: str) -> None:
    answer = orjson.dumps({"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": "2025-11-25", "capabilities": {}}})
    body = answer if mime == "application/json" else b"event: message\r\ndata: " + answer + b"\r\n\r\n"
    assert negotiated_version(body, mime) == "2025-11-25"
    assert negotiated_version(orjson.dumps({"jsonrpc": "2.0", "id": 0, "error": {"code": 1, "message": "x"}}), "application/json") is None
    with pytest.raises(JsonRpcError):
        negotiated_version(b"data: {\n\n", "text/event-stream")
