"""The `hoop` command line (also `python -m hoop_addon`): everything but the proxy.

    hoop policy check PATH...           validate policy files; exit 0 valid, 1 invalid
    hoop policy test | replay           policy unit tests; recorded flows under a new
                                        policy: see `hoop_addon.cli.policy`
    hoop init [--home DIR]              create the mitmproxy CA and the dev issuer
    hoop dev-token --subject S --groups a,b [--ttl SECONDS]
                                        mint a development token (printed alone)
    hoop keygen | verify | audit | evidence   signing keys, recordings, the audit log:
                                        see `hoop_addon.cli.evidence`
    hoop approvals list | approve ID | deny ID   decide requests waiting for approval
    hoop serve [--rules DIR] [--workers N] [mitmdump options...]
                                        run the gateway (N workers on the same ports):
                                        see `hoop_addon.cli.serve`, `hoop_addon.cli.workers`
    hoop dev-upstream [--port 9000]     a fake OpenAI/Anthropic upstream, offline

Exit codes: 0 success, 1 invalid input found, 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hoop_addon.cli import approvals, evidence, serve
from hoop_addon.dev import upstream
from hoop_addon.cli import policy as policy_commands
from hoop_addon.policy.loader import PolicyError, load_policy


def _home(value: str | None) -> Path:
    return Path(value or os.environ.get("HOOP_HOME", ".hoop"))


def policy_check(args: argparse.Namespace) -> int:
    """Validate each PATH (file or directory); print one line per path."""
    status = 0
    for path in args.paths:
        try:
            policy = load_policy(path, resolve_env=False)
        except PolicyError as exc:
            print(f"INVALID {exc}")
            status = 1
            continue
        print(
            f"OK {path}: {len(policy.files)} file(s), {len(policy.routes)} route(s), "
            f"{len(policy.issuers)} issuer(s), sha256 {policy.digest}"
        )
    return status


def init(args: argparse.Namespace) -> int:
    """Create what a first run needs under the home directory (idempotent)."""
    from mitmproxy.certs import CertStore

    from hoop_addon.dev import issuer
    from hoop_addon.dev.gateway import ensure_signing_key

    home = _home(args.home)
    confdir = home / "mitmproxy"
    confdir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(confdir, "mitmproxy", 2048)
    dev = issuer.ensure(home)
    print(f"mitmproxy CA:      {confdir / 'mitmproxy-ca-cert.pem'}")
    print(f"dev issuer JWKS:   {dev.jwks_path} (issuer '{issuer.ISSUER}', audience '{issuer.AUDIENCE}')")
    print(f"dev signing key:   {ensure_signing_key(home / 'signing.key')} (public: {home / 'signing.pub'})")
    return 0


def dev_token(args: argparse.Namespace) -> int:
    """Print a token from the development issuer."""
    from hoop_addon.dev import issuer

    groups = [g for g in args.groups.split(",") if g]
    print(issuer.mint(_home(args.home), args.subject, groups, args.ttl, args.audience))
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of `hoop`."""
    p = argparse.ArgumentParser(prog="hoop", description="hoop_addon: policy, keys and tokens for the gateway.")
    sub = p.add_subparsers(dest="command", required=True)

    policy = sub.add_parser("policy", help="work with policy files").add_subparsers(dest="action", required=True)
    check = policy.add_parser("check", help="validate policy files or directories")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.set_defaults(run=policy_check)
    policy_commands.register(policy)

    init_p = sub.add_parser("init", help="create the mitmproxy CA and the development issuer")
    init_p.add_argument("--home", help="state directory (default $HOOP_HOME or .hoop)")
    init_p.set_defaults(run=init)

    token = sub.add_parser("dev-token", help="mint a development token")
    token.add_argument("--subject", required=True)
    token.add_argument("--groups", default="", help="comma-separated groups")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--audience", default="hoop-gateway")
    token.add_argument("--home", help="state directory (default $HOOP_HOME or .hoop)")
    token.set_defaults(run=dev_token)
    evidence.register(sub)
    approvals.register(sub)
    serve.register(sub)
    upstream.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    p = parser()
    args, extra = p.parse_known_args(approvals.id_operands(sys.argv[1:] if argv is None else list(argv)))
    if extra and not getattr(args, "passthrough", False):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args, extra) if getattr(args, "passthrough", False) else args.run(args)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
