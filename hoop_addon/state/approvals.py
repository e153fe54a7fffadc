"""Approvals in a store: the interface, the in-memory backend and `open_store`.

A row is one `PendingApproval` plus the process that opened it (its `owner`, a random
id per process). The record is the row: a decision is a read-modify-write in one
transaction (so `min_approvals`, "each approver once" and "one deny denies" hold
across processes), a ticket is redeemed by one conditional UPDATE (it passes once,
whichever process sees the retry). A held flow stays in the process that holds it;
that process learns of a decision made elsewhere by polling (SQLite) or by a
PostgreSQL NOTIFY (`watch`).

Leases: every process renews its own lease (`heartbeat`) every `lease_s / 3`
seconds; a pending approval whose owner's lease ran out (the process was killed) is
closed as `abandoned` by the next process whose heartbeat sees it, and is never
approved afterwards.

Times are Unix seconds (float) given by the caller, so that a test's clock applies.
Every backend method may raise `StateError` (the store cannot be reached or failed);
none raises `ApprovalError`: the queue decides what a missing row means.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from hoop_addon.approvals.queue import Outcome, PendingApproval
    from hoop_addon.policy.model import ApprovalRule

DECIDED_KEPT_S = 600.0
"""A decided hold stays in the store this long, so that a late decision is told
`already_decided` rather than `not_found`; a decided ticket stays for its window."""

Rules = Callable[[str], "ApprovalRule | None"]
"""Resolves a rule's name in this process's policy (None: no such rule)."""


class StateError(Exception):
    """The state store cannot be reached or failed; `str()` is a sentence naming the
    store (never its password)."""


def kept_s(item: PendingApproval) -> float:
    """Seconds a decided approval stays in the store after its decision."""
    return float(item.rule.ticket_window) if item.rule.mode == "ticket" else DECIDED_KEPT_S


class ApprovalStore(abc.ABC):
    """Where approvals live. `owner` is this process's id; `poll_s` is how often the
    holder of flows asks for decisions made elsewhere (None: it never needs to, as
    in memory; PostgreSQL's NOTIFY wakes it, its `poll_s` is a fallback).

    Subclasses implement every method; all take and return `PendingApproval`s
    (fresh copies for the SQL backends, the objects themselves in memory)."""

    poll_s: float | None = None
    lease_s: float = 15.0
    blocking = True
    """Calls may wait on I/O (run them off the event loop); False for memory."""
    name: str
    """The store's URL without its password, for messages."""

    def __init__(self) -> None:
        self.owner = secrets.token_hex(8)

    @abc.abstractmethod
    def add(self, item: PendingApproval) -> None:
        """Store a new pending approval, owned by this process."""

    @abc.abstractmethod
    def get(self, approval_id: str) -> PendingApproval | None:
        """The approval with this id, or None (unknown, or its rule is not in this
        process's policy)."""

    @abc.abstractmethod
    def pending(self) -> list[PendingApproval]:
        """Every undecided approval of every process, oldest first."""

    @abc.abstractmethod
    def update(self, approval_id: str, change: Callable[[PendingApproval], None]) -> PendingApproval | None:
        """Atomically apply `change` (which mutates the item: decisions, outcome,
        decided_at; whatever it raises is re-raised and nothing is written) to the
        current row; returns the changed item, or None when there is no such row."""

    @abc.abstractmethod
    def redeem(self, approval_id: str) -> bool:
        """Claim an approved, unredeemed ticket: True for exactly one caller."""

    @abc.abstractmethod
    def delete(self, approval_id: str) -> None:
        """Forget an approval now."""

    @abc.abstractmethod
    def ticket(self, subject: str, key: str) -> PendingApproval | None:
        """The oldest unredeemed ticket of `subject` for request key `key`."""

    @abc.abstractmethod
    def expire(self, now: float) -> list[PendingApproval]:
        """Close pending approvals past their deadline as `timeout` (returned: those
        this call closed) and delete decided ones kept long enough."""

    @abc.abstractmethod
    def shutdown(self, now: float) -> list[PendingApproval]:
        """Close this process's pending approvals as `shutdown` (returned) and end its
        lease."""

    @abc.abstractmethod
    def heartbeat(self, now: float) -> list[PendingApproval]:
        """Renew this process's lease until `now + lease_s`; close as `abandoned` the
        pending approvals of processes whose lease ended (returned)."""

    @abc.abstractmethod
    def decided(self, ids: list[str]) -> set[str]:
        """Which of `ids` have an outcome (or are gone)."""

    def watch(self, wake: Callable[[str], None]) -> None:
        """Call `wake(approval_id)` (from any thread) when an approval is decided
        elsewhere; a no-op where `poll_s` does the job."""

    def close(self) -> None:
        """Release connections and threads."""


class MemoryStore(ApprovalStore):
    """One process's approvals in a dict (the default: nothing is shared)."""

    name = "memory"
    blocking = False

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[str, PendingApproval] = {}

    def add(self, item: PendingApproval) -> None:
        self.items[item.id] = item

    def get(self, approval_id: str) -> PendingApproval | None:
        return self.items.get(approval_id)

    def pending(self) -> list[PendingApproval]:
        return [p for p in self.items.values() if p.outcome is None]

    def update(self, approval_id: str, change: Callable[[PendingApproval], None]) -> PendingApproval | None:
        if (item := self.items.get(approval_id)) is not None:
            change(item)
        return item

    def redeem(self, approval_id: str) -> bool:
        item = self.items.get(approval_id)
        if item is None or item.outcome != "approved" or item.redeemed:
            return False
        item.redeemed = True
        return True

    def delete(self, approval_id: str) -> None:
        self.items.pop(approval_id, None)

    def ticket(self, subject: str, key: str) -> PendingApproval | None:
        return next((p for p in self.items.values() if p.rule.mode == "ticket" and p.key == key
                     and p.requester.get("subject") == subject and not p.redeemed), None)

    def expire(self, now: float) -> list[PendingApproval]:
        expired = []
        for item in list(self.items.values()):
            if item.outcome is None and now >= item.deadline:
                _close(item, "timeout", now)
                expired.append(item)
            elif item.outcome is not None and now >= item.decided_at + kept_s(item):  # type: ignore[operator]
                del self.items[item.id]
        return expired

    def shutdown(self, now: float) -> list[PendingApproval]:
        items = self.pending()
        for item in items:
            _close(item, "shutdown", now)
        return items

    def heartbeat(self, now: float) -> list[PendingApproval]:
        return []  # one process: nobody else's lease to watch

    def decided(self, ids: list[str]) -> set[str]:
        return {i for i in ids if (p := self.items.get(i)) is None or p.outcome is not None}


def _close(item: PendingApproval, outcome: Outcome, now: float) -> None:
    item.outcome, item.decided_at = outcome, now


def redact(url: str) -> str:
    """`url` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
