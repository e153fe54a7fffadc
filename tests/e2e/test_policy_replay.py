"""`hoop policy replay`: recorded flows re-evaluated under a changed policy."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from hoop_addon.dev.gateway import ROOT, Gateway
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, write_policy
from tests.support.idp import LocalIdP


def replay(recording: str, rules: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hoop_addon", "policy", "replay", recording, "--rules", str(rules), "--fail-on-diff"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_replay_reports_what_a_new_policy_changes(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP, tmp_path: Path) -> None:
    before = len(gateway.audit())
    ca = ssl.create_default_context(cafile=str(gateway.ca_cert))
    with httpx.Client(proxy=gateway.proxy(idp.mint(subject="agent-replayed", groups=["agents"])), verify=ca, trust_env=False) as client:
        r = client.post(f"{upstream.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "my ssn is 078-05-1120"}]})
    assert r.status_code == 200
    recording = gateway.wait_audit(before + 1)[-1]["recording"]

    same = replay(recording, write_policy(tmp_path / "same", idp))
    assert same.returncode == 0, same.stdout
    assert same.stdout.strip().endswith("1 flow(s) replayed, 0 would be handled differently")

    stricter = POLICY.replace("detectors: [email, payment_card]", "detectors: [email, payment_card, us_ssn]", 1)
    stricter += "block:\n  - name: no-ssn-talk\n    when:\n      body_matches: ['ssn']\n    reason: SSNs stay out of prompts\n"
    changed = replay(recording, write_policy(tmp_path / "stricter", idp, stricter))
    assert changed.returncode == 1, changed.stdout
    (line,) = [x for x in changed.stdout.splitlines() if x.startswith("DIFF ")]
    assert "outcome 'allow' -> 'block'" in line and "rule None -> 'no-ssn-talk'" in line
