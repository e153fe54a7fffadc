"""Recordings: scrubbing, manifest and chain, checkpoints, rotation; keys; the policy keys."""

from __future__ import annotations

import collections
import enum
import re
import stat
from pathlib import Path

import orjson
import pytest
from mitmproxy import http
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from hoop_addon.evidence import keys
from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.evidence.recording import GENESIS, FlowEncoder, Limits, SessionRecording, chain_next, manifest_path, scrubbed, tnet
from hoop_addon.evidence.verify import verify_recording


@pytest.fixture
def signer(tmp_path: Path) -> keys.Signer:
    keys.generate(tmp_path / "key")
    return keys.load_signer(tmp_path / "key")


def test_secrets_are_scrubbed_from_a_copy() -> None:
    flow = tflow.tflow(resp=True)
    flow.request.headers["Authorization"] = "Bearer agent-jwt"
    flow.request.headers["X-Api-Key"] = "upstream-key"
    flow.request.headers["Cookie"] = "sid=secret-sid; theme=dark"
    flow.request.query = [("api_key", "secret-q"), ("page", "2"), ("Tenant", "secret-t")]
    flow.response.headers["Set-Cookie"] = "sid=secret-new; Path=/"
    scrubbed_state = scrubbed(flow, headers=("x-api-key",), cookies=("sid",), query=("api_key", "tenant"))
    copy = http.HTTPFlow.from_state(scrubbed_state)
    state = repr(scrubbed_state)
    for secret in ("agent-jwt", "upstream-key", "secret-sid", "secret-q", "secret-t", "secret-new"):
        assert secret not in state
    assert copy.request.cookies["theme"] == "dark" and copy.request.query["page"] == "2"
    assert flow.request.headers["Authorization"] == "Bearer agent-jwt"  # the live flow is untouched


def test_headers_are_scrubbed_in_every_occurrence_without_a_query_or_cookies() -> None:
    flow = tflow.tflow(resp=True)
    flow.request.headers.set_all("x-api-key", ["key-one", "key-two"])
    flow.request.headers["Proxy-Authorization"] = "Basic c2VjcmV0"
    flow.request.headers["X-Trace"] = "kept"
    state = scrubbed(flow, headers=("X-API-Key",))
    copy = http.HTTPFlow.from_state(state)
    assert copy.request.headers.get_all("X-Api-Key") == ["[SCRUBBED]", "[SCRUBBED]"]
    assert copy.request.headers["Proxy-Authorization"] == "[SCRUBBED]" and copy.request.headers["X-Trace"] == "kept"
    assert flow.request.headers.get_all("x-api-key") == ["key-one", "key-two"]  # the live flow is untouched


def test_the_backup_of_an_edited_or_replayed_flow_is_scrubbed_too() -> None:
    flow = tflow.tflow(resp=True)
    flow.request.headers["Authorization"] = "Bearer agent-jwt"
    flow.request.query = [("api_key", "secret-q")]
    flow.backup()  # as mitmproxy does before an edit or a client replay
    flow.request.content = b"edited"
    data = tnetstring.dumps(scrubbed(flow))
    assert b"agent-jwt" not in data and b"secret-q" not in data
    assert http.HTTPFlow.from_state(tnetstring.loads(data)).modified()  # the backup is kept, scrubbed


def flows_to_encode() -> list[http.HTTPFlow]:
    """Flows of every shape a recording holds: with a response, an error, a WebSocket,
    metadata, secrets to scrub, and one edited in mitmproxy (it holds a backup)."""
    plain = tflow.tflow(resp=True)
    plain.metadata["hoop"] = {"identity": {"subject": "alice", "groups": ["a"]}, "masked": [{"rule": "r", "count": 2}]}
    failed = tflow.tflow(err=True)
    secrets = tflow.tflow(resp=True)
    secrets.request.headers["Cookie"] = "sid=secret-sid; theme=dark"
    secrets.request.query = [("api_key", "secret-q"), ("page", "2")]
    secrets.response.headers["Set-Cookie"] = "sid=secret-new; Path=/"
    edited = tflow.tflow(resp=True)
    edited.backup()
    edited.request.content = b"edited"
    return [plain, failed, tflow.twebsocketflow(), secrets, edited]


@pytest.mark.parametrize("index", range(5))
def test_the_encoder_writes_what_mitmproxy_would(index: int) -> None:
    flow = flows_to_encode()[index]
    scrub = {"headers": ("x-api-key",), "cookies": ("sid",), "query": ("api_key",)}
    encoder = FlowEncoder()
    for _ in range(2):  # the second time from its remembered connection states
        assert encoder.encode(flow, **scrub) == tnetstring.dumps(scrubbed(flow, **scrub))
    assert http.HTTPFlow.from_state(tnetstring.loads(encoder.encode(flow, **scrub))).id == flow.id


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**70, 1.5, -0.0, float("inf"), b"", b"\x00:,", "", "h\u00e9llo \u2603", [], (), {},
    {"a": [1, (2.5, None)], b"k": {"nested": True}, "z": ""},
    collections.OrderedDict(b=1, a=2), enum.IntEnum("E", "X").X,  # subclasses: mitmproxy's encoder
])
def test_tnet_writes_what_mitmproxy_would(value: object) -> None:
    assert tnet(value) == tnetstring.dumps(value)


def test_tnet_refuses_what_tnetstrings_cannot_hold() -> None:
    with pytest.raises(ValueError):
        tnet({"a": object()})


def test_the_encoder_sees_a_connection_change() -> None:
    encoder, flow = FlowEncoder(), tflow.tflow(resp=True)
    encoder.encode(flow)
    flow.server_conn.timestamp_end = flow.server_conn.timestamp_start + 5  # the upstream closed
    flow.client_conn.alpn_offers.append(b"h2")  # a list attribute mutated in place
    assert encoder.encode(flow) == tnetstring.dumps(scrubbed(flow))


def test_manifest_lists_every_flow_with_offsets_hashes_and_chain(tmp_path: Path, signer: keys.Signer) -> None:
    rec = SessionRecording(tmp_path, "s1", {"subject": "alice"}, "ph", signer)
    for _ in range(3):
        rec.add(tflow.tflow(resp=True), 7200)
    digest = rec.seal()
    raw = manifest_path(rec.path).read_bytes()
    manifest = orjson.loads(raw)
    data = rec.path.read_bytes()
    chain = GENESIS
    for entry in manifest["flows"]:
        chunk = data[entry["offset"]:entry["offset"] + entry["length"]]
        assert keys.sha256(chunk) == entry["sha256"] and isinstance(tnetstring.loads(chunk), dict)
        chain = chain_next(chain, entry["sha256"])
    assert manifest["chain"] == chain and manifest["sealed"] is True and manifest["retention"] == 7200
    assert manifest["key_id"] == signer.key_id and digest == keys.sha256(raw)
    assert raw == keys.canonical(manifest)  # canonical JSON on disk


def test_checkpoints_leave_an_unsealed_tail_after_a_crash(tmp_path: Path, signer: keys.Signer) -> None:
    rec = SessionRecording(tmp_path, "s1", {"subject": "alice"}, "ph", signer, Limits(checkpoint_flows=2))
    for _ in range(3):
        rec.add(tflow.tflow(resp=True), None)
    rec.abandon()  # killed: flow 3 came after the last checkpoint
    item = verify_recording(rec.path, keys.TrustedKeys([signer.private.public_key()]))
    assert item.status == "UNSEALED" and item.info["flows"] == 2 and item.info["unsigned_flows"] == 1


def test_rotation_links_parts(tmp_path: Path, signer: keys.Signer) -> None:
    first = SessionRecording(tmp_path, "s1", {"subject": "a"}, None, signer, Limits(rotate_bytes=1))
    assert not first.full(0)
    first.add(tflow.tflow(resp=True), None)
    assert first.full(0)
    digest = first.seal()
    second = SessionRecording(tmp_path, "s1", {"subject": "a"}, None, signer, part=2, previous=digest)
    second.seal()
    assert orjson.loads(manifest_path(second.path).read_bytes())["previous"] == digest
    assert second.path.name == "s1-p2.mitm"


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    private, public, key_id = keys.generate(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert keys.load_signer(private).key_id == key_id == keys.TrustedKeys.load([public]).keys.popitem()[0]
    with pytest.raises(FileExistsError):
        keys.generate(tmp_path / "k")
    (tmp_path / "bad").write_text("nope")
    with pytest.raises(keys.KeyFileError, match="bad: not a PEM"):
        keys.load_signer(tmp_path / "bad")


def test_signature_checks(signer: keys.Signer) -> None:
    trusted = keys.TrustedKeys([signer.private.public_key()])
    body = {"a": 1}
    assert trusted.check(body, signer.key_id, signer.sign(body)) is None
    assert trusted.check({"a": 2}, signer.key_id, signer.sign(body)) == "bad signature"
    assert trusted.check(body, "ff" * 32, signer.sign(body)).startswith("unknown key")
    assert trusted.check(body, None, None) == "unsigned"


POLICY = """\
version: 1
issuers:
  - {name: i, issuer: https://i.example, audience: a, jwks: https://i.example/jwks}
recording:
  signing: unsigned
  checkpoint: {flows: 10, seconds: 5}
  rotate: {bytes: 1000000, seconds: 3600}
  scrub: {cookies: [sid], query: [tenant]}
  retention: 30d
audit:
  checkpoint: {entries: 50, seconds: 10}
routes:
  - name: r
    match: {hosts: [x.example]}
    allow: {groups: [g]}
    retention: 12h
"""


def test_policy_recording_settings(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(tmp_path / "p.yaml")
    rec = policy.recording
    assert (rec.signing, rec.checkpoint_flows, rec.checkpoint_seconds, rec.rotate_bytes, rec.rotate_seconds) == ("unsigned", 10, 5, 1000000, 3600)
    assert rec.scrub_cookies == ("sid",) and rec.scrub_query == ("tenant",) and rec.retention == 30 * 86400
    assert (rec.audit_checkpoint_entries, rec.audit_checkpoint_seconds) == (50, 10)
    assert policy.routes[0].retention == 12 * 3600


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("signing: unsigned", "signing: none", "recording.signing: 'none' is not one of: required, unsigned"),
        ("retention: 30d", "retention: 30 days", "recording.retention: expected a positive duration"),
        ("    retention: 12h", "    retention: 0", "routes[0].retention: expected a positive duration"),
        ("rotate:", "rotation:", "recording.rotation: unknown key (did you mean 'rotate'?)"),
        ("{flows: 10,", "{flows: 0,", "recording.checkpoint.flows: must be 1..1000000"),
    ],
)
def test_policy_recording_errors_name_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    (tmp_path / "p.yaml").write_text(POLICY.replace(old, new))
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(tmp_path / "p.yaml")
