"""The audit log: chain, resume, checkpoints, partial lines, and queries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from hoop_addon.evidence import keys
from hoop_addon.evidence.audit_log import GENESIS, AuditError, AuditLog, select
from hoop_addon.evidence.verify import verify_audit


@pytest.fixture
def signer(tmp_path: Path) -> keys.Signer:
    keys.generate(tmp_path / "key")
    return keys.load_signer(tmp_path / "key")


def entries(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_chain_and_checkpoints(tmp_path: Path, signer: keys.Signer) -> None:
    log = AuditLog(tmp_path / "a.jsonl", signer, checkpoint_entries=2)
    written = log.append("request", route="r")
    assert written["seq"] == 1 and written["prev"] == GENESIS
    log.append("block", route="r")
    log.append("mask", route="r")
    log.close()
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    got = [orjson.loads(line) for line in lines]
    assert [e["event"] for e in got] == ["request", "block", "checkpoint", "mask", "checkpoint"]
    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
    assert all(got[i]["prev"] == keys.sha256(lines[i - 1]) for i in range(1, 5))
    item, _ = verify_audit(tmp_path / "a.jsonl", keys.TrustedKeys([signer.private.public_key()]))
    assert item.status == "OK" and item.info["last_checkpoint"] == f"5:{keys.sha256(lines[4])}"


def test_reopening_resumes_the_chain_and_notices_a_new_key(tmp_path: Path, signer: keys.Signer) -> None:
    log = AuditLog(tmp_path / "a.jsonl", signer)
    log.append("request")
    log.close()
    keys.generate(tmp_path / "new")
    again = AuditLog(tmp_path / "a.jsonl", keys.load_signer(tmp_path / "new"))
    assert again.previous_key_id == signer.key_id
    assert again.append("key_rotated")["seq"] == 3
    again.close()
    trusted = keys.TrustedKeys.load([tmp_path / "key.pub", tmp_path / "new.pub"])  # both trusted: rotation
    assert verify_audit(tmp_path / "a.jsonl", trusted)[0].status == "OK"


def test_a_partial_last_line_is_not_appended_to(tmp_path: Path, signer: keys.Signer) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"seq":1,"event":"request","prev":"00"}\n{"seq":2,"ev')
    with pytest.raises(AuditError, match="partial line"):
        AuditLog(tmp_path / "a.jsonl", signer)


def test_select_filters() -> None:
    log = [
        {"seq": 1, "time": "2026-01-01T00:00:00Z", "event": "request", "identity": {"subject": "a", "groups": ["x"]}, "route": "r",
         "decision": {"outcome": "allow"}, "masked": [{"rule": "pii", "detectors": {"email": 1}}]},
        {"seq": 2, "time": "2026-02-01T00:00:00Z", "event": "request", "identity": {"subject": "b", "groups": ["y"]}, "route": "r",
         "decision": {"outcome": "deny", "rule": "no-export"}},
        {"seq": 3, "time": "2026-03-01T00:00:00Z", "event": "approval_decided", "identity": {"subject": "b"},
         "approval": {"rule": "big-spend", "approver": "carol", "outcome": "approved"}},
    ]
    seqs = lambda **f: [e["seq"] for e in select(log, **f)]  # noqa: E731
    assert seqs(subject="b") == [2, 3] and seqs(group="x") == [1] and seqs(route="r") == [1, 2]
    assert seqs(decision="deny") == [2] and seqs(rule="pii") == [1] and seqs(rule="no-export") == [2] and seqs(rule="big-spend") == [3]
    assert seqs(since="2026-01-15T00:00:00Z", until="2026-02-15T00:00:00Z") == [2] and seqs(event="approval_decided") == [3]
    log[1]["mcp"] = {"batch": False, "calls": [{"method": "tools/call", "target": "delete_bucket", "outcome": "deny"}]}
    log[2]["mcp"] = "not an object"  # a malformed field matches no filter
    assert seqs(tool="delete_bucket") == [2] and seqs(tool="echo") == []


def test_one_writer_per_chain(tmp_path: Path) -> None:
    """A second writer on the same log (a second gateway) is refused with the pid of
    the first; once the first closes, the chain can be reopened and continues."""
    first = AuditLog(tmp_path / "audit.jsonl", None)
    first.append("request")
    with pytest.raises(AuditError, match=rf"being written by another gateway \(pid {os.getpid()}\): one writer per audit chain"):
        AuditLog(tmp_path / "audit.jsonl", None)
    other = AuditLog(tmp_path / "audit-worker2.jsonl", None)  # another worker's chain: its own lock
    other.close()
    first.close()
    again = AuditLog(tmp_path / "audit.jsonl", None)
    assert again.seq == 2
    again.close()


def aliases(tmp_path: Path, target: Path) -> dict[str, Path]:
    """Other paths to `target`: a symlink, a hard link, a symlinked directory, `..`."""
    (tmp_path / "via").mkdir()
    (tmp_path / "audit-symlink.jsonl").symlink_to(target)
    os.link(target, tmp_path / "audit-hardlink.jsonl")
    (tmp_path / "dir-link").symlink_to(target.parent, target_is_directory=True)
    return {"symlink": tmp_path / "audit-symlink.jsonl", "hardlink": tmp_path / "audit-hardlink.jsonl",
            "symlinked directory": tmp_path / "dir-link" / target.name, "dot-dot": tmp_path / "via" / ".." / target.name}


WRITER = """\
import sys
from pathlib import Path
from hoop_addon.evidence.audit_log import AuditLog
log = AuditLog(Path(sys.argv[1]), None)
log.append("request")
print("open", flush=True)
sys.stdin.read()  # hold the chain until told to stop
log.close()
"""


def test_every_path_to_a_log_meets_the_same_writer_lock(tmp_path: Path) -> None:
    """A writer in another process holds the chain: opening it by a symlink, a hard
    link, a symlinked directory or `..` is refused with that process's pid (the lock is
    the file's, not its name's), the file is left as the writer wrote it, and once the
    writer stops every path resumes the one chain."""
    target = tmp_path / "audit.jsonl"
    target.touch()
    paths = {"same path": target, **aliases(tmp_path, target)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "open\n"
        before = target.read_bytes()
        for how, path in paths.items():
            with pytest.raises(AuditError, match=rf"being written by another gateway \(pid {writer.pid}\): one writer per audit chain"):
                AuditLog(path, None)
            assert target.read_bytes() == before, how
    finally:
        writer.communicate("")
    assert writer.returncode == 0
    for n, (how, path) in enumerate(paths.items()):
        log = AuditLog(path, None)
        assert log.is_file(target) and log.seq == 2 * n + 2, how  # the writer's entry and checkpoint, then ours
        with pytest.raises(AuditError, match=rf"pid {os.getpid()}"):  # in one process too: one writer per chain
            AuditLog(target, None)
        log.append("request")
        log.close()
    lines = target.read_bytes().splitlines()
    assert [orjson.loads(line)["seq"] for line in lines] == list(range(1, 2 * len(paths) + 3))
    assert [orjson.loads(line)["prev"] for line in lines] == [GENESIS] + [keys.sha256(line) for line in lines[:-1]]  # one chain


def test_approvals_left_open_by_a_killed_gateway(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", None)
    for approval_id in ("held", "decided", "ticket", "ticket-done"):
        log.append("approval_requested", approval={"id": approval_id, "status": "pending"})
    log.append("request", decision={"outcome": "allow", "approval": {"id": "decided", "status": "approved"}})
    log.append("request", decision={"outcome": "pending", "approval": {"id": "ticket", "status": "pending"}})
    log.append("approval_decided", approval={"id": "ticket-done", "status": "timeout"})
    log._file.close()  # killed: no close(), no checkpoint (closing the file drops its lock)
    reopened = AuditLog(tmp_path / "audit.jsonl", None)
    assert sorted(reopened.open_approvals) == ["held", "ticket"]
    reopened.close()


def test_audit_queries_survive_fields_of_every_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded: entries whose fields hold values of the wrong JSON type are shown or
    filtered, never a traceback; a line that is not an entry is named (exit 1)."""
    import random

    from hoop_addon.cli.main import main

    rng = random.Random(4)
    values = [None, 1, -2.5, True, "x", [], [1, "a"], {}, {"rule": ["r"]}, {"subject": 3, "groups": "g"}]
    fields = ["identity", "decision", "masked", "approval", "route", "status", "recording", "time", "rule", "seq", "event"]
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"".join(orjson.dumps({f: rng.choice(values) for f in fields}) + b"\n" for _ in range(300)))
    for filters in ([], ["--subject", "a"], ["--group", "g"], ["--rule", "r"], ["--decision", "allow"], ["--since", "2026-01-01"], ["--json"]):
        assert main(["audit", "--log", str(log), *filters]) == 0
    capsys.readouterr()
    log.write_bytes(log.read_bytes() + b"[1, 2]\n")
    assert main(["audit", "--log", str(log)]) == 1
    assert "line 301 is not an audit entry" in capsys.readouterr().err
