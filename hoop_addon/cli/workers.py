"""`hoop serve --workers N`: a supervisor of N gateway worker processes on one set of
addresses (run by `hoop_addon.cli.serve` when N > 1).

Each worker is `hoop serve` with the same arguments plus `--worker I/N` (I = 0..N-1):
its proxy and base-URL listeners and the control port bind with `SO_REUSEPORT`, so
the kernel spreads new connections over the workers (no balancer of ours); worker I
also answers the control API on its own port, control port + 1 + I (its `/metrics`
and `/healthz`: one scrape target per worker). Workers share approvals and tickets
through the state store: `hoop_state` unset means `sqlite:///HOME/state.db`, and
`hoop_state=memory` is refused. Each writes its own audit chain,
`<recordings>/audit-<I>.jsonl`, and its own recording parts.

The supervisor:

- prints "hoop: ready ..." once, when every worker's own `/healthz` answers 200; a
  worker that exits before all are ready, or not being ready within `--ready-timeout`
  seconds, stops them all (exit status 1);
- restarts a worker that dies (kill -9, a crash) after `RESTART_BACKOFF_S` seconds,
  doubling per consecutive death before it was ready again, up to `MAX_BACKOFF_S`;
  `STARTUP_FAILURES` such deaths in a row stop them all (exit status 1, naming the
  worker and its last exit status);
- on SIGTERM or SIGINT sends SIGTERM to every worker (each denies and audits its
  pending approvals, as a single gateway does), waits for them (at most
  `STOP_TIMEOUT_S`, then SIGKILL) and exits 0.

Workers run in their own session (a terminal's Ctrl-C reaches the supervisor only,
which stops them in order) and get SIGTERM if the supervisor itself dies (Linux
`PR_SET_PDEATHSIG`), so no worker serves unsupervised.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hoop_addon.control.server import parse_listen

STARTUP_FAILURES = 3
RESTART_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.1


def set_option(extra: list[str], name: str) -> str | None:
    """The value `extra` (mitmdump arguments) gives option `name` with `--set NAME=V`
    or `--set=NAME=V` (the last one), or None."""
    value = None
    for i, arg in enumerate(extra):
        spec = extra[i + 1] if arg == "--set" and i + 1 < len(extra) else arg.removeprefix("--set=") if arg.startswith("--set=") else None
        if spec is not None and spec.startswith(f"{name}="):
            value = spec.partition("=")[2]
    return value


def worker_argv(args: argparse.Namespace, extra: list[str], index: int) -> list[str]:
    """The command line of worker `index` of `args.workers`: `hoop serve` with the
    supervisor's arguments, `--worker I/N`, and the shared store when `extra` names none."""
    home = Path(args.home or os.environ.get("HOOP_HOME", ".hoop")).resolve()
    state = [] if set_option(extra, "hoop_state") is not None else ["--set", f"hoop_state=sqlite:///{home / 'state.db'}"]
    optional = {"--home": args.home, "--confdir": args.confdir, "--signing-key": args.signing_key}
    return [
        sys.executable, "-m", "hoop_addon", "serve", "--rules", args.rules, "--recordings", args.recordings,
        "--listen-host", args.listen_host, "--listen-port", str(args.listen_port), "--control", args.control,
        "--ready-timeout", str(args.ready_timeout),
        *(arg for name, value in optional.items() if value for arg in (name, value)),
        *(arg for spec in args.reverse for arg in ("--reverse", spec)),
        "--worker", f"{index}/{args.workers}", *state, *extra,
    ]


def _usage_problem(args: argparse.Namespace, extra: list[str]) -> str | None:
    """Why `args` cannot run as workers, or None."""
    if set_option(extra, "hoop_state") == "memory":
        return ("hoop_state=memory keeps approvals in one process: several workers need a shared store "
                "(leave hoop_state unset for sqlite:///HOME/state.db, or give sqlite:///PATH or postgresql://...)")
    if set_option(extra, "hoop_audit_log"):
        return "hoop_audit_log cannot be set with --workers: each worker writes <recordings>/audit-<worker>.jsonl"
    if not args.control:
        return "--workers needs the control API (--control HOST:PORT): readiness and approvals go through it"
    if args.listen_port == 0:
        return "--workers needs a fixed --listen-port: workers share it"
    try:
        host, port = parse_listen(args.control)
    except ValueError as exc:
        return f"--control: {exc}"
    own = {port + 1 + i for i in range(args.workers)}
    taken = {args.listen_port, *(int(spec.rpartition("@")[2]) for spec in args.reverse)}
    if own & taken or max(own) > 65535:
        return (f"the workers' own control ports {port + 1}-{port + args.workers} (--control port + 1 + worker) "
                "overlap a proxy port or pass 65535: choose another --control port")
    return None


def _die_with_parent() -> None:
    """In a worker, before exec: SIGTERM when the supervisor dies (Linux
    `prctl(PR_SET_PDEATHSIG)`); where that call does not exist nothing is set."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass


@dataclass
class Worker:
    """One worker: its `index`, process (None while it waits to be restarted), own
    `/healthz` URL, whether it answered 200 since it started (`ready`), consecutive
    deaths before being ready (`failures`) and when to restart it (monotonic s)."""

    index: int
    argv: list[str]
    healthz: str
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    failures: int = 0
    restart_at: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, start_new_session=True, preexec_fn=_die_with_parent)
        self.ready = False

    def healthy(self) -> bool:
        """True when this worker's own `/healthz` answers 200."""
        try:
            with urllib.request.urlopen(self.healthz, timeout=1.0) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False


def _exit_status(code: int) -> str:
    return f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"status {code}"


def supervise(args: argparse.Namespace, extra: list[str]) -> int:
    """Run `args.workers` workers until SIGTERM/SIGINT (see the module docstring).
    Returns 0 after a clean stop, 1 when start-up failed or a worker kept dying at
    start-up, 2 on a usage error (printed to stderr)."""
    if problem := _usage_problem(args, extra):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    host, port = parse_listen(args.control)
    Path(args.home or os.environ.get("HOOP_HOME", ".hoop")).mkdir(parents=True, exist_ok=True)  # the default store's folder
    workers = [Worker(i, worker_argv(args, extra, i), f"http://{host}:{port + 1 + i}/healthz")
               for i in range(args.workers)]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(args, workers, stop, host, port)
    finally:
        _stop_all(workers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, workers: list[Worker], stop: threading.Event, host: str, port: int) -> int:
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + args.ready_timeout
    announced = False
    while not stop.is_set():
        now = time.monotonic()
        for worker in workers:
            if worker.proc is None:
                if now >= worker.restart_at:
                    worker.start()
                continue
            code = worker.proc.poll()
            if code is None:
                if not worker.ready and worker.healthy():
                    worker.ready, worker.failures = True, 0
                    if announced:
                        print(f"hoop: worker {worker.index} restarted (pid {worker.proc.pid})", file=sys.stderr, flush=True)
                continue
            worker.proc = None
            if not announced:
                print(f"error: hoop: worker {worker.index} exited with {_exit_status(code)} during start-up "
                      "(its output above says why): stopping all workers", file=sys.stderr, flush=True)
                return 1
            if not worker.ready:
                worker.failures += 1
                if worker.failures >= STARTUP_FAILURES:
                    print(f"error: hoop: worker {worker.index} died at start-up {worker.failures} times in a row "
                          f"(last: {_exit_status(code)}): stopping all workers", file=sys.stderr, flush=True)
                    return 1
            delay = min(RESTART_BACKOFF_S * 2 ** worker.failures, MAX_BACKOFF_S)
            worker.restart_at = now + delay
            print(f"hoop: worker {worker.index} exited with {_exit_status(code)}; restarting it in {delay:g} s",
                  file=sys.stderr, flush=True)
        if not announced and all(w.ready for w in workers):
            announced = True
            ports = [args.listen_port, *(int(spec.rpartition("@")[2]) for spec in args.reverse)]
            print(f"hoop: ready: {len(workers)} workers (pids {', '.join(str(w.proc.pid) for w in workers if w.proc)}): "
                  f"proxy on {', '.join(f'{args.listen_host}:{p}' for p in ports)}, control API on http://{host}:{port}, "
                  f"each worker's /metrics on http://{host}:{port + 1}..{port + len(workers)}", flush=True)
        elif not announced and now > deadline:
            print(f"error: hoop: not ready after {args.ready_timeout:g} s: workers "
                  f"{', '.join(str(w.index) for w in workers if not w.ready)} did not answer /healthz", file=sys.stderr, flush=True)
            return 1
        stop.wait(POLL_S)
    return 0


def _stop_all(workers: list[Worker]) -> None:
    """SIGTERM to every live worker, then wait for all (SIGKILL past `STOP_TIMEOUT_S`)."""
    live = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in live:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
