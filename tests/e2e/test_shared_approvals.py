"""End to end: two `hoop serve` processes on two ports ("two hosts") sharing one state
store act as one gateway for approvals, with PostgreSQL (a real server) and SQLite.

A flow held by B stays in B; A's control API lists it and records the decision in
the store; B resumes it (woken by NOTIFY, or by its poll with SQLite). Approver checks
and `min_approvals` count across the two; a ticket passes once whichever process sees
the retries; a process killed with -9 leaves approvals that the other closes as
`approval_abandoned` once its lease ends; a process that stops closes its own.
The decision-to-response latency across processes is printed (p50, p99), next to a
plain round trip through the same gateway: figures, never asserted.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
import signal
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.support.idp import LocalIdP
from tests.support.postgres import free_port, running_postgres

LEASE_S = 3
RULES = POLICY + """\
approvals:
  - name: risky
    when: {{headers: {{X-Risk: '^high$'}}}}
    approvers: {{groups: [reviewers]}}
    timeout: 60
  - name: two-person
    when: {{headers: {{X-Risk: '^critical$'}}}}
    approvers: {{groups: [reviewers]}}
    min_approvals: 2
    timeout: 60
  - name: ticketed
    when: {{headers: {{X-Risk: '^ticket$'}}}}
    approvers: {{groups: [reviewers]}}
    mode: ticket
    ticket_window: 60
defaults:
  max_pending: 50
"""
LATENCY_ROUNDS = 20


def serve(work: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], state: str, lease: str = str(LEASE_S)) -> Gateway:
    rules = write_policy(work / "rules", idp, RULES)
    return Gateway(rules, work, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True,
                   options={"hoop_state": state, "hoop_state_lease": lease})


def fresh_database(base: str) -> str:
    name = f"e2e_{secrets.token_hex(6)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP,
         pki: tuple[CA, Path, Path], upstream_server: FakeOpenAI) -> Iterator[tuple[Gateway, Gateway, str]]:
    """Gateways A and B on one store: (a, b, backend)."""
    work = tmp_path_factory.mktemp(f"shared-{request.param}")
    if request.param == "postgresql":
        state = fresh_database(request.getfixturevalue("postgres_url"))
    else:
        state = f"sqlite://{work / 'state.db'}"
    a = serve(work / "a", idp, pki, state).start()
    b = serve(work / "b", idp, pki, state).start()
    yield a, b, request.param
    a.stop()
    b.stop()


class Agent:
    """One identity sending requests through one gateway, from threads."""

    def __init__(self, gateway: Gateway, upstream: FakeOpenAI, token: str) -> None:
        self.upstream = upstream
        self.client = httpx.Client(proxy=gateway.proxy(token), verify=ssl.create_default_context(cafile=gateway.ca_cert),
                                   timeout=60)
        self.pool = ThreadPoolExecutor(8)

    def post(self, content: str, risk: str | None = None) -> httpx.Response:
        return self.client.post(f"{self.upstream.url}/v1/chat/completions", headers={"X-Risk": risk} if risk else {},
                                json={"model": "m", "messages": [{"role": "user", "content": content}]})

    def later(self, content: str, risk: str | None = None) -> Future[httpx.Response]:
        return self.pool.submit(self.post, content, risk)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


@pytest.fixture
def agents(pair: tuple[Gateway, Gateway, str], upstream: FakeOpenAI, idp: LocalIdP) -> Iterator[tuple[Agent, Agent]]:
    token = idp.mint(subject="agent-1", groups=["agents", "reviewers"])  # a reviewer too: never of its own requests
    made = (Agent(pair[0], upstream, token), Agent(pair[1], upstream, token))
    yield made
    for agent in made:
        agent.close()


def api(gateway: Gateway, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.request(method, gateway.control_url + path, json=body, headers={"Authorization": f"Bearer {token}"},
                         timeout=10)


def wait_for(condition: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert value, "condition not met in time"
    return value


def listed(gateway: Gateway, token: str, content_marker: str) -> dict[str, Any]:
    """The pending approval whose preview holds `content_marker`, as `gateway` lists it."""
    return wait_for(lambda: next((i for i in api(gateway, "GET", "/approvals", token).json()["approvals"]
                                  if content_marker in i["request"]["preview"]), None))


def request_entry(gateway: Gateway, approval_id: str) -> dict[str, Any]:
    return wait_for(lambda: next((e for e in gateway.audit() if (e["decision"].get("approval") or {}).get("id") == approval_id),
                                 None))


def test_held_on_b_approved_through_a(pair, agents, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    a, b, backend = pair
    alice = idp.mint(subject="alice", groups=["reviewers"])
    marker = secrets.token_hex(4)
    future = agents[1].later(f"deploy {marker}", risk="high")
    item = listed(a, alice, marker)
    assert item["requester"]["subject"] == "agent-1" and item["rule"] == "risky"
    assert api(a, "POST", f"/approvals/{item['id']}/approve", idp.mint(subject="agent-1", groups=["reviewers"])).json()["error"] == "self_approval"
    assert not future.done() and upstream.received == []
    decided = api(a, "POST", f"/approvals/{item['id']}/approve", alice, {"reason": "via A"})
    assert decided.status_code == 200 and decided.json()["status"] == "approved"
    response = future.result(15)
    assert response.status_code == 200
    assert len([r for r in upstream.received if marker in r.body.decode()]) == 1
    entry = request_entry(b, item["id"])  # the holder audits the flow, with the decision taken on A
    assert entry["decision"]["outcome"] == "allow"
    assert [(d["approver"], d["reason"]) for d in entry["decision"]["approval"]["decisions"]] == [("alice", "via A")]
    def events(gateway: Gateway) -> list[str]:
        return [e["event"] for e in gateway.audit(None) if (e.get("approval") or {}).get("id") == item["id"]]

    assert events(a) == ["approval_refused", "approval_decided"]  # where the approvers acted
    assert events(b) == ["approval_requested"]  # where the flow was held (and its request entry)


def test_denied_through_a_is_answered_by_b(pair, agents, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    a, b, _ = pair
    bob = idp.mint(subject="bob", groups=["reviewers"])
    marker = secrets.token_hex(4)
    future = agents[1].later(f"drop {marker}", risk="high")
    item = listed(a, bob, marker)
    assert api(a, "POST", f"/approvals/{item['id']}/deny", bob, {"reason": "freeze"}).status_code == 200
    response = future.result(15)
    assert response.status_code == 403 and response.json()["error"] == "approval_denied"
    assert not [r for r in upstream.received if marker in r.body.decode()]
    assert api(b, "POST", f"/approvals/{item['id']}/approve", idp.mint(subject="alice", groups=["reviewers"])).json()["error"] == "already_decided"


def test_min_approvals_counts_across_processes(pair, agents, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    a, b, _ = pair
    alice, bob = (idp.mint(subject=s, groups=["reviewers"]) for s in ("alice", "bob"))
    marker = secrets.token_hex(4)
    future = agents[0].later(f"rotate {marker}", risk="critical")  # held by A
    item = listed(b, alice, marker)
    assert api(b, "POST", f"/approvals/{item['id']}/approve", alice).json()["status"] == "pending"
    again = api(a, "POST", f"/approvals/{item['id']}/approve", alice)  # the same approver, through the other process
    assert again.status_code == 409 and again.json()["error"] == "already_approved"
    time.sleep(0.3)
    assert not future.done()
    assert api(b, "POST", f"/approvals/{item['id']}/approve", bob).json()["status"] == "approved"
    assert future.result(15).status_code == 200
    assert len([r for r in upstream.received if marker in r.body.decode()]) == 1


def test_a_ticket_passes_once_across_processes(pair, agents, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    a, b, _ = pair
    alice = idp.mint(subject="alice", groups=["reviewers"])
    marker = secrets.token_hex(4)
    first = agents[1].post(f"export {marker}", risk="ticket")
    assert first.status_code == 202 and first.json()["error"] == "approval_pending"
    approval_id = first.json()["approval_id"]
    assert api(a, "POST", f"/approvals/{approval_id}/approve", alice).json()["status"] == "approved"
    retries = [agent.later(f"export {marker}", risk="ticket") for agent in (*agents, *agents)]  # both, twice, at once
    statuses = sorted(f.result(15).status_code for f in retries)
    assert statuses.count(200) == 1, statuses
    assert len([r for r in upstream.received if marker in r.body.decode()]) == 1


def test_decision_to_response_latency(pair, agents, upstream: FakeOpenAI, idp: LocalIdP, capsys: pytest.CaptureFixture[str]) -> None:
    """Held on B, approved through A: from the decision (its `decided_at`, A's clock,
    the same host's) to B's client receiving its answer: the store's commit, the
    wake-up (NOTIFY or poll), forwarding and the upstream's answer; beside a plain
    round trip through B (which the figure includes once)."""
    a, b, backend = pair
    alice = idp.mint(subject="alice", groups=["reviewers"])
    plain, resumed = [], []
    for _ in range(LATENCY_ROUNDS):
        start = time.perf_counter()
        assert agents[1].post("plain").status_code == 200
        plain.append(time.perf_counter() - start)
        marker = secrets.token_hex(4)
        future = agents[1].later(f"hold {marker}", risk="high")
        item = listed(a, alice, marker)
        decided = api(a, "POST", f"/approvals/{item['id']}/approve", alice).json()
        assert future.result(15).status_code == 200
        answered = time.time()
        at = datetime.datetime.fromisoformat(decided["decided_at"].replace("Z", "+00:00")).timestamp()
        resumed.append(answered - at)

    def ms(values: list[float], q: int) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000

    with capsys.disabled():
        print(f"\n[{backend}] decision recorded through A -> answer of the flow held on B, {LATENCY_ROUNDS} rounds: "
              f"p50 {ms(resumed, 50):.1f} ms, p99 {ms(resumed, 99):.1f} ms (plain round trip through B: "
              f"p50 {ms(plain, 50):.1f} ms, p99 {ms(plain, 99):.1f} ms)")
    assert len(resumed) == LATENCY_ROUNDS and all(r >= -0.001 for r in resumed)  # never answered before the decision


def test_a_stopped_process_closes_its_approvals_and_a_killed_one_is_abandoned(
        pair, agents, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """Last in the module: it stops B (SIGTERM), restarts it, then kills it (-9)."""
    a, b, _ = pair
    alice = idp.mint(subject="alice", groups=["reviewers"])
    marker = secrets.token_hex(4)
    future = agents[1].later(f"stop {marker}", risk="high")
    item = listed(a, alice, marker)
    b.stop()  # SIGTERM: its pending approvals are closed as today
    assert future.result(15).json()["error"] == "gateway_shutdown"
    assert api(a, "POST", f"/approvals/{item['id']}/approve", alice).json()["error"] == "already_decided"

    b.start()
    killed = Agent(b, upstream, idp.mint(subject="agent-2", groups=["agents"]))
    marker = secrets.token_hex(4)
    future = killed.later(f"kill {marker}", risk="high")
    item = listed(a, alice, marker)
    b.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    b.proc.wait()  # type: ignore[union-attr]
    with pytest.raises(httpx.HTTPError):
        future.result(15)
    abandoned = wait_for(lambda: next((e for e in a.audit(None) if e["event"] == "approval_abandoned"
                                       and e["approval"]["id"] == item["id"]), None), timeout=LEASE_S * 4)
    assert abandoned["approval"]["status"] == "abandoned" and abandoned["reason"] == "holder_lease_expired"
    late = api(a, "POST", f"/approvals/{item['id']}/approve", alice)
    assert late.status_code == 409 and late.json()["error"] == "already_decided"
    assert not [r for r in upstream.received if marker in r.body.decode()]
    killed.close()


def test_an_unreachable_store_stops_startup(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    for state, lease, expected in (
        (f"postgresql://hoop:s3cret@127.0.0.1:{free_port()}/postgres", "3", "hoop_state: state store"),
        ("sqlite://relative.db", "3", "ABSOLUTE"), ("mysql://x", "3", "is not a state store"),
        (f"sqlite://{tmp_path / 'ok.db'}", "0.5", "hoop_state_lease: '0.5' is not a number of seconds"),
    ):
        code, output = serve(tmp_path / secrets.token_hex(3), idp, pki, state, lease).run_to_exit()
        assert code == 1 and expected in output and "Traceback" not in output and "s3cret" not in output, output


def test_a_store_lost_later_fails_closed(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path],
                                         upstream: FakeOpenAI) -> None:
    """Its own PostgreSQL, stopped under a held flow: the flow and new approvals are
    refused (and audited), /healthz fails; once the server is back, both recover."""
    with running_postgres() as server:
        gateway = serve(tmp_path, idp, pki, server.url).start()
        agent = Agent(gateway, upstream, idp.mint(subject="agent-1", groups=["agents"]))
        try:
            alice = idp.mint(subject="alice", groups=["reviewers"])
            marker = secrets.token_hex(4)
            future = agent.later(f"lost {marker}", risk="high")
            listed(gateway, alice, marker)
            server.stop()  # with the flow held
            held = future.result(15)
            assert held.status_code == 503 and held.json()["error"] == "approval_store_unavailable"
            fresh = agent.post("new", risk="high")
            assert fresh.status_code == 503 and fresh.json()["error"] == "approval_store_unavailable"
            health = wait_for(lambda: (r := httpx.get(gateway.control_url + "/healthz")).status_code == 503 and r)
            assert any(p.startswith("state store") for p in health.json()["problems"])
            assert not [r for r in upstream.received if marker in r.body.decode()]
            entry = wait_for(lambda: next((e for e in gateway.audit() if e["decision"].get("reason") == "approval_store_unavailable"), None))
            assert entry["status"] == 503

            server.start()  # back: health recovers, approvals work again
            wait_for(lambda: httpx.get(gateway.control_url + "/healthz").status_code == 200)
            marker = secrets.token_hex(4)
            future = agent.later(f"back {marker}", risk="high")
            item = listed(gateway, alice, marker)
            assert api(gateway, "POST", f"/approvals/{item['id']}/approve", alice).status_code == 200
            assert future.result(15).status_code == 200
        finally:
            agent.close()
            gateway.stop()


class Relay:
    """A TCP relay to a server that can `hang`: while it hangs, it accepts and holds
    connections but forwards nothing (a database that stopped answering, a network
    partition), then forwards what waited once released."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.hang = target, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                while self.hang.is_set():
                    time.sleep(0.01)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_hanging_store_stalls_nothing_else(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path],
                                             upstream: FakeOpenAI, postgres_url: str) -> None:
    """A PostgreSQL that stops answering (no error, no data): the request needing an
    approval is refused once the store's time limit passes, while requests needing
    none are served meanwhile (store calls run off the event loop); once it answers
    again, /healthz recovers."""
    database = urlsplit(fresh_database(postgres_url))
    relay = Relay((database.hostname, database.port))  # type: ignore[arg-type]
    gateway = serve(tmp_path, idp, pki, database._replace(netloc=f"hoop@127.0.0.1:{relay.port}").geturl()).start()
    agent = Agent(gateway, upstream, idp.mint(subject="agent-1", groups=["agents"]))
    try:
        relay.hang.set()
        held = agent.later("needs the store", risk="high")
        plain = [agent.post(f"plain {i}") for i in range(3)]
        assert [r.status_code for r in plain] == [200] * 3 and not held.done()  # served while the store hangs
        refused = held.result(30)
        assert refused.status_code == 503 and refused.json()["error"] == "approval_store_unavailable"
        assert "no answer within" in wait_for(lambda: (r := httpx.get(gateway.control_url + "/healthz")).status_code == 503
                                              and r).json()["problems"][0]
        relay.hang.clear()
        wait_for(lambda: httpx.get(gateway.control_url + "/healthz").status_code == 200, timeout=30)
    finally:
        relay.hang.clear()
        agent.close()
        gateway.stop()
        relay.close()
