"""Offline verification of recordings and audit logs (pure: reads files, no network).

`verify_paths(paths, keys, ...)` checks every recording (`*.mitm` and its manifest, see
`hoop_addon.evidence.recording`), every audit log (`*.jsonl`, see `hoop_addon.evidence.audit_log`) and every
evidence bundle (`*.tar.gz`, see `hoop_addon.evidence.bundle`) under the given paths, and
cross-checks each directory's recordings against its audit log. It yields one `Item`
per recording, audit log and cross-check problem:

- `OK`: signed by a trusted key, every hash and the chain match.
- `INVALID`: the reasons say what is wrong: `bad signature`, `unknown key <id>`,
  `unsigned`, `hash mismatch (flow i of n)` (`; the file ends inside it (truncated)`),
  `unreadable flow i`, `n bytes after the last sealed flow`, `chain break at seq N`, `sequence gap
  at seq N (deleted entries)`, `sequence out of order at seq N`, `truncated below
  trusted checkpoint seq N`, `recording missing`, `not referenced by the audit log`,
  `manifest differs from the one sealed at seq N`, ...
- `UNSEALED`: valid up to the last signed checkpoint, but not closed cleanly (a crash):
  the tail after it is not signed. A failure unless unsealed tails are allowed.
"""

from __future__ import annotations

import binascii
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from mitmproxy.io import tnetstring

from hoop_addon.evidence.audit_log import CHECKPOINT
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
        flows, chain, sealed = manifest["flows"], manifest["chain"], manifest["sealed"]
        if flows is None and sealed is False:  # an open part's checkpoint: entries come from the file
            flows = _entries(data, int(manifest["flow_count"]))
        if manifest.get("format") != FORMAT or not isinstance(flows, list):
            raise ValueError
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        item.invalid("manifest unreadable")
        return item
    item.info.update(session=manifest.get("session"), flows=len(flows), sealed=sealed,
                     key_id=manifest.get("key_id"), manifest_sha256=sha256(raw))
    signed = {k: v for k, v in manifest.items() if k not in ("signature", "flows")}
    if problem := keys.check(signed, manifest.get("key_id"), manifest.get("signature")):
        item.invalid(f"manifest: {problem}")
    if manifest.get("flow_count") != len(flows):
        item.invalid(f"flow count mismatch: {len(flows)} listed, {manifest.get('flow_count')} signed")
    if manifest.get("recording") != path.name:
        item.invalid(f"manifest is for {manifest.get('recording')!r}, not this file")
    offset, running = 0, GENESIS
    for i, entry in enumerate(flows, 1):
        try:
            start, length, digest = int(entry["offset"]), int(entry["length"]), str(entry["sha256"])
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
        offset += length
    if running != chain:
        item.invalid("chain mismatch: the manifest's running hash does not match its flows")
    tail = data[offset:]
    if sealed and tail:
        item.invalid(f"{len(tail)} bytes after the last sealed flow (appended or foreign data)")
    elif not sealed:
        count, rest = _count_flows(tail)
        item.info["unsigned_flows"] = count
        if rest:
            item.invalid(f"unreadable data in the unsealed tail ({rest} bytes)")
        item.unsealed(f"unsealed: not closed cleanly; {len(flows)} flow(s) signed, {count} flow(s) after the last checkpoint")
    return item


def _readable(chunk: bytes) -> bool:
    try:
        return isinstance(tnetstring.loads(chunk), dict)
    except (ValueError, TypeError, IndexError):
        return False


def _entries(data: bytes, count: int) -> list[dict[str, Any]]:
    """The manifest entries (offset, length, SHA-256) of the first `count` flows of a
    flow file, as far as the file holds them; the signed chain then checks them."""
    view, entries, offset = memoryview(data), [], 0
    while len(entries) < count and view:
        try:
            _, rest = tnetstring.pop(view)
        except (ValueError, TypeError, IndexError):
            break
        length = len(view) - len(rest)
        entries.append({"offset": offset, "length": length, "sha256": sha256(bytes(view[:length]))})
        view, offset = rest, offset + length
    return entries


def _count_flows(data: bytes) -> tuple[int, int]:
    """(whole flows, bytes left over) at the start of `data`."""
    view, count = memoryview(data), 0
    while view:
        try:
            value, rest = tnetstring.pop(view)
        except (ValueError, TypeError, IndexError):
            break
        if not isinstance(value, dict):
            break
        view, count = rest, count + 1
    return count, len(view)


@dataclass
class AuditFacts:
    """What an audit log says about recordings, by file name: `referenced` (first seq),
    `sealed` (seq, manifest sha256, flows), `deleted` (seq, manifest sha256)."""

    referenced: dict[str, int] = field(default_factory=dict)
    sealed: dict[str, tuple[int, str, int]] = field(default_factory=dict)
    deleted: dict[str, tuple[int, str]] = field(default_factory=dict)


def verify_audit(
    path: Path, keys: TrustedKeys, trusted: Iterable[tuple[int, str]] = (), start: tuple[int, str] | None = None
) -> tuple[Item, AuditFacts]:
    """Check an audit log's sequence, chain and checkpoint signatures, and that it
    reaches every `trusted` checkpoint (seq, line sha256). `start` (seq, prev) is where
    a slice (from an evidence bundle) begins; a whole log starts at (1, 64 zeros)."""
    item, facts = Item(str(path), "audit"), AuditFacts()
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
            if not isinstance(entry, dict) or not isinstance(entry["seq"], int):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            item.invalid(f"line {number} is not an audit entry")
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
        expected, prev = seq + 1, digest
    item.info.update(entries=len(lines), last_checkpoint=f"{last_checkpoint['seq']}:{last_checkpoint['sha256']}" if last_checkpoint else None)
    for seq, digest in trusted:
        if seq not in hashes:
            item.invalid(f"truncated below trusted checkpoint seq {seq} (the log ends at seq {expected - 1})")
        elif hashes[seq] != digest:
            item.invalid(f"trusted checkpoint seq {seq} does not match (rewritten log)")
    if unsigned:
        item.info["unsigned_entries"] = unsigned
        item.unsealed(f"unsealed tail: {unsigned} entr{'y' if unsigned == 1 else 'ies'} after the last checkpoint")
    return item, facts


def _collect(entry: dict[str, Any], seq: int, facts: AuditFacts) -> None:
    name = entry.get("recording")
    if not isinstance(name, str) or not name:
        return
    name = Path(name).name
    facts.referenced.setdefault(name, seq)
    if entry.get("event") == "recording_sealed":
        facts.sealed[name] = (seq, str(entry.get("manifest_sha256")), int(entry.get("flows") or 0))
    elif entry.get("event") == "retention_deleted":
        facts.deleted[name] = (seq, str(entry.get("manifest_sha256")))


def cross_check(directory: Path, facts: AuditFacts, recordings: dict[str, Item]) -> Iterator[Item]:
    """Recordings in `directory` against what its audit log says about them: every
    recording referenced, every referenced one present or deleted by retention, every
    sealed one's manifest the one sealed. Updates `recordings` items in place; yields
    items for recordings that are missing or were deleted by retention."""
    for name, item in recordings.items():
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


def _bundle_start(directory: Path) -> tuple[int, str] | None:
    """Where an evidence bundle's audit excerpt starts, from its `bundle.json`. Only
    called for a bundle archive that verify extracted itself (see `_tree`)."""
    info = directory / BUNDLE_INFO
    if not info.exists():
        return None
    try:
        doc = orjson.loads(info.read_bytes())
        return int(doc["audit_start"]["seq"]), str(doc["audit_start"]["prev"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VerifyError(f"{info}: not a valid evidence bundle description ({type(exc).__name__})") from None


def _tree(
    directory: Path, keys: TrustedKeys, trusted: list[tuple[int, str]], tick: Any, bundle: bool = False
) -> Iterator[Item]:
    """Verify one directory: its audit logs, its recordings, and both against each other.

    `bundle` is True only for a directory extracted from an evidence bundle archive
    (`hoop evidence`). Only then is `bundle.json` honoured: it is unsigned, so in a
    plain directory anyone who deletes the head of the audit log could drop one there
    to make the gap look like an excerpt's start. There it is ignored, and a missing
    head stays a sequence gap."""
    start = _bundle_start(directory) if bundle else None
    recordings = {p.name: p for p in sorted(directory.glob("*.mitm"))}
    orphan_manifests = {p.name.removesuffix(".manifest.json") + ".mitm" for p in directory.glob("*.manifest.json")}
    logs = sorted(directory.glob("*.jsonl"))
    facts = AuditFacts()
    for log in logs:
        item, found = verify_audit(log, keys, trusted, start)
        facts.referenced.update(found.referenced)
        facts.sealed.update(found.sealed)
        facts.deleted.update(found.deleted)
        tick()
        yield item
    items = {}
    for name, path in recordings.items():
        items[name] = verify_recording(path, keys)
        tick()
    for name in sorted(orphan_manifests - set(recordings)):
        if not logs or name not in facts.referenced:
            orphan = Item(str(directory / name), "recording")
            orphan.invalid("recording missing (its manifest is here)")
            yield orphan
    if logs:
        yield from cross_check(directory, facts, items)
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
) -> Iterator[Item]:
    """Verify directories (each with its audit log cross-checked), single `*.mitm` or
    `*.jsonl` files, and evidence bundles (`*.tar.gz`, unpacked to a temporary
    directory). `progress(done, total)` is called as items complete. Raises
    `VerifyError` for a path that does not exist or cannot be read."""
    paths, trusted = list(paths), list(trusted)
    directories = _directories(paths)
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
            yield verify_audit(path, keys, trusted)[0]
        else:
            raise VerifyError(f"{path}: not a recording (*.mitm), audit log (*.jsonl), evidence bundle (*.tar.gz) or directory")
        tick()
    for directory in directories:
        yield from _tree(directory, keys, trusted, tick)


def _bundle(path: Path, keys: TrustedKeys, trusted: list[tuple[int, str]], tick: Any) -> Iterator[Item]:
    with tempfile.TemporaryDirectory(prefix="hoop-evidence-") as tmp:
        try:
            with tarfile.open(path, "r:gz") as archive:
                archive.extractall(tmp, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise VerifyError(f"{path}: not a readable evidence bundle: {exc}") from None
        for directory in _directories([Path(tmp)]):
            for item in _tree(directory, keys, trusted, tick, bundle=True):
                item.path = f"{path}:{Path(item.path).relative_to(tmp)}"
                yield item


def parse_checkpoint(text: str) -> tuple[int, str]:
    """`SEQ:SHA256` (as printed by verify) to (seq, hex). Raises `ValueError`."""
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise ValueError(f"expected SEQ:SHA256, got {text!r}")
    binascii.unhexlify(digest)
    return int(seq), digest.lower()
