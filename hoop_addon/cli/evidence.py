"""The `hoop` commands for keys, recordings and the audit log (registered by `hoop_addon.cli.main`):

    hoop keygen [-o FILE]                      new Ed25519 signing key (FILE, FILE.pub)
    hoop verify PATH... --public-key FILE [--json] [--trusted-checkpoint SEQ:SHA256]
                [--allow-unsealed-tail] [--no-audit-log]
                                               exit 0 valid, 1 invalid (or nothing to verify), 2 usage or I/O error
                (a directory with audit logs given apart, `hoop verify REC LOG`, is one body of evidence)
    hoop audit [--log FILE] [--subject S] [--group G] [--route R] [--since T] [--until T]
               [--decision D] [--rule R] [--event E] [--tool NAME] [--json]
    hoop evidence --since T --until T -o FILE --public-key FILE [--recordings DIR] [--log FILE]

Without `--log`, `audit` and `evidence` read every audit chain of the recordings
directory (`audit.jsonl`, and `audit-<I>.jsonl` of each gateway worker) as one log:
`audit` merges them by time (with several chains, each JSON line names its `chain` and
the table has a `chain` column), `evidence` packs each chain's slice.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from hoop_addon.evidence import bundle, keys
from hoop_addon.evidence.audit_log import as_object, chains, select
from hoop_addon.evidence.verify import VerifyError, parse_checkpoint, verify_paths


def _home() -> Path:
    return Path(os.environ.get("HOOP_HOME", ".hoop"))


def keygen(args: argparse.Namespace) -> int:
    """Write a new key pair; print the key id and the files."""
    path = Path(args.output or _home() / "signing.key")
    try:
        private, public, key_id = keys.generate(path)
    except FileExistsError:
        print(f"error: {path} exists: keys are never overwritten (rotate by writing a new one)", file=sys.stderr)
        return 2
    print(f"key id:      {key_id}\nprivate key: {private} (mode 0600; the gateway's --set hoop_signing_key)\npublic key:  {public} (give it to auditors: hoop verify --public-key)")
    return 0


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\rverifying [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\r" + " " * (width + 30) + "\r")
    sys.stderr.flush()


def verify(args: argparse.Namespace) -> int:
    """Verify recordings, audit logs and bundles; one line per item and a summary."""
    try:
        trusted_keys = keys.TrustedKeys.load(Path(p) for p in args.public_key)
        checkpoints = [parse_checkpoint(c) for c in args.trusted_checkpoint]
        counts = {"OK": 0, "INVALID": 0, "UNSEALED": 0}
        progress = _progress if sys.stderr.isatty() and not args.json else None
        for item in verify_paths([Path(p) for p in args.paths], trusted_keys, checkpoints, progress,
                                 audit_required=not args.no_audit_log):
            counts[item.status] += 1
            if args.json:
                print(orjson.dumps({"path": item.path, "kind": item.kind, "status": item.status,
                                    "reasons": item.reasons, **item.info}).decode())
            else:
                print(item.line())
    except (keys.KeyFileError, VerifyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(counts.values())
    valid = total > 0 and counts["INVALID"] == 0 and (counts["UNSEALED"] == 0 or args.allow_unsealed_tail)
    summary = f"{'VALID' if valid else 'INVALID'}: {total} item(s): {counts['OK']} OK, {counts['INVALID']} invalid, {counts['UNSEALED']} unsealed"
    if not total:  # an emptied directory proves nothing
        summary = f"INVALID: nothing to verify in {' '.join(args.paths)} (no recording, audit log or evidence bundle)"
    if counts["UNSEALED"] and not args.allow_unsealed_tail:
        summary += " (unsealed tails fail without --allow-unsealed-tail)"
    print(orjson.dumps({"summary": summary, "valid": valid, **counts}).decode() if args.json else summary)
    return 0 if valid else 1


def _time(text: str) -> str:
    """An ISO 8601 date or time (naive means UTC) as the log's `YYYY-MM-DDTHH:MM:SSZ`."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _logs(args: argparse.Namespace) -> list[Path]:
    """`--log`, else every audit chain of `--recordings` (else its `audit.jsonl`, which
    then names what is missing when read)."""
    if args.log:
        return [Path(args.log)]
    return chains(Path(args.recordings)) or [Path(args.recordings) / "audit.jsonl"]


COLUMNS = ("seq", "time", "event", "subject", "route", "decision", "status", "masked", "approval", "recording")


def _row(e: dict[str, Any]) -> tuple[str, ...]:
    """One table row; a field of the wrong type (a malformed entry) shows as text, never raises."""
    decision = as_object(e.get("decision"))
    approval = as_object(e.get("approval") or decision.get("approval"))
    decisions = [as_object(d) for d in approval["decisions"]] if isinstance(approval.get("decisions"), list) else []
    approvers = ",".join(str(d["approver"]) for d in decisions if d.get("approve") and d.get("approver"))
    masked = ",".join(f"{m.get('rule')}:{sum(v for v in as_object(m.get('detectors')).values() if type(v) is int)}"
                      for m in map(as_object, e.get("masked") if isinstance(e.get("masked"), list) else []))
    return tuple(str(x) for x in (
        e.get("seq", ""), e.get("time", ""), e.get("event", ""), as_object(e.get("identity")).get("subject") or "",
        e.get("route") or "", " ".join(str(x) for x in (decision.get("outcome"), decision.get("reason")) if x),
        e.get("status") or "", masked, " ".join(str(x) for x in (approval.get("status"), approvers) if x),
        Path(e["recording"]).name if isinstance(e.get("recording"), str) and e["recording"] else "",
    ))


def audit(args: argparse.Namespace) -> int:
    """Print the audit entries matching the filters: a table, or JSON lines. Several
    chains (gateway workers) are merged by time, each entry naming its `chain`."""
    paths = _logs(args)
    entries = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"error: {path}: {exc.strerror}", file=sys.stderr)
            return 2
        for number, line in enumerate(data.splitlines(), 1):
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                print(f"error: {path}: line {number} is not an audit entry (check the log with `hoop verify`)", file=sys.stderr)
                return 1
            entries.append({**entry, "chain": path.name} if len(paths) > 1 else entry)
    if len(paths) > 1:  # stable: each chain's own order is kept within a second
        entries.sort(key=lambda e: str(e.get("time", "")))
    chosen = select(entries, subject=args.subject, group=args.group, route=args.route, since=args.since,
                    until=args.until, decision=args.decision, rule=args.rule, event=args.event, tool=args.tool)
    if args.json:
        for entry in chosen:
            print(orjson.dumps(entry).decode())
        return 0
    columns = (*COLUMNS, "chain") if len(paths) > 1 else COLUMNS
    rows = [columns, *(_row(e) + ((str(e["chain"]),) if len(paths) > 1 else ()) for e in chosen)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def evidence_cmd(args: argparse.Namespace) -> int:
    """Build an evidence bundle and print its verify report."""
    try:
        report, valid = bundle.build(_logs(args), Path(args.recordings), args.since, args.until, Path(args.output),
                                     [Path(p) for p in args.public_key])
    except (OSError, ValueError, keys.KeyFileError, VerifyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report))
    print(f"evidence bundle: {args.output} (check it with: hoop verify {args.output} --public-key KEY.pub)")
    if not valid:
        print("error: the evidence does not verify (INVALID items above): the bundle documents it, it does not prove it",
              file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the keygen, verify, audit and evidence subcommands to `hoop`'s parser."""
    kg = sub.add_parser("keygen", help="create an Ed25519 signing key pair")
    kg.add_argument("-o", "--output", help="private key file (default $HOOP_HOME/signing.key); the public key is FILE.pub")
    kg.set_defaults(run=keygen)

    ver = sub.add_parser("verify", help="verify recordings, audit logs and evidence bundles offline")
    ver.add_argument("paths", nargs="+", metavar="PATH", help="recordings directory, *.mitm, *.jsonl or *.tar.gz")
    ver.add_argument("--public-key", action="append", required=True, metavar="FILE", help="trusted public key (repeat for rotated keys)")
    ver.add_argument("--json", action="store_true", help="JSON lines instead of text")
    ver.add_argument("--trusted-checkpoint", action="append", default=[], metavar="SEQ:SHA256",
                     help="an audit checkpoint you recorded earlier: the log must still reach it unchanged")
    ver.add_argument("--allow-unsealed-tail", action="store_true", help="accept recordings and logs not closed cleanly (after a crash)")
    ver.add_argument("--no-audit-log", action="store_true",
                     help="recordings without their audit log: skip the cross-check (only if you know no log is kept)")
    ver.set_defaults(run=verify)

    aud = sub.add_parser("audit", help="query the audit log")
    aud.add_argument("--recordings", default="recordings", help="recordings directory (default recordings)")
    aud.add_argument("--log", help="one audit log (default: every chain of <recordings>, audit.jsonl and audit-<worker>.jsonl)")
    for name in ("subject", "group", "route", "decision", "rule", "event"):
        aud.add_argument(f"--{name}")
    aud.add_argument("--tool", help="MCP tool (or prompt name, resource URI) an entry's calls name")
    aud.add_argument("--since", type=_time, help="ISO 8601 date or time (UTC unless an offset is given)")
    aud.add_argument("--until", type=_time)
    aud.add_argument("--json", action="store_true", help="JSON lines (for tools) instead of a table")
    aud.set_defaults(run=audit)

    ev = sub.add_parser("evidence", help="pack recordings, audit log slice, keys and a verify report")
    ev.add_argument("--since", type=_time, required=True)
    ev.add_argument("--until", type=_time, required=True)
    ev.add_argument("-o", "--output", required=True, help="the bundle (.tar.gz)")
    ev.add_argument("--public-key", action="append", required=True, metavar="FILE")
    ev.add_argument("--recordings", default="recordings")
    ev.add_argument("--log", help="one audit log (default: every chain of <recordings>, audit.jsonl and audit-<worker>.jsonl)")
    ev.set_defaults(run=evidence_cmd)
