"""`hoop policy test` and `hoop policy replay`: check a policy change before enforcing it.

    hoop policy test FIXTURES... --rules PATH [--json]
        run policy unit tests (see `hoop_addon.policy.testing`); exit 0 all pass, 1 a
        case fails, 2 a fixture or policy cannot be read
    hoop policy replay RECORDINGS... --rules PATH [--fail-on-diff] [--json]
        re-evaluate recorded flows (*.mitm files or folders of them) under PATH and print
        each flow that would now be handled differently: another outcome, route or rule,
        or values the recorded policy let through that PATH would mask. Recordings hold
        masked bodies, so values masked then cannot be compared, only new catches.
        Exit 1 on differences with --fail-on-diff, else 0; 2 on a read error.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from mitmproxy import http, io
from mitmproxy.exceptions import FlowReadException

from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.simulate import Caller, Exchange, Outcome, simulate
from hoop_addon.policy.testing import load_cases, run


def register(policy: Any) -> None:
    """Add `test` and `replay` to the `hoop policy` subcommand parsers."""
    test = policy.add_parser("test", help="run policy unit tests (fixtures) against a policy")
    test.add_argument("fixtures", nargs="+", type=Path, metavar="FIXTURES")
    test.add_argument("--rules", type=Path, default=Path("rules"), help="the policy (default rules/)")
    test.add_argument("--json", action="store_true", help="one JSON object per case")
    test.set_defaults(run=policy_test)

    replay = policy.add_parser("replay", help="re-evaluate recorded flows under another policy")
    replay.add_argument("recordings", nargs="+", type=Path, metavar="RECORDINGS")
    replay.add_argument("--rules", type=Path, required=True, help="the policy to evaluate them under")
    replay.add_argument("--fail-on-diff", action="store_true", help="exit 1 when any flow would be handled differently")
    replay.add_argument("--json", action="store_true", help="one JSON object per differing flow")
    replay.set_defaults(run=policy_replay)


def policy_test(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.rules, resolve_env=False)
        cases = [case for path in args.fixtures for case in load_cases(path)]
    except PolicyError as exc:
        print(f"error: {exc}")
        return 2
    failed = 0
    for case, outcome, problems in run(policy, cases):
        failed += bool(problems)
        if args.json:
            print(orjson.dumps({"name": case.name, "where": case.where, "passed": not problems,
                                "problems": problems, "outcome": outcome.record()}).decode())
        else:
            print(f"{'FAIL' if problems else 'PASS'} {case.where} {case.name}" + "".join(f"\n    {p}" for p in problems))
    if not args.json:
        print(f"policy tests: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


def policy_replay(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.rules, resolve_env=False)
        total = differing = 0
        for path, flow in _flows(args.recordings):
            total += 1
            changes = differences(flow, simulate(policy, _exchange(flow), _caller(flow)))
            if changes:
                differing += 1
                where = f"{path.name} {flow.id[:8]} {flow.request.method} {flow.request.pretty_url}"
                if args.json:
                    print(orjson.dumps({"recording": str(path), "flow": flow.id, "changes": changes}).decode())
                else:
                    print(f"DIFF {where}: " + "; ".join(changes))
    except PolicyError as exc:
        print(f"error: {exc}")
        return 2
    except (OSError, FlowReadException) as exc:
        print(f"error: cannot read recordings: {exc}")
        return 2
    if not args.json:
        print(f"{total} flow(s) replayed, {differing} would be handled differently")
    return 1 if differing and args.fail_on_diff else 0


def _flows(paths: list[Path]) -> Iterator[tuple[Path, http.HTTPFlow]]:
    for root in paths:
        for path in sorted(root.rglob("*.mitm")) if root.is_dir() else [root]:
            with path.open("rb") as fh:
                for flow in io.FlowReader(fh).stream():
                    if isinstance(flow, http.HTTPFlow):
                        yield path, flow


def _caller(flow: http.HTTPFlow) -> Caller:
    identity = flow.metadata.get("hoop", {}).get("identity") or {}
    return Caller(identity.get("subject", ""), tuple(identity.get("groups", ())), identity.get("client_id"),
                  tuple(identity.get("scopes", ())), identity.get("issuer"))


def _exchange(flow: http.HTTPFlow) -> Exchange:
    response = flow.response
    return Exchange(
        flow.request.method, flow.request.url, list(flow.request.headers.items(multi=True)),
        flow.request.get_content(strict=False) or b"",
        list(response.headers.items(multi=True)) if response else (),
        (response.get_content(strict=False) or b"") if response else None,
    )


def differences(flow: http.HTTPFlow, now: Outcome) -> list[str]:
    """How `now` differs from what was recorded for `flow` (empty: the same)."""
    record = flow.metadata.get("hoop", {})
    decision = record.get("decision", {})
    approval = record.get("approval") or {}
    then = {
        "outcome": "approve" if approval.get("rule") else decision.get("outcome", "allow"),
        "route": record.get("route"),
        "rule": decision.get("rule") or approval.get("rule"),
    }
    changes = [f"{key} {then[key]!r} -> {getattr(now, key)!r}" for key in ("outcome", "route", "rule") if then[key] != getattr(now, key)]
    if now.masked:
        changes.append("would also mask " + ", ".join(f"{n} value(s) by {rule}" for rule, n in sorted(now.masked.items())))
    return changes
