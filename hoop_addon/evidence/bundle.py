"""Evidence bundles: what an auditor needs to check a time window offline, in one archive.

`build()` writes a gzip'd tar with one directory `evidence/`:

- each audit chain's slice under the chain's name (`audit.jsonl`; one per gateway
  worker, `audit-<I>.jsonl`): from the first entry at or after `since` to the first
  checkpoint at or after the last entry before `until` (so the slice ends signed), or
  later, until it holds the sealing of every recording it references; a chain with no
  entry in the window gives its nearest checkpoint (it shows the chain was there);
- every recording (flow file + manifest) the slices reference and that still exists;
- `keys/*.pub`: the public keys given;
- `bundle.json`: `{"since", "until", "created", "audit_start": {CHAIN: {"seq", "prev"}}}`
  (where each slice starts in its chain; bundles of one chain used to write one
  `{"seq", "prev"}`, which verify still reads as `audit.jsonl`'s);
- `report.txt`: the verify report at packing time.

`hoop verify BUNDLE.tar.gz --public-key KEY` checks it like a recordings directory.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import orjson

from hoop_addon.evidence.audit_log import CHECKPOINT
from hoop_addon.evidence.keys import TrustedKeys
from hoop_addon.evidence.recording import manifest_path
from hoop_addon.evidence.verify import BUNDLE_INFO, verify_packed


def _slice(lines: list[bytes], since: str, until: str) -> list[bytes]:
    """The lines from the first entry at or after `since` to the first checkpoint after
    the last entry at or before `until`, extended (to a checkpoint again) until every
    recording the slice references has its sealing in it, if it was sealed."""
    entries = [orjson.loads(line) for line in lines]
    if not all(isinstance(e, dict) and isinstance(e.get("time"), str) and isinstance(e.get("event"), str) for e in entries):
        raise ValueError("the audit log holds a line that is not an audit entry: run `hoop verify` on it")
    first = next((i for i, e in enumerate(entries) if e["time"] >= since), len(entries))
    last = max((i for i, e in enumerate(entries) if e["time"] <= until), default=-1)
    if last < first:  # nothing in the window: the nearest checkpoint, if any
        near = [i for i, e in enumerate(entries) if e["event"] == CHECKPOINT]
        before = [i for i in near if entries[i]["time"] <= until]
        return [lines[before[-1] if before else near[0]]] if near else []

    def checkpoint_after(i: int) -> int:
        return next((j for j in range(i, len(entries)) if entries[j]["event"] == CHECKPOINT), len(entries) - 1)

    end = checkpoint_after(last)
    while True:
        names = {_name(e) for e in entries[first:end + 1]} - {None}
        sealed = max((i for i in range(end + 1, len(entries))
                      if entries[i]["event"] == "recording_sealed" and _name(entries[i]) in names), default=end)
        if sealed == end:
            return lines[first:end + 1]
        end = checkpoint_after(sealed)


def _entry_in(lines: list[bytes], since: str, until: str) -> bool:
    """True when a slice holds an entry of the window (not only a nearest checkpoint)."""
    return any(since <= orjson.loads(line)["time"] <= until for line in lines)


def _name(entry: dict) -> str | None:
    name = entry.get("recording")
    return Path(name).name if isinstance(name, str) and name else None


def build(
    audit_logs: list[Path], recordings: Path, since: str, until: str, output: Path, public_keys: Iterable[Path]
) -> tuple[list[str], bool]:
    """Pack the evidence for entries with `since <= time <= until` (RFC 3339 UTC
    strings as in the logs) of the audit chains `audit_logs` (one body of evidence:
    a gateway's, or one per worker) into `output` (.tar.gz). Returns the verify report
    lines and whether every item is OK (a bundle is written either way: it documents
    what was found). Raises `OSError` when a file cannot be read or written,
    `ValueError` when the window holds no audit entry or a log is not JSON lines."""
    slices = {log.name: _slice(log.read_bytes().splitlines(), since, until) for log in audit_logs}
    if not any(_entry_in(chosen, since, until) for chosen in slices.values()):
        raise ValueError(f"no audit entries between {since} and {until}")
    keys = list(public_keys)
    with tempfile.TemporaryDirectory(prefix="hoop-evidence-") as tmp:
        root = Path(tmp) / "evidence"
        (root / "keys").mkdir(parents=True)
        starts = {}
        for chain, chosen in slices.items():
            if chosen:
                (root / chain).write_bytes(b"\n".join(chosen) + b"\n")
                head = orjson.loads(chosen[0])
                starts[chain] = {"seq": head["seq"], "prev": head["prev"]}
        names = {_name(orjson.loads(line)) for chosen in slices.values() for line in chosen} - {None}
        for name in sorted(names):
            for path in (recordings / name, manifest_path(recordings / name)):
                if path.exists():
                    shutil.copy2(path, root / path.name)
        for key in keys:
            shutil.copy2(key, root / "keys" / key.name)
        info = {"since": since, "until": until, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "audit_start": starts}
        (root / BUNDLE_INFO).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
        items = list(verify_packed(root, TrustedKeys.load(keys)))  # slices start where bundle.json says
        report = [item.line().replace(str(root) + "/", "") for item in items]
        # An open session's unsigned tail is reported (UNSEALED), as verify's
        # --allow-unsealed-tail would accept it; anything INVALID fails the bundle.
        counts = {status: sum(item.status == status for item in items) for status in ("OK", "INVALID", "UNSEALED")}
        valid = bool(items) and not counts["INVALID"]
        report.append(f"{'VALID' if valid else 'INVALID'}: {len(items)} item(s): {counts['OK']} OK, "
                      f"{counts['INVALID']} invalid, {counts['UNSEALED']} unsealed")
        (root / "report.txt").write_text("\n".join(report) + "\n")
        with tarfile.open(output, "w:gz") as archive:
            archive.add(root, arcname="evidence")
    return report, valid

