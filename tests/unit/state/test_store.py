"""The approval store, the same tests against its three backends (memory, SQLite,
PostgreSQL for real): decisions and their checks through `ApprovalQueue`, several
"processes" (one store object each, with its own connection and owner) sharing one
database, atomic decisions and ticket claims under threads racing, leases and
abandonment, and the URLs `open_store` accepts."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from hoop_addon.approvals.queue import ApprovalError, ApprovalQueue, Approver, QueueFull
from hoop_addon.policy.model import ApprovalRule, Conditions, Names
from hoop_addon.state.approvals import DECIDED_KEPT_S, ApprovalStore, StateError
from hoop_addon.state.url import open_store
from tests.support.postgres import free_port

REQUESTER = {"subject": "agent-7", "issuer": "https://idp", "groups": ["agents"], "token_id": None}
SUMMARY = {"route": "llm", "method": "POST", "url": "https://api/v1/x", "preview": "{}"}
APPROVERS = [Approver(f"sre-{i}", ("sre",), "https://idp") for i in range(8)]


def rule(name: str, **kw) -> ApprovalRule:
    return ApprovalRule(name=name, when=Conditions(methods=frozenset({"POST"})), approver_groups=Names(frozenset({"sre"})),
                        approver_subjects=Names(frozenset()), reason="why", **kw)


RULES = {r.name: r for r in (rule("one"), rule("three", min_approvals=3), rule("ticket", mode="ticket", ticket_window=60),
                            rule("short", timeout=10))}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], ApprovalStore]]:
    """A factory of stores on one fresh database: each call is another process (the
    same object for memory, which one process alone uses)."""
    made: list[ApprovalStore] = []
    if request.param == "memory":
        shared = open_store("memory", RULES.get)
        yield lambda: shared
        return
    if request.param == "sqlite":
        url = f"sqlite://{tmp_path / 'state.db'}"
    else:
        base = request.getfixturevalue("postgres_url")
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        url = base.rsplit("/", 1)[0] + "/" + name

    def make() -> ApprovalStore:
        made.append(store := open_store(url, RULES.get, lease_s=30))
        return store

    yield make
    for store in made:
        store.close()


def queues(backend: Callable[[], ApprovalStore], clock: Clock, n: int = 2) -> list[ApprovalQueue]:
    return [ApprovalQueue(clock, store=backend()) for _ in range(n)]


def test_a_decision_in_one_process_is_seen_by_another(backend) -> None:
    clock = Clock()
    a, b = queues(backend, clock)
    item = b.open(RULES["one"], REQUESTER, SUMMARY, "k", 10)
    assert [p.id for p in a.pending()] == [item.id]
    assert a.get(item.id).record()["request"] == SUMMARY and a.get(item.id).requester == REQUESTER
    a.decide(item.id, APPROVERS[0], True, "fine")
    seen = b.get(item.id)
    assert seen.outcome == "approved" and seen.decisions[0]["approver"] == "sre-0" and seen.decisions[0]["reason"] == "fine"
    assert b.pending() == [] and b.store.decided([item.id]) == {item.id}


def test_checks_hold_across_processes(backend) -> None:
    clock = Clock()
    a, b = queues(backend, clock)
    item = b.open(RULES["three"], REQUESTER, SUMMARY, "k", 10)
    codes = []
    for queue, approver in ((a, Approver("agent-7", ("sre",), "https://idp")), (b, Approver("mallory", ("agents",)))):
        with pytest.raises(ApprovalError) as caught:
            queue.decide(item.id, approver, True, "")
        codes.append(caught.value.code)
    assert codes == ["self_approval", "not_an_approver"]
    a.decide(item.id, APPROVERS[0], True, "")
    with pytest.raises(ApprovalError) as caught:
        b.decide(item.id, APPROVERS[0], True, "again, elsewhere")  # each approver counts once, wherever
    assert caught.value.code == "already_approved"
    b.decide(item.id, APPROVERS[1], True, "")
    assert a.get(item.id).outcome is None  # 2 of 3
    assert a.decide(item.id, APPROVERS[2], True, "").outcome == "approved"
    with pytest.raises(ApprovalError) as caught:
        b.decide(item.id, APPROVERS[3], False, "late")
    assert caught.value.code == "already_decided"
    assert [d["approver"] for d in b.get(item.id).decisions] == ["sre-0", "sre-1", "sre-2"]


def test_racing_decisions_count_exactly_min_approvals(backend) -> None:
    """8 approvers at once, each through its own process, on a rule needing 3."""
    clock = Clock()
    qs = queues(backend, clock, 8)
    item = qs[0].open(RULES["three"], REQUESTER, SUMMARY, "k", 10)
    results: list[str] = []
    start = threading.Barrier(8)

    def decide(queue: ApprovalQueue, approver: Approver) -> None:
        start.wait()
        try:
            queue.decide(item.id, approver, True, "")
            results.append("ok")
        except ApprovalError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=decide, args=(q, ap)) for q, ap in zip(qs, APPROVERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = qs[1].get(item.id)
    assert final.outcome == "approved" and len(final.decisions) == 3
    assert sorted(results) == ["already_decided"] * 5 + ["ok"] * 3


def test_a_ticket_is_redeemed_once_across_processes(backend) -> None:
    clock = Clock()
    qs = queues(backend, clock, 6)
    item = qs[0].open(RULES["ticket"], REQUESTER, SUMMARY, "key-1", 10)
    assert qs[1].ticket("agent-7", "key-1").id == item.id and qs[1].ticket("agent-7", "key-2") is None
    qs[2].decide(item.id, APPROVERS[0], True, "")
    found = [q.ticket("agent-7", "key-1") for q in qs]
    assert {f.outcome for f in found} == {"approved"}
    wins: list[bool] = []
    start = threading.Barrier(len(qs))

    def redeem(queue: ApprovalQueue, ticket) -> None:
        start.wait()
        try:
            queue.redeem(ticket)
            wins.append(True)
        except ApprovalError:
            wins.append(False)

    threads = [threading.Thread(target=redeem, args=pair) for pair in zip(qs, found)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]
    assert all(q.ticket("agent-7", "key-1") is None for q in qs)


def test_timeouts_and_keeping(backend) -> None:
    clock = Clock()
    a, b = queues(backend, clock)
    item = b.open(RULES["short"], REQUESTER, SUMMARY, "k", 10)
    clock.now += 9
    assert a.expire() == []
    clock.now += 1
    assert [p.id for p in a.expire()] == [item.id] and b.get(item.id).outcome == "timeout"
    assert b.close(b.get(item.id), "abandoned").outcome == "timeout"  # the first outcome stays
    clock.now += DECIDED_KEPT_S
    with pytest.raises(ApprovalError) as caught:
        b.get(item.id)
    assert caught.value.code == "not_found"


def test_cap_counts_every_process(backend) -> None:
    clock = Clock()
    a, b = queues(backend, clock)
    a.open(RULES["one"], REQUESTER, SUMMARY, "k", 2)
    b.open(RULES["one"], REQUESTER, SUMMARY, "k", 2)
    with pytest.raises(QueueFull):
        a.open(RULES["one"], REQUESTER, SUMMARY, "k", 2)


def test_shutdown_closes_only_its_own(backend) -> None:
    clock = Clock()
    a, b = queues(backend, clock)
    mine = a.open(RULES["one"], REQUESTER, SUMMARY, "k", 10)
    theirs = b.open(RULES["one"], REQUESTER, SUMMARY, "k", 10)
    shared = a.store is not b.store  # in memory, one process has nobody else's approvals
    closed = a.shutdown()
    assert sorted(p.id for p in closed) == sorted([mine.id] if shared else [mine.id, theirs.id])
    assert b.get(mine.id).outcome == "shutdown"
    assert [p.id for p in b.pending()] == ([theirs.id] if shared else [])


def test_a_dead_process_approvals_are_abandoned_after_its_lease(backend) -> None:
    clock = Clock()
    a, b = queues(backend, clock)
    if a.store is b.store:
        pytest.skip("in memory, approvals die with their only process")
    for q in (a, b):
        q.heartbeat()
    held = b.open(RULES["one"], REQUESTER, SUMMARY, "k", 10)
    clock.now += 29  # b stops renewing (kill -9); its lease is 30 s
    assert a.heartbeat() == []
    clock.now += 1
    abandoned = a.heartbeat()
    assert [p.id for p in abandoned] == [held.id] and abandoned[0].outcome == "abandoned"
    with pytest.raises(ApprovalError) as caught:
        a.decide(held.id, APPROVERS[0], True, "too late: nobody holds it")
    assert caught.value.code == "already_decided"
    assert a.heartbeat() == []  # once


def test_an_unknown_rule_hides_the_row(backend) -> None:
    clock = Clock()
    a, b = queues(backend, clock)
    if a.store is b.store:
        pytest.skip("in memory, one process has one policy")
    item = b.open(rule("elsewhere-only"), REQUESTER, SUMMARY, "k", 10)
    assert a.pending() == [] and a.store.get(item.id) is None


def test_postgresql_notifies_the_holder(postgres_url: str) -> None:
    holder, decider = (open_store(postgres_url, RULES.get) for _ in range(2))
    woken: list[str] = []
    event = threading.Event()
    holder.watch(lambda approval_id: (woken.append(approval_id), event.set()))
    try:
        time.sleep(0.3)  # the listener is connected
        queue = ApprovalQueue(store=holder)
        item = queue.open(RULES["one"], REQUESTER, SUMMARY, f"k-{secrets.token_hex(4)}", 1000)
        ApprovalQueue(store=decider).decide(item.id, APPROVERS[0], False, "no")
        assert event.wait(5) and item.id in woken
    finally:
        holder.close()
        decider.close()


@pytest.mark.parametrize(("url", "message"), [
    ("redis://x", "is not a state store"),
    ("sqlite://relative.db", "ABSOLUTE"),
    ("sqlite:///no/such/dir/state.db", "does not exist"),
    ("postgresql://u:s3cret@[::1]:1/db", "is not a state store"),
])
def test_bad_urls_are_refused_with_a_sentence(url: str, message: str) -> None:
    if url.startswith("postgresql"):
        url = "pg" + url  # an unknown scheme with a password: never shown
    with pytest.raises(ValueError) as caught:
        open_store(url, RULES.get)
    assert message in str(caught.value) and "s3cret" not in str(caught.value)


def test_an_unreachable_postgresql_is_a_state_error() -> None:
    with pytest.raises(StateError) as caught:
        open_store(f"postgresql://hoop:s3cret@127.0.0.1:{free_port()}/postgres", RULES.get)
    assert "127.0.0.1" in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_lost_postgresql_connection_is_opened_again(postgres_url: str) -> None:
    store = open_store(postgres_url, RULES.get)
    try:
        queue = ApprovalQueue(store=store)
        item = queue.open(RULES["one"], REQUESTER, SUMMARY, "k", 1000)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (store.conn.info.backend_pid,))
        with pytest.raises(StateError):
            queue.pending()  # the call that finds the connection gone fails (fail closed)...
        assert queue.get(item.id).id == item.id  # ...the next one connects again
    finally:
        store.close()
