"""What an MCP server sends its client, governed end to end: the GET event stream and
server-to-client requests (sampling, elicitation, roots) on a POST's answer stream or
on the GET stream (revision 2025-11-25), with the `mcp` SDK's MCPServer behind the real
gateway (`hoop serve --reverse`) and its ClientSession through it. Each test asserts
on what the client got (its callbacks), what the server got, the audit log and the
recording."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import orjson
import pytest
import uvicorn
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError

from hoop_addon.dev.gateway import Gateway
from tests.conftest import write_policy
from tests.e2e.test_mcp import EMAIL, MCP_KEY, POLICY, McpServer, recorded_flows, start
from tests.support.agents import assert_absent, recorded_bytes
from tests.support.idp import LocalIdP

MASKED = "[REDACTED:EMAIL]"

STREAM_POLICY = POLICY.replace(
    '"$.result.contents[*].text"]',
    '"$.result.contents[*].text", "$.params.data", "$.params.messages[*].content.text", "$.result.content.text",'
    ' "$.result.content.*", "$.params.message"]',
).replace(
    """        - name: everyday
""",
    """        - name: interns-are-not-asked
          server_methods: ["elicitation/*"]
          when: {{groups: [interns]}}
          action: deny
          reason: interns are not asked for anything
        - name: no-roots
          server_methods: [roots/list]
          action: deny
          reason: the client's file roots stay private
        - name: streamers
          tools: [summarize, ask_user, log_pii, list_client_roots, chatty]
          action: allow
        - name: everyday
""",
)


class StreamServer(McpServer):
    """The test MCPServer with tools that speak to the client: sampling (on the
    call's stream, or on the GET stream), elicitation, roots, log notifications."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(tls=tls)
        server = self.mcp
        self.errors: list[str] = []

        @server.tool()
        async def summarize(topic: str, ctx: Context, via_get: bool = False) -> str:
            """Ask the client's model to summarize `topic` (sampling)."""
            message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=f"summarize {topic} for {EMAIL}"))
            result = await ctx.session.create_message(
                [message], max_tokens=20, related_request_id=None if via_get else ctx.request_id)
            return f"model said: {result.content.text}"

        @server.tool()
        async def ask_user(ctx: Context) -> str:
            """Ask the user for their email (elicitation)."""
            try:
                result = await ctx.session.elicit(
                    f"Which address, {EMAIL}?", {"type": "object", "properties": {"email": {"type": "string"}}},
                    related_request_id=ctx.request_id)
            except Exception as exc:  # noqa: BLE001 - the server's view of a withheld request
                self.errors.append(str(exc))
                raise
            return f"user said: {result.content}"

        @server.tool()
        async def list_client_roots(ctx: Context) -> str:
            """The client's roots (roots/list)."""
            try:
                result = await ctx.session.list_roots()
            except Exception as exc:  # noqa: BLE001
                self.errors.append(str(exc))
                raise
            return f"roots: {[str(r.uri) for r in result.roots]}"

        @server.tool()
        async def log_pii(ctx: Context) -> str:
            """Log PII to the client: on the GET stream and on the call's stream."""
            await ctx.session.send_log_message("info", f"standalone {EMAIL}")
            await ctx.log("info", f"in-call {EMAIL}")
            return "logged"


class Client:
    """What the SDK client's callbacks received."""

    def __init__(self) -> None:
        self.sampled: list[str] = []
        self.elicited: list[str] = []
        self.roots = 0
        self.logs: list[Any] = []

    async def sampling(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.sampled.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text=f"done, mail {EMAIL}"),
                                         model="test-model")

    async def elicitation(self, context: Any, params: Any) -> types.ElicitResult:
        self.elicited.append(params.message)
        return types.ElicitResult(action="accept", content={"email": EMAIL})

    async def list_roots(self, context: Any) -> types.ListRootsResult:
        self.roots += 1
        return types.ListRootsResult(roots=[types.Root(uri="file:///home/jane/secret")])

    async def logging(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)


def refused(name: str) -> Callable[[ClientSession], Awaitable[str]]:
    """A session's work: call tool `name`, which must fail; the JSON-RPC error's message."""

    async def work(s: ClientSession) -> str:
        with pytest.raises(MCPError) as caught:
            await s.call_tool(name, {})
        return caught.value.error.message

    return work


def run[T](url: str, token: str, client: Client, work: Callable[[ClientSession], Awaitable[T]],
           until: Callable[[], bool] = lambda: True) -> T:
    """`work` in an initialized SDK session through the gateway with `client`'s
    callbacks; the session stays open (its GET stream too) until `until()` holds."""

    async def main() -> T:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30.0, read=90.0)) as http:
            async with streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write, sampling_callback=client.sampling, elicitation_callback=client.elicitation,
                                         list_roots_callback=client.list_roots, logging_callback=client.logging) as s:
                    await s.initialize()
                    result = await work(s)
                    deadline = time.monotonic() + 10
                    while not until() and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    return result

    return asyncio.run(main())


@pytest.fixture(scope="module")
def stream_server() -> Iterator[StreamServer]:
    with StreamServer() as server:
        yield server


@pytest.fixture(scope="module")
def stream_gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki, stream_server: StreamServer) -> Iterator[tuple[Gateway, str]]:
    gw, url = start(tmp_path_factory, idp, pki, stream_server, policy=STREAM_POLICY)
    yield gw, url
    gw.stop()


def server_entries(gw: Gateway, method: str, count: int = 1) -> list[dict[str, Any]]:
    """The `mcp_server_message` audit entries of `method`, once there are `count`."""
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in gw.audit(("mcp_server_message",)) if e["method"] == method]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def posted(server: McpServer, since: int) -> list[Any]:
    """The JSON bodies POSTed to the server since request `since`."""
    return [orjson.loads(bytes(r["body"])) for r in server.requests[since:] if r["method"] == "POST" and r["body"]]


@pytest.mark.parametrize("via_get", [False, True], ids=["on-the-call-stream", "on-the-get-stream"])
def test_sampling_passes_masked_both_ways_and_is_audited(stream_gateway, stream_server: StreamServer, idp: LocalIdP,
                                                         via_get: bool) -> None:
    gw, url = stream_gateway
    client, seen = Client(), len(stream_server.requests)
    before = len(server_entries(gw, "sampling/createMessage", 0))
    result = run(url, idp.mint(groups=["agents"]), client, lambda s: s.call_tool("summarize", {"topic": "q3", "via_get": via_get}))
    assert client.sampled == [f"summarize q3 for {MASKED}"]  # the server's request, masked for the client
    assert result.content[0].text == f"model said: done, mail {MASKED}" and not result.is_error
    answers = [m for m in posted(stream_server, seen) if "result" in m and "method" not in m]
    assert [a["result"]["content"]["text"] for a in answers] == [f"done, mail {MASKED}"]  # the client's answer, masked
    entries = server_entries(gw, "sampling/createMessage", before + 1)[before:]
    assert [(e["outcome"], e["kind"], e["stream"], e["rule"]) for e in entries] == [
        ("allow", "request", "GET" if via_get else "POST", None)]
    assert_absent(recorded_bytes(gw), (EMAIL,))


def test_a_denied_elicitation_never_reaches_the_client_and_the_server_gets_the_rules_error(stream_gateway, stream_server: StreamServer,
                                                                                          idp: LocalIdP) -> None:
    gw, url = stream_gateway
    client = Client()
    before = len(server_entries(gw, "elicitation/create", 0))
    message = run(url, idp.mint(groups=["agents", "interns"]), client, refused("ask_user"))
    assert client.elicited == []  # withheld: the client never saw it
    # the gateway answered the server, whose tool failed with the rule's message
    assert message == ("elicitation/create denied by rule 'interns-are-not-asked': interns are not asked for anything "
                       "(the gateway withheld it from the client)")
    assert any("denied by rule 'interns-are-not-asked': interns are not asked for anything" in e for e in stream_server.errors)
    (entry,) = server_entries(gw, "elicitation/create", before + 1)[before:]
    assert (entry["outcome"], entry["rule"], entry["identity"]["groups"]) == ("deny", "interns-are-not-asked", ["agents", "interns"])
    # an agent outside the group is asked, and its answer reaches the server masked
    other, seen = Client(), len(stream_server.requests)
    result = run(url, idp.mint(groups=["agents"]), other, lambda s: s.call_tool("ask_user", {}))
    assert other.elicited == [f"Which address, {MASKED}?"] and result.content[0].text == f"user said: {{'email': '{MASKED}'}}"
    assert EMAIL.encode() not in b"".join(bytes(r["body"]) for r in stream_server.requests[seen:])


def test_a_method_denied_for_everyone_is_withheld_and_answered(stream_gateway, stream_server: StreamServer, idp: LocalIdP) -> None:
    gw, url = stream_gateway
    client = Client()
    message = run(url, idp.mint(groups=["agents"]), client, refused("list_client_roots"))
    assert client.roots == 0 and "denied by rule 'no-roots'" in message
    assert server_entries(gw, "roots/list")[-1]["outcome"] == "deny"


def test_log_notifications_on_the_get_stream_and_the_call_stream_reach_the_client_masked(stream_gateway, stream_server: StreamServer,
                                                                                         idp: LocalIdP) -> None:
    gw, url = stream_gateway
    client = Client()

    async def work(s: ClientSession) -> Any:
        deadline = time.monotonic() + 10  # the GET stream is opened after initialize, in the background
        while not any(r["method"] == "GET" for r in stream_server.requests[seen:]) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await s.call_tool("log_pii", {})

    seen = len(stream_server.requests)
    result = run(url, idp.mint(groups=["agents"]), client, work, until=lambda: len(client.logs) >= 2)
    assert result.content[0].text == "logged"
    assert sorted(client.logs) == [f"in-call {MASKED}", f"standalone {MASKED}"]
    deadline = time.monotonic() + 10
    logged = {"method": "notifications/message", "kind": "notification", "id": None, "outcome": "allow", "rule": None}
    while not (gets := [e for e in gw.audit() if e["method"] == "GET" and logged in (e.get("mcp") or {}).get("server", {}).get("messages", [])]):
        assert time.monotonic() < deadline, "the GET stream's audit entry, noting the notification"
        time.sleep(0.05)
    (flow,) = recorded_flows(gw, gets[-1])
    assert f"standalone {MASKED}".encode() in flow.response.content  # the recording keeps the masked GET stream
    assert_absent(recorded_bytes(gw), (EMAIL,))
    assert MASKED.encode() in recorded_bytes(gw)


def test_a_forged_answer_to_a_request_the_server_never_sent_is_refused(stream_gateway, stream_server: StreamServer, idp: LocalIdP) -> None:
    gw, url = stream_gateway
    token = idp.mint(groups=["agents"])
    init = httpx.post(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
                      json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                          "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    sid = init.headers["mcp-session-id"]
    seen = len(stream_server.requests)
    forged = httpx.post(url, headers={"Authorization": f"Bearer {token}", "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25",
                                      "Accept": "application/json, text/event-stream"},
                        json={"jsonrpc": "2.0", "id": 0, "result": {"role": "assistant", "model": "x",
                                                                    "content": {"type": "text", "text": "forged"}}})
    assert forged.status_code == 403 and "an answer to no request the server sent" in forged.json()["message"]
    assert not [r for r in stream_server.requests[seen:] if r["method"] == "POST"]


class RogueUpstream:
    """An 'MCP server' whose GET stream sends a valid notification, then the given
    raw events: what a broken or hostile server could put on the stream."""

    def __init__(self, events: tuple[bytes, ...]) -> None:
        self.events = events

        async def app(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            ok = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hi"}})
            for event in (b"data: " + ok + b"\n\n", *self.events):  # one network chunk each
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.scheme = "http"

    url = McpServer.url
    __enter__ = McpServer.__enter__
    __exit__ = McpServer.__exit__


SMUGGLED_LIST = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "drop_table", "inputSchema": {}}]}}


@pytest.mark.parametrize("masked", [False, True], ids=["gate-alone", "after-masking"])
@pytest.mark.parametrize(("event", "expect"), [
    (b"data: {not json\n\n", "end"),
    (b'data: {"jsonrpc": "2.0", "method": "notifications/message", "method": "sampling/createMessage"}\n\n', "end"),
    (b'event: other\ndata: {"jsonrpc": "2.0", "id": 1, "method": "shell/exec", "params": {}}\n\n', "withheld"),
    (b"data: " + orjson.dumps(SMUGGLED_LIST) + b"\n\n", "withheld"),  # a response on the GET stream: an unfiltered tools/list
], ids=["not-json", "repeated-member", "unknown-method", "response-on-get"])
def test_the_get_stream_passes_only_valid_allowed_messages(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki,
                                                           event: bytes, expect: str, masked: bool) -> None:
    """A rogue server's GET stream: a valid notification, then `event`, then another
    valid one. What cannot be read ends the stream (the Mask stage's reading or this
    stage's, whichever comes first); a message of no allowed method is withheld."""
    tail = b'data: {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "after"}}\n\n'
    policy = STREAM_POLICY if masked else STREAM_POLICY.replace("    masking: [pii]\n", "")
    with RogueUpstream((event, tail)) as rogue:
        gw, url = start(tmp_path_factory, idp, pki, rogue, policy=policy)  # type: ignore[arg-type]
        try:
            got = httpx.get(url, headers={"Authorization": f"Bearer {idp.mint(groups=['agents'])}", "Accept": "text/event-stream"})
            entries = gw.wait_audit(1)
            events = gw.audit(("mcp_server_message",))
        finally:
            gw.stop()
    assert got.status_code == 200 and got.text.startswith('data: {"jsonrpc":"2.0","method":"notifications/message"')
    assert event.decode() not in got.text and "drop_table" not in got.text and "shell/exec" not in got.text
    (entry,) = [e for e in entries if e["method"] == "GET"]
    if expect == "end":
        assert got.text.endswith("\n\n") and "event: error" in got.text and "after" not in got.text
        assert entry["decision"]["reason"] in ({"unmaskable_response", "unreadable_server_message"} if masked
                                               else {"unreadable_server_message"})
    else:
        assert ": hoop: withheld" in got.text and '"data":"after"' in got.text.replace(" ", "")
        (audited,) = events
        assert audited["outcome"] == "deny" and audited["stream"] == "GET" and entry["mcp"]["server"]["withheld"] == 1


SHELL = b'data: {"jsonrpc": "2.0", "id": 9, "method": "shell/exec", "params": {}}\n\n'


@pytest.mark.parametrize("method", ["tools/call", "tools/list"], ids=["streamed-answer", "buffered-tools-list"])
def test_a_posts_answer_stream_passes_only_allowed_methods_and_its_own_answers(tmp_path_factory: pytest.TempPathFactory,
                                                                              idp: LocalIdP, pki, method: str) -> None:
    """A rogue server answers a POST with an unknown request and a tools/list answer:
    the request is withheld; the answer passes (filtered) only to the tools/list
    whose id it carries, and is withheld from the tools/call (id 1) that never asked."""
    params = {"name": "echo", "arguments": {"text": "a"}} if method == "tools/call" else {}
    listing = b"data: " + orjson.dumps(SMUGGLED_LIST) + b"\n\n"
    with RogueUpstream((SHELL, listing)) as rogue:
        gw, url = start(tmp_path_factory, idp, pki, rogue, policy=STREAM_POLICY)  # type: ignore[arg-type]
        try:
            got = httpx.post(url, headers={"Authorization": f"Bearer {idp.mint(groups=['agents'])}",
                                           "Accept": "application/json, text/event-stream"},
                             json={"jsonrpc": "2.0", "id": 1 if method == "tools/call" else 3, "method": method, "params": params})
            entries = gw.wait_audit(1)
            events = gw.audit(("mcp_server_message",))
        finally:
            gw.stop()
    assert got.status_code == 200 and "shell/exec" not in got.text and "drop_table" not in got.text
    assert got.text.count(": hoop: withheld") == (2 if method == "tools/call" else 1)
    if method == "tools/list":  # its own answer, filtered: the denied tool removed
        assert '"result":{"tools":[]}' in got.text.replace(" ", "")
    assert [(e["kind"], e["outcome"], e["stream"]) for e in events] == [("request", "deny", "POST")] + (
        [("response", "deny", "POST")] if method == "tools/call" else [])
    (entry,) = entries
    assert entry["mcp"]["server"]["withheld"] == len(events)


def test_the_get_stream_needs_an_admitted_identity(stream_gateway, stream_server: StreamServer, idp: LocalIdP) -> None:
    gw, url = stream_gateway
    seen = len(stream_server.requests)
    assert httpx.get(url, headers={"Accept": "text/event-stream"}).status_code == 401
    outsider = httpx.get(url, headers={"Authorization": f"Bearer {idp.mint(groups=['visitors'])}", "Accept": "text/event-stream"})
    assert outsider.status_code == 403
    assert stream_server.requests[seen:] == []


def test_an_unreadable_event_on_a_posts_stream_ends_it_with_an_error_for_the_call(tmp_path_factory: pytest.TempPathFactory,
                                                                                  idp: LocalIdP, pki) -> None:
    policy = STREAM_POLICY.replace("    masking: [pii]\n", "")  # this stage reads it, not the masker
    with RogueUpstream((b'data: {"jsonrpc": "2.0", "id": 1, "result": {}, "result": {"x": 1}}\n\n', SHELL)) as rogue:
        gw, url = start(tmp_path_factory, idp, pki, rogue, policy=policy)  # type: ignore[arg-type]
        try:
            got = httpx.post(url, headers={"Authorization": f"Bearer {idp.mint(groups=['agents'])}",
                                           "Accept": "application/json, text/event-stream"},
                             json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {}}})
            (entry,) = gw.wait_audit(1)
        finally:
            gw.stop()
    last = got.text.rstrip("\n").rsplit("\n\n", 1)[-1]
    assert last.startswith("event: message\ndata: ") and "shell/exec" not in got.text and '"x"' not in got.text
    error = orjson.loads(last.split("data: ", 1)[1])
    assert error["id"] == 1 and error["error"]["code"] == -32001 and "repeats a member name" in error["error"]["message"]
    assert entry["decision"]["reason"] == "unreadable_server_message"


def test_through_https_proxy_a_denied_request_is_answered_to_the_tls_server(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP,
                                                                           pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward-proxy mode, TLS intercepted: the gateway's own answer to a withheld
    request goes to the HTTPS server, trusted as mitmproxy trusts its upstreams; an
    allowed sampling request passes masked."""
    with StreamServer(tls=(pki[1], pki[2])) as server:
        work = tmp_path_factory.mktemp("mcp-stream-forward")
        gw = Gateway(write_policy(work / "rules", idp, STREAM_POLICY), work, pki[0].cert_path, env={"HOOP_TEST_MCP_KEY": MCP_KEY},
                     serve=True)
        gw.start()
        try:
            monkeypatch.setenv("HTTPS_PROXY", gw.proxy())
            monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca_cert))
            monkeypatch.delenv("NO_PROXY", raising=False)
            url = f"{server.url}/mcp"
            client = Client()
            message = run(url, idp.mint(groups=["agents", "interns"]), client, refused("ask_user"))
            assert client.elicited == [] and "denied by rule 'interns-are-not-asked'" in message
            answers = [m for m in posted(server, 0) if "error" in m and "method" not in m]
            assert [a["error"]["code"] for a in answers] == [-32001]
            assert all(("authorization", f"Bearer {MCP_KEY}") in r["headers"] for r in server.requests)
            result = run(url, idp.mint(groups=["agents"]), client, lambda s: s.call_tool("summarize", {"topic": "tls"}))
            assert client.sampled == [f"summarize tls for {MASKED}"] and result.content[0].text == f"model said: done, mail {MASKED}"
            assert_absent(recorded_bytes(gw), (EMAIL,))
        finally:
            gw.stop()
