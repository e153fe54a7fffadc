"""Strict JSON-RPC 2.0 parsing of MCP bodies: hand cases plus a seeded fuzz."""

import random

import orjson
import pytest

from hoop_addon.mcp.jsonrpc import INVALID_REQUEST, PARSE_ERROR, JsonRpcError, check_headers, check_version, parse_body


def call(name="echo", mid=1, **extra):
    return {"jsonrpc": "2.0", "id": mid, "method": "tools/call", "params": {"name": name, "arguments": {}}, **extra}


def test_single_call_names_tool():
    (msg,), batch = parse_body(orjson.dumps(call("read_file", "a")))
    assert (batch, msg.kind, msg.method, msg.id, msg.target) == (False, "request", "tools/call", "a", "read_file")


def test_batch_notification_and_response():
    body = [call(), {"jsonrpc": "2.0", "method": "notifications/initialized"}, {"jsonrpc": "2.0", "id": 9, "result": {}}]
    msgs, batch = parse_body(orjson.dumps(body))
    assert batch and [m.kind for m in msgs] == ["request", "notification", "response"]


@pytest.mark.parametrize(("raw", "code"), [
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"delete_bucket"}}', PARSE_ERROR),
    (b'{"jsonrpc":"2.0",', PARSE_ERROR),
    (b'\xff', PARSE_ERROR),
    (b'[]', INVALID_REQUEST),
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', INVALID_REQUEST),
    (b'{"jsonrpc":2.0,"id":1,"method":"ping"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":7}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":"x"}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["echo"]}}', INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"result":1,"error":{}}', INVALID_REQUEST),
    (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}, 5]', INVALID_REQUEST),
])
def test_refused(raw, code):
    with pytest.raises(JsonRpcError) as e:
        parse_body(raw)
    assert e.value.code == code and e.value.message


def test_headers_must_agree():
    msgs, batch = parse_body(orjson.dumps(call("echo")))
    check_headers(msgs, batch, "tools/call", "echo")
    check_headers(msgs, batch, None, None)
    with pytest.raises(JsonRpcError, match="Mcp-Name 'echo'"):
        check_headers(*parse_body(orjson.dumps(call("delete_bucket"))), "tools/call", "echo")
    with pytest.raises(JsonRpcError, match="Mcp-Method"):
        check_headers(msgs, batch, "tools/list", None)
    with pytest.raises(JsonRpcError, match="batch"):
        check_headers(*parse_body(orjson.dumps([call()])), "tools/call", "echo")


# Seeded fuzz: each generated body is either valid (every item accepted, targets kept in
# order) or refused as a whole; never accepted with an invalid item inside.
_BAD = [
    lambda r: b"{" + bytes([r.randrange(256)]),
    lambda r: orjson.dumps({**call(), "jsonrpc": r.choice(["1.0", 2, None, "2.0 "])}),
    lambda r: orjson.dumps({**call(), "id": r.choice([{}, [], True, False])}),
    lambda r: orjson.dumps({**call(), "method": r.choice([1, None, [], {}])}),
    lambda r: orjson.dumps(call(name=r.choice([["x"], 1, None]))),
    lambda r: b'{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}',
]


def _good(r):
    return r.choice([call(f"t{r.randrange(9)}", r.choice([1, "s", None, 2.5, -3])),
                     {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
                     {"jsonrpc": "2.0", "id": r.randrange(99), "method": "tools/list"}])


def test_fuzz_seeded():
    r = random.Random(19)
    seen = {"valid": 0, "invalid": 0, "batch_mixed": 0, "huge_batch": 0}
    for i in range(1200):
        kind = i % 4
        if kind == 0:
            body, ok = orjson.dumps(_good(r)), True
            seen["valid"] += 1
        elif kind == 1:
            body, ok = r.choice(_BAD)(r), False
            seen["invalid"] += 1
        elif kind == 2:
            items = [_good(r) for _ in range(r.randrange(1, 6))]
            items.insert(r.randrange(len(items) + 1), orjson.loads(orjson.dumps({**call(), "id": {}})))
            body, ok = orjson.dumps(items), False
            seen["batch_mixed"] += 1
        else:
            items = [_good(r) for _ in range(r.choice([1000, 5000]))]
            body, ok = orjson.dumps(items), True
            seen["huge_batch"] += 1
        if ok:
            msgs, _ = parse_body(body)
            assert [m.target for m in msgs if m.method == "tools/call"] == [
                it["params"]["name"] for it in (orjson.loads(body) if body[:1] == b"[" else [orjson.loads(body)])
                if it.get("method") == "tools/call"]
        else:
            with pytest.raises(JsonRpcError):
                parse_body(body)
    print("coverage", seen)
    assert all(v >= 300 for v in seen.values())


def test_a_protocol_version_header_is_a_revision_date() -> None:
    assert check_version("2025-11-25") == "2025-11-25" and check_version(None) is None
    for bad in ("latest", "2025-11-25\n", "2025-11-25, 2026-07-28", "x" * 100, ""):
        with pytest.raises(JsonRpcError) as caught:
            check_version(bad)
        assert caught.value.code == INVALID_REQUEST
