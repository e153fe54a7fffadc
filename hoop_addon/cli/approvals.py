"""`hoop approvals list | approve ID | deny ID`: a client of the control API.

    hoop approvals list [--json]
    hoop approvals approve ID [--reason TEXT]
    hoop approvals deny ID [--reason TEXT]

Options (all subcommands): `--url` (default `$HOOP_CONTROL_URL`, else
`http://127.0.0.1:8081`), `--token` (the approver's own JWT; default
`$HOOP_APPROVER_TOKEN`). Exit codes: 0 done, 1 refused by the gateway (not an
approver, own request, already decided, unknown id, bad token), 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import orjson

from hoop_addon.approvals.inert import inert

DEFAULT_URL = "http://127.0.0.1:8081"


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(HTTP status, parsed JSON answer) of one control API call; `OSError` when the
    API cannot be reached."""
    if not args.token:
        raise _Usage("an approver token is required: --token or $HOOP_APPROVER_TOKEN")
    request = urllib.request.Request(
        args.url.rstrip("/") + path, method=method, data=orjson.dumps(body) if body is not None else None,
        headers={"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, orjson.loads(exc.read())
        except orjson.JSONDecodeError:
            return exc.code, {"error": "http_error", "message": str(exc)}


class _Usage(Exception):
    pass


def _refused(answer: Any) -> int:
    print(inert(f"refused: {answer.get('error')}: {answer.get('message')}"), file=sys.stderr)
    return 1


def list_approvals(args: argparse.Namespace) -> int:
    """Print the pending approvals this approver may decide, one per line."""
    status, answer = _call(args, "GET", "/approvals")
    if status != 200:
        return _refused(answer)
    if args.json:
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
        return 0
    for item in answer["approvals"]:
        # Everything shown comes from the request or its requester: inert for the terminal.
        request = item["request"]
        preview = inert(" ".join(str(request.get("preview", "")).split(" "))[:100])
        call = request.get("mcp")  # an MCP call: which tool (prompt, resource) it is
        mcp = f"  mcp={call.get('method')} {call.get('target')}" if isinstance(call, dict) else ""
        print(inert(f"{item['id']}  rule={item['rule']}  requester={item['requester']['subject']}  "
                    f"{request['method']} {request['url']}{mcp}  until {item['deadline']}") + f"\n    {preview}")
    if not answer["approvals"]:
        print("no pending approvals for you")
    return 0


def decide(args: argparse.Namespace) -> int:
    """Approve or deny one approval; print its status."""
    status, answer = _call(args, "POST", f"/approvals/{args.id}/{args.verb}", {"reason": args.reason})
    if status != 200:
        return _refused(answer)
    approvals = sum(d["approve"] for d in answer["decisions"])
    print(inert(f"{answer['id']}: {answer['status']} ({approvals}/{answer['min_approvals']} approvals)"))
    return 0


_VALUED = ("--reason", "--url", "--token")


def id_operands(argv: list[str]) -> list[str]:
    """`argv` of `hoop` with the approval id of `approvals approve|deny` moved behind
    `--` when it starts with `-` (ids made before new ids never did, about 1 in 64,
    could), so that argparse reads it as the id and not as an unknown option. Other
    command lines are returned unchanged."""
    if len(argv) < 3 or argv[0] != "approvals" or argv[1] not in ("approve", "deny") or "--" in argv:
        return argv
    rest, ids, i = list(argv[:2]), [], 2
    while i < len(argv):
        token = argv[i]
        if token in _VALUED and i + 1 < len(argv):
            rest.append(f"{token}={argv[i + 1]}")  # a value may start with `-` too (a reason)
            i += 2
            continue
        if token.startswith("-") and token not in ("-h", "--help") and not token.startswith(tuple(f"{o}=" for o in _VALUED)):
            ids.append(token)
        else:
            rest.append(token)
        i += 1
    return rest + ["--", *ids] if ids else argv


def register(sub: argparse._SubParsersAction) -> None:
    """Add `approvals` and its subcommands to the `hoop` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("HOOP_CONTROL_URL", DEFAULT_URL), help="control API base URL")
    common.add_argument("--token", default=os.environ.get("HOOP_APPROVER_TOKEN"), help="your own JWT (default $HOOP_APPROVER_TOKEN)")
    actions = sub.add_parser("approvals", help="see and decide requests waiting for approval").add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="pending requests you may decide")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    listing.set_defaults(run=_run(list_approvals))
    for verb in ("approve", "deny"):
        p = actions.add_parser(verb, parents=[common], help=f"{verb} a request")
        p.add_argument("id", help="the approval id (from `hoop approvals list`)")
        p.add_argument("--reason", default="", help="why (recorded in the audit log)")
        p.set_defaults(run=_run(decide), verb=verb)


def _run(command: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except _Usage as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run
