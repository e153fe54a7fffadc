"""The control HTTP API: one tornado application on a loopback port, beside the proxy.

Stages add their handlers with `ControlServer.add` before it starts. Every answer is
JSON (but `/metrics`, in the Prometheus text format); errors are
`{"error": code, "message": sentence}`.

    GET  /metrics                    Prometheus exposition (text format 0.0.4)
    GET  /healthz                    200 {"status": "ok"}, or 503 {"status": "failing",
                                     "problems": [...]} when enforcement cannot work

Approvals API (approvers authenticate with `Authorization: Bearer <JWT>` from an
issuer the policy trusts, RFC 6750):

    GET  /approvals                  pending requests this approver may decide
    GET  /approvals/{id}             one approval (its approvers and its requester)
    POST /approvals/{id}/approve     body (optional) {"reason": "..."}
    POST /approvals/{id}/deny        body (optional) {"reason": "..."}

A shared state store that does not answer makes these 503 `state_unavailable`.

MCP tool pins (the same tokens; a route's `mcp.pin_approvers` may accept):

    GET  /mcp/pins                   changed tool definitions awaiting acceptance
    POST /mcp/pins/accept            body {"route", "tool", "fingerprint"}: the new
                                     definition (that fingerprint) becomes the pin
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson
import tornado.httpserver
import tornado.web

from hoop_addon.approvals.queue import ApprovalError, Approver

logger = logging.getLogger("hoop")

MAX_REASON_CHARS = 1000


def parse_listen(value: str) -> tuple[str, int]:
    """Parse `HOST:PORT` (IPv6 as `[::1]:PORT`) where HOST is a loopback address or
    `localhost`. Returns (host, port). Raises `ValueError` with a sentence: the control
    API accepts approvers' tokens over plain HTTP, so it never listens beyond loopback."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{value}' is not HOST:PORT")
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"'{host}' is not a loopback address")
        except ValueError as exc:
            raise ValueError(f"'{value}': the control API listens on loopback only ({exc})") from None
    return host, int(port)


class JSONHandler(tornado.web.RequestHandler):
    """Base handler: JSON answers, JSON errors, no tornado HTML pages or tracebacks."""

    def send(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(orjson.dumps(body))

    def fail(self, status: int, code: str, message: str) -> None:
        self.send(status, {"error": code, "message": message})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.fail(status_code, "error", self._reason)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, tornado.web.HTTPError):
            logger.error(f"hoop: control API error: {value!r}")


class ApprovalService(Protocol):
    """What the approvals API needs from the approval stage."""

    async def authenticate(self, token: str) -> Approver:
        """The verified approver, or `ApprovalError` (401)."""

    async def visible(self, approver: Approver) -> list[dict[str, Any]]:
        """Records of the pending approvals `approver` may decide."""

    async def show(self, approver: Approver, approval_id: str) -> dict[str, Any]:
        """One record, for its approvers and its requester; `ApprovalError` otherwise."""

    async def decide(self, approver: Approver, approval_id: str, approve: bool, reason: str) -> dict[str, Any]:
        """Record a decision; returns the record; raises `ApprovalError`."""

    async def refused(self, approval_id: str, approver: Approver | None, error: ApprovalError) -> None:
        """Report a refused decision attempt (`approver` None: not authenticated)."""


class _ApprovalHandler(JSONHandler):
    def initialize(self, service: ApprovalService) -> None:
        self.service = service

    async def approver(self, approval_id: str | None = None) -> Approver | None:
        """The authenticated approver, or None once a 401 is sent (and, for a decision
        on `approval_id`, reported as refused)."""
        scheme, _, token = (self.request.headers.get("Authorization") or "").partition(" ")
        try:
            if scheme.lower() != "bearer" or not token.strip():
                raise ApprovalError("unauthenticated", 401, "send your own token: Authorization: Bearer <JWT>")
            return await self.service.authenticate(token.strip())
        except ApprovalError as exc:
            if approval_id is not None:
                await self.service.refused(approval_id, None, exc)
            self.set_header("WWW-Authenticate", 'Bearer realm="hoop-control"')
            self.fail(exc.status, exc.code, str(exc))
            return None


class ApprovalsList(_ApprovalHandler):
    async def get(self) -> None:
        if (approver := await self.approver()) is not None:
            self.send(200, {"approvals": await self.service.visible(approver)})


class ApprovalShow(_ApprovalHandler):
    async def get(self, approval_id: str) -> None:
        if (approver := await self.approver()) is None:
            return
        try:
            self.send(200, await self.service.show(approver, approval_id))
        except ApprovalError as exc:
            self.fail(exc.status, exc.code, str(exc))


class ApprovalDecide(_ApprovalHandler):
    async def post(self, approval_id: str, verb: str) -> None:
        if (approver := await self.approver(approval_id)) is None:
            return
        try:
            body = orjson.loads(self.request.body) if self.request.body.strip() else {}
            reason = body.get("reason", "") if isinstance(body, dict) else None
        except orjson.JSONDecodeError:
            reason = None
        if not isinstance(reason, str):
            self.fail(400, "bad_request", 'the body must be JSON {"reason": "..."}')
            return
        try:
            self.send(200, await self.service.decide(approver, approval_id, verb == "approve", reason[:MAX_REASON_CHARS]))
        except ApprovalError as exc:
            await self.service.refused(approval_id, approver, exc)
            self.fail(exc.status, exc.code, str(exc))


def approval_handlers(service: ApprovalService) -> list[tuple[str, type[JSONHandler], dict[str, Any]]]:
    """The approvals API's URL patterns and handlers, for `ControlServer.add`."""
    args = {"service": service}
    return [
        (r"/approvals", ApprovalsList, args),
        (r"/approvals/([A-Za-z0-9_-]{1,64})", ApprovalShow, args),
        (r"/approvals/([A-Za-z0-9_-]{1,64})/(approve|deny)", ApprovalDecide, args),
    ]


class PinService(Protocol):
    """What the MCP pins API needs from the MCP stage."""

    async def authenticate(self, token: str) -> Approver:
        """The verified approver, or `ApprovalError` (401)."""

    def changed(self, approver: Approver) -> list[dict[str, Any]]:
        """The changed tool definitions awaiting acceptance that `approver` may accept;
        raises `ApprovalError` (503 `state_unavailable`)."""

    def accept(self, approver: Approver, route: str, tool: str, fingerprint: str) -> dict[str, Any]:
        """Accept a changed definition; returns `{"route", "tool", "old", "new"}`;
        raises `ApprovalError`."""


class PinsList(_ApprovalHandler):
    async def get(self) -> None:
        if (approver := await self.approver()) is None:
            return
        try:
            self.send(200, {"changed": self.service.changed(approver)})
        except ApprovalError as exc:  # a shared store that fails: 503 state_unavailable
            self.fail(exc.status, exc.code, str(exc))


class PinAccept(_ApprovalHandler):
    async def post(self) -> None:
        if (approver := await self.approver()) is None:
            return
        try:
            body = orjson.loads(self.request.body)
        except orjson.JSONDecodeError:
            body = None
        fields = ("route", "tool", "fingerprint")
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in fields):
            self.fail(400, "bad_request", 'the body must be JSON {"route": "...", "tool": "...", "fingerprint": "<sha256 hex>"}')
            return
        try:
            self.send(200, self.service.accept(approver, *(body[k] for k in fields)))
        except ApprovalError as exc:
            self.fail(exc.status, exc.code, str(exc))


def pin_handlers(service: PinService) -> list[tuple[str, type[JSONHandler], dict[str, Any]]]:
    """The MCP pins API's URL patterns and handlers, for `ControlServer.add`."""
    args = {"service": service}
    return [(r"/mcp/pins", PinsList, args), (r"/mcp/pins/accept", PinAccept, args)]


class MetricsHandler(tornado.web.RequestHandler):
    """GET /metrics: `exposition()` as Prometheus text (no authentication: metrics hold
    no identities' secrets or values, and the port is loopback only)."""

    def initialize(self, exposition: Callable[[], bytes]) -> None:
        self.exposition = exposition

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.exposition())


class HealthHandler(JSONHandler):
    """GET /healthz: 200 when `problems()` is empty, else 503 listing them."""

    def initialize(self, problems: Callable[[], list[str]]) -> None:
        self.problems = problems

    def get(self) -> None:
        problems = self.problems()
        self.send(503 if problems else 200, {"status": "failing", "problems": problems} if problems else {"status": "ok"})


class _NotFound(JSONHandler):
    def prepare(self) -> None:
        self.fail(404, "not_found", "no such endpoint")


class ControlServer:
    """A tornado HTTP server for the control API. `add(pattern, handler, kwargs)`
    before `start(host, port, worker_port=None)` (which binds at once: `OSError` if it
    cannot); `stop()` closes the listening sockets. With `worker_port` (a gateway
    worker), `port` is bound with `SO_REUSEPORT`, shared by all workers, and the same
    API also answers on `worker_port`, this worker's alone."""

    def __init__(self) -> None:
        self.handlers: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = []
        self.server: tornado.httpserver.HTTPServer | None = None

    def add(self, pattern: str, handler: type[tornado.web.RequestHandler], kwargs: dict[str, Any] | None = None) -> None:
        self.handlers.append((pattern, handler, kwargs or {}))

    def start(self, host: str, port: int, worker_port: int | None = None) -> None:
        app = tornado.web.Application(self.handlers, default_handler_class=_NotFound)
        self.server = tornado.httpserver.HTTPServer(app, xheaders=False, max_body_size=64 * 1024)
        try:
            self.server.listen(port, address=host, reuse_port=worker_port is not None)
            if worker_port is not None:
                self.server.listen(worker_port, address=host)
        except OSError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
