"""Masking rules on an MCP route reach every message of a JSON-RPC batch, in request
bodies, JSON answers and event streams, with the paths written for one message."""

from __future__ import annotations

from pathlib import Path

import orjson

from hoop_addon.masking.body import mask_body
from hoop_addon.masking.engine import MaskContext
from hoop_addon.masking.sse import EventStreamMasker
from hoop_addon.masking.engine import Evidence
from hoop_addon.masking.vault import TokenSession
from hoop_addon.policy.loader import load_policy

EMAIL = "jane.doe@example.com"
POLICY = """\
version: 1
issuers:
  - {name: idp, issuer: https://idp.example, audience: hoop, jwks: https://idp.example/jwks}
masking:
  - name: pii
    paths: ["$.params.arguments.*", "$.result.content[*].text", "$.result.structuredContent.result"]
    detectors: [email]
routes:
  - name: plain
    match: {hosts: [api.example]}
    allow: {groups: [agents]}
    masking: [pii]
  - name: tools
    match: {hosts: [mcp.example]}
    allow: {groups: [agents]}
    masking: [pii]
    mcp: {default: allow}
"""


def routes(tmp_path: Path) -> dict:
    (tmp_path / "policy.yaml").write_text(POLICY)
    return {r.name: r for r in load_policy(tmp_path).routes}


def call(mid: int, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": mid, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}}


def answer(mid: int, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": text}],
                                                    "structuredContent": {"result": text}}}


def test_a_batch_request_is_masked_message_by_message_on_an_mcp_route_only(tmp_path: Path) -> None:
    found = routes(tmp_path)
    body = orjson.dumps([call(1, f"to {EMAIL}"), call(2, "nothing"), call(3, EMAIL)])
    new, records = mask_body(body, "application/json", found["tools"].rules_for("request"), "request")
    doc = orjson.loads(new)
    assert [m["params"]["arguments"]["text"] for m in doc] == ["to [REDACTED:EMAIL]", "nothing", "[REDACTED:EMAIL]"]
    assert records[0]["count"] == 2 and records[0]["rule"] == "pii"
    assert mask_body(body, "application/json", found["plain"].rules_for("request"), "request")[0] is None  # not an MCP route
    single = orjson.dumps(call(1, EMAIL))  # one message: the paths as written
    assert EMAIL.encode() not in mask_body(single, "application/json", found["tools"].rules_for("request"), "request")[0]


def test_batch_answers_are_masked_as_json_and_as_one_event(tmp_path: Path) -> None:
    rules = routes(tmp_path)["tools"].rules_for("response")
    batch = [answer(1, EMAIL), answer(2, f"mail {EMAIL}")]
    new, _ = mask_body(orjson.dumps(batch), "application/json", rules, "response")
    assert EMAIL.encode() not in new and orjson.loads(new)[1]["result"]["structuredContent"]["result"] == "mail [REDACTED:EMAIL]"
    stream = b"event: message\ndata: " + orjson.dumps(batch) + b"\n\n"
    masker = EventStreamMasker(rules, MaskContext(), Evidence())
    out = b"".join(masker.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + masker.feed(b"", final=True)
    (event,) = [e for e in out.split(b"\n\n") if e]
    doc = orjson.loads(event.split(b"data: ", 1)[1])
    assert [d["result"]["content"][0]["text"] for d in doc] == ["[REDACTED:EMAIL]", "mail [REDACTED:EMAIL]"]


def test_an_event_streamed_tool_result_is_restored_whole_in_one_event(tmp_path: Path) -> None:
    """A JSON-RPC answer ends its text: no tail is held back into an extra event (the
    client would drop it as a second answer to the same id), batch or not."""
    rules = routes(tmp_path)["tools"].rules_for("response")
    session = TokenSession(16)
    token = session.token("EMAIL", EMAIL)
    for doc in (answer(1, f"echo: {token} jane.doe"), [answer(1, f"echo: {token} jane.doe"), answer(2, "b")]):
        masker = EventStreamMasker(rules, MaskContext(tokens=session), Evidence(), restore=session, record=True)
        out = masker.feed(b"data: " + orjson.dumps(doc) + b"\n\n")  # "jane.doe" could begin an address
        assert out.count(b"data: ") == 1 and f"echo: {EMAIL} jane.doe".encode() in out
        assert masker.feed(b"", final=True) == b""
        assert EMAIL.encode() not in bytes(masker.recorded) and token.encode() in bytes(masker.recorded)
