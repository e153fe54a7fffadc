"""Offline verification of recordings and audit logs (pure: reads files, no network).

`verify_paths(paths, keys, ...)` checks every recording (`*.mitm` and its manifest, see
`hoop_addon.evidence.recording`), every audit log (`*.jsonl`, see `hoop_addon.evidence.audit_log`) and every
evidence bundle (`*.tar.gz`, see `hoop_addon.evidence.bundle`) under the given paths, and
cross-checks each directory's recordings against its audit logs (one chain per
gateway worker, all of them one body of evidence). It yields one `Item` per
recording, audit log and cross-check problem:

- `OK`: signed by a trusted key, every hash and the chain match.
- `INVALID`: the reasons say what is wrong: `bad signature`, `unknown key <id>`,
  `unsigned`, `hash mismatch (flow i of n)` (`; the file ends inside it (truncated)`),
  `unreadable flow i`, `n bytes after the last sealed flow`, `chain break at seq N`, `sequence gap
  at seq N (deleted entries)`, `sequence out of order at seq N`, `truncated below
  trusted checkpoint seq N`, `recording missing`, `not referenced by the audit log`,
  `manifest differs from the one sealed at seq N`, `audit chain missing` (a worker's
  chain that another chain's `workers` entry names), ...
- `UNSEALED`: valid up to the last signed checkpoint, but not closed cleanly (a crash):
  the tail after it is not signed. A failure unless unsealed tails are allowed.
"""

from __future__ import annotations

import binascii
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from mitmproxy.io import tnetstring

from hoop_addon.evidence.audit_log import CHECKPOINT, WORKERS
from hoop_addon.evidence.audit_log import GENESIS as AUDIT_GENESIS
from hoop_addon.evidence.keys import TrustedKeys, sha256
from hoop_addon.evidence.recording import FORMAT, GENESIS, chain_next, manifest_path

Status = Literal["OK", "INVALID", "UNSEALED"]
BUNDLE_INFO = "bundle.json"


class VerifyError(Exception):
    """A path cannot be read at all (usage or I/O error, exit status 2)."""


@dataclass
class Item:
    """The verdict on one item: `path` (str), `kind` ("recording", "audit", "tree"),
    `status`, `reasons` (why INVALID or UNSEALED) and `info` (JSON-safe facts: flows,
    entries, key id, last checkpoint, ...)."""

    path: str
    kind: str
    status: Status = "OK"
    reasons: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    # A recording's running hash after each of its flows, signed and unsigned tail
    # alike (index 0: before any flow): what the audit log's entries are checked against.
    chains: list[str] = field(default_factory=list, repr=False)

    def invalid(self, reason: str) -> None:
        self.status = "INVALID"
        self.reasons.append(reason)

    def unsealed(self, reason: str) -> None:
        if self.status == "OK":
            self.status = "UNSEALED"
        self.reasons.append(reason)

    def line(self) -> str:
        """`STATUS path: reasons or facts` for people."""
        facts = ", ".join(f"{k} {v}" for k, v in self.info.items() if k in _SHOWN and v is not None)
        return f"{self.status} {self.path}: " + ("; ".join(self.reasons) or facts or "ok")


_SHOWN = ("flows", "entries", "session", "last_checkpoint", "deleted")


def verify_recording(path: Path, keys: TrustedKeys) -> Item:
    """Check one flow file against its manifest (see `hoop_addon.evidence.recording`)."""
    item = Item(str(path), "recording")
    mpath = manifest_path(path)
    try:
        data = path.read_bytes()
        raw = mpath.read_bytes()
    except FileNotFoundError as exc:
        item.invalid(f"missing {Path(exc.filename).name}")
        return item
    except OSError as exc:
        raise VerifyError(f"{exc.filename}: {exc.strerror}") from None
    try:
        manifest = orjson.loads(raw)
        if not isinstance(manifest, dict):
            raise TypeError
        flows, chain, sealed = manifest["flows"], manifest["chain"], manifest["sealed"]
        if flows is None and sealed is False:  # an open part's checkpoint: entries come from the file
            flows = _entries(data, _count(manifest["flow_count"]))
        if manifest.get("format") != FORMAT or not isinstance(flows, list) or not isinstance(sealed, bool):
            raise ValueError
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        item.invalid("manifest unreadable")
        return item
    item.info.update(session=manifest.get("session"), flows=len(flows), sealed=sealed,
                     key_id=manifest.get("key_id"), manifest_sha256=sha256(raw))
    if "audit_log" in manifest:
        item.info["audit_log"] = manifest["audit_log"]
    signed = {k: v for k, v in manifest.items() if k not in ("signature", "flows")}
    if problem := keys.check(signed, manifest.get("key_id"), manifest.get("signature")):
        item.invalid(f"manifest: {problem}")
    if manifest.get("flow_count") != len(flows):
        item.invalid(f"flow count mismatch: {len(flows)} listed, {manifest.get('flow_count')} signed")
    if manifest.get("recording") != path.name:
        item.invalid(f"manifest is for {manifest.get('recording')!r}, not this file")
    offset, running = 0, GENESIS
    item.chains.append(running)
    for i, entry in enumerate(flows, 1):
        try:
            start, length, digest = _count(entry["offset"]), _count(entry["length"]), str(entry["sha256"])
            bytes.fromhex(digest)
        except (KeyError, TypeError, ValueError):
            item.invalid(f"manifest entry {i} unreadable")
            return item
        if start != offset:
            item.invalid(f"manifest offsets not contiguous at flow {i}")
            return item
        chunk = data[start:start + length]
        if sha256(chunk) != digest:
            cut = f"; the file ends {'inside' if chunk else 'before'} it (truncated)" if len(chunk) < length else ""
            item.invalid(f"hash mismatch (flow {i} of {len(flows)}){cut}")
            return item
        if not _readable(chunk):
            item.invalid(f"unreadable flow {i}")
        running = chain_next(running, digest)
        item.chains.append(running)
        offset += length
    if running != chain:
        item.invalid("chain mismatch: the manifest's running hash does not match its flows")
    tail = data[offset:]
    if sealed and tail:
        item.invalid(f"{len(tail)} bytes after the last sealed flow (appended or foreign data)")
    elif not sealed:
        entries = _entries(tail, None)
        for entry in entries:
            running = chain_next(running, entry["sha256"])
            item.chains.append(running)
        count, rest = len(entries), len(tail) - sum(e["length"] for e in entries)
        item.info["unsigned_flows"] = count
        if rest:
            item.invalid(f"unreadable data in the unsealed tail ({rest} bytes)")
        item.unsealed(f"unsealed: not closed cleanly; {len(flows)} flow(s) signed, {count} flow(s) after the last checkpoint")
    return item


# What mitmproxy's tnetstring reader raises on bad input; a deeply nested value
# (planted in an unsigned tail) exhausts the recursion limit.
_TNET_ERRORS = (ValueError, TypeError, IndexError, RecursionError)


def _count(value: Any) -> int:
    """A non-negative JSON integer (not a bool) from a manifest; `ValueError` else."""
    if type(value) is not int or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value


def _readable(chunk: bytes) -> bool:
    try:
        return isinstance(tnetstring.loads(chunk), dict)
    except _TNET_ERRORS:
        return False


def _entries(data: bytes, count: int | None) -> list[dict[str, Any]]:
    """The manifest entries (offset, length, SHA-256) of the first `count` (None: all)
    whole flows (tnetstring dictionaries) of `data`, as far as it holds them; the signed
    chain then checks them."""
    view, entries, offset = memoryview(data), [], 0
    while (count is None or len(entries) < count) and view:
        try:
            value, rest = tnetstring.pop(view)
        except _TNET_ERRORS:
            break
        if not isinstance(value, dict):
            break
        length = len(view) - len(rest)
        entries.append({"offset": offset, "length": length, "sha256": sha256(bytes(view[:length]))})
        view, offset = rest, offset + length
    return entries


@dataclass
class AuditFacts:
    """What audit logs say about recordings, by file name: `referenced` (first seq),
    `sealed` (seq, manifest sha256, flows), `deleted` (seq, manifest sha256), `flows`
    (how many `request` entries name it: the recording holds at least as many) and
    `heads` (seq, flow index, the recording's running hash after that flow: the last
    one the log names). `logs` are the names of the audit logs read; `chains` the
    audit chains their `workers` entries name (name -> (log, seq) that first names it):
    each must be among the logs."""

    referenced: dict[str, int] = field(default_factory=dict)
    sealed: dict[str, tuple[int, str, int]] = field(default_factory=dict)
    deleted: dict[str, tuple[int, str]] = field(default_factory=dict)
    flows: dict[str, int] = field(default_factory=dict)
    heads: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    logs: set[str] = field(default_factory=set)
    chains: dict[str, tuple[str, int]] = field(default_factory=dict)
    reached: set[tuple[int, str]] = field(default_factory=set)

    def update(self, other: AuditFacts) -> None:
        """Add what another log of the same body of evidence says."""
        for name, seq in other.referenced.items():
            self.referenced.setdefault(name, seq)
        self.sealed.update(other.sealed)
        self.deleted.update(other.deleted)
        for name, n in other.flows.items():
            self.flows[name] = self.flows.get(name, 0) + n
        for name, head in other.heads.items():
            if name not in self.heads or head[1] > self.heads[name][1]:
                self.heads[name] = head
        self.logs |= other.logs
        for name, where in other.chains.items():
            self.chains.setdefault(name, where)
        self.reached |= other.reached


def verify_audit(
    path: Path, keys: TrustedKeys, trusted: Iterable[tuple[int, str]] = (), start: tuple[int, str] | None = None,
    *, one_of: bool = False,
) -> tuple[Item, AuditFacts]:
    """Check an audit log's sequence, chain and checkpoint signatures, and that it
    reaches every `trusted` checkpoint (seq, line sha256). `start` (seq, prev) is where
    a slice (from an evidence bundle) begins; a whole log starts at (1, 64 zeros).
    `one_of`: the log is one of several chains (gateway workers), and a trusted
    checkpoint is another chain's as likely: those it holds go to `facts.reached`,
    and the caller checks that every one is reached by some chain."""
    item, facts = Item(str(path), "audit"), AuditFacts(logs={path.name})
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        raise VerifyError(f"{path}: {exc.strerror}") from None
    if lines[-1]:
        item.invalid("the last line is incomplete (truncated write)")
    lines = lines[:-1]
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = orjson.loads(line)
            if not isinstance(entry, dict) or type(entry["seq"]) is not int:
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            item.invalid(f"line {number} is not an audit entry")
            return item, facts
        if problem := _malformed(entry):
            item.invalid(f"line {number} (seq {entry['seq']}): {problem}")
            return item, facts
        entries.append(entry)
    present = {e["seq"] for e in entries}
    expected, prev = start or (1, AUDIT_GENESIS)
    hashes: dict[int, str] = {}
    unsigned, last_checkpoint = 0, None
    for number, (line, entry) in enumerate(zip(lines, entries), 1):
        seq = entry["seq"]
        if seq > expected and expected in present:
            item.invalid(f"sequence out of order at seq {seq} (line {number}, expected {expected})")
        elif seq > expected:
            item.invalid(f"sequence gap at seq {expected} (deleted entries: {expected}..{seq - 1})")
        elif seq < expected:
            item.invalid(f"sequence out of order at seq {seq} (line {number}, expected {expected})")
        if entry.get("prev") != prev:
            item.invalid(f"chain break at seq {seq}")
        if item.status == "INVALID":
            return item, facts
        digest = sha256(line)
        hashes[seq] = digest
        if entry.get("event") == CHECKPOINT:
            body = {k: v for k, v in entry.items() if k != "signature"}
            if problem := keys.check(body, entry.get("key_id"), entry.get("signature")):
                item.invalid(f"checkpoint seq {seq}: {problem}")
                return item, facts
            unsigned, last_checkpoint = 0, {"seq": seq, "sha256": digest}
        else:
            unsigned += 1
        _collect(entry, seq, facts)
        if entry["event"] == WORKERS and isinstance(entry.get("chains"), list):
            for name in entry["chains"]:
                facts.chains.setdefault(str(name), (path.name, seq))
        expected, prev = seq + 1, digest
    item.info.update(entries=len(lines), last_checkpoint=f"{last_checkpoint['seq']}:{last_checkpoint['sha256']}" if last_checkpoint else None)
    for seq, digest in trusted:
        if one_of:
            if hashes.get(seq) == digest:
                facts.reached.add((seq, digest))
        elif seq not in hashes:
            item.invalid(f"truncated below trusted checkpoint seq {seq} (the log ends at seq {expected - 1})")
        elif hashes[seq] != digest:
            item.invalid(f"trusted checkpoint seq {seq} does not match (rewritten log)")
    if unsigned:
        item.info["unsigned_entries"] = unsigned
        item.unsealed(f"unsealed tail: {unsigned} entr{'y' if unsigned == 1 else 'ies'} after the last checkpoint")
    return item, facts


# The types of the fields verification reads (None allowed): a line whose fields have
# other types is named, never half-read.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "event": str, "prev": str, "time": str, "recording": str, "manifest_sha256": str,
    "flows": int, "key_id": str, "signature": str, "recording_flow": dict,
}


def _malformed(entry: dict[str, Any]) -> str | None:
    """What is wrong with the types of an entry's fields, or None."""
    for name, kind in _FIELDS.items():
        value = entry.get(name)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            return f"field {name!r} is {type(value).__name__}, not {getattr(kind, '__name__', kind)}"
    head = entry.get("recording_flow")
    if head is not None and (type(head.get("index")) is not int or not isinstance(head.get("chain"), str)):
        return "field 'recording_flow' is not {index: int, chain: str}"
    if not isinstance(entry.get("event"), str):
        return "no event"
    return None


def _collect(entry: dict[str, Any], seq: int, facts: AuditFacts) -> None:
    name = entry.get("recording")
    if not isinstance(name, str) or not name:
        return
    name = Path(name).name
    facts.referenced.setdefault(name, seq)
    event = entry.get("event")
    if event == "recording_sealed":
        facts.sealed[name] = (seq, str(entry.get("manifest_sha256")), entry.get("flows") or 0)
    elif event == "retention_deleted":
        facts.deleted[name] = (seq, str(entry.get("manifest_sha256")))
    elif event == "request":
        facts.flows[name] = facts.flows.get(name, 0) + 1
        if (head := entry.get("recording_flow")) and (name not in facts.heads or head["index"] > facts.heads[name][1]):
            facts.heads[name] = (seq, head["index"], head["chain"])


def cross_check(directory: Path, facts: AuditFacts, recordings: dict[str, Item]) -> Iterator[Item]:
    """Recordings in `directory` against what its audit log says about them: every
    recording referenced, every referenced one present or deleted by retention, every
    sealed one's manifest the one sealed. Updates `recordings` items in place; yields
    items for recordings that are missing or were deleted by retention."""
    for name, item in recordings.items():
        _flows_against_log(name, item, facts)
        if name not in facts.referenced:
            item.invalid("not referenced by the audit log (foreign or planted recording)")
        elif name not in facts.sealed:
            if item.info.get("sealed"):
                item.invalid("sealed, but the audit log does not record its sealing (log truncated?)")
        else:
            seq, digest, flows = facts.sealed[name]
            if item.info.get("manifest_sha256") != digest:
                item.invalid(f"manifest differs from the one sealed at seq {seq}")
            elif item.info.get("flows") != flows:
                item.invalid(f"flow count mismatch: {item.info.get('flows')} in the manifest, {flows} sealed at seq {seq}")
    for name, seq in sorted(facts.referenced.items()):
        if name in recordings:
            continue
        gone = Item(str(directory / name), "recording")
        if name in facts.deleted:
            gone.info["deleted"] = f"by retention at seq {facts.deleted[name][0]}"
        else:
            gone.invalid(f"recording missing (referenced by the audit log at seq {seq}, no retention deletion)")
        yield gone


def _flows_against_log(name: str, item: Item, facts: AuditFacts) -> None:
    """A recording, sealed or not, holds every flow the audit log names in it, and the
    log's last named flow has the recording's running hash: a part rolled back to an
    older signed checkpoint (and cut to match) or whose tail was swapped is caught."""
    if item.status == "INVALID":
        return  # its flows could not all be read: the reason is given already
    held = len(item.chains) - 1
    logged = facts.flows.get(name, 0)
    if logged > held:
        item.invalid(f"the audit log names {logged} flow(s) in it, it holds {held} (rolled back or truncated)")
    if (head := facts.heads.get(name)) is not None:
        seq, index, chain = head
        if index > held:
            item.invalid(f"the audit log names its flow {index} at seq {seq}, it holds {held} (rolled back or truncated)")
        elif item.chains[index] != chain:
            item.invalid(f"flow {index} is not the one audited at seq {seq} (running hash differs)")
    chain_log = item.info.get("audit_log")
    if isinstance(chain_log, str) and facts.logs and chain_log not in facts.logs:
        item.invalid(f"its audit log {chain_log} is missing")


def _bundle_starts(directory: Path) -> dict[str, tuple[int, str]]:
    """Where each of an evidence bundle's audit excerpts starts (chain name -> (seq,
    prev)), from its `bundle.json` (`audit_start`: per chain, or, in bundles of one
    chain, one `{seq, prev}`, `audit.jsonl`'s). Only called for a bundle archive that
    verify extracted itself (see `_tree`)."""
    info = directory / BUNDLE_INFO
    if not info.exists():
        return {}
    try:
        starts = orjson.loads(info.read_bytes())["audit_start"]
        if "seq" in starts:
            starts = {"audit.jsonl": starts}
        return {str(chain): (int(start["seq"]), str(start["prev"])) for chain, start in starts.items()}
    except (OSError, orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise VerifyError(f"{info}: not a valid evidence bundle description ({type(exc).__name__})") from None


def _tree(
    directories: list[Path], keys: TrustedKeys, trusted: list[tuple[int, str]], tick: Any, *,
    logs: list[Path] | None = None, bundle: bool = False, audit_required: bool = True,
) -> Iterator[Item]:
    """Verify one body of evidence: the recordings of `directories`, the audit logs
    (`*.jsonl`: one chain per gateway worker) found there plus `logs` (given
    apart, e.g. `hoop_audit_log` outside the recordings directory), and both against
    each other. Without any audit log the body is invalid (the log is required
    evidence) unless `audit_required` is False (`--no-audit-log`).

    `bundle` is True only for a directory extracted from an evidence bundle archive
    (`hoop evidence`). Only then is `bundle.json` honoured: it is unsigned, so in a
    plain directory anyone who deletes the head of the audit log could drop one there
    to make the gap look like an excerpt's start. There it is ignored, and a missing
    head stays a sequence gap."""
    starts = _bundle_starts(directories[0]) if bundle else {}
    recordings = {p.name: p for d in directories for p in sorted(d.glob("*.mitm"))}
    orphan_manifests = {p.name.removesuffix(".manifest.json") + ".mitm": d
                        for d in directories for p in d.glob("*.manifest.json")}
    logs = sorted({*(p for d in directories for p in d.glob("*.jsonl")), *(logs or [])})
    facts = AuditFacts()
    for log in logs:
        item, found = verify_audit(log, keys, trusted, starts.get(log.name), one_of=len(logs) > 1)
        facts.update(found)
        tick()
        yield item
    for seq, digest in trusted if len(logs) > 1 else ():
        if (seq, digest) not in facts.reached:
            cut = Item(str(directories[0]), "audit")
            cut.invalid(f"trusted checkpoint seq {seq} is in none of the {len(logs)} audit chains "
                        "(its chain truncated below it, rewritten or deleted)")
            yield cut
    for name, (log, seq) in sorted(facts.chains.items()):
        if name not in facts.logs:  # a worker's whole chain deleted or renamed
            missing = Item(str(directories[0] / name), "audit")
            missing.invalid(f"audit chain missing: {log} names it at seq {seq} as one of the gateway workers' chains")
            yield missing
    if not logs and audit_required and (recordings or orphan_manifests):
        missing = Item(str(directories[0] / "audit.jsonl"), "audit")
        missing.invalid("audit log missing: recordings cannot be cross-checked "
                        "(deleted or renamed? give it as a path, or --no-audit-log if you know it is not kept)")
        yield missing
    items = {}
    for name, path in recordings.items():
        items[name] = verify_recording(path, keys)
        tick()
    for name in sorted(set(orphan_manifests) - set(recordings)):
        if not logs or name not in facts.referenced:
            orphan = Item(str(orphan_manifests[name] / name), "recording")
            orphan.invalid("recording missing (its manifest is here)")
            yield orphan
    if logs:
        yield from cross_check(directories[0], facts, items)
    yield from items.values()


def _directories(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted({p.parent for p in path.rglob("*") if p.suffix in (".mitm", ".jsonl") or p.name.endswith(".manifest.json")})
        elif not path.exists():
            raise VerifyError(f"{path}: no such file or directory")
    return found


def verify_paths(
    paths: Iterable[Path],
    keys: TrustedKeys,
    trusted: Iterable[tuple[int, str]] = (),
    progress: Any = None,
    audit_required: bool = True,
) -> Iterator[Item]:
    """Verify directories (each with its audit logs cross-checked), single `*.mitm` or
    `*.jsonl` files, and evidence bundles (`*.tar.gz`, unpacked to a temporary
    directory). Audit logs given beside directories are their logs: directories and
    those logs are then one body of evidence, cross-checked together. A directory
    whose recordings have no audit log is invalid unless `audit_required` is False.
    `progress(done, total)` is called as items complete. Raises `VerifyError` for a
    path that does not exist or cannot be read; an archive that is not a readable
    bundle is an INVALID item, so the other paths are still reported."""
    paths, trusted = list(paths), list(trusted)
    directories = _directories(paths)
    outside = [p for p in paths if p.suffix == ".jsonl" and not p.is_dir()] if directories else []
    total = sum(len(list(d.glob("*.mitm"))) + len(list(d.glob("*.jsonl"))) for d in directories)
    total += sum(1 for p in paths if not p.is_dir())
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    for path in paths:
        if path.is_dir():
            continue
        if path.name.endswith((".tar.gz", ".tgz")):
            yield from _bundle(path, keys, trusted, lambda: None)  # counted as one item
        elif path.suffix == ".mitm":
            yield verify_recording(path, keys)
        elif path.suffix == ".jsonl":
            if path in outside:
                continue  # verified with the directories, below
            yield verify_audit(path, keys, trusted)[0]
        else:
            raise VerifyError(f"{path}: not a recording (*.mitm), audit log (*.jsonl), evidence bundle (*.tar.gz) or directory")
        tick()
    if outside:
        yield from _tree(directories, keys, trusted, tick, logs=outside, audit_required=audit_required)
        return
    for directory in directories:
        yield from _tree([directory], keys, trusted, tick, audit_required=audit_required)


def verify_packed(directory: Path, keys: TrustedKeys) -> Iterator[Item]:
    """Verify the `evidence/` directory `hoop_addon.evidence.bundle` has just written
    (before packing it), as verify will read the archive: its audit slices start where
    its own `bundle.json` says."""
    yield from _tree([directory], keys, [], lambda: None, bundle=True)


def _bundle(path: Path, keys: TrustedKeys, trusted: list[tuple[int, str]], tick: Any) -> Iterator[Item]:
    with tempfile.TemporaryDirectory(prefix="hoop-evidence-") as tmp:
        try:
            with tarfile.open(path, "r:gz") as archive:
                archive.extractall(tmp, filter="data")
        except FileNotFoundError:
            raise VerifyError(f"{path}: no such file") from None
        except PermissionError as exc:
            raise VerifyError(f"{path}: {exc.strerror}") from None
        except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:  # truncated or not gzip/tar
            broken = Item(str(path), "bundle")
            broken.invalid(f"not a readable evidence bundle (truncated or not a .tar.gz): {exc or type(exc).__name__}")
            yield broken
            return
        directories = _directories([Path(tmp)])
        if not directories:
            empty = Item(str(path), "bundle")
            empty.invalid("the evidence bundle holds no recordings or audit log")
            yield empty
        for directory in directories:
            try:
                found = list(_tree([directory], keys, trusted, tick, bundle=True))
            except VerifyError as exc:
                broken = Item(str(path), "bundle")
                broken.invalid(str(exc).replace(tmp + "/", ""))
                found = [broken]
            for item in found:
                if item.path.startswith(tmp):
                    item.path = f"{path}:{Path(item.path).relative_to(tmp)}"
                yield item


def parse_checkpoint(text: str) -> tuple[int, str]:
    """`SEQ:SHA256` (as printed by verify) to (seq, hex). Raises `ValueError`."""
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise ValueError(f"expected SEQ:SHA256, got {text!r}")
    binascii.unhexlify(digest)
    return int(seq), digest.lower()
