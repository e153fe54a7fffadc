"""End to end: what is audited and recorded when things race or break: a second
gateway on one audit chain, an upstream that closes early, a client that closes a
stream once it has what it needs, an approval that arrives as the agent disconnects,
and approvals held by a gateway killed with SIGKILL. Real mitmdump, real clients
(httpx), real TLS upstreams; the assertions read the audit log and the recordings."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from mitmproxy import io

from hoop_addon.dev.gateway import ROOT, Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.e2e.test_approvals import wait_for
from tests.support.idp import LocalIdP
from tests.support.upstreams import serve_connections

EMAIL = "jane.doe@example.com"
RULES = POLICY + """\
approvals:
  - name: risky
    when: {{headers: {{X-Risk: '^high$'}}}}
    approvers: {{groups: [reviewers]}}
    timeout: 60
"""


class RawUpstream:
    """A TLS upstream that reads one request per connection and runs `reply(sock)`:
    for faults no well-behaved HTTP server library produces."""

    def __init__(self, pki: tuple[CA, Path, Path], reply: Callable[[ssl.SSLSocket], None]) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki[1], pki[2])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.context, self.reply, self.requests = context, reply, 0
        serve_connections(self.listener, self._one)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.listener.getsockname()[1]}"

    def _one(self, raw: socket.socket) -> None:
        try:
            with self.context.wrap_socket(raw, server_side=True) as conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests += 1
                self.reply(conn)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


def client(gateway: Gateway, token: str, **kwargs: Any) -> httpx.Client:
    return httpx.Client(proxy=gateway.proxy(token), verify=ssl.create_default_context(cafile=gateway.ca_cert), **kwargs)


def recorded(gateway: Gateway) -> list[Any]:
    flows = []
    for path in sorted(gateway.recordings.glob("*.mitm")):
        with path.open("rb") as f:
            flows += list(io.FlowReader(f).stream())
    return flows


def verify(gateway: Gateway, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hoop_addon", "verify", str(gateway.recordings),
                           "--public-key", str(gateway.public_key), *extra], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def gw(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    gateway = Gateway(write_policy(tmp_path / "rules", idp, RULES), tmp_path, pki[0].cert_path,
                      env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, options={"store_streamed_bodies": "true"}).start()
    yield gateway
    gateway.stop()


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "symlinked directory"])
def test_a_second_gateway_on_the_same_chain_refuses_to_start(how: str, gw: Gateway, tmp_path: Path, idp: LocalIdP,
                                                             pki: tuple[CA, Path, Path]) -> None:
    """`make run` and `make demo` at once, on the same log by whatever path: the second
    exits 1 with a clear message and appends nothing, so the chain does not fork."""
    wait_for(lambda: gw.audit(("policy_loaded",)))
    log = gw.recordings / "audit.jsonl"
    before = log.read_bytes()
    recordings, options = gw.recordings, {"hoop_signing_key": str(tmp_path / "signing.key")}
    if how != "same path":
        recordings = tmp_path / "second-recordings"  # its own recordings; only the log is shared
        alias = tmp_path / "alias.jsonl"
        if how == "symlink":
            alias.symlink_to(log)
        elif how == "hard link":
            os.link(log, alias)
        else:
            (tmp_path / "dir-link").symlink_to(gw.recordings, target_is_directory=True)
            alias = tmp_path / "dir-link" / "audit.jsonl"
        options["hoop_audit_log"] = str(alias)
    second = Gateway(write_policy(tmp_path / "rules2", idp, RULES), tmp_path / "second", pki[0].cert_path,
                     env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, recordings=recordings, options=options)
    code, output = second.run_to_exit()
    assert code == 1, output
    assert f"is being written by another gateway (pid {gw.proc.pid}): one writer per audit chain" in output
    assert "Traceback" not in output
    gw.stop()
    assert log.read_bytes().startswith(before)
    assert verify(gw).returncode == 0


def test_a_gateway_that_fails_to_start_appends_nothing(gw: Gateway, tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    """A new signing key (a `key_rotated` entry is due) and an option that fails after
    the audit stage configured: the log is as it was."""
    wait_for(lambda: gw.audit(("policy_loaded",)))
    gw.stop()
    before = (gw.recordings / "audit.jsonl").read_bytes()
    failing = Gateway(write_policy(tmp_path / "rules2", idp, RULES), tmp_path / "failing", pki[0].cert_path,
                      env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, recordings=gw.recordings,
                      options={"hoop_control": "not-an-address"})
    code, output = failing.run_to_exit()
    assert code == 1 and "hoop_control" in output, output
    assert (gw.recordings / "audit.jsonl").read_bytes() == before


def test_an_upstream_that_closes_early_is_audited_with_the_status_the_client_got(gw: Gateway, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    def short(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n0123456789")

    upstream = RawUpstream(pki, short)
    try:
        with client(gw, idp.mint(subject="agent-1", groups=["agents"]), timeout=30) as c:
            got = c.post(f"{upstream.url}/v1/chat/completions", json={"model": "m", "messages": []})
    finally:
        upstream.close()
    assert got.status_code == 502 and upstream.requests == 1
    (entry,) = wait_for(lambda: gw.audit())
    assert entry["status"] == 502 and entry["upstream_status"] == 200, entry
    assert entry["error"], entry


def test_a_stream_the_client_closes_after_done_is_recorded_and_audited(gw: Gateway, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    """The sync openai SDK closes after `data: [DONE]`; the upstream ends a moment later.
    What the client received (masked) is what is recorded, with the response masking."""
    finished = threading.Event()

    def stream(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for delta in (f"mail {EMAIL} ", "please", None):
            event = b"data: [DONE]\n\n" if delta is None else b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": delta}}]}).encode() + b"\n\n"
            conn.sendall(b"%x\r\n%b\r\n" % (len(event), event))
        finished.wait(10)  # the upstream ends only after the client has gone
        conn.sendall(b"0\r\n\r\n")

    upstream = RawUpstream(pki, stream)
    received = b""
    try:
        with client(gw, idp.mint(subject="agent-1", groups=["agents"]), timeout=30) as c:
            with c.stream("POST", f"{upstream.url}/v1/chat/completions", json={"model": "m", "messages": [], "stream": True}) as r:
                for chunk in r.iter_raw():
                    received += chunk
                    if b"[DONE]" in received:
                        break
        time.sleep(1.0)
        finished.set()
        (entry,) = wait_for(lambda: gw.audit())
    finally:
        finished.set()
        upstream.close()
    assert EMAIL not in received.decode() and b"[REDACTED:EMAIL]" in received
    responses = [m for m in entry["masked"] if m["where"] and "response" in json.dumps(m)] or [m for m in entry["masked"] if m["rule"] == "pii-out"]
    assert responses and responses[0]["detectors"] == {"email": 1}, entry
    (flow,) = wait_for(lambda: recorded(gw))
    body = flow.response.content
    assert b"[REDACTED:EMAIL]" in body and b"[DONE]" in body and EMAIL.encode() not in body


def test_an_approval_that_arrives_as_the_agent_disconnects_is_client_gone(gw: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """The agent gives up; the approver approves at once (before the gateway polls
    the connection): nothing reaches the upstream, the entry says client_gone, no
    credential, and no recording part is left open."""
    alice = idp.mint(subject="alice", groups=["reviewers"])
    pool = ThreadPoolExecutor(1)
    with client(gw, idp.mint(subject="agent-1", groups=["agents"]), timeout=httpx.Timeout(30, read=2.0)) as c:
        future = pool.submit(c.post, f"{upstream.url}/v1/chat/completions", json={"model": "m", "messages": []}, headers={"X-Risk": "high"})
        item = wait_for(lambda: httpx.get(gw.control_url + "/approvals", headers={"Authorization": f"Bearer {alice}"}).json()["approvals"])[0]
        with pytest.raises(httpx.ReadTimeout):
            future.result(30)
        decided = httpx.post(f"{gw.control_url}/approvals/{item['id']}/approve", headers={"Authorization": f"Bearer {alice}"}, json={})
    pool.shutdown()
    assert decided.status_code in (200, 409), decided.text
    entry = wait_for(lambda: next((e for e in gw.audit() if (e["decision"].get("approval") or {}).get("id") == item["id"]), None))
    assert entry["decision"]["outcome"] == "deny" and entry["decision"]["reason"] == "client_gone", entry
    assert entry["credential"] is None and entry["recording"] is None and entry["status"] is None
    time.sleep(0.5)
    assert upstream.received == [] and list(gw.recordings.glob("*.mitm")) == []


def test_approvals_held_by_a_killed_gateway_are_closed_on_start_up(tmp_path: Path, upstream: FakeOpenAI, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    rules = write_policy(tmp_path / "rules", idp, RULES)
    first = Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    pool = ThreadPoolExecutor(1)
    c = client(first, idp.mint(subject="agent-1", groups=["agents"]), timeout=30)
    try:
        pool.submit(c.post, f"{upstream.url}/v1/chat/completions", json={"model": "m", "messages": []}, headers={"X-Risk": "high"})
        (requested,) = wait_for(lambda: first.audit(("approval_requested",)))
        first.proc.kill()  # SIGKILL: no shutdown, no denial, no checkpoint
        first.proc.wait()
    finally:
        c.close()
        pool.shutdown()
    second = Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        (abandoned,) = wait_for(lambda: second.audit(("approval_abandoned",)), 20)
    finally:
        second.stop()
    assert abandoned["approval"]["id"] == requested["approval"]["id"] and abandoned["approval"]["status"] == "abandoned"
    assert abandoned["requested_seq"] == requested["seq"] and "killed or crashed" in abandoned["reason"]
    assert abandoned["identity"]["subject"] == "agent-1" and upstream.received == []
    done = verify(second, "--allow-unsealed-tail")
    assert done.returncode == 0, done.stdout
