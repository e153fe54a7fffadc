"""`hoop serve`: the gateway's front door, mitmdump with the chain built in.

    hoop serve [--rules DIR] [--home DIR] [--confdir DIR] [--signing-key FILE]
               [--recordings DIR] [--listen-host H] [--listen-port P] [--control H:P]
               [--reverse URL@PORT ...] [--ready-timeout SECONDS] [--workers N]
               [mitmdump options...]

The chain (`hoop_addon.stages.chain`) is added to the master before any option is read,
so every hoop option is known when the command line is applied: an option given twice or
a value that does not parse stops the process (status 1) before it listens, instead of
making mitmproxy skip a `-s` script. Once the proxy runs, readiness is checked on the
control API's `/healthz`; "hoop: ready ..." is printed (stdout) only when it answers 200,
and a gateway that is not ready within `--ready-timeout` seconds stops with status 1,
naming what failed. Other arguments go to mitmdump as they are (`--set NAME=VALUE`,
`--mode reverse:URL`, `-s` scripts of one's own, ...).

Base-URL mode: each `--reverse https://api.openai.com@8090` adds a listener on that port
(mitmproxy's `reverse:` mode) whose requests all go to that upstream, beside the forward
proxy on `--listen-port`: an agent sets its SDK's base URL to
`http://127.0.0.1:8090/v1` (no proxy settings, no CA on loopback) and its gateway token
as the API key. The same chain judges both ways in. Streamed bodies are kept for the
recording by default (`store_streamed_bodies`; `--set store_streamed_bodies=false`
turns it off): streams are most of an agent's traffic.

Workers: `--workers N` (N > 1) runs N such gateways behind the same addresses, under a
supervisor (`hoop_addon.cli.workers`): each is this command with `--worker I/N`, whose
listeners (proxy, base-URL and the shared control port) bind with `SO_REUSEPORT`, so
the kernel spreads connections over them. "hoop: ready ..." is printed once, by the
supervisor, when every worker's own control port (PORT + 1 + I) answers `/healthz`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from hoop_addon.evidence.audit_log import parse_worker

logger = logging.getLogger("hoop")
READY_POLL_S = 0.1


def register(sub: Any) -> None:
    """Add `serve` to the `hoop` subcommands (`sub`: argparse subparsers)."""
    p = sub.add_parser(
        "serve", help="run the gateway (mitmdump with the chain built in)",
        description="Run the gateway. Arguments not listed here are passed to mitmdump.",
        allow_abbrev=False,  # `--rule` is not `--rules`: unknown arguments go to mitmdump whole
    )
    p.add_argument("--rules", default="rules", help="policy file or directory (default: rules)")
    p.add_argument("--home", help="state directory of `hoop init` (default $HOOP_HOME or .hoop)")
    p.add_argument("--confdir", help="mitmproxy confdir: the CA clients trust (default HOME/mitmproxy)")
    p.add_argument("--signing-key", help="Ed25519 key signing recordings and checkpoints (default HOME/signing.key)")
    p.add_argument("--recordings", default="recordings", help="recordings and audit log directory (default: recordings)")
    p.add_argument("--listen-host", default="127.0.0.1", help="proxy address (default 127.0.0.1)")
    p.add_argument("--listen-port", type=int, default=8080, help="proxy port (default 8080)")
    p.add_argument("--control", default="127.0.0.1:8081", help="control API HOST:PORT on loopback (default 127.0.0.1:8081)")
    p.add_argument("--reverse", action="append", default=[], metavar="URL@PORT", type=_reverse,
                   help="base-URL mode: also listen on PORT, sending every request to URL (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for /healthz (default 30)")
    p.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="worker processes on the same ports (default 1); N > 1 needs a shared hoop_state "
                        "(default then sqlite:///HOME/state.db)")
    p.add_argument("--worker", type=_worker, metavar="I/N",
                   help="run as worker I of N (what --workers starts; for a supervisor of your own)")
    p.set_defaults(run=serve, passthrough=True)


def mitmdump_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The mitmdump command line for `args` (a parsed `hoop serve`) and `extra`
    (passed through, last: an option that repeats one of ours is an error)."""
    home = Path(args.home or os.environ.get("HOOP_HOME", ".hoop"))
    options = {
        "hoop_rules": args.rules,
        "confdir": args.confdir or str(home / "mitmproxy"),
        "hoop_signing_key": args.signing_key or str(home / "signing.key"),
        "hoop_recordings": args.recordings,
        "hoop_control": args.control,
        **({"hoop_worker": f"{args.worker[0]}/{args.worker[1]}"} if args.worker else {}),
    }
    # the forward proxy stays on --listen-port beside the base-URL listeners
    modes = ["regular", *(f"reverse:{spec}" for spec in args.reverse)] if args.reverse else []
    return [
        "--listen-host", args.listen_host, "--listen-port", str(args.listen_port),
        *(arg for mode in modes for arg in ("--mode", mode)),
        *(arg for name, value in options.items() for arg in ("--set", f"{name}={value}")),
        *extra,
    ]


def _workers(text: str) -> int:
    """A `--workers` value: an integer from 1 to 64; `argparse.ArgumentTypeError` else."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of workers from 1 to 64")
    return int(text)


def _worker(text: str) -> tuple[int, int]:
    """A `--worker` value, `I/N`, as (I, N); `argparse.ArgumentTypeError` else."""
    try:
        worker = parse_worker(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if worker is None:
        raise argparse.ArgumentTypeError("expected I/N, e.g. 0/2")
    return worker


def _listen_with_reuse_port(index: int) -> None:
    """Make every TCP proxy listener of this process bind with `SO_REUSEPORT` (worker
    `index` only: N processes then bind one port and the kernel spreads connections).

    mitmproxy has no option for it: `AsyncioServerInstance.listen` in
    `mitmproxy.proxy.mode_servers` calls `asyncio.start_server(handle, host, port)`, and
    its mode registry admits one server class per mode, so a subclass cannot take a
    mode's place. The least invasive hook is that module's own name `asyncio`: it is
    pointed at a view of asyncio whose `start_server` adds `reuse_port=True`. Every mode
    (regular, reverse:...) goes through it; nothing else in the process (the control
    API, upstream connections, other modules) sees the change.

    UDP cannot be shared so: an `https://` base-URL listener also opens a UDP socket
    (HTTP/3), bound in mitmproxy_rs without `SO_REUSEPORT`. Worker 0 binds it as a
    single gateway does; the others open none (`start_udp_based_server` answers with a
    listener of no sockets, which `listen_addrs` skips and `_stop` closes), so HTTP/3
    on those ports is served by worker 0 alone."""
    from mitmproxy.proxy import mode_servers

    class ReusePortAsyncio:
        """asyncio, but for `start_server`, which binds with `SO_REUSEPORT`."""

        def __getattr__(self, name: str) -> Any:
            return getattr(asyncio, name)

        @staticmethod
        async def start_server(*args: Any, **kwargs: Any) -> asyncio.Server:
            return await asyncio.start_server(*args, reuse_port=True, **kwargs)

    class NoSockets:
        """A UDP listener left to worker 0: no sockets, nothing to close."""

        sockets = ()

        def close(self) -> None:
            pass

    async def left_to_worker_0(self: Any, host: str, port: int) -> NoSockets:
        return NoSockets()

    mode_servers.asyncio = ReusePortAsyncio()  # type: ignore[assignment]
    if index > 0:
        mode_servers.AsyncioServerInstance.start_udp_based_server = left_to_worker_0  # type: ignore[method-assign,assignment]


def _reverse(spec: str) -> str:
    """A `--reverse` value, `http(s)://HOST[:PORT]@LISTEN_PORT`, checked; raises
    `argparse.ArgumentTypeError` naming what is wrong."""
    url, at, port = spec.rpartition("@")
    if not at or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected URL@PORT, e.g. https://api.openai.com@8090")
    scheme, sep, rest = url.partition("://")
    origin = rest.removesuffix("/")
    if scheme not in ("http", "https") or not sep or not origin or any(c in origin for c in "/?#@ "):
        raise argparse.ArgumentTypeError(f"{spec!r}: the upstream is an http:// or https:// origin (no path, query or user)")
    return f"{scheme}://{origin}@{port}"


class Readiness:
    """The master's last addon: once the proxy runs, polls the control API's
    `/healthz` every `READY_POLL_S` seconds for at most `timeout` seconds; prints
    "hoop: ready ..." at the first 200, else logs what `/healthz` reported and shuts
    the master down (`failed` is then True: the exit status is 1). A worker polls its
    own control port and prints "hoop: worker I/N ready ..." instead: the supervisor
    says when all are."""

    def __init__(self, master: Any, timeout: float) -> None:
        self.master, self.timeout = master, timeout
        self.failed = False
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._check(), name="hoop readiness")

    async def _check(self) -> None:
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        control = self.master.options.hoop_control
        if not control:
            return self._fail("hoop serve needs the control API (--control) to check readiness")
        worker = parse_worker(self.master.options.hoop_worker)
        shared = control
        if worker is not None:  # the shared port may answer for another worker: ask this one's
            control = f"{control.rpartition(':')[0]}:{self.master.addons.get('control').worker_port}"
        client = AsyncHTTPClient(force_instance=True)
        deadline = time.monotonic() + self.timeout
        problems: list[str] = ["/healthz did not answer"]
        try:
            while time.monotonic() < deadline:
                try:
                    answer = await client.fetch(f"http://{control}/healthz", raise_error=False, request_timeout=2.0)
                except (HTTPClientError, OSError) as exc:  # not answering (yet): ask again until the deadline
                    problems = [f"/healthz did not answer: {exc}"]
                    await asyncio.sleep(READY_POLL_S)
                    continue
                if answer.code == 200:
                    addresses = dict.fromkeys(f"{h}:{p}" for h, p, *_ in self.master.addons.get("proxyserver").listen_addrs())
                    proxy = ", ".join(addresses)  # each once: a listener may report an address per socket
                    if worker is not None:
                        print(f"hoop: worker {worker[0]}/{worker[1]} ready (pid {os.getpid()}): proxy on {proxy}, "
                              f"control API on http://{shared}, this worker's on http://{control}", flush=True)
                    else:
                        print(f"hoop: ready: proxy on {proxy}, control API on http://{control}", flush=True)
                    return None
                if answer.code == 503 and answer.body:
                    try:
                        problems = list(orjson.loads(answer.body).get("problems") or problems)
                    except (orjson.JSONDecodeError, AttributeError):
                        pass
                await asyncio.sleep(READY_POLL_S)
        finally:
            client.close()
        return self._fail(f"hoop: not ready after {self.timeout:g} s: {'; '.join(problems)}")

    def _fail(self, message: str) -> None:
        logger.error(message)
        self.failed = True
        self.master.shutdown()


def serve(args: argparse.Namespace, extra: list[str]) -> int:
    """Run the gateway until SIGINT/SIGTERM. Returns 0 after a clean stop, 1 when it
    did not become ready (mitmproxy itself exits with 1 on a start-up error), 2 on a
    usage error. `--workers N` (N > 1) runs the supervisor instead (`hoop_addon.cli.workers`)."""
    if args.workers > 1:
        if args.worker:
            print("error: --workers starts workers itself; --worker I/N is for one of them", file=sys.stderr)
            return 2
        from hoop_addon.cli.workers import supervise

        return supervise(args, extra)
    from mitmproxy.tools import cmdline
    from mitmproxy.tools.dump import DumpMaster
    from mitmproxy.tools.main import run

    from hoop_addon.stages.chain import build

    readiness: list[Readiness] = []

    class HoopMaster(DumpMaster):
        """mitmdump's master with the hoop chain, then `Readiness`, added at construction."""

        def __init__(self, options: Any) -> None:
            super().__init__(options)
            options.store_streamed_bodies = True  # a default: the command line may turn it off
            self.addons.add(*build())
            readiness.append(Readiness(self, args.ready_timeout))
            self.addons.add(readiness[0])

    if args.worker:
        _listen_with_reuse_port(args.worker[0])
    run(HoopMaster, cmdline.mitmdump, mitmdump_args(args, extra))
    return 1 if readiness and readiness[0].failed else 0
