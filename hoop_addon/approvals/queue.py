"""The approval queue: pending requests, who may decide them, decisions, timeouts and
tickets (pure: no mitmproxy, no I/O; the clock is injectable).

A request waiting for approval is a `PendingApproval`. Approvers are checked here and
only here: they must be named by the rule (group or subject), can never decide their
own request, and each counts once. A request is approved once `min_approvals`
distinct approvers approved it, denied by the first deny, and timed out (denied) at
its deadline. Times are Unix seconds (float).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hoop_addon.policy.model import ApprovalRule
from hoop_addon.state.approvals import ApprovalStore, MemoryStore

Outcome = Literal["approved", "denied", "timeout", "shutdown", "abandoned", "unavailable"]

LOCAL_OPERATOR = "local-operator"
"""The subject recorded for decisions taken in mitmproxy itself (console, mitmweb,
`hoop.approve` commands): whoever runs the gateway process."""


class ApprovalError(Exception):
    """A decision was refused. `code` is short and machine-readable (`not_found`,
    `already_decided`, `self_approval`, `not_an_approver`, `already_approved`);
    `status` is the HTTP status the control API answers with; `str()` is a sentence."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code, self.status = code, status


class QueueFull(Exception):
    """As many approvals as the policy allows are pending; `retry_after` is seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many requests are waiting for approval; retry in {retry_after}s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Approver:
    """Who decides: a verified identity (`via` "api") or the local operator (`via`
    "mitmproxy", allowed on every rule: they run the gateway)."""

    subject: str
    groups: tuple[str, ...] = ()
    issuer: str | None = None
    via: Literal["api", "mitmproxy"] = "api"

    @classmethod
    def local_operator(cls) -> Approver:
        return cls(LOCAL_OPERATOR, via="mitmproxy")


@dataclass(slots=True)
class PendingApproval:
    """One request waiting for (or decided by) approvers.

    `requester` is the identity record (subject, issuer, groups, token id), `request`
    a JSON-safe summary shown to approvers (route, method, host, path, masked preview),
    `key` the ticket-mode request key (`hoop_addon.policy.conditions.request_key`).
    """

    id: str
    rule: ApprovalRule
    requester: dict[str, Any]
    request: dict[str, Any]
    key: str
    created: float
    deadline: float
    decisions: list[dict[str, Any]] = field(default_factory=list)
    outcome: Outcome | None = None
    decided_at: float | None = None
    redeemed: bool = False

    def may_decide(self, approver: Approver) -> bool:
        """True when the rule names the approver (the local operator always is) and the
        approver is not the requester."""
        if approver.subject == self.requester.get("subject"):
            return False
        return (
            approver.via == "mitmproxy"
            or self.rule.approver_subjects.has(approver.issuer, approver.subject)
            or self.rule.approver_groups.any_of(approver.issuer, approver.groups)
        )

    def record(self) -> dict[str, Any]:
        """The JSON-safe form for flow metadata, the audit log and the control API:
        id, rule, mode, status (pending or the outcome), requester, request, created,
        deadline, decided_at, waited_s, min_approvals, decisions (approver, via,
        approve, reason, at)."""
        return {
            "id": self.id,
            "rule": self.rule.name,
            "mode": self.rule.mode,
            "status": self.outcome or "pending",
            "requester": self.requester,
            "request": self.request,
            "created": _iso(self.created),
            "deadline": _iso(self.deadline),
            "decided_at": _iso(self.decided_at) if self.decided_at else None,
            "waited_s": round(self.decided_at - self.created, 3) if self.decided_at else None,
            "min_approvals": self.rule.min_approvals,
            "decisions": list(self.decisions),
        }


def new_id() -> str:
    """A fresh unguessable approval id: 16 URL-safe base64 characters (96 random bits)
    that never start with `-`, so no command line reads one as an option."""
    while (value := secrets.token_urlsafe(12)).startswith("-"):
        pass
    return value


def _iso(t: float) -> str:
    """RFC 3339 UTC time with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class ApprovalQueue:
    """The rules of approval over a store of approvals (`hoop_addon.state`: in memory
    by default, or shared by several processes).

    `clock` returns Unix seconds; `on_close` is called with each approval once its
    outcome is set by this process (for metrics). Every method may raise `StateError`
    when a shared store fails. It keeps no state besides its store: callable from
    several threads when the store is (the SQL stores are; memory is not).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        on_close: Callable[[PendingApproval], None] | None = None,
        store: ApprovalStore | None = None,
    ) -> None:
        self.store = store if store is not None else MemoryStore()
        self.clock = clock
        self.on_close = on_close

    def open(
        self, rule: ApprovalRule, requester: dict[str, Any], request: dict[str, Any], key: str, max_pending: int
    ) -> PendingApproval:
        """Queue a request under `rule`; returns it with a fresh unguessable id.
        Raises `QueueFull` when `max_pending` approvals are already pending (in the
        whole store: every process sharing it counts)."""
        self.expire()
        if len(pending := self.pending()) >= max_pending:
            soonest = min(p.deadline for p in pending)
            raise QueueFull(max(1, int(soonest - self.clock()) + 1))
        now = self.clock()
        item = PendingApproval(
            id=new_id(),
            rule=rule,
            requester=requester,
            request=request,
            key=key,
            created=now,
            deadline=now + rule.timeout,
        )
        self.store.add(item)
        return item

    def get(self, approval_id: str) -> PendingApproval:
        """The approval with this id; raises `ApprovalError` (404) when unknown."""
        self.expire()
        if (item := self.store.get(approval_id)) is None:
            raise ApprovalError("not_found", 404, f"no approval '{approval_id}' is known")
        return item

    def pending(self) -> list[PendingApproval]:
        """Undecided approvals, oldest first."""
        return self.store.pending()

    def decide(self, approval_id: str, approver: Approver, approve: bool, reason: str) -> PendingApproval:
        """Record `approver`'s decision. Returns the approval (its `outcome` is set once
        decided). Raises `ApprovalError`: `not_found` (404), `already_decided` (409),
        `self_approval` (403), `not_an_approver` (403), `already_approved` (409: the
        same approver twice). The check and the write are one transaction of the
        store, so they hold for decisions taken at once in several processes."""
        self.expire()
        now = self.clock()

        def apply(item: PendingApproval) -> None:
            if item.outcome is not None:
                raise ApprovalError("already_decided", 409, f"approval '{item.id}' is already {item.outcome}")
            if approver.subject == item.requester.get("subject"):
                raise ApprovalError("self_approval", 403, "nobody may decide on their own request")
            if not item.may_decide(approver):
                raise ApprovalError("not_an_approver", 403, f"you are not an approver of rule '{item.rule.name}'")
            if any(d["approver"] == approver.subject and d["approve"] for d in item.decisions):
                raise ApprovalError("already_approved", 409, "you already approved this request")
            item.decisions.append(
                {"approver": approver.subject, "issuer": approver.issuer, "via": approver.via,
                 "approve": approve, "reason": reason, "at": _iso(now)}
            )
            if not approve:
                item.outcome, item.decided_at = "denied", now
            elif sum(d["approve"] for d in item.decisions) >= item.rule.min_approvals:
                item.outcome, item.decided_at = "approved", now

        if (item := self.store.update(approval_id, apply)) is None:
            raise ApprovalError("not_found", 404, f"no approval '{approval_id}' is known")
        if item.outcome is not None:
            self._closed([item])
        return item

    def expire(self) -> list[PendingApproval]:
        """Time out pending approvals past their deadline (returned) and forget decided
        ones: tickets when their window ends, holds `DECIDED_KEPT_S` after the decision
        (until then a late decision gets `already_decided`, not `not_found`)."""
        return self._closed(self.store.expire(self.clock()))

    def heartbeat(self) -> list[PendingApproval]:
        """Renew this process's lease in the store; returns the approvals of processes
        that died (lease over), now closed as `abandoned`."""
        return self._closed(self.store.heartbeat(self.clock()))

    def forget(self, approval_id: str) -> None:
        """Drop an approval now (a denied ticket, once its retry has been refused)."""
        self.store.delete(approval_id)

    def shutdown(self) -> list[PendingApproval]:
        """Deny every pending approval of this process with outcome `shutdown`;
        returns them."""
        return self._closed(self.store.shutdown(self.clock()))

    def ticket(self, subject: str, key: str) -> PendingApproval | None:
        """The live ticket (pending, or decided within its window and not yet redeemed)
        of this identity for this request key, if any."""
        self.expire()
        return self.store.ticket(subject, key)

    def redeem(self, item: PendingApproval) -> None:
        """Use an approved ticket: its request passes this once, never again (the
        claim is atomic in the store: one process wins)."""
        if item.outcome != "approved" or item.redeemed or not self.store.redeem(item.id):
            raise ApprovalError("not_redeemable", 409, "this ticket cannot be used")
        item.redeemed = True
        self.store.delete(item.id)

    def close(self, item: PendingApproval, outcome: Outcome) -> PendingApproval:
        """Set the outcome of an approval still pending (e.g. `timeout` when its
        holder's timer fires). Returns the approval as the store has it: a decision
        taken meanwhile elsewhere wins (then nothing changes)."""
        now = self.clock()

        def apply(current: PendingApproval) -> None:
            if current.outcome is None:
                current.outcome, current.decided_at = outcome, now

        current = self.store.update(item.id, apply)
        if current is None:  # gone from the store: close the caller's copy
            item.outcome, item.decided_at = item.outcome or outcome, item.decided_at or now
            current = item
        if current.outcome == outcome and current.decided_at == now:
            self._closed([current])
        return current

    def _closed(self, items: list[PendingApproval]) -> list[PendingApproval]:
        if self.on_close is not None:
            for item in items:
                self.on_close(item)
        return items
