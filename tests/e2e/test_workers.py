"""End to end: `hoop serve --workers 2`, two gateway workers on one set of ports.

Both workers bind the proxy, base-URL and control ports (`SO_REUSEPORT`, seen with
`ss`; the UDP socket of HTTP/3 is worker 0's alone) and both serve; 200 concurrent agents (httpx, async, each its own connection) with 20 held
for approval, decided through the other worker's control API: none lost, none
forwarded twice (counted at the upstream), each audited once in its worker's chain.
A worker killed with -9 is restarted while the other keeps serving; `hoop verify`
then passes on both chains (`--allow-unsealed-tail` for the killed one's open parts).
SIGTERM stops both, each denying and auditing its pending approvals, and the
supervisor exits 0. Start-up: a worker set without a shared store is refused, and a
worker that keeps dying at start-up stops them all.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from hoop_addon.dev.gateway import ROOT, Gateway, free_port
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.support.idp import LocalIdP

AGENTS, HELD = 200, 20
RULES = POLICY + """\
approvals:
  - name: risky
    when: {{headers: {{X-Risk: '^high$'}}}}
    approvers: {{groups: [reviewers]}}
    timeout: 60
defaults:
  max_pending: 50
"""


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[FakeOpenAI]:
    """A plain-HTTP upstream: 200 agents' TLS handshakes would only slow the test."""
    with FakeOpenAI(None, None) as server:
        yield server


def workers_gateway(work: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], rules: str = RULES) -> Gateway:
    """`hoop serve --workers 2` on a fresh home (so the default store, HOME/state.db),
    with an https:// base-URL listener (TCP and UDP) on `gateway.reverse_port`."""
    policy = write_policy(work / "rules", idp, rules)
    reverse_port = free_port()
    gateway = Gateway(policy, work, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True,
                      args=["--workers", "2", "--home", str(work / "home"), "--set", "hoop_reload=1",
                            "--reverse", f"https://127.0.0.1:9@{reverse_port}"])
    gateway.reverse_port = reverse_port  # type: ignore[attr-defined]
    return gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    gateway = workers_gateway(tmp_path_factory.mktemp("workers"), idp, pki).start(timeout=60)
    yield gateway
    gateway.stop()


def workers(gateway: Gateway) -> dict[int, int]:
    """The supervisor's live workers: worker id -> pid (from their command lines)."""
    found = {}
    children = subprocess.run(["ps", "--ppid", str(gateway.proc.pid), "-o", "pid="], capture_output=True, text=True).stdout
    for pid in map(int, children.split()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker" in argv:
            found[int(argv[argv.index(b"--worker") + 1].split(b"/")[0])] = pid
    return found


def listeners(port: int, udp: bool = False) -> set[int]:
    """The pids with a TCP socket listening on `port` (ss -ltnp), or a UDP socket bound to it."""
    out = subprocess.run(["ss", "-Hlunp" if udp else "-Hltnp", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def chain(gateway: Gateway, worker: int, events: tuple[str, ...] | None = ("request",)) -> list[dict[str, Any]]:
    path = gateway.recordings / f"audit-{worker}.jsonl"
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
    return [e for e in entries if events is None or e["event"] in events]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value, "condition not met in time"
    return value


def chat(marker: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": f"hello {marker}"}]}


def test_both_workers_listen_on_the_shared_ports(gw: Gateway) -> None:
    pids = workers(gw)
    assert sorted(pids) == [0, 1] and gw.proc.pid not in pids.values()
    assert listeners(gw.port) == set(pids.values())  # two sockets, one per worker, on the proxy port
    assert listeners(gw.control_port) == set(pids.values())  # and on the shared control port
    assert listeners(gw.reverse_port) == set(pids.values())  # and on the base-URL port
    assert listeners(gw.reverse_port, udp=True) == {pids[0]}  # its HTTP/3 socket: worker 0's alone
    for worker, pid in pids.items():  # each worker's own control port: its metrics
        assert listeners(gw.control_port + 1 + worker) == {pid}
        assert httpx.get(f"http://127.0.0.1:{gw.control_port + 1 + worker}/healthz").json() == {"status": "ok"}
    assert gw.output.count("hoop: ready") == 1 and "hoop: ready: 2 workers" in gw.output
    for worker in (0, 1):  # start-up's entries are written within a second of running
        assert wait_for(lambda: chain(gw, worker, ("workers",)))[0] == {
            **chain(gw, worker, ("workers",))[0], "worker": worker, "count": 2, "chains": ["audit-0.jsonl", "audit-1.jsonl"]}
    assert (gw.workdir / "home" / "state.db").exists()  # the default shared store


def test_200_agents_20_held_decided_across_workers(gw: Gateway, plain_upstream: FakeOpenAI, idp: LocalIdP) -> None:
    plain_upstream.clear()
    alice = idp.mint(subject="alice", groups=["reviewers"])
    tokens = [idp.mint(subject=f"agent-{i}", groups=["agents"]) for i in range(AGENTS)]
    markers = [secrets.token_hex(6) for _ in range(AGENTS)]
    risky = set(range(0, AGENTS, AGENTS // HELD))
    before = [len(chain(gw, w)) for w in (0, 1)]

    async def agent(i: int) -> httpx.Response:
        async with httpx.AsyncClient(proxy=gw.proxy(tokens[i]), timeout=60) as client:
            return await client.post(f"{plain_upstream.url}/v1/chat/completions", json=chat(markers[i]),
                                     headers={"X-Risk": "high"} if i in risky else {})

    async def decide() -> dict[str, int]:
        """Approve each held request through the control port of the worker that does not hold it."""
        holders: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while len(holders) < HELD and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            holders = {e["approval"]["id"]: w for w in (0, 1) for e in chain(gw, w, ("approval_requested",))}
        assert len(holders) == HELD
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {alice}"}, timeout=10) as api:
            listed = (await api.get(f"{gw.control_url}/approvals")).json()["approvals"]
            assert {item["id"] for item in listed} == set(holders)  # the shared port lists both workers' approvals
            for approval, holder in holders.items():
                other = gw.control_port + 1 + (1 - holder)
                decided = await api.post(f"http://127.0.0.1:{other}/approvals/{approval}/approve", json={"reason": "ok"})
                assert decided.status_code == 200 and decided.json()["status"] == "approved"
        return holders

    async def run() -> tuple[list[httpx.Response], dict[str, int]]:
        responses = asyncio.gather(*(agent(i) for i in range(AGENTS)))
        holders = await decide()
        return await responses, holders

    responses, holders = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * AGENTS
    assert set(Counter(holders.values())) == {0, 1}  # each worker held some of the 20
    forwarded = Counter(m for r in plain_upstream.received for m in markers if m in r.body.decode())
    assert forwarded == Counter(markers)  # every request reached the upstream exactly once
    audited = {w: chain(gw, w)[before[w]:] for w in (0, 1)}
    assert all(audited.values())  # both workers served
    subjects = Counter(e["identity"]["subject"] for entries in audited.values() for e in entries)
    assert subjects == Counter(f"agent-{i}" for i in range(AGENTS))  # each audited once, in one chain
    released = [e for entries in audited.values() for e in entries if (e["decision"].get("approval") or {}).get("id")]
    assert sorted(e["decision"]["approval"]["id"] for e in released) == sorted(holders)
    assert {e["decision"]["outcome"] for e in released} == {"allow"}


def test_a_killed_worker_is_restarted_while_the_other_serves(gw: Gateway, plain_upstream: FakeOpenAI, idp: LocalIdP) -> None:
    token = idp.mint(subject="survivor", groups=["agents"])
    victim = workers(gw)[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in listeners(gw.port))
    for _ in range(10):  # new connections, each to whichever worker listens
        with httpx.Client(proxy=gw.proxy(token), timeout=30) as client:
            assert client.post(f"{plain_upstream.url}/v1/chat/completions", json=chat("still served")).status_code == 200
    restarted = wait_for(lambda: (pid := workers(gw).get(1)) and pid != victim and
                         listeners(gw.control_port + 2) == {pid} and pid)
    wait_for(lambda: "hoop: worker 1 restarted" in gw.output)
    assert "hoop: worker 1 exited with signal 9 (SIGKILL); restarting it in 0.5 s" in gw.output
    assert listeners(gw.port) == {workers(gw)[0], restarted}
    wait_for(lambda: [e["worker"] for e in chain(gw, 1, ("workers",))] == [1, 1])  # its chain, resumed by the new process
    with httpx.Client(proxy=gw.proxy(token), timeout=30) as client:
        assert client.post(f"{plain_upstream.url}/v1/chat/completions", json=chat("after")).status_code == 200


def test_sigterm_denies_what_each_worker_holds_and_stops_all_then_verify_passes(
        gw: Gateway, plain_upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """Last in the module: it stops the gateway."""
    tokens = [idp.mint(subject=f"held-{i}", groups=["agents"]) for i in range(6)]

    async def held(token: str) -> httpx.Response:
        async with httpx.AsyncClient(proxy=gw.proxy(token), timeout=60) as client:
            return await client.post(f"{plain_upstream.url}/v1/chat/completions", json=chat("held at stop"),
                                     headers={"X-Risk": "high"})

    async def run() -> list[httpx.Response]:
        answers = asyncio.gather(*(held(t) for t in tokens))
        alice = idp.mint(subject="alice", groups=["reviewers"])
        while len(httpx.get(f"{gw.control_url}/approvals", headers={"Authorization": f"Bearer {alice}"}).json()["approvals"]) < 6:
            await asyncio.sleep(0.1)
        gw.proc.send_signal(signal.SIGTERM)
        return await answers

    pids = set(workers(gw).values())
    answers = asyncio.run(run())
    assert gw.proc.wait(30) == 0
    assert [(r.status_code, r.json()["error"]) for r in answers] == [(403, "gateway_shutdown")] * 6
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    shut = [e for w in (0, 1) for e in chain(gw, w) if e["identity"]["subject"].startswith("held-")]
    assert sorted(e["identity"]["subject"] for e in shut) == sorted(f"held-{i}" for i in range(6))
    assert {e["decision"]["approval"]["status"] for e in shut} == {"shutdown"}
    verify = [sys.executable, "-m", "hoop_addon", "verify", str(gw.recordings), "--public-key", str(gw.public_key)]
    checked = subprocess.run([*verify, "--allow-unsealed-tail"], capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode == 0, checked.stdout
    assert "OK " + str(gw.recordings / "audit-0.jsonl") in checked.stdout
    assert re.search(rf"(OK|UNSEALED) {re.escape(str(gw.recordings / 'audit-1.jsonl'))}", checked.stdout)
    (gw.recordings / "audit-1.jsonl").rename(gw.workdir / "audit-1.jsonl")  # one worker's chain gone
    checked = subprocess.run([*verify, "--allow-unsealed-tail"], capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode == 1 and "audit-1.jsonl: audit chain missing" in checked.stdout, checked.stdout


def test_workers_without_a_shared_store_are_refused(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    gateway = workers_gateway(tmp_path / "supervisor", idp, pki)
    gateway.argv += ["--set", "hoop_state=memory"]
    code, output = gateway.run_to_exit()
    assert code == 2 and "hoop_state=memory keeps approvals in one process" in output
    one = Gateway(write_policy(tmp_path / "rules", idp, RULES), tmp_path / "one", pki[0].cert_path,
                  env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True, args=["--worker", "0/2"])
    code, output = one.run_to_exit()  # a worker run by hand, with the default memory store
    assert code == 1 and "several workers need a shared store" in output and "hoop: worker 0/2 ready" not in output


def test_a_worker_that_keeps_dying_at_start_up_stops_them_all(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    gateway = workers_gateway(tmp_path, idp, pki).start(timeout=60)
    try:
        (gateway.rules / "policy.yaml").write_text("version: 1\nroutes: [")  # the running workers keep their policy
        survivor, victim = workers(gateway)[0], workers(gateway)[1]
        os.kill(victim, signal.SIGKILL)
        assert gateway.proc.wait(60) == 1
    finally:
        gateway.stop()
    assert "error: hoop: worker 1 died at start-up 3 times in a row (last: status 1): stopping all workers" in gateway.output
    assert not Path(f"/proc/{survivor}").exists()
