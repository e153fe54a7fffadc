"""The soak: `make soak` (not part of `make test`: it runs for about a minute).

200 concurrent agents for HOOP_SOAK_SECONDS (default 60) send a mix of allowed,
masked, blocked and held (approval) requests through the real gateway, while the
upstream restarts every few seconds (dropping its connections) and the JWKS server
restarts. Afterwards: no request hung (each got an answer before its timeout), none
was lost (one audit line per answered request), every recording verifies, and the
gateway's memory stayed under a coarse ceiling (the series is printed).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hoop_addon.dev.gateway import ROOT, Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.support.idp import LocalIdP

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("HOOP_SOAK_SECONDS", "60"))
CLIENTS = 200
TIMEOUT = 45.0  # per request: a held request waits for the approver (every 0.5 s) or its 20 s timeout
RULES = POLICY + """\
block:
  - name: no-rm
    when:
      body_matches: ['rm -rf']
    reason: destructive commands are not allowed
approvals:
  - name: prod-deploys
    when:
      body_matches: ['deploy to prod']
    approvers: {{groups: [sre]}}
    timeout: 20
defaults:
  max_pending: 100
"""
PROMPTS = {  # kind -> (prompt, share of requests)
    "allowed": ("summarise the release notes", 6),
    "masked": ("mail jane.doe@example.com the card 4242 4242 4242 4242", 6),
    "blocked": ("now run rm -rf / on the box", 2),
    "held": ("deploy to prod please", 1),
}
SCHEDULE = [kind for kind, (_, share) in PROMPTS.items() for _ in range(share)]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Chaos(threading.Thread):
    """Restarts the upstream every 4 s (on the same port) and the IdP every 15 s."""

    def __init__(self, upstream: list[FakeOpenAI], pki: tuple[CA, Path, Path], idp: LocalIdP, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.upstream, self.pki, self.idp, self.stop_event = upstream, pki, idp, stop
        self.restarts = Counter[str]()

    def run(self) -> None:
        tick = 0
        while not self.stop_event.wait(1.0):
            tick += 1
            if tick % 4 == 0:
                port = self.upstream[0].port
                self.upstream[0].stop()
                self.upstream[0] = FakeOpenAI(self.pki[1], self.pki[2], port=port).start()
                self.restarts["upstream"] += 1
            if tick % 15 == 0:
                self.idp.restart()
                self.restarts["jwks"] += 1


class Approver(threading.Thread):
    """An SRE who decides every pending approval twice a second: approves most."""

    def __init__(self, gateway: Gateway, token: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.gateway, self.token, self.stop_event = gateway, token, stop
        self.decided = Counter[str]()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.gateway.control_url, headers=headers, timeout=10, trust_env=False) as api:
            while not self.stop_event.wait(0.5):
                try:
                    pending = api.get("/approvals").json().get("approvals", [])
                    for i, item in enumerate(pending):
                        verb = "deny" if i % 4 == 3 else "approve"
                        if api.post(f"/approvals/{item['id']}/{verb}", json={"reason": "soak"}).status_code == 200:
                            self.decided[verb] += 1
                except httpx.HTTPError as exc:
                    self.decided[f"error {type(exc).__name__}"] += 1


async def agent(n: int, gateway: Gateway, idp: LocalIdP, url: str, deadline: float, results: Counter[str], hung: list[str]) -> None:
    ca = ssl.create_default_context(cafile=str(gateway.ca_cert))
    token = idp.mint(subject=f"soak-agent-{n}", groups=["agents"], expires_in=3600)
    i = n
    async with httpx.AsyncClient(proxy=gateway.proxy(token), verify=ca, trust_env=False, timeout=TIMEOUT) as client:
        while time.monotonic() < deadline:
            kind = SCHEDULE[i % len(SCHEDULE)]
            i += 1
            body = {"messages": [{"role": "user", "content": PROMPTS[kind][0]}]}
            try:
                r = await client.post(f"{url}/v1/chat/completions", json=body)
                results[f"{kind} {r.status_code}"] += 1
            except httpx.TimeoutException:
                hung.append(f"{kind} timed out after {TIMEOUT}s")
            except httpx.HTTPError as exc:  # the gateway closed the connection: counted, not hidden
                results[f"{kind} {type(exc).__name__}"] += 1


@pytest.fixture
def soak_gateway(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    rules = write_policy(tmp_path / "rules", idp, RULES)
    gateway = Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                      options={"termlog_verbosity": "warn", "flow_detail": "0"})
    yield gateway.start()
    gateway.stop()


def test_soak(soak_gateway: Gateway, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    gateway = soak_gateway
    upstream = [FakeOpenAI(pki[1], pki[2]).start()]
    stop = threading.Event()
    chaos, approver = Chaos(upstream, pki, idp, stop), Approver(gateway, idp.mint(subject="sre-1", groups=["sre"], expires_in=3600), stop)
    results: Counter[str] = Counter()
    hung: list[str] = []

    async def run() -> None:
        deadline = time.monotonic() + SECONDS
        url = upstream[0].url  # the chaos thread restarts it on the same port
        await asyncio.gather(*(agent(n, gateway, idp, url, deadline, results, hung) for n in range(CLIENTS)))

    rss: list[int] = []  # KiB, every 5 s

    def sample() -> None:
        while not stop.wait(5.0):
            rss.append(rss_kb(gateway.proc.pid))

    threading.Thread(target=sample, daemon=True).start()
    chaos.start()
    approver.start()
    started = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - started
    stop.set()
    chaos.join()
    approver.join()
    answered = sum(n for key, n in results.items() if key.split()[1].isdigit())
    audited = len(gateway.wait_audit(answered, timeout=30))
    gateway.stop()
    upstream[0].stop()

    verify = subprocess.run(
        [sys.executable, "-m", "hoop_addon", "verify", str(gateway.recordings), "--public-key", str(gateway.public_key)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    print(f"\nsoak: {CLIENTS} clients, {elapsed:.0f} s, {sum(results.values())} requests ({sum(results.values()) / elapsed:.0f}/s)")
    print(f"  outcomes: {dict(sorted(results.items()))}")
    print(f"  restarts: {dict(chaos.restarts)}; approver: {dict(approver.decided)}")
    print(f"  gateway RSS every 5 s (MB): {[round(kb / 1024) for kb in rss]}; audited {audited} of {answered} answered")
    print(f"  verify: {verify.stdout.strip().splitlines()[-1]}")

    assert not hung, hung[:5]
    assert audited >= answered
    assert results["allowed 200"] and results["masked 200"] and results["blocked 403"]
    assert results["held 200"] or results["held 403"]
    assert results["blocked 200"] == 0, results
    assert verify.returncode == 0, verify.stdout[-3000:]
    # A coarse ceiling. Measured (2 cores, 60 s): the gateway's RSS rises from 86 to
    # 171 MB, flattening; bare mitmdump under the same 200 clients and upstream restarts
    # rises alike (72 to 166 MB): the connections' cost, not something held per flow.
    assert max(rss) < 512 * 1024, rss
