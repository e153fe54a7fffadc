"""`make demo`: the whole path, offline, in one command.

Starts a local OpenAI-compatible HTTPS upstream, the gateway with the example policy
(`rules/`), and the example agent (`examples/agent.py`, official openai SDK) pointed at
the gateway only through `HTTPS_PROXY` and `SSL_CERT_FILE`, once plain and once
streamed; then prints what the agent got, what the upstream received, and where the
session was recorded. It signs with the development key `make run` uses
(`<home>/signing.key`), as both write to `recordings/` (the demo's `--recordings` moves
its part elsewhere): one tree, one key to verify.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from hoop_addon.dev import issuer
from hoop_addon.dev.gateway import ROOT, Gateway, ensure_signing_key
from hoop_addon.dev.tls import issue_server_cert, make_ca
from hoop_addon.dev.upstream import FakeOpenAI

PROMPT = "Summarise my account. I am jane.doe@example.com, card 4242 4242 4242 4242."


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when the agent's calls succeeded, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=".hoop", help="state directory (default .hoop, where the example policy finds the dev issuer)")
    parser.add_argument("--recordings", type=Path, default=ROOT / "recordings", help="recordings and audit log (default recordings/)")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    pki = home / "demo-pki"
    ca = make_ca(pki)
    cert, key = issue_server_cert(ca, ["localhost", "127.0.0.1"], pki)
    token = issuer.mint(home, "demo-agent", ["agents"])

    with FakeOpenAI(cert, key) as upstream:
        gateway = Gateway(
            ROOT / "rules",
            home / "demo-gateway",
            ca.cert_path,
            env={"HOOP_LOCAL_LLM_KEY": "demo-upstream-key-held-by-the-gateway", "OPENAI_API_KEY": "unused-in-demo",
                 "ANTHROPIC_API_KEY": "unused-in-demo"},
            recordings=args.recordings.resolve(),
            options={"hoop_signing_key": str(ensure_signing_key(home / "signing.key"))},
        )
        gateway.start()
        try:
            status = 0
            for stream in (False, True):
                status |= _agent_call(gateway, upstream, token, stream)
        finally:
            gateway.stop()
    entry = gateway.audit()[-1]
    print(f"\nlast audit line ({gateway.recordings / 'audit.jsonl'}):\n  {json.dumps(entry)}")
    print(f"\nrecording: {entry['recording']}\n  open it with: .venv/bin/mitmdump -nr {entry['recording']}")
    print(f"  verify the tree: .venv/bin/python -m hoop_addon verify {gateway.recordings} --public-key {home / 'signing.pub'}")
    return status


def _agent_call(gateway: Gateway, upstream: FakeOpenAI, token: str, stream: bool) -> int:
    upstream.clear()
    env = {
        **os.environ,
        "HTTPS_PROXY": gateway.proxy(token),
        "SSL_CERT_FILE": str(gateway.ca_cert),
        "OPENAI_BASE_URL": f"{upstream.url}/v1",
        "OPENAI_API_KEY": "the-agent-has-no-real-key",
    }
    env.pop("NO_PROXY", None)
    args = [sys.executable, str(ROOT / "examples" / "agent.py"), "--prompt", PROMPT] + (["--stream"] if stream else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    print(f"\n=== agent ({'streamed' if stream else 'plain'}) prompt: {PROMPT}")
    if done.returncode != 0:
        print(f"agent failed:\n{done.stderr}")
        return 1
    print(f"agent received:    {json.loads(done.stdout)['content']}")
    for received in upstream.received:
        auth = next((v for k, v in received.headers if k.lower() == "authorization"), None)
        print(f"upstream received: {json.loads(received.body)['messages'][0]['content']}")
        print(f"  with Authorization: {auth}  (the gateway's key; the agent sent its JWT as proxy password)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
