"""Run the real gateway, `mitmdump -s hoop_addon/addon.py`, as a subprocess on a free
loopback port with its own confdir (and so its own CA): for the demo and the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from hoop_addon.evidence import keys

ROOT = Path(__file__).resolve().parents[2]
ADDON = ROOT / "hoop_addon" / "addon.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_signing_key(path: Path) -> Path:
    """An Ed25519 signing key at `path` (created, with `path.pub`, if missing): what a
    development gateway signs its recordings and audit checkpoints with."""
    if not path.exists():
        keys.generate(path)
    return path


class Gateway:
    """A gateway process. `rules` is the policy path, `workdir` holds its confdir, log
    and (unless `recordings` is given) recordings; `upstream_ca` is the CA file the
    gateway trusts for upstream TLS; `env` is added to the environment; `options` are
    extra mitmproxy/hoop options (`--set NAME=VALUE`). Unless `options` names
    `hoop_signing_key`, the gateway signs with `workdir/signing.key` (created if
    missing; its public half `public_key` is what `hoop verify` trusts). `bare` runs mitmdump without
    the addon (the benchmark's baseline): `rules` and `recordings` are then unused.
    `serve` runs `hoop serve` (the chain built in) instead of `mitmdump -s`; `args` are
    added to its command line as they are (e.g. `--reverse URL@PORT`).

    `start()` returns once the proxy port accepts connections (`serve`: once it
    printed that it is ready) (or raises
    `RuntimeError` with mitmdump's output if it exited first); `stop()` terminates it.
    """

    def __init__(
        self,
        rules: Path,
        workdir: Path,
        upstream_ca: Path,
        env: dict[str, str] | None = None,
        recordings: Path | None = None,
        options: dict[str, str] | None = None,
        bare: bool = False,
        serve: bool = False,
        args: list[str] | None = None,
    ) -> None:
        self.rules, self.workdir = rules, workdir
        self.recordings = recordings or workdir / "recordings"
        self.confdir = workdir / "mitmproxy"
        self.log = workdir / "mitmdump.log"
        self.port = free_port()
        self.control_port = free_port()
        self.serve = serve
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, **(env or {})}
        options = dict(options or {})
        extra = [arg for name, value in options.items() for arg in ("--set", f"{name}={value}")]
        listen = ["--listen-host", "127.0.0.1", "--listen-port", str(self.port)]
        trust = ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
        key = None if bare or "hoop_signing_key" in options else ensure_signing_key(workdir / "signing.key")
        # the control API never on its fixed default port: gateways run side by side
        control = None if bare or "hoop_control" in options else f"127.0.0.1:{self.control_port}"
        self.ports_after_start: tuple[int, ...] = (self.control_port,) if control else ()  # opened in `running`
        if serve:
            self.argv = [
                sys.executable, "-m", "hoop_addon", "serve", "--rules", str(rules), "--recordings", str(self.recordings),
                "--confdir", str(self.confdir), *(["--signing-key", str(key)] if key else []),
                *(["--control", control] if control else []), *listen, *trust, *extra, *(args or []),
            ]
            return
        hoop = [] if bare else ["-s", str(ADDON), "--set", f"hoop_rules={rules}", "--set", f"hoop_recordings={self.recordings}"]
        self.argv = [str(MITMDUMP), *hoop, *listen, "--set", f"confdir={self.confdir}", *trust, *extra, *(args or [])]
        if key:
            self.argv += ["--set", f"hoop_signing_key={key}"]
        if control:
            self.argv += ["--set", f"hoop_control={control}"]

    def start(self, timeout: float = 30.0) -> Gateway:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.proc.returncode}:\n{self.output}")
            if self.serve:  # `hoop serve` says when /healthz answered 200
                if "hoop: ready" in self.output:
                    return self
                time.sleep(0.05)
                continue
            try:
                for port in (self.port, *self.ports_after_start):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not listen within {timeout}s:\n{self.output}")

    def run_to_exit(self, timeout: float = 30.0) -> tuple[int, str]:
        """Start and wait for mitmdump to exit by itself (a start-up that must fail)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(self.argv, capture_output=True, env=self.env, cwd=ROOT, timeout=timeout)
        return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def public_key(self) -> Path:
        """The public key of the development signing key (see `ensure_signing_key`)."""
        return self.workdir / "signing.pub"

    @property
    def control_url(self) -> str:
        """The control API's base URL (approvals)."""
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def ca_cert(self) -> Path:
        """The gateway's CA certificate: what clients trust via SSL_CERT_FILE."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    def proxy(self, token: str | None = None) -> str:
        """The proxy URL, with `token` as the proxy password if given."""
        auth = f"agent:{token}@" if token else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def audit(self, events: tuple[str, ...] | None = ("request", "connect")) -> list[dict[str, Any]]:
        """The audit log's entries of the given event types (default: the one per flow;
        None: all, with checkpoints, `recording_sealed`, ... written at any moment)."""
        path = self.recordings / "audit.jsonl"
        entries = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
        return [e for e in entries if events is None or e["event"] in events]

    def wait_audit(self, count: int, timeout: float = 5.0, events: tuple[str, ...] | None = ("request", "connect")) -> list[dict[str, Any]]:
        """The audit entries (see `audit`) once there are at least `count` (the line is
        written when the response is sent, so a client can see the response a moment earlier)."""
        deadline = time.monotonic() + timeout
        while len(entries := self.audit(events)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return entries
