"""The mitmproxy addon classes, one per pipeline stage, and what they share.

Stages talk to each other only through `flow.metadata["hoop"]` (JSON-safe: mitmproxy
silently skips saving a flow whose metadata is not) and, for the compiled `Route` the
flow was admitted under, a weak side table (a `Route` is not JSON).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from mitmproxy import exceptions, http

from hoop_addon.control.metrics import STAGE_SECONDS
from hoop_addon.mcp.jsonrpc import refusal
from hoop_addon.policy.model import Route
from hoop_addon.providers.errors import error_body
from hoop_addon.stages.sentinel import mark
from hoop_addon.state.approvals import ApprovalStore, StateError

logger = logging.getLogger("hoop")

SESSION_HEADER = "X-Hoop-Session"

_routes: weakref.WeakKeyDictionary[http.HTTPFlow, Route] = weakref.WeakKeyDictionary()


STORE_TIMEOUT_S = 5.0
"""Longest wait for one call of a shared state store before the flow fails closed."""
T = TypeVar("T")


async def store_call(store: ApprovalStore, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, a call that reaches the state store `store`: on a worker thread
    for a shared store (a store that hangs, e.g. a connection timing out, must not
    stall the other flows on the event loop), inline in memory. Raises `StateError`
    when the store fails or gives no answer within `STORE_TIMEOUT_S` (the thread may
    still finish: a late commit wins in the store)."""
    if not store.blocking:
        return call(*args)
    try:
        return await asyncio.wait_for(asyncio.to_thread(call, *args), STORE_TIMEOUT_S)
    except TimeoutError:
        raise StateError(f"state store {store.name}: no answer within {STORE_TIMEOUT_S:g} s") from None


def hoop(flow: http.HTTPFlow) -> dict[str, Any]:
    """The flow's hoop record, `flow.metadata["hoop"]`, created on first use."""
    return flow.metadata.setdefault("hoop", {})


def client_session(flow: http.HTTPFlow) -> str | None:
    """The client-chosen session label of the `X-Hoop-Session` request header, noted in
    `hoop.client_session` on first use so that it outlives the header (the Mask stage
    removes it before forwarding). None when the client sent none."""
    record = hoop(flow)
    if "client_session" not in record:
        record["client_session"] = flow.request.headers.get(SESSION_HEADER)
    return record["client_session"]


def note_api(flow: http.HTTPFlow, route: Route | None) -> None:
    """Note the provider API `route` declares (`hoop.api`), whose error shape the flow's
    refusals then take (`refuse`); nothing when it declares none."""
    if route is not None and route.api is not None:
        hoop(flow)["api"] = route.api


def mark_admitted(flow: http.HTTPFlow, route: Route | None) -> None:
    """Mark the flow allowed under `route` (None: no route matched, policy allows it)."""
    if route is not None:
        _routes[flow] = route
        note_api(flow, route)
    hoop(flow)["route"] = route.name if route else None
    hoop(flow)["decision"] = {"outcome": "allow"}


def route_of(flow: http.HTTPFlow) -> Route | None:
    """The route the flow was admitted under, or None if it was not admitted under one."""
    return _routes.get(flow)


def allowed(flow: http.HTTPFlow) -> bool:
    """True while no stage has refused the flow."""
    return hoop(flow).get("decision", {}).get("outcome") == "allow"


def refuse(
    flow: http.HTTPFlow,
    status: int,
    stage: str,
    reason: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer the flow ourselves with a JSON error and record the decision.

    `reason` is a short code (`expired`, `no_route`, ...); `message` is shown to the
    client and must not contain secrets or policy internals beyond the rule's name.
    Body: `{"error": reason, "message": message, "stage": stage}`, or the error shape of
    the provider API noted by `note_api` (`hoop_addon.providers.errors`). On an MCP
    POST (noted `hoop.mcp` by the MCP stage) it is a JSON-RPC error response instead,
    HTTP 200, carrying the request's id (`hoop_addon.mcp.jsonrpc.refusal`). The decision
    keeps the shadow rules noted before (`decision.shadow`). A request refused before it
    was forwarded loses its body, its query, and the headers and cookies its route's
    request rules mask.
    """
    body = error_body(hoop(flow).get("api"), status, reason, message, stage)
    if (note := hoop(flow).get("mcp")) is not None and (answer := refusal(note, status, reason, message, stage)) is not None:
        status, body = answer
    flow.response = http.Response.make(status, body, {"Content-Type": "application/json", **(headers or {})})
    if not hoop(flow).get("forwarded"):
        # A refused request keeps no body and no query: they may hold a token, or values
        # masking has not replaced yet (mitmproxy's UIs show the flow, and may save it).
        # A body that arrives after a refusal at its headers is dropped by `Identify.request`.
        if flow.request.raw_content:
            flow.request.raw_content = b""
        if b"?" in flow.request.data.path:
            flow.request.data.path = flow.request.data.path.split(b"?", 1)[0]
        if (route := route_of(flow)) is not None:  # and the headers and cookies its rules mask
            rules = route.rules_for("request")
            for name in {n for r in rules for n in r.headers}:
                flow.request.headers.pop(name, None)
            if any(r.cookies for r in rules):
                flow.request.headers.pop("Cookie", None)
    decision = {"outcome": "deny", "stage": stage, "reason": reason, "message": message}
    if shadow := hoop(flow).get("decision", {}).get("shadow"):
        decision["shadow"] = shadow  # what shadow rules saw stays in the audit line
    hoop(flow)["decision"] = decision


_FLOW_HOOKS = (
    "http_connect", "requestheaders", "request", "responseheaders", "response", "error",
    "http_connect_error", "websocket_message",
)
_BEFORE_UPSTREAM = ("http_connect", "requestheaders", "request")


def _fail_closed(stage: str, hook: str, flow: Any) -> None:
    """A stage's hook raised unexpectedly. mitmproxy would log it and run the next
    addons, i.e. forward the flow half-enforced: refuse it instead. Before the upstream,
    the client gets a 500 and nothing is forwarded; after it, the connection is killed
    so that no body the stage did not finish with reaches the client."""
    logger.exception(f"hoop: {stage}.{hook} failed; the flow is refused")
    if not isinstance(flow, http.HTTPFlow):
        return
    if hook in _BEFORE_UPSTREAM and flow.live:
        refuse(flow, 500, stage.lower(), "internal_error", "the gateway could not process this request; it was not forwarded")
        if flow.intercepted:  # e.g. held for approval: a refused flow left intercepted would hang
            flow.resume()
    elif hook in ("responseheaders", "response", "websocket_message") and flow.killable:
        hoop(flow)["decision"] = {"outcome": "deny", "stage": stage.lower(), "reason": "internal_error",
                                  "message": "the gateway could not process the response; it was withheld"}
        flow.kill()


def _guarded(stage: str, hook: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, timed into `hoop_stage_seconds{stage, hook}`, failing closed on any
    exception it does not handle itself."""
    observe = STAGE_SECONDS.timer(stage, hook)
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def guarded_async(self: Any, flow: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(self, flow)
            except Exception:
                _fail_closed(stage, hook, flow)
            finally:
                observe(time.perf_counter() - start)

        return guarded_async

    @functools.wraps(fn)
    def guarded(self: Any, flow: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(self, flow)
        except Exception:
            _fail_closed(stage, hook, flow)
        finally:
            observe(time.perf_counter() - start)

    return guarded


def _unloading(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stage's `done`, first telling the Sentinel it no longer runs (unloaded by a
    script reload, or shutting down): flows are refused from then on."""

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def done_async(self: Any) -> Any:
            mark(self, False)
            return await fn(self)

        return done_async

    @functools.wraps(fn)
    def done(self: Any) -> Any:
        mark(self, False)
        return fn(self)

    return done


class Stage:
    """Base of every stage: knows whether the proxy is running, so that a
    configuration error stops start-up but, later, only rejects the change; and wraps
    every flow hook its subclasses define, to time it (metric `hoop_stage_seconds`) and
    to fail closed when it raises (mitmproxy itself would carry on with the flow)."""

    started = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in _FLOW_HOOKS:
            if hook in cls.__dict__:
                setattr(cls, hook, _guarded(cls.__name__, hook, cls.__dict__[hook]))
        if "done" in cls.__dict__:
            setattr(cls, "done", _unloading(cls.__dict__["done"]))

    def running(self) -> None:
        self.started = True

    def done(self) -> None:
        mark(self, False)

    def config_error(self, message: str) -> None:
        """Report a configuration error. Before start-up completes it is logged as an
        error, which makes mitmproxy's ErrorCheck exit with status 1 before any port is
        opened; afterwards `OptionsError` makes mitmproxy roll the option back, so the
        previous configuration keeps enforcing."""
        if self.started:
            raise exceptions.OptionsError(message)
        logger.error(message)
