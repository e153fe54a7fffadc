"""Stage 3b (after block rules, before masking): govern MCP calls on routes with an
`mcp:` block (Model Context Protocol, JSON-RPC 2.0 over streamable HTTP)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from mitmproxy import ctx, http
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from hoop_addon.approvals import webhook
from hoop_addon.approvals.queue import ApprovalError, Approver
from hoop_addon.control.metrics import MCP_TOOL_CHANGES, labelled
from hoop_addon.control.server import pin_handlers
from hoop_addon.masking.codec import BodyTooLarge, Decoder, decode
from hoop_addon.masking.engine import MaskError
from hoop_addon.mcp.jsonrpc import (
    CLIENT_METHODS, REFUSED, SERVER_NOTIFICATIONS, SERVER_REQUESTS, JsonRpcError, Message, check_headers, check_version,
    error_response, parse_body, refusal,
)
from hoop_addon.mcp.listing import filter_tools_list, negotiated_version
from hoop_addon.mcp.pinning import Change, PinError, PinStore
from hoop_addon.mcp.rules import decide, decide_server, may_list
from hoop_addon.mcp.stream import AwaitedAnswers, EventGate, id_key
from hoop_addon.state.pins import SharedPinStore
from hoop_addon.policy.conditions import UninspectableBody, request_key
from hoop_addon.policy.model import McpPolicy, Route
from hoop_addon.providers.errors import stream_error_event
from hoop_addon.stages import Stage, allowed, hoop, logger, refuse, route_of
from hoop_addon.stages.audit import Audit
from hoop_addon.stages.control import Control
from hoop_addon.stages.mask import Mask
from hoop_addon.stages.policy import PolicyStage


class Mcp(Stage):
    """On a route with an `mcp:` block, reads every POST body as JSON-RPC 2.0
    (`hoop_addon.mcp.jsonrpc`: one message or a batch, strictly) and judges each
    governed call (`tools/call`, `prompts/get`, `resources/read`) by the route's MCP
    rules (`hoop_addon.mcp.rules`), on the body as the agent sent it (before masking).

    - A body that is not valid JSON-RPC, or whose `Mcp-Method` / `Mcp-Name` headers
      disagree with it, is answered HTTP 400 with a JSON-RPC error (-32700 or -32600,
      id null) and never forwarded.
    - A denied call is answered HTTP 200 with a JSON-RPC error carrying its id and a
      message naming the rule (every later refusal of the flow takes that shape too,
      see `hoop_addon.stages.refuse`); an `approve` call is held by the Approve stage
      (`hoop.approval`), its approver seeing the tool name and the masked arguments.
    - Batches fail closed: a batch is forwarded only if every call in it is allowed;
      otherwise no part of it is, and each of its requests is answered with an error
      (the refused call's naming its rule, the others saying why they were not sent).
      A call needing approval must come alone and as a request (with an id), and a
      `tools/list` alone.
    - The response to a lone `tools/list` (JSON, or the event stream of the
      streamable-HTTP transport) is buffered (within `hoop_mask_max_body` once decoded)
      and rewritten so that the identity sees only the tools it may call; a response
      that cannot be read is withheld (a JSON-RPC error), never passed unfiltered.
    - A GET (the server's event stream) is governed by `McpStream`; a resumption
      (`Last-Event-ID`), which could replay an unfiltered `tools/list` answer, is refused.
    - A client's answer to a server's request (a message with `result` or `error` and
      no method) is forwarded only when the gateway gave the client that request in
      the same conversation (route, identity, `Mcp-Session-Id`) and it was not
      answered yet (`self.awaited`, filled by `McpStream`): a forged or replayed answer
      is refused (HTTP 403, the body never forwarded).
    - Tool definitions are pinned (`hoop_addon.mcp.pinning`, per route and tool, in
      this process's memory) the first time a `tools/list` answer lists them; a
      changed one is audited (`mcp_tool_changed`: tool, old and new fingerprints),
      counted (`hoop_mcp_tool_changes_total{route,action}`) and posted to
      `hoop_webhook`, once per new definition; under `pinning: hide` it is also
      removed from `tools/list` and its calls denied until one of the route's
      `pin_approvers` accepts it (control API `/mcp/pins`, audited `mcp_tool_accepted`).

    `hoop.mcp` records `{"batch", "calls": [{"method", "target", "id", "has_id",
    "outcome", "rule"}], "list", "hidden", "changed": [{"tool", "old", "new"}],
    "protocol_version"}`, which the audit entry carries: the revision the request's
    `MCP-Protocol-Version` header names (refused, 400, when it is not a revision
    date), or for an `initialize` the one the server's answer negotiated (its answer
    is buffered for that).
    """

    def __init__(self, policy: PolicyStage, mask: Mask, audit: Audit, control: Control,
                 authenticate: Callable[[str], Awaitable[Approver]]) -> None:
        self.policy, self.mask, self.audit, self.control = policy, mask, audit, control  # Mask owns the decoded-size limit
        self.authenticate = authenticate  # approvers' tokens, verified as the approvals API does
        self.secret = secrets.token_bytes(32)  # approval keys: per process, never written down
        self.local_pins = PinStore()
        self.shared_pins: SharedPinStore | None = None
        self.awaited = AwaitedAnswers()  # the server's requests given to clients, awaiting their answers
        self.notifications: set[asyncio.Task[bool]] = set()
        for pattern, handler, kwargs in pin_handlers(self):
            control.server.add(pattern, handler, kwargs)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow) or (route := route_of(flow)) is None or route.mcp is None:
            return
        record, request = hoop(flow), flow.request
        if request.method == "GET" and "Last-Event-ID" in request.headers:
            refuse(flow, 400, "mcp", "mcp_resumption",
                   "resuming an MCP event stream is not supported through the gateway; send the request again")
            return
        if request.method not in ("POST", "GET", "DELETE"):
            refuse(flow, 405, "mcp", "method_not_allowed",
                   f"an MCP endpoint takes POST (messages), GET (the server's event stream) and DELETE (end of session), not {request.method}")
            return
        if request.method != "POST":
            if request.raw_content:  # a body the server might read as a message, judged by no rule
                refuse(flow, 400, "mcp", "invalid_jsonrpc", f"an MCP {request.method} carries no body; send messages with POST")
            elif request.method == "DELETE":  # the session ends: no answer of it is awaited any more
                self.awaited.forget(conversation(flow, route))
            return
        try:
            body = decode(request.raw_content or b"", request.headers.get("Content-Encoding", ""), self.mask.max_body)
        except BodyTooLarge as exc:
            refuse(flow, 413, "mcp", "request_too_large", f"request body could not be inspected: {exc}")
            return
        except MaskError as exc:
            refuse(flow, 415, "mcp", "uninspectable_request", f"request body could not be inspected: {exc}")
            return
        try:
            messages, batch = parse_body(body)
            check_headers(messages, batch, request.headers.get("Mcp-Method"), request.headers.get("Mcp-Name"))
            version = check_version(request.headers.get("MCP-Protocol-Version"))
        except JsonRpcError as exc:
            record["mcp"] = {"invalid": exc.code}
            refuse(flow, 400, "mcp", "invalid_jsonrpc", exc.message)
            return
        calls: list[dict[str, Any]] = [
            {"method": m.method, "target": m.target, "id": m.id, "has_id": m.has_id} for m in messages
        ]
        record["mcp"] = {"batch": batch, "calls": calls}
        if version is not None:
            record["mcp"]["protocol_version"] = version  # the revision the client says was negotiated
        identity = record["identity"]
        refused: dict[str, Any] | None = None  # the first call refused, which names why
        approval: dict[str, Any] | None = None
        answers = []  # the server's requests this body answers
        for message, call in zip(messages, calls):
            if message.kind == "response":
                if not self.awaited.awaits(conversation(flow, route), message.id):
                    call.update(outcome="deny", message=(
                        "an answer to no request the server sent this client through the gateway "
                        "(or one already answered, or one the gateway withheld)"))
                    refused = refused or call
                else:
                    answers.append(message.id)
                continue
            if message.method is not None and message.method not in CLIENT_METHODS:
                # a misspelling (`Tools/Call`) or a method of no revision: a lenient server
                # could still run it, and no rule would have judged it
                call.update(outcome="deny", message=(
                    f"method '{message.method}' is not one an MCP client sends (revisions 2025-11-25, 2026-07-28)"))
                refused = refused or call
                continue
            if message.method == "tools/list" and batch:
                call.update(outcome="deny", message="tools/list must be sent alone, not in a batch (its answer is filtered)")
                refused = refused or call
            if message.target is None:
                continue
            what = f"{message.method} '{message.target}'"
            if message.method == "tools/call" and route.mcp.pinning == "hide" and self.pins.held(route.name, message.target):
                call.update(outcome="deny", rule=None, message=(
                    f"{what} denied: its definition changed since the gateway pinned it; it is withheld until an approver "
                    "accepts the new definition"))
                refused = refused or call
                continue
            try:
                outcome, rule = decide(route.mcp, message, identity)
            except UninspectableBody as exc:
                call.update(outcome="deny", rule=None, message=f"{what} could not be inspected: {exc}")
                refused = refused or call
                continue
            call.update(outcome=outcome, rule=rule.name if rule else None)
            if outcome == "deny":
                call["message"] = (f"{what} denied by rule '{rule.name}': {rule.reason}" if rule else
                                   f"{what} denied: no MCP rule of route '{route.name}' allows it")
                refused = refused or call
            elif outcome == "approve" and (batch or not message.has_id):
                # held alone, as a request: a batch's other calls would wait too, and a
                # notification has no answer to carry a denial
                call["message"] = f"{what} needs approval (rule '{rule.name}'): send it alone, as a request with an id"  # type: ignore[union-attr]
                refused = refused or call
            elif outcome == "approve":
                approval = call
        if refused is not None:
            for call in calls:
                if call is not refused and "message" not in call:
                    call["message"] = f"not forwarded: another call in this batch was refused ({refused['message']})"
            refuse(flow, 403, "mcp", "mcp_denied", refused["message"])
            record["decision"]["rule"] = refused.get("rule")
            return
        for mid in answers:
            self.awaited.answered(conversation(flow, route), mid)
        if len(messages) == 1 and messages[0].kind == "request" and messages[0].method in ("tools/list", "initialize"):
            # its answer is read whole (the Mask stage buffers it too): filtered, or its version noted
            record["mcp"]["buffer"] = True
            record["mcp"]["list" if messages[0].method == "tools/list" else "initialize"] = True
        if approval is not None and not record.get("approval"):  # one approval per request: a Guard rule's comes first
            key = request_key(self.secret, identity["issuer"], identity["subject"], record.get("route"), request.method,
                              request.url, body)
            record["approval"] = {"rule": approval["rule"], "status": "required", "key": key}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if self._buffered(flow):
            flow.response.stream = False  # type: ignore[union-attr]  # read whole, in `response`

    def response(self, flow: http.HTTPFlow) -> None:
        if not self._buffered(flow) or not allowed(flow):
            return
        response, record = flow.response, hoop(flow)
        if response is None or not 200 <= response.status_code < 300:
            return  # an HTTP error carries no tool list the client would read
        mime = media_type(response)
        if record["mcp"].get("initialize"):
            self._note_version(flow, mime)
            return
        identity, route = record["identity"], route_of(flow)
        policy = route.mcp  # type: ignore[union-attr]
        changes: list[Change] = []

        def visible(tool: dict[str, Any]) -> bool:
            if (change := self.pins.observe(route.name, tool)) is not None:  # type: ignore[union-attr]
                changes.append(change)
                if policy.pinning == "hide":
                    return False
            return may_list(policy, tool["name"], identity)

        try:
            body = decode(response.raw_content or b"", response.headers.get("Content-Encoding", ""), self.mask.max_body)
            new, hidden = filter_tools_list(body, mime, visible)
        except (JsonRpcError, MaskError, PinError) as exc:
            message = exc.message if isinstance(exc, JsonRpcError) else str(exc)
            refuse(flow, 502, "mcp", "unfilterable_response", f"the MCP server's tools/list answer was withheld: {message}")
            return
        record["mcp"]["hidden"] = hidden
        if changes:
            record["mcp"]["changed"] = [{"tool": c.tool, "old": c.old, "new": c.new} for c in changes]
        try:
            for change in changes:
                if change.first:
                    self._changed(flow, change, policy.pinning)
                    self.pins.reported(change)
        except OSError:  # unreported: the next listing reports it again

            refuse(flow, 502, "mcp", "audit_failed", "the MCP server's tools/list answer was withheld: a changed tool could not be audited")
            return
        if new is not None:
            response.content = new  # re-encoded with the response's Content-Encoding

    def _changed(self, flow: http.HTTPFlow, change: Change, action: str) -> None:
        """Report a tool definition seen changed for the first time: audit entry (raises
        `OSError` when it cannot be written), counter, webhook (best effort)."""
        fields = {"server": change.route, "tool": change.tool, "old": change.old, "new": change.new, "action": action}
        self.audit.event("mcp_tool_changed", flow, **fields)
        labelled(MCP_TOOL_CHANGES, change.route, action).inc()
        logger.warning(f"hoop: mcp: tool {change.tool!r} of route {change.route!r} changed since it was pinned ({action})")
        if url := getattr(ctx.options, "hoop_webhook", ""):
            task = asyncio.ensure_future(webhook.notify(url, webhook.pin_payload(
                {"route": change.route, "tool": change.tool, "old": change.old, "new": change.new, "action": action},
                self.control.url)))
            self.notifications.add(task)
            task.add_done_callback(self.notifications.discard)

    @property
    def pins(self) -> PinStore | SharedPinStore:
        """The pins in force: the shared state store's once one is open (`hoop_state`,
        fixed at start-up; every process then sees the same pins), else this process's."""
        store = self.mask.state()
        if not store.blocking:
            return self.local_pins
        if self.shared_pins is None:
            self.shared_pins = SharedPinStore(store)  # type: ignore[arg-type]
        return self.shared_pins

    # The pins service, for the control API.

    def _policy_of(self, route: str) -> McpPolicy | None:
        """The `mcp:` block of the route named `route` in the policy in force, if any."""
        active = self.policy.active
        found = next((r for r in active.policy.routes if r.name == route), None) if active else None
        return found.mcp if found is not None else None

    def changed(self, approver: Approver) -> list[dict[str, Any]]:
        """The pending changes (`PinStore.pending`) on routes whose `pin_approvers` name `approver`."""
        try:
            pending = self.pins.pending()
        except PinError as exc:  # state_unavailable
            raise ApprovalError(exc.code, 503, str(exc)) from None
        return [item for item in pending
                if (policy := self._policy_of(item["route"])) is not None
                and policy.may_accept(approver.issuer, approver.subject, approver.groups)]

    def accept(self, approver: Approver, route: str, tool: str, fingerprint: str) -> dict[str, Any]:
        """Accept the changed definition `fingerprint` of `tool` on `route` for
        `approver` (one of its `pin_approvers`), audited first (`mcp_tool_accepted`):
        unaudited, nothing changes. Raises `ApprovalError`: 403 `not_an_approver`,
        409 `no_change` / `stale_fingerprint`, 503 `audit_failed`."""
        policy = self._policy_of(route)
        if policy is None or not policy.may_accept(approver.issuer, approver.subject, approver.groups):
            raise ApprovalError("not_an_approver", 403, f"you may not accept tool definitions on route '{route}'")
        try:
            old = self.pins.acceptable(route, tool, fingerprint)
        except PinError as exc:
            raise ApprovalError(exc.code, 503 if exc.code == "state_unavailable" else 409, str(exc)) from None
        try:
            self.audit.event("mcp_tool_accepted", route=route, server=route, tool=tool, old=old, new=fingerprint,
                             approver={"subject": approver.subject, "issuer": approver.issuer, "via": approver.via})
        except OSError as exc:
            raise ApprovalError("audit_failed", 503, f"the acceptance could not be audited ({exc.strerror or exc}); nothing changed") from None
        try:
            self.pins.accept(route, tool, fingerprint)
        except PinError as exc:  # changed again, or the store failed, since `acceptable`
            raise ApprovalError(exc.code, 503 if exc.code == "state_unavailable" else 409, str(exc)) from None
        return {"route": route, "tool": tool, "old": old, "new": fingerprint}

    def _note_version(self, flow: http.HTTPFlow, mime: str) -> None:
        """Note in `hoop.mcp.protocol_version` the revision the server's `initialize`
        answer negotiated (MCP lifecycle); an answer that cannot be read goes on as it
        is (nothing in it is filtered), its version unnoted."""
        response = flow.response
        try:
            body = decode(response.raw_content or b"", response.headers.get("Content-Encoding", ""), self.mask.max_body)  # type: ignore[union-attr]
            version = negotiated_version(body, mime)
        except (JsonRpcError, MaskError) as exc:
            logger.warning(f"hoop: mcp: the negotiated protocol version could not be read: {exc}")
            return
        if version is not None:
            hoop(flow)["mcp"]["protocol_version"] = version[:32]  # the server's word, bounded

    @staticmethod
    def _buffered(flow: http.HTTPFlow) -> bool:
        """True for the upstream's answer to a lone tools/list or initialize on an MCP route."""
        return flow.response is not None and bool(hoop(flow).get("forwarded")) and bool((hoop(flow).get("mcp") or {}).get("buffer"))


def media_type(message: http.Message) -> str:
    """The media type of `message`'s `Content-Type` (lower case, no parameters; "" when absent)."""
    return message.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def conversation(flow: http.HTTPFlow, route: Route) -> tuple[str, str | None, str, str | None]:
    """Whose exchange with the MCP server `flow` is part of: (route, issuer, subject,
    `Mcp-Session-Id`), the scope in which the server's requests await the client's answers."""
    identity = hoop(flow).get("identity") or {}
    return route.name, identity.get("issuer"), identity.get("subject", ""), flow.request.headers.get("Mcp-Session-Id")


MAX_NOTED = 64
"""Most server messages listed in a flow's audit entry (`mcp.server.messages`); all are counted."""
ANSWER_TIMEOUT_S = 5.0
"""How long the gateway's answer to a withheld server request may take."""


class McpStream(Stage):
    """After the Mask stage (so on what the client would get, masked): govern what the
    MCP server sends the client on an event stream, the answer stream of a POST and
    the stream a client opens with GET (MCP 2025-11-25), event by event
    (`hoop_addon.mcp.stream.EventGate`).

    - Every event's data must be one valid JSON-RPC message (read as strictly as POST
      bodies); one that is not ends the stream: nothing of it or after it goes on, and
      the client gets a last event saying why (on a POST's stream, a JSON-RPC error for
      each of its requests; on the GET stream an `event: error`).
    - A server request (`SERVER_REQUESTS`: `sampling/createMessage`,
      `elicitation/create`, `roots/list`, `ping`, `tasks/*`) or notification
      (`SERVER_NOTIFICATIONS`) passes unless a rule of the route's `mcp:` block with
      `server_methods` denies it (`hoop_addon.mcp.rules.decide_server`); any other
      method is withheld. A withheld event is replaced by an SSE comment (`: hoop:
      withheld ...`), and a withheld request is answered to the server on the client's
      behalf (a POST of a JSON-RPC error, code -32001, with the gateway-held
      credential), so that the server's tool does not wait for an answer that cannot
      come. Each server request, and each withheld message, gets an audit entry
      (`mcp_server_message`: method, kind, id, outcome, rule, stream); one that cannot
      be written ends the stream. A request that passes is remembered (`Mcp.awaited`)
      so that only the client's answer to it is forwarded.
    - A response passes on a POST's stream only for an id of that POST's requests; on
      the GET stream none does (only a resumed stream carries one, and resumption is
      refused): either would carry an answer no rule judged (an unfiltered tools/list).
    - A lone `tools/list` or `initialize` answer, buffered, is read whole the same way.

    The flow's `hoop.mcp.server` notes `{"messages": [{"method", "kind", "outcome",
    "rule"}...] (at most MAX_NOTED), "count", "withheld"}`."""

    def __init__(self, mcp: Mcp) -> None:
        self.mcp = mcp
        self.answers: set[asyncio.Task[None]] = set()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if (route := self._governed(flow)) is None or (hoop(flow).get("mcp") or {}).get("buffer"):
            return  # a buffered answer is read in `response`
        response = flow.response
        gate = EventGate(self._judge(flow, route))
        inner = response.stream if callable(response.stream) else None  # type: ignore[union-attr]
        decoder: Decoder | None = None
        if inner is None:  # no masking reads it (nor decodes it): this stage does
            try:
                decoder = Decoder(response.headers.get("Content-Encoding", ""), self.mcp.mask.max_body)  # type: ignore[union-attr]
            except MaskError as exc:
                refuse(flow, 502, "mcp", "unreadable_server_stream", f"the MCP server's event stream cannot be read: {exc}")
                return
            response.headers.pop("Content-Encoding", None)  # type: ignore[union-attr]
            if response.headers.pop("Content-Length", None) is not None and flow.request.http_version == "HTTP/1.1":  # type: ignore[union-attr]
                response.headers["Transfer-Encoding"] = "chunked"  # type: ignore[union-attr]
        ended = False

        def stream(chunk: bytes) -> list[bytes]:
            # A list, never b"": an empty HTTP/1.1 chunk would end the response.
            nonlocal ended
            if ended:
                return []
            try:
                if inner is not None:
                    out = inner(chunk)
                    data = out if isinstance(out, bytes) else b"".join(out)
                    decision = hoop(flow).get("decision") or {}
                    if decision.get("outcome") == "deny" and decision.get("stage") == "mask":
                        ended = True  # the Mask stage ended it, with its own last event
                        return [data] if data else []
                else:
                    data = decoder.feed(chunk) if chunk else decoder.feed(b"")  # type: ignore[union-attr]
                passed = gate.feed(data, final=not chunk)
                return [passed] if passed else []
            except Exception as exc:  # fail closed: end the stream, audit why
                ended = True
                return [self._end(flow, exc)]

        response.stream = stream  # type: ignore[union-attr]

    def response(self, flow: http.HTTPFlow) -> None:
        if (route := self._governed(flow)) is None or not (hoop(flow).get("mcp") or {}).get("buffer") or flow.response.stream:  # type: ignore[union-attr]
            return
        response = flow.response
        try:
            body = decode(response.raw_content or b"", response.headers.get("Content-Encoding", ""), self.mcp.mask.max_body)  # type: ignore[union-attr]
            gate = EventGate(self._judge(flow, route))
            new = gate.feed(body, final=True)
        except (JsonRpcError, MaskError, OSError) as exc:  # a message that cannot be read, an audit entry not written
            message = exc.message if isinstance(exc, JsonRpcError) else str(exc)
            refuse(flow, 502, "mcp", "unreadable_server_message", f"the MCP server's answer was withheld: {message}")
            return
        if gate.withheld:
            response.content = new  # type: ignore[union-attr]  # re-encoded with the response's Content-Encoding

    @staticmethod
    def _governed(flow: http.HTTPFlow) -> Route | None:
        """The route of `flow` when its response is an MCP server's event stream to govern."""
        response = flow.response
        if response is None or not hoop(flow).get("forwarded") or not allowed(flow):
            return None
        if (route := route_of(flow)) is None or route.mcp is None:
            return None
        if not 200 <= response.status_code < 300 or media_type(response) != "text/event-stream":
            return None
        return route

    def _judge(self, flow: http.HTTPFlow, route: Route) -> Callable[[Message], str | None]:
        """The `EventGate` judge of `flow`'s stream (see the class)."""
        record = hoop(flow)
        note = record.setdefault("mcp", {}).setdefault("server", {"messages": [], "count": 0, "withheld": 0})
        on_get = flow.request.method == "GET"
        calls = record["mcp"].get("calls") or ()
        expected = {id_key(c["id"]) for c in calls if c.get("has_id") and c.get("method") is not None}
        identity, policy = record.get("identity") or {}, route.mcp

        def judge(message: Message) -> str | None:
            note["count"] += 1
            mid = message.id[:100] if isinstance(message.id, str) else message.id  # the server's words, bounded
            if message.kind == "response":
                if not on_get and id_key(message.id) in expected:
                    return None
                why = "a response on the GET stream" if on_get else "a response to no request of this POST"
                return self._withhold(flow, note, {"method": None, "kind": "response", "id": mid, "outcome": "deny", "rule": None}, why)
            method = message.method or ""
            known = method in (SERVER_REQUESTS if message.kind == "request" else SERVER_NOTIFICATIONS)
            outcome, rule = decide_server(policy, method, identity) if known else ("deny", None)  # type: ignore[arg-type]
            entry = {"method": method[:100], "kind": message.kind, "id": mid if message.has_id else None,
                     "outcome": outcome, "rule": rule.name if rule else None}
            if outcome == "allow":
                if message.kind == "request":
                    self._audit(flow, entry)
                    self.mcp.awaited.expect(conversation(flow, route), message.id)
                if len(note["messages"]) < MAX_NOTED:
                    note["messages"].append(entry)
                return None
            if not known:
                why = f"a server {message.kind} of a method no MCP server sends"
                said = f"the gateway refused {why}"
            else:
                why = f"{method} denied by rule '{rule.name}': {rule.reason}"  # type: ignore[union-attr]
                said = f"{why} (the gateway withheld it from the client)"
            if message.kind == "request":
                self._answer_server(flow, route, message.id, said)
            return self._withhold(flow, note, entry, why)

        return judge

    def _withhold(self, flow: http.HTTPFlow, note: dict[str, Any], entry: dict[str, Any], why: str) -> str:
        """Audit a withheld server message and note it; the comment that replaces it."""
        self._audit(flow, entry)
        note["withheld"] += 1
        if len(note["messages"]) < MAX_NOTED:
            note["messages"].append(entry)
        logger.warning(f"hoop: mcp: withheld from the client: {why}")
        return f"withheld {why}"

    def _audit(self, flow: http.HTTPFlow, entry: dict[str, Any]) -> None:
        """The audit entry of one server message (raises `OSError`: the stream ends)."""
        self.mcp.audit.event("mcp_server_message", flow, stream=flow.request.method, **entry)

    def _end(self, flow: http.HTTPFlow, exc: Exception) -> bytes:
        """The last event of a stream this stage ended on `exc`, the decision recorded:
        on a POST's stream a JSON-RPC error for each of its requests, else `event: error`."""
        message = exc.message if isinstance(exc, JsonRpcError) else (
            f"an audit entry could not be written ({exc})" if isinstance(exc, OSError) else str(exc) or type(exc).__name__)
        said = f"the MCP server's stream was ended by the gateway: {message}"
        logger.error(f"hoop: mcp: stream of {flow.request.pretty_url} ended: {message}")
        record = hoop(flow)
        record["decision"] = {"outcome": "deny", "stage": "mcp", "reason": "unreadable_server_message", "message": said}
        answer = refusal({"batch": record["mcp"].get("batch"), "calls": record["mcp"].get("calls")}, 502,
                         "unreadable_server_message", said, "mcp") if flow.request.method == "POST" else None
        if answer is not None:
            return b"event: message\ndata: " + answer[1] + b"\n\n"
        return stream_error_event(record.get("api"), "unreadable_server_message", said, "mcp")

    def _answer_server(self, flow: http.HTTPFlow, route: Route, mid: Any, message: str) -> None:
        """Answer the server's request `mid`, withheld from the client, with a JSON-RPC
        error on its behalf: a POST to the MCP endpoint `flow` went to, in its session,
        with the route's credential (the client's token never). Best effort: a
        credential the gateway signs per request (`aws_sigv4`) or a failed POST leaves
        the server to its own timeout, logged."""
        credential = route.credential
        if credential is not None and credential.aws is not None:
            logger.warning("hoop: mcp: a withheld server request is not answered on an aws_sigv4 route")
            return
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        for name in ("Mcp-Session-Id", "MCP-Protocol-Version"):
            if name in flow.request.headers:
                headers[name] = flow.request.headers[name]
        if credential is not None and credential.param is None:
            headers[credential.header] = credential.value  # a query credential is in the URL already
        answer = error_response(mid, REFUSED, message)
        answer["error"]["data"] = {"reason": "mcp_denied", "stage": "mcp", "status": 403}
        request = HTTPRequest(
            flow.request.url, method="POST", headers=headers, body=orjson.dumps(answer), request_timeout=ANSWER_TIMEOUT_S,
            validate_cert=not ctx.options.ssl_insecure, ca_certs=ctx.options.ssl_verify_upstream_trusted_ca or None,
        )

        async def send() -> None:
            try:
                reply = await AsyncHTTPClient().fetch(request, raise_error=False)
            except Exception as exc:  # the server then waits for its own timeout
                logger.warning(f"hoop: mcp: the server's withheld request could not be answered: {exc}")
                return
            if reply.code >= 300:
                logger.warning(f"hoop: mcp: the server refused the gateway's answer to its withheld request: HTTP {reply.code}")

        task = asyncio.ensure_future(send())
        self.answers.add(task)
        task.add_done_callback(self.answers.discard)
