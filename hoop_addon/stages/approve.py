"""Stage 4 (after masking, before the credential): just-in-time approval."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from mitmproxy import command, ctx, exceptions, http
from mitmproxy.connection import ConnectionState
from mitmproxy.hooks import UpdateHook

from hoop_addon.approvals import webhook
from hoop_addon.approvals.inert import inert
from hoop_addon.approvals.queue import ApprovalError, ApprovalQueue, Approver, PendingApproval, QueueFull
from hoop_addon.control.server import approval_handlers
from hoop_addon.identity.verifier import TokenError
from hoop_addon.policy.model import ApprovalRule
from hoop_addon.control.metrics import APPROVAL_OLDEST, APPROVAL_WAIT, APPROVALS_DECIDED, APPROVALS_PENDING
from hoop_addon.stages import STORE_TIMEOUT_S, Stage, allowed, hoop, logger, refuse, store_call
from hoop_addon.stages.audit import Audit
from hoop_addon.stages.control import Control
from hoop_addon.stages.policy import PolicyStage
from hoop_addon.state.approvals import StateError, redact
from hoop_addon.state.url import open_store

PREVIEW_CHARS = 2000
DENIALS = {
    "denied": (403, "approval_denied", "an approver denied this request"),
    "timeout": (403, "approval_timeout", "nobody approved this request in time"),
    "shutdown": (403, "gateway_shutdown", "the gateway shut down before this request was approved"),
    # the client closed its connection, or (shared store) this process's lease ran out
    "abandoned": (403, "client_gone", "the request was abandoned before a decision"),
    "unavailable": (503, "approval_store_unavailable", "the shared approval store cannot be reached"),
}
CLIENT_CHECK_S = 0.5
SWEEP_S = 1.0
T = TypeVar("T")


class Approve(Stage):
    """Holds the requests the Guard stage marked (`hoop.approval.status == "required"`)
    until approvers decide, or answers them with a ticket (rule `mode: ticket`).

    Hold: the flow is intercepted (`flow.intercept()`, visible as such in mitmproxy's
    console and mitmweb) and this async hook waits, so the later stages (credential
    injection, forwarding) run only once it returns; other flows are not delayed.
    Approve: the flow resumes and goes on. Deny, timeout or shutdown: a 403 response
    is set, then the flow resumes (mitmproxy 12 hangs a killed intercepted flow).
    Resuming the flow in mitmproxy without `hoop.approve` denies it (fail closed), and
    so does the client closing its connection (outcome `abandoned`): an agent that gave
    up may retry, and the stale request must not reach the upstream later.

    Ticket: the first request gets 202 `{"error": "approval_pending", "approval_id",
    "rule", "status", "deadline", "message", "stage"}` with `Retry-After`; once
    approved, the same identity's identical request (route, method, URL, body) passes
    once within the rule's `ticket_window`; a denied or timed-out ticket answers its
    retry with 403 once. Beyond the policy's `max_pending`: 503 with `Retry-After`.

    Every outcome goes to `hoop.approval` (the record: approvers, times, reasons, time
    waited) and, without the masked preview, to `hoop.decision.approval` (the audit
    line). Owns option `hoop_webhook` (http(s) URL notified of each pending approval).

    Options `hoop_state` (`memory`, `sqlite:///ABS/PATH`, `postgresql://...`: where
    approvals live, see `hoop_addon.state`) and `hoop_state_lease` (seconds): with a
    shared store, several processes act as one gateway for approvals. A held flow
    stays here; any process's control API lists and decides it; this process wakes on
    the store's notification (PostgreSQL) or poll (SQLite). A store that cannot be
    reached at start-up stops start-up; later, held flows and new approvals are
    refused (503 `approval_store_unavailable`) and `/healthz` fails until it answers.
    This process renews its lease every `lease / 3` seconds and closes as
    `approval_abandoned` the pending approvals of processes whose lease ran out.
    """

    def __init__(self, policy: PolicyStage, control: Control, audit: Audit) -> None:
        self.policy, self.control, self.audit = policy, control, audit
        self.queue = ApprovalQueue(on_close=_observe)
        self.store_problem: str | None = None
        self.lease_s = 15.0
        self.last_heartbeat = 0.0
        self.pending_seen: list[PendingApproval] = []  # a shared store's pending, as of the last sweep
        self.abandoned_seen: list[PendingApproval] = []  # closed by the first heartbeat, audited once running
        APPROVALS_PENDING.set_function(lambda: len(self._pending_or_none()))
        APPROVAL_OLDEST.set_function(self._oldest_wait)
        self.wakeups: dict[str, asyncio.Event] = {}
        self.held: dict[str, http.HTTPFlow] = {}
        self.finished = asyncio.Event()
        self.webhook_url = ""
        self.notifications: set[asyncio.Task[bool]] = set()
        self.sweeper: asyncio.Task[None] | None = None
        self.poller: asyncio.Task[None] | None = None
        self.opening = 0  # flows whose approval is being written to a shared store, not yet held
        self.stopping = False
        for pattern, handler, kwargs in approval_handlers(self):
            control.server.add(pattern, handler, kwargs)

    def _pending_or_none(self) -> list[PendingApproval]:
        """Pending approvals for the metrics: a shared store's as of the last sweep
        (a scrape must not wait for it, nor raise when it fails)."""
        return self.pending_seen if self.queue.store.blocking else self.queue.pending()

    async def _store(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)`, a call of the queue that reaches the store (`store_call`)."""
        return await store_call(self.queue.store, call, *args)

    def _oldest_wait(self) -> float:
        """Seconds the oldest pending approval has waited (0 when none is pending)."""
        pending = self._pending_or_none()
        return max(0.0, self.queue.clock() - min(p.created for p in pending)) if pending else 0.0

    def _rule(self, name: str) -> ApprovalRule | None:
        """The approval rule `name` of the policy in force (None: none such): rows a
        shared store gives back carry the rule's name only."""
        active = self.policy.active
        return active.policy.approval_rule(name) if active else None

    def problems(self) -> list[str]:
        """For `/healthz`: the state store's failure, if it fails now."""
        return [f"state store: {self.store_problem}"] if self.store_problem else []

    def load(self, loader) -> None:
        loader.add_option("hoop_webhook", str, "", "http(s) URL to POST each pending approval to (JSON with a Slack `text`).")
        loader.add_option(
            "hoop_state", str, "memory",
            "Where approvals live: memory (this process only), sqlite:///ABSOLUTE/PATH (processes of one host) "
            "or postgresql://... (several hosts).",
        )
        loader.add_option(
            "hoop_state_lease", str, "15",
            "Seconds a process's approvals outlive its last heartbeat in a shared store (then: approval_abandoned).",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"hoop_state", "hoop_state_lease"}:
            self._configure_store()
        if "hoop_webhook" in updated:
            url = ctx.options.hoop_webhook
            if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
                self.config_error(f"hoop: hoop_webhook: '{url}' is not an http(s) URL")
                return
            self.webhook_url = url

    def _configure_store(self) -> None:
        """Open the store `hoop_state` names (once, at start-up)."""
        if self.started:
            self.config_error("hoop: hoop_state and hoop_state_lease cannot change while the gateway runs")
            return
        try:
            lease = float(ctx.options.hoop_state_lease)
        except ValueError:
            lease = 0.0
        if not 1.0 <= lease <= 3600.0:
            self.config_error(f"hoop: hoop_state_lease: '{ctx.options.hoop_state_lease}' is not a number of seconds "
                              "from 1 to 3600")
            return
        try:
            store = open_store(ctx.options.hoop_state, self._rule, lease)
        except (ValueError, StateError) as exc:
            self.config_error(f"hoop: hoop_state: {exc}")
            return
        self.queue.store.close()
        self.queue.store, self.lease_s = store, lease
        if store.blocking:
            logger.info(f"hoop: approvals in the shared store {redact(ctx.options.hoop_state)} (lease {lease:g} s)")
            try:  # the lease before the first approval; what dead processes left is audited once running
                self.abandoned_seen = self.queue.heartbeat()
                self.last_heartbeat = self.queue.clock()
            except StateError as exc:
                self.config_error(f"hoop: hoop_state: {exc}")

    async def request(self, flow: http.HTTPFlow) -> None:
        record = hoop(flow)
        need = record.get("approval")
        if flow.response is not None or not allowed(flow) or not need or need.get("status") != "required":
            return
        key = need.pop("key")
        active = self.policy.active
        rule = active.policy.approval_rule(need["rule"]) if active else None
        if rule is None:
            _refuse(flow, 503, "approval_unavailable", "the approval rule is no longer in force; retry")
            return
        try:
            await self._approval(flow, record, rule, key, active.policy.max_pending)  # type: ignore[union-attr]
        except StateError as exc:
            self._store_failed(exc)
            if flow.response is None:
                _refuse(flow, 503, "approval_store_unavailable",
                        "the shared approval store cannot be reached; the request was not forwarded")

    async def _approval(self, flow: http.HTTPFlow, record: dict[str, Any], rule: ApprovalRule, key: str, max_pending: int) -> None:
        """Use a ticket, answer with one, or hold the flow. Raises `StateError` when the
        store fails before the flow is held (the caller refuses it)."""
        if rule.mode == "ticket" and (ticket := await self._store(self.queue.ticket, record["identity"]["subject"], key)):
            await self._use_ticket(flow, ticket)
            return
        # Already masked by the Mask stage; read as UTF-8, as masking reads a body.
        preview = (flow.request.get_content(strict=False) or b"")[:4 * PREVIEW_CHARS].decode("utf-8", "replace")
        summary = {
            "route": record.get("route"), "method": flow.request.method,
            "url": flow.request.pretty_url.split("?", 1)[0], "preview": preview[:PREVIEW_CHARS],
        }
        if calls := (record.get("mcp") or {}).get("calls"):  # an MCP call: the approver sees which tool
            summary["mcp"] = {"method": calls[0]["method"], "target": calls[0]["target"]}
        try:
            self.opening += 1
            item = await self._store(self.queue.open, rule, record["identity"], summary, key, max_pending)
        except QueueFull as exc:
            _refuse(flow, 503, "approvals_full", str(exc), {"Retry-After": str(exc.retry_after)})
            return
        finally:
            self.opening -= 1
        if self.stopping:  # shutdown began while the store wrote it: `done` may have missed it
            self._settle(flow, await self._store(self.queue.close, item, "shutdown"))
            return
        try:
            self.audit.event("approval_requested", flow, approval=_audit_view(item))
        except OSError:
            await self._store(self.queue.close, item, "denied")
            _refuse(flow, 503, "audit_failed", "the gateway could not audit this approval request")
            return
        self._notify(item)
        if rule.mode == "ticket":
            self._ticket_answer(flow, item)
            return
        await self._hold(flow, item)

    async def _hold(self, flow: http.HTTPFlow, item: PendingApproval) -> None:
        wakeup = self.wakeups[item.id] = asyncio.Event()
        self.held[item.id] = flow
        hoop(flow)["approval"] = item.record()
        flow.intercept()
        ctx.master.addons.trigger(UpdateHook([flow]))
        logger.info(inert(f"hoop: approval {item.id} pending: {item.requester['subject']} {flow.request.method} "
                          f"{item.request['url']} (rule {item.rule.name})"))
        waits = [asyncio.ensure_future(w) for w in (wakeup.wait(), flow.wait_for_resume(), _client_gone(flow))]
        try:
            await asyncio.wait(waits, timeout=max(0.0, item.deadline - self.queue.clock()), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            del self.wakeups[item.id], self.held[item.id]
        try:
            item = await self._store(self._conclude, item, flow.intercepted, _connected(flow))
        except StateError as exc:  # fail closed: without the store, no decision can be trusted
            self._store_failed(exc)
            item.outcome, item.decided_at = "unavailable", self.queue.clock()
        self._settle(flow, item)
        flow.resume()
        ctx.master.addons.trigger(UpdateHook([flow]))
        if not self.held:
            self.finished.set()

    def _conclude(self, item: PendingApproval, intercepted: bool, connected: bool) -> PendingApproval:
        """The held approval as the store has it once the wait ended, closed by this
        process if nobody decided it: timeout (the flow still `intercepted`, its
        client `connected`), client gone, resumed in mitmproxy (not `intercepted`)."""
        current = self.queue.store.get(item.id) or item
        if current.outcome is not None:
            return current
        if self.store_problem is not None:  # woken by a store failure, which is over already
            return self.queue.close(current, "unavailable")
        if self.stopping:  # held as `done` closed this process's approvals
            return self.queue.close(current, "shutdown")
        if not intercepted:  # resumed in mitmproxy, not decided: fail closed
            try:
                return self.queue.decide(item.id, Approver.local_operator(), False, "resumed in mitmproxy without hoop.approve")
            except ApprovalError:  # the requester is the local operator
                return self.queue.close(current, "denied")
        return self.queue.close(current, "timeout" if connected else "abandoned")

    def _store_failed(self, exc: StateError) -> None:
        """Note the store's failure for `/healthz` (once per failure) and release every
        held flow: each is then refused, since its decision cannot be read."""
        if self.store_problem is None:
            logger.error(f"hoop: {exc}: approvals are refused until it answers")
        self.store_problem = str(exc)
        for wakeup in self.wakeups.values():
            wakeup.set()

    def _woken(self, approval_id: str) -> None:
        """The store says `approval_id` was decided (by any process)."""
        if (wakeup := self.wakeups.get(approval_id)) is not None:
            wakeup.set()

    def _settle(self, flow: http.HTTPFlow, item: PendingApproval) -> None:
        """Write the outcome into the flow's record; refuse it unless approved, and
        unless its client is still there to receive the answer: an approval that
        arrives as the agent disconnects must not send upstream a request nobody waits
        for (it is audited `client_gone`, with the approval it got)."""
        hoop(flow)["approval"] = item.record()
        outcome = item.outcome or "timeout"
        gone = outcome == "approved" and item.rule.mode == "hold" and not _connected(flow)
        if gone:
            outcome = "abandoned"
            hoop(flow)["approval"]["client_gone"] = True
        if outcome != "approved":
            status, reason, message = DENIALS[outcome]
            _refuse(flow, status, reason, f"{message} (approval {item.id}, rule '{item.rule.name}')")
        hoop(flow)["decision"]["approval"] = {**_audit_view(item), **({"client_gone": True} if gone else {})}
        logger.info(f"hoop: approval {item.id} {item.outcome}")

    async def _use_ticket(self, flow: http.HTTPFlow, ticket: PendingApproval) -> None:
        if ticket.outcome is None:
            self._ticket_answer(flow, ticket)
            return
        if ticket.outcome == "approved":
            try:
                await self._store(self.queue.redeem, ticket)  # passes this once
            except ApprovalError:  # another process redeemed it a moment ago
                _refuse(flow, 409, "ticket_used", f"approval {ticket.id} was already used; send a new request")
                return
        else:
            await self._store(self.queue.forget, ticket.id)  # refused this once; a later retry asks again
        self._settle(flow, ticket)
        hoop(flow)["approval"]["redeemed"] = True

    def _ticket_answer(self, flow: http.HTTPFlow, item: PendingApproval) -> None:
        record = hoop(flow)
        record["approval"] = item.record()
        _refuse(
            flow, 202, "approval_pending",
            f"this request needs approval (rule '{item.rule.name}'): retry the identical request once approved",
            {"Retry-After": "30"},
        )
        record["decision"].update(outcome="pending", approval={"id": item.id, "rule": item.rule.name, "status": "pending"})
        body = {
            "error": "approval_pending", "approval_id": item.id, "rule": item.rule.name, "status": "pending",
            "deadline": record["approval"]["deadline"], "message": record["decision"]["message"], "stage": "approve",
        }
        flow.response.set_content(orjson.dumps(body))  # type: ignore[union-attr]

    def _notify(self, item: PendingApproval) -> None:
        if self.webhook_url:
            task = asyncio.ensure_future(webhook.notify(self.webhook_url, webhook.payload(item.record(), self.control.url)))
            self.notifications.add(task)
            task.add_done_callback(self.notifications.discard)

    # The approval service, for the control API and the mitmproxy commands.

    async def authenticate(self, token: str) -> Approver:
        """Verify an approver's own token with the identity stage's verifier."""
        if (active := self.policy.active) is None:
            raise ApprovalError("policy_not_loaded", 503, "the gateway has no policy loaded")
        try:
            identity = await active.verifier.verify(token)
        except TokenError as exc:
            raise ApprovalError(exc.reason, 401, str(exc)) from None
        return Approver(identity.subject, identity.groups, identity.issuer)

    async def visible(self, approver: Approver) -> list[dict[str, Any]]:
        with _store_answers():
            return [p.record() for p in await self._store(self.queue.pending) if p.may_decide(approver)]

    async def show(self, approver: Approver, approval_id: str) -> dict[str, Any]:
        with _store_answers():
            item = await self._store(self.queue.get, approval_id)
        if not item.may_decide(approver) and approver.subject != item.requester.get("subject"):
            raise ApprovalError("not_found", 404, f"no approval '{approval_id}' is known")
        return item.record()

    async def decide(self, approver: Approver, approval_id: str, approve: bool, reason: str) -> dict[str, Any]:
        with _store_answers():
            item = await self._store(self.queue.decide, approval_id, approver, approve, reason)
        return self._decided(item, approver, approve, reason)

    def _decided(self, item: PendingApproval, approver: Approver, approve: bool, reason: str) -> dict[str, Any]:
        """Audit and log a decision taken here; wake its flow if this process holds it."""
        try:
            self.audit.event("approval_decided", identity=item.requester, route=item.request["route"],
                             approver={"subject": approver.subject, "issuer": approver.issuer, "via": approver.via},
                             approve=approve, reason=reason, approval=_audit_view(item))
        except OSError as exc:  # the flow's own audit entry fails too, and withholds its response
            logger.error(f"hoop: approval {item.id}: decision not audited: {exc}")
        logger.info(inert(f"hoop: approval {item.id}: {approver.subject} ({approver.via}) "
                          f"{'approves' if approve else 'denies'}: {reason!r}"))
        if item.outcome is not None and (wakeup := self.wakeups.get(item.id)) is not None:
            wakeup.set()
        return item.record()

    async def refused(self, approval_id: str, approver: Approver | None, error: ApprovalError) -> None:
        """Audit a refused decision attempt (`approval_refused`): who tried (None: no
        valid token), on which approval, and why (`self_approval`, `not_an_approver`,
        `expired`, ...)."""
        who = {"subject": approver.subject, "issuer": approver.issuer, "via": approver.via} if approver else None
        logger.warning(inert(f"hoop: approval {approval_id}: decision refused ({error.code}) for {who and who['subject']}"))
        try:
            item = await self._store(self.queue.store.get, approval_id)
        except StateError:
            item = None
        try:
            self.audit.event(
                "approval_refused", identity=item.requester if item else None, route=item.request["route"] if item else None,
                approval={"id": approval_id, "rule": item.rule.name if item else None}, approver=who, reason=error.code,
            )
        except OSError as exc:
            logger.error(f"hoop: approval {approval_id}: refused attempt not audited: {exc}")

    @command.command("hoop.pending")
    def pending(self) -> Sequence[str]:
        """Pending approvals, one line each: id, rule, requester, method, URL, deadline
        (inert: controls and bidi characters from the request as visible escapes)."""
        try:
            pending = self.queue.pending()
        except StateError as exc:
            raise exceptions.CommandError(str(exc)) from None
        return [
            inert(f"{p.id} rule={p.rule.name} requester={p.requester['subject']} "
                  f"{p.request['method']} {p.request['url']} deadline={p.record()['deadline']}")
            for p in pending
        ]

    @command.command("hoop.approve")
    def approve(self, approval_id: str, reason: str = "") -> None:
        """Approve as the local operator (an approval id, or the id of a held flow)."""
        self._local(approval_id, True, reason)

    @command.command("hoop.deny")
    def deny(self, approval_id: str, reason: str = "") -> None:
        """Deny as the local operator (an approval id, or the id of a held flow)."""
        self._local(approval_id, False, reason)

    def _local(self, approval_id: str, approve: bool, reason: str) -> None:
        by_flow = {f.id: i for i, f in self.held.items()}
        operator = Approver.local_operator()
        try:  # a command is synchronous: it waits for a shared store on the event loop
            with _store_answers():
                item = self.queue.decide(by_flow.get(approval_id, approval_id), operator, approve, reason)
        except ApprovalError as exc:
            raise exceptions.CommandError(str(exc)) from None
        self._decided(item, operator, approve, reason)

    def running(self) -> None:
        super().running()
        loop = asyncio.get_running_loop()
        store = self.queue.store
        store.watch(lambda approval_id: loop.call_soon_threadsafe(self._woken, approval_id))
        self.sweeper = loop.create_task(self._sweep())
        if store.poll_s is not None:
            self.poller = loop.create_task(self._poll(store.poll_s))

    async def _sweep(self) -> None:
        """Every `SWEEP_S`: time out tickets nobody decided (held flows time out on
        their own timers) and, with a shared store, keep the lease and note what is
        pending (for the metrics). The first round runs once every stage runs (the
        audit log writes start-up's entries first)."""
        while True:
            abandoned, self.abandoned_seen = self.abandoned_seen, []  # first round: start-up's heartbeat
            try:
                self._audit_tickets(await self._store(self.queue.expire))
                if self.queue.store.blocking:
                    if self.queue.clock() - self.last_heartbeat >= self.lease_s / 3:
                        abandoned += await self._store(self.queue.heartbeat)
                        self.last_heartbeat = self.queue.clock()
                    self.pending_seen = await self._store(self.queue.pending)
                if self.store_problem is not None:
                    logger.warning("hoop: the state store answers again")
                self.store_problem = None
            except StateError as exc:
                self._store_failed(exc)
            self._audit_abandoned(abandoned)
            await asyncio.sleep(SWEEP_S)

    async def _poll(self, interval: float) -> None:
        """Every `interval` seconds while flows are held: wake those decided elsewhere
        (SQLite has no notifications; for PostgreSQL, a missed NOTIFY)."""
        while True:
            await asyncio.sleep(interval)
            if not self.held:
                continue
            try:
                for approval_id in await self._store(self.queue.store.decided, list(self.held)):
                    self._woken(approval_id)
            except StateError as exc:
                self._store_failed(exc)

    def _audit_abandoned(self, items: list[PendingApproval]) -> None:
        """Audit `approval_abandoned` for approvals whose process died holding them
        (its lease ran out): closed, never approved later against nothing."""
        for item in items:
            logger.warning(f"hoop: approval {item.id}: its gateway process stopped renewing its lease; abandoned")
            try:
                self.audit.event("approval_abandoned", identity=item.requester, route=item.request["route"],
                                 reason="holder_lease_expired", approval=_audit_view(item))
            except OSError as exc:
                logger.error(f"hoop: approval {item.id}: abandonment not audited: {exc}")

    def _audit_tickets(self, items: list[PendingApproval]) -> None:
        """Audit tickets closed without a person (timeout, shutdown): no flow is waiting
        to carry their outcome into its own audit entry."""
        for item in items:
            if item.rule.mode != "ticket":
                continue
            try:
                self.audit.event("approval_decided", identity=item.requester, route=item.request["route"],
                                 approver=None, approve=False, reason=item.outcome, approval=_audit_view(item))
            except OSError as exc:
                logger.error(f"hoop: approval {item.id}: {item.outcome} not audited: {exc}")

    async def done(self) -> None:
        """Deny every pending approval (outcome `shutdown`) and give held flows a moment
        to be answered and audited before the later stages close their files."""
        self.stopping = True
        for task in (self.sweeper, self.poller):
            if task is not None:
                task.cancel()
        try:
            denied = await self._store(self.queue.shutdown)
        except StateError as exc:
            self._store_failed(exc)
            denied = []
        if denied:
            logger.warning(f"hoop: shutting down: {len(denied)} pending approval(s) denied")
        self._audit_tickets(denied)
        opened = bool(self.opening)
        for _ in range(int(STORE_TIMEOUT_S / 0.01)):  # approvals being opened: held, or refused, next
            if not self.opening:
                break
            await asyncio.sleep(0.01)
        if opened and not self.held:
            await asyncio.sleep(0.2)  # let the refused flows' response hooks (record, audit) run
        if self.held:
            self.finished.clear()
            flows = list(self.held.values())
            for wakeup in self.wakeups.values():
                wakeup.set()
            try:
                await asyncio.wait_for(self.finished.wait(), 5.0)
                # answered (mitmproxy marks a flow not live once its response is sent and its
                # hooks, record and audit, ran): under load 0.2 s was not always enough
                for _ in range(500):
                    if not any(f.live for f in flows):
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
            except TimeoutError:
                logger.error(f"hoop: {len(self.held)} held flow(s) did not finish before shutdown")
        self.queue.store.close()


@contextlib.contextmanager
def _store_answers() -> Iterator[None]:
    """A failing store, for the control API: `ApprovalError` 503 `state_unavailable`."""
    try:
        yield
    except StateError as exc:
        raise ApprovalError("state_unavailable", 503, str(exc)) from None


def _observe(item: PendingApproval) -> None:
    """Count a decided approval and how long it waited (metrics)."""
    APPROVALS_DECIDED.labels(item.outcome).inc()
    if item.decided_at is not None:
        APPROVAL_WAIT.observe(item.decided_at - item.created)


def _connected(flow: http.HTTPFlow) -> bool:
    return bool(flow.client_conn.state & ConnectionState.CAN_READ)


async def _client_gone(flow: http.HTTPFlow) -> None:
    """Returns once the client has closed its connection: an approval must not send a
    request upstream that its agent gave up on (and may have retried)."""
    while _connected(flow):
        await asyncio.sleep(CLIENT_CHECK_S)


def _refuse(flow: http.HTTPFlow, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
    """`refuse` by this stage."""
    refuse(flow, status, "approve", reason, message, headers)


def _audit_view(item: PendingApproval) -> dict[str, Any]:
    """The approval record without the request preview and requester (the audit entry
    carries the identity already; previews stay out of a log kept for years)."""
    return {k: v for k, v in item.record().items() if k not in ("request", "requester")}
