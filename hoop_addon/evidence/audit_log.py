"""The audit log: hash-chained JSON lines with signed checkpoints.

Each line is one entry, the canonical JSON (`hoop_addon.evidence.keys.canonical`) of an object:

    {"seq": int (1, 2, ...), "time": RFC 3339 UTC, "event": str,
     "prev": SHA-256 hex of the previous line's bytes (64 zeros for seq 1), ...fields}

so deleting, reordering or editing a line breaks the sequence or the chain. Every
`checkpoint_entries` entries or `checkpoint_seconds` (and when the log is closed) a
checkpoint entry is appended: `{"event": "checkpoint", "key_id": hex, "signature":
base64}` plus the common fields, signed with Ed25519 over the canonical form of the
entry without `signature`. As `prev` covers the chain, a checkpoint signs every entry
before it. An auditor who keeps a checkpoint's `seq` and line hash can later detect a
log truncated below it (`hoop verify --trusted-checkpoint SEQ:SHA256`).

Appending an event (the API other stages use)::

    log.append("approval_decided", identity={...}, route="openai", approval={...})

returns the written entry (with `seq`, `time`, `prev`). Fields are JSON values (never
secrets, tokens or unmasked data: the log is kept for years). The gateway's Audit stage
wraps this as `Audit.event(name, flow=None, **fields)`, which also fills in the flow's
identity, route, policy hash and flow id. Event names in use (snake_case; add yours
here): `request` (every finished flow: decision, status, masked counts, recording),
`connect` (refused CONNECT), `block`, `mask`, `approval_requested`, `approval_decided`,
`recording_sealed` (recording, manifest_sha256, flows), `retention_deleted`
(recording, manifest_sha256, retention), `policy_loaded` (policy_hash),
`key_rotated` (key_id, previous_key_id), `approval_abandoned` (approval, reason: an
approval still open when the previous gateway process stopped uncleanly),
`mcp_tool_changed` (server, tool, old and new fingerprints, action: an MCP tool's
definition changed since it was pinned), `mcp_tool_accepted` (server, tool, old, new,
approver), `mcp_server_message` (stream, method, kind, id, outcome, rule: a message an MCP
server sent its client, judged by the route's `server_methods` rules), `workers` (worker,
count, chains: a worker's start, see below), `checkpoint`.

One writer per chain: while an `AuditLog` has a log open, the log file itself is locked
(`flock` on the file's own descriptor: the lock belongs to the inode, so a symlink or a
hard link to the same file meets the same lock), and a second gateway on the same chain,
by whatever path, refuses to start instead of forking the hash chain. Gateway workers
(`hoop serve --workers N`) each write their own chain, `audit-<worker>.jsonl` (see
`chain_name`), with its own lock, in one recordings directory; each chain's first
entries after a start include `workers` (`worker`: its id, `count`: N, `chains`: the
file names of all N chains), so that `hoop verify`, which reads every `*.jsonl` of a
directory as one body of evidence, notices a chain that was deleted.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from hoop_addon.evidence.keys import Signer, canonical, sha256

GENESIS = "0" * 64
CHECKPOINT = "checkpoint"


WORKERS = "workers"


def parse_worker(text: str) -> tuple[int, int] | None:
    """A worker's place, `"I/N"` (worker I of N, 0 <= I < N <= 64), as (I, N); None for
    the empty string (a single gateway). Raises `ValueError` with a sentence."""
    if not text:
        return None
    index, sep, count = text.partition("/")
    if not sep or not (index.isascii() and index.isdigit() and count.isascii() and count.isdigit()):
        raise ValueError(f"'{text}' is not I/N (worker I of N, e.g. 0/2)")
    if not 0 <= int(index) < int(count) <= 64:
        raise ValueError(f"'{text}': expected 0 <= I < N <= 64")
    return int(index), int(count)


def chain_name(worker: tuple[int, int] | None) -> str:
    """The file name of a gateway's audit chain in its recordings directory:
    `audit.jsonl` for a single gateway (`worker` None), `audit-<I>.jsonl` for worker I."""
    return "audit.jsonl" if worker is None else f"audit-{worker[0]}.jsonl"


def chains(directory: Path) -> list[Path]:
    """The gateways' audit chains in a recordings directory, sorted: `audit.jsonl` and
    the workers' `audit-<I>.jsonl` (see `chain_name`); empty when there is none."""
    return sorted(p for p in directory.glob("audit*.jsonl")
                  if p.name == "audit.jsonl" or p.name.removeprefix("audit-").removesuffix(".jsonl").isdigit())


class AuditError(OSError):
    """The audit log cannot be opened or appended to safely."""


def _last_state(path: Path) -> tuple[int, str, str | None, dict[str, dict[str, Any]]]:
    """(last seq, hash of the last line, key id of the last checkpoint, open approvals)
    of an existing log, read line by line; (0, GENESIS, None, {}) for an empty or
    missing one. Open approvals are the `approval_requested` entries (by approval id)
    that no later entry closes (see `_settled`)."""
    seq, prev, key, open_approvals = 0, GENESIS, None, {}
    if not path.exists():
        return seq, prev, key, open_approvals
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                raise AuditError(f"{path} ends with a partial line: run `hoop verify` and repair before appending")
            try:
                entry = orjson.loads(line)
                seq = int(entry["seq"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                raise AuditError(f"{path}: line {seq + 1} is not an audit entry: run `hoop verify`") from None
            prev = sha256(line[:-1])
            if entry.get("event") == CHECKPOINT:
                key = entry.get("key_id")
            elif entry.get("event") == "approval_requested" and isinstance(approval := entry.get("approval"), dict):
                open_approvals[str(approval.get("id"))] = entry
            elif (settled := _settled(entry)) is not None:
                open_approvals.pop(settled, None)
    return seq, prev, key, open_approvals


def _settled(entry: dict[str, Any]) -> str | None:
    """The id of the approval an entry closes, or None: a held flow's `request` entry
    with its outcome, a ticket's decision, timeout or shutdown (`approval_decided`
    with a final status), or `approval_abandoned`."""
    event = entry.get("event")
    if event == "request":
        approval = (entry.get("decision") or {}).get("approval") if isinstance(entry.get("decision"), dict) else None
    elif event in ("approval_decided", "approval_abandoned"):
        approval = entry.get("approval")
    else:
        return None
    if not isinstance(approval, dict) or approval.get("status") == "pending" and event != "approval_abandoned":
        return None
    return str(approval.get("id"))


def _holder(file: Any) -> str:
    """The pid holding a `flock` on `file`'s inode, from Linux's /proc/locks (fields:
    `N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...`, device numbers in hex), or
    "unknown" where that cannot be read."""
    st = os.fstat(file.fileno())
    ours = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    found = "unknown"
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[4].startswith("->"):
            continue
        device, _, inode = fields[5].rpartition(":")
        if inode == str(st.st_ino):
            if device == ours:
                return fields[4]
            found = fields[4]  # an overlay file system may report another device number
    return found


def _open_locked(path: Path) -> Any:
    """Open the log for appending (created if missing) and take the chain's writer lock:
    an exclusive `flock` on the log file itself, held by the returned binary file until
    it is closed. Locking the inode, not a name derived from `path`, means every path
    to the file (a symlink, a hard link, `..` in it) meets the same lock. Raises
    `AuditError` naming the pid of the process that holds it."""
    file = open(path, "ab")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(file)
        file.close()
        raise AuditError(
            f"{path} is being written by another gateway (pid {holder}): one writer per audit chain; "
            "stop it, or give this gateway its own hoop_audit_log and hoop_recordings"
        ) from None
    except BaseException:
        file.close()
        raise
    return file


class AuditLog:
    """An append-only, hash-chained audit log (see the module docstring).

    Opening resumes the chain of an existing file. `signer` None is unsigned
    development mode (checkpoints carry no signature). `append()` and `checkpoint()`
    write and flush one line, and raise `OSError` when they cannot (`TypeError` when a
    field is not JSON). `previous_key_id` is the key id of the file's last checkpoint;
    `open_approvals` the `approval_requested` entries (by approval id) the file leaves
    without an outcome (the previous process was killed while they were held).
    Opening takes the chain's writer lock (on the file's inode): `AuditError` if
    another `AuditLog`, in this process or another, has the same file open by any path.
    `is_file(path)` tells whether `path` names this log's file.
    """

    def __init__(self, path: Path, signer: Signer | None, checkpoint_entries: int = 100, checkpoint_seconds: int = 30) -> None:
        self.path, self.signer = path, signer
        self.checkpoint_entries, self.checkpoint_seconds = checkpoint_entries, checkpoint_seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _open_locked(path)
        try:
            self.seq, self.prev, self.previous_key_id, self.open_approvals = _last_state(path)
        except BaseException:
            self._file.close()
            raise
        self._unsigned = 0
        self._checkpointed = time.time()

    def is_file(self, path: Path) -> bool:
        """True when `path` names the file this log writes (the same inode, by any
        path); False for another file or none."""
        if self._file.closed:
            return False
        try:
            theirs, ours = os.stat(path), os.fstat(self._file.fileno())
        except OSError:
            return False
        return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry; checkpoints when `checkpoint_entries` are unsigned.
        Returns the entry as written."""
        entry = self._write({"event": event, **fields})
        self._unsigned += 1
        if self._unsigned >= self.checkpoint_entries:
            self.checkpoint()
        return entry

    def due(self, now: float) -> bool:
        """True when unsigned entries have waited `checkpoint_seconds`."""
        return self._unsigned > 0 and now - self._checkpointed >= self.checkpoint_seconds

    def checkpoint(self) -> dict[str, Any]:
        """Write a signed checkpoint covering every entry so far; returns it."""
        key = self.signer.key_id if self.signer else None
        entry = self._write({"event": CHECKPOINT, "key_id": key}, sign=True)
        self._unsigned = 0
        self._checkpointed = time.time()
        return entry

    def _write(self, fields: dict[str, Any], sign: bool = False) -> dict[str, Any]:
        entry = {**fields, "seq": self.seq + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "prev": self.prev}
        if sign:
            entry["signature"] = self.signer.sign(entry) if self.signer else None
        line = canonical(entry)
        self._file.write(line + b"\n")
        self._file.flush()
        self.seq, self.prev = entry["seq"], sha256(line)
        return entry

    def close(self) -> None:
        """Checkpoint what is unsigned, then close."""
        try:
            if self._unsigned and not self._file.closed:
                self.checkpoint()
        finally:
            self._file.close()  # releases the writer lock



def select(
    entries: Iterable[dict[str, Any]],
    *,
    subject: str | None = None,
    group: str | None = None,
    route: str | None = None,
    since: str | None = None,
    until: str | None = None,
    decision: str | None = None,
    rule: str | None = None,
    event: str | None = None,
    tool: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The entries matching every filter given. `since`/`until` are RFC 3339 UTC
    strings (`YYYY-MM-DDTHH:MM:SSZ`, inclusive); `decision` is an outcome (`allow`,
    `deny`, ...); `rule` matches a masking rule that masked something, or the rule named
    in the decision or approval; `tool` matches an entry whose MCP calls (`mcp.calls`)
    include one of that tool, prompt or resource (`target`)."""
    for e in entries:
        identity, decided = as_object(e.get("identity")), as_object(e.get("decision"))
        masked = e.get("masked") if isinstance(e.get("masked"), list) else []
        named = [as_object(m).get("rule") for m in masked] + [
            decided.get("rule"), as_object(e.get("approval") or decided.get("approval")).get("rule"), e.get("rule")]
        rules = {r for r in named if isinstance(r, str)}
        groups = identity.get("groups") if isinstance(identity.get("groups"), list) else []
        calls = as_object(e.get("mcp")).get("calls")
        targets = {as_object(c).get("target") for c in calls} if isinstance(calls, list) else set()
        if (
            (subject is None or identity.get("subject") == subject)
            and (group is None or group in groups)
            and (route is None or e.get("route") == route)
            and (since is None or str(e.get("time", "")) >= since)
            and (until is None or str(e.get("time", "")) <= until)
            and (decision is None or decided.get("outcome") == decision)
            and (rule is None or rule in rules)
            and (event is None or e.get("event") == event)
            and (tool is None or tool in targets)
        ):
            yield e


def as_object(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (a malformed field matches no filter)."""
    return value if isinstance(value, dict) else {}
