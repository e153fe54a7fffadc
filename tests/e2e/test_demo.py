"""End to end: `make demo`, the README's first run, does what it says: the openai-SDK
agent gets answers through the gateway, the upstream gets masked prompts and the
gateway's key, and the session it records verifies."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from hoop_addon.dev.gateway import ROOT


def test_demo_runs_end_to_end_and_its_recording_verifies(tmp_path: Path) -> None:
    # The default home, as `make demo` uses it: the example policy (rules/) reads the
    # development issuer's JWKS from there, so this test writes its demo state (dev
    # issuer, demo CA, signing key) into the checkout's .hoop/, as `make demo` does.
    # Only the recordings go elsewhere.
    home, recordings = ROOT / ".hoop", tmp_path / "recordings"
    demo = subprocess.run(
        [sys.executable, "-m", "hoop_addon.dev.demo", "--recordings", str(recordings)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )

    assert demo.returncode == 0, demo.stdout + demo.stderr
    received = [line for line in demo.stdout.splitlines() if line.startswith("upstream received:")]
    assert len(received) == 2  # the plain call and the streamed one
    for line in received:
        assert "[REDACTED:EMAIL]" in line and "[REDACTED:CARD]" in line
        assert "jane.doe@example.com" not in line and "4242 4242 4242 4242" not in line
    assert demo.stdout.count("with Authorization: Bearer demo-upstream-key-held-by-the-gateway") == 2
    assert "the-agent-has-no-real-key" not in demo.stdout
    verify = subprocess.run(
        [sys.executable, "-m", "hoop_addon", "verify", str(recordings), "--public-key", str(home / "signing.pub")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert re.search(r"^VALID: ", verify.stdout, re.MULTILINE), verify.stdout
