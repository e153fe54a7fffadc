"""End to end: signed recordings and the audit log of a real gateway, checked with the
real `hoop verify`; kill -9 mid-session; retention; the byte scan for leaked secrets.

Each test runs its own gateway (its own recordings folder), except the last, which scans
what the shared gateway recorded for every test before it.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from hoop_addon.dev.gateway import MITMDUMP, ROOT, Gateway
from hoop_addon.dev.tls import CA
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import POLICY, UPSTREAM_KEY, write_policy
from tests.support.agents import recorded_bytes
from tests.support.idp import LocalIdP

PROMPT_PII = ("jane.doe@example.com", "4242 4242 4242 4242")
REPLY_PII = ("help@upstream.example", "4111 1111 1111 1111")
COOKIE_SECRET, QUERY_SECRET, TENANT_SECRET = "cookie-secret-5d1f", "query-secret-8a2b", "tenant-secret-c3e4"
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}")
RECORDING = """\
recording:
  scrub:
    cookies: [session_id]
    query: [tenant]
"""


def own_gateway(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], policy: str = POLICY + RECORDING, **options: str) -> Gateway:
    rules = write_policy(tmp_path / "rules", idp, policy)
    return Gateway(rules, tmp_path, pki[0].cert_path, env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, options=options)


@pytest.fixture
def gw(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI) -> Iterator[Gateway]:
    gateway = own_gateway(tmp_path, idp, pki).start()
    yield gateway
    gateway.stop()


def client(gateway: Gateway, token: str | None = None) -> httpx.Client:
    return httpx.Client(proxy=gateway.proxy(token), verify=ssl.create_default_context(cafile=str(gateway.ca_cert)), timeout=10)


def chat(content: str, stream: bool = False) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "stream": stream}


def verify(gateway: Gateway, *extra: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "hoop_addon", "verify", str(gateway.recordings), "--public-key", str(gateway.public_key), *extra],
        capture_output=True, text=True, timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout


def recordings(gateway: Gateway) -> list[Path]:
    return sorted(gateway.recordings.glob("*.mitm"))


def stock_mitmdump_flows(recording: Path) -> int:
    """How many flows stock `mitmdump -nr` prints from a recording."""
    done = subprocess.run([str(MITMDUMP), "-n", "-r", str(recording), "--flow-detail", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.count("POST https://")


def test_cleanly_stopped_gateway_leaves_a_valid_signed_tree(gw: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    with client(gw, idp.mint(subject="rec-agent", groups=["agents"])) as c:
        for i in range(3):
            assert c.post(f"{upstream.url}/v1/chat/completions", json=chat(f"hello {i}")).status_code == 200
    gw.wait_audit(3)
    gw.stop()
    code, out = verify(gw)
    assert code == 0, out
    (recording,) = recordings(gw)
    assert f"OK {recording}: session " in out and "flows 3" in out
    assert stock_mitmdump_flows(recording) == 3
    events = [e["event"] for e in gw.audit(events=None)]
    assert events[0] == "policy_loaded" and events.count("request") == 3
    assert "recording_sealed" in events and events[-1] == "checkpoint"
    manifest = orjson.loads(recording.with_suffix(".manifest.json").read_bytes())
    assert manifest["sealed"] is True and manifest["identity"]["subject"] == "rec-agent"
    assert manifest["policy_hash"] == gw.audit()[0]["policy_hash"] and len(manifest["flows"]) == 3

    second = manifest["flows"][1]  # tampering with what the real gateway wrote is caught too
    data = bytearray(recording.read_bytes())
    data[second["offset"] + second["length"] // 2] ^= 0x20
    recording.write_bytes(bytes(data))
    code, out = verify(gw)
    assert code == 1 and f"INVALID {recording}: hash mismatch (flow 2 of 3)" in out, out
    log = gw.recordings / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))
    code, out = verify(gw)
    assert code == 1 and "audit.jsonl: sequence gap at seq 2" in out, out


def test_x_hoop_session_header_groups_connections(gw: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    token = idp.mint(subject="multi-conn", groups=["agents"])
    for _ in range(2):  # two client connections, one session
        with client(gw, token) as c:
            r = c.post(f"{upstream.url}/v1/chat/completions", json=chat("hi"), headers={"X-Hoop-Session": "task-42"})
            assert r.status_code == 200
    first, second = gw.wait_audit(2)
    assert first["recording"] == second["recording"] and "multi-conn-task-42" in first["recording"]
    gw.stop()
    assert verify(gw)[0] == 0
    assert stock_mitmdump_flows(Path(first["recording"])) == 2


def manifest_flow_count(recording: Path) -> int:
    """The flow count the recording's manifest signs (its last checkpoint)."""
    return orjson.loads(recording.with_suffix(".manifest.json").read_bytes())["flow_count"]


def test_kill_9_mid_session_keeps_every_flushed_flow_verifiable(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI) -> None:
    """Flows are flushed at once and signed at the next checkpoint (within two
    seconds by default): a kill -9 leaves the signed flows valid and the rest, still in
    the file and the chain, as the unsealed tail."""
    gateway = own_gateway(tmp_path, idp, pki).start()
    try:
        with client(gateway, idp.mint(subject="crashing", groups=["agents"])) as c:
            for i in range(3):
                assert c.post(f"{upstream.url}/v1/chat/completions", json=chat(f"step {i}")).status_code == 200
            gateway.wait_audit(3)
            (recording,) = recordings(gateway)
            deadline = time.monotonic() + 5
            while manifest_flow_count(recording) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert manifest_flow_count(recording) == 3  # the periodic checkpoint signed them
            assert c.post(f"{upstream.url}/v1/chat/completions", json=chat("step 3")).status_code == 200
            gateway.wait_audit(4)
            gateway.proc.kill()  # SIGKILL while the client's session is still open
            gateway.proc.wait()
    finally:
        gateway.stop()
    code, out = verify(gateway)
    assert code == 1, out
    assert "INVALID " not in out.replace("INVALID: ", "")
    signed = manifest_flow_count(recording)
    assert signed in (3, 4)  # flow 4 is signed only if a checkpoint came before the kill
    assert f"UNSEALED {recording}: unsealed: not closed cleanly; {signed} flow(s) signed, {4 - signed} flow(s) after the last checkpoint" in out
    assert "audit.jsonl: unsealed tail: " in out
    assert verify(gateway, "--allow-unsealed-tail")[0] == 0
    assert stock_mitmdump_flows(recording) == 4


def test_a_part_past_its_rotation_age_continues_as_the_linked_next_part(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI) -> None:
    """Rotation by age while the agent is idle: the next flow starts part 2 of the same
    session, linked to part 1's manifest, not a new session."""
    gateway = own_gateway(tmp_path, idp, pki, POLICY + "recording:\n  rotate: {{seconds: 1}}\n").start()
    try:
        with client(gateway, idp.mint(subject="rotating", groups=["agents"])) as c:
            assert c.post(f"{upstream.url}/v1/chat/completions", json=chat("first")).status_code == 200
            time.sleep(2.5)  # past the limit, with the maintenance tick running meanwhile
            assert c.post(f"{upstream.url}/v1/chat/completions", json=chat("second")).status_code == 200
            first, second = gateway.wait_audit(2)
    finally:
        gateway.stop()
    assert first["session"] == second["session"]
    assert first["recording"].endswith("-p1.mitm") and second["recording"].endswith("-p2.mitm")
    part1 = Path(first["recording"]).with_suffix(".manifest.json").read_bytes()
    assert orjson.loads(Path(second["recording"]).with_suffix(".manifest.json").read_bytes())["previous"] == hashlib.sha256(part1).hexdigest()
    assert verify(gateway)[0] == 0


def test_retention_deletes_expired_recordings_and_audits_it(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI) -> None:
    policy = POLICY.replace("      value: Bearer ${{HOOP_TEST_UPSTREAM_KEY}}\n", "      value: Bearer ${{HOOP_TEST_UPSTREAM_KEY}}\n    retention: 1s\n")
    gateway = own_gateway(tmp_path, idp, pki, policy).start()
    with client(gateway, idp.mint(groups=["agents"])) as c:
        assert c.post(f"{upstream.url}/v1/chat/completions", json=chat("short-lived")).status_code == 200
    gateway.wait_audit(1, events=("recording_sealed",))
    gateway.stop()
    (recording,) = recordings(gateway)
    assert orjson.loads(recording.with_suffix(".manifest.json").read_bytes())["retention"] == 1
    subprocess.run(["sleep", "1.1"], check=True)  # let the retention period pass (not a timed assertion)
    again = own_gateway(tmp_path, idp, pki, policy).start()  # sweeps at start-up
    try:
        (deleted,) = again.wait_audit(1, events=("retention_deleted",))
    finally:
        again.stop()
    assert deleted["recording"] == recording.name and not recording.exists()
    code, out = verify(again)
    assert code == 0, out
    assert f"OK {recording}: deleted by retention at seq {deleted['seq']}" in out


def test_gateway_refuses_to_record_without_a_signing_key(tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> None:
    code, output = own_gateway(tmp_path, idp, pki, hoop_signing_key="").run_to_exit()
    assert code == 1 and "recording needs a signing key" in output and "Traceback" not in output
    unsigned = own_gateway(tmp_path / "dev", idp, pki, POLICY + "recording:\n  signing: unsigned\n", hoop_signing_key="").start()
    unsigned.stop()


def test_audit_queries(gw: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    with client(gw, idp.mint(subject="query-me", groups=["agents"])) as c:
        c.post(f"{upstream.url}/v1/chat/completions", json=chat(f"mail {PROMPT_PII[0]}"))
        c.post(f"{upstream.url}/internal/nothing", json=chat("x"))
    gw.wait_audit(2)
    base = [sys.executable, "-m", "hoop_addon", "audit", "--recordings", str(gw.recordings), "--subject", "query-me"]
    masked = subprocess.run([*base, "--rule", "pii-in", "--json"], capture_output=True, text=True, check=True).stdout
    (entry,) = [json.loads(line) for line in masked.splitlines()]
    assert entry["route"] == "llm" and {"rule": "pii-in"}.items() <= entry["masked"][0].items()
    denied = subprocess.run([*base, "--decision", "deny"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert denied[0].split()[:4] == ["seq", "time", "event", "subject"] and len(denied) == 2 and "no_route" in denied[1]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream_server: FakeOpenAI) -> Path:
    """A sealed recording of one chat exchange with an email in the prompt."""
    recorder = own_gateway(tmp_path_factory.mktemp("recorded"), idp, pki).start()
    with client(recorder, idp.mint(subject="original", groups=["agents"])) as c:
        assert c.post(f"{upstream_server.url}/v1/chat/completions", json=chat(f"mail {PROMPT_PII[0]}")).status_code == 200
    recorder.wait_audit(1)
    recorder.stop()
    (recording,) = recordings(recorder)
    return recording


@pytest.mark.parametrize("reauthenticated", [False, True])
def test_client_replay_goes_through_the_policy_again(recorded: Path, tmp_path: Path, idp: LocalIdP, pki: tuple[CA, Path, Path], upstream: FakeOpenAI, reauthenticated: bool) -> None:
    """`mitmdump -s hoop_addon/replay.py -s hoop_addon/addon.py -C RECORDING`: the
    scrubbed token makes the replay fail identity; a fresh token lets it through,
    masked, with the gateway's credential, and recorded again."""
    token = idp.mint(subject="replayer", groups=["agents"]) if reauthenticated else ""
    replay = own_gateway(tmp_path, idp, pki, client_replay=str(recorded), hoop_replay_token=token)
    replay.argv[1:1] = ["-s", str(ROOT / "hoop_addon" / "replay.py")]  # before the gateway's script
    (entry,) = replay.start().wait_audit(1)
    replay.stop()
    if not reauthenticated:
        assert entry["decision"]["outcome"] == "deny" and entry["status"] == 401 and upstream.received == []
        return
    assert entry["decision"] == {"outcome": "allow"} and entry["identity"]["subject"] == "replayer"
    (received,) = upstream.received
    assert b"[REDACTED:EMAIL]" in received.body and f"Bearer {UPSTREAM_KEY}" in repr(received.headers)
    code, out = verify(replay)
    assert code == 0, out


def test_server_replay_serves_the_recorded_masked_answer(recorded: Path, tmp_path: Path, pki: tuple[CA, Path, Path], upstream: FakeOpenAI) -> None:
    """`mitmdump -S RECORDING`: an agent gets the recorded (masked) answer, the
    upstream is never asked."""
    server = Gateway(tmp_path, tmp_path, pki[0].cert_path, bare=True, options={
        "server_replay": str(recorded), "server_replay_ignore_content": "true", "server_replay_extra": "kill",
        "server_replay_reuse": "true", "connection_strategy": "lazy",
    }).start()
    try:
        with client(server) as c:
            r = c.post(f"{upstream.url}/v1/chat/completions", json=chat("a different prompt"))
    finally:
        server.stop()
    assert r.status_code == 200 and "[REDACTED:EMAIL]" in r.json()["choices"][0]["message"]["content"]
    assert upstream.received == []


def test_no_secret_or_unmasked_value_is_recorded_or_audited(gw: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """The byte scan: tokens (as proxy password and bearer), the upstream credential,
    named cookies, query tokens and planted PII appear nowhere under the recordings folder."""
    tokens = [idp.mint(subject="scan-proxy", groups=["agents"]), idp.mint(subject="scan-bearer", groups=["agents"])]
    url = f"{upstream.url}/v1/chat/completions?api_key={QUERY_SECRET}&tenant={TENANT_SECRET}&model=m"
    prompt = f"mail {PROMPT_PII[0]}, card {PROMPT_PII[1]}"
    with client(gw, tokens[0]) as c:
        for stream in (False, True):
            r = c.post(url, json=chat(prompt, stream), headers={"Cookie": f"session_id={COOKIE_SECRET}; theme=dark"})
            assert r.status_code == 200
    with client(gw) as c:
        r = c.post(url, json=chat(prompt), headers={"Authorization": f"Bearer {tokens[1]}", "X-Hoop-Session": "scan"})
        assert r.status_code == 200
    gw.wait_audit(3)
    gw.stop()
    assert verify(gw)[0] == 0
    data = recorded_bytes(gw)
    assert b"[SCRUBBED]" in data and b"theme=dark" in data  # scrubbed, not dropped: what is kept is still there
    for secret in (*tokens, UPSTREAM_KEY, COOKIE_SECRET, QUERY_SECRET, TENANT_SECRET, *PROMPT_PII, *REPLY_PII):
        assert secret.encode() not in data, f"{secret!r} leaked"
    assert not JWT.search(data)


def test_shared_gateway_recorded_nothing_secret_and_verifies(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """Runs after the other end-to-end tests that use the shared gateway (file order):
    its whole recordings folder, audit log included, holds no token, credential or
    planted value, and verifies (sessions still open are unsealed tails)."""
    before = len(gateway.audit())
    with client(gateway, idp.mint(groups=["agents"])) as c:  # at least this session, whatever ran before
        assert c.post(f"{upstream.url}/v1/chat/completions", json=chat(PROMPT_PII[0])).status_code == 200
    gateway.wait_audit(before + 1)
    data = recorded_bytes(gateway)
    for secret in (UPSTREAM_KEY, *PROMPT_PII, *REPLY_PII):
        assert secret.encode() not in data, f"{secret!r} leaked"
    assert not JWT.search(data)
    code, out = verify(gateway, "--allow-unsealed-tail")
    assert code == 0, out
