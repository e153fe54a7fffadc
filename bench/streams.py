"""Benchmark many concurrent LLM streams through bare mitmdump and through the gateway.

    python bench/streams.py [--streams 1000] [--events 20] [--gap-ms 50] [--json bench/results/streams.json]

A local upstream (asyncio, plain HTTP, in this process) answers every chat POST with an
SSE stream of `--events` chunks `--gap-ms` apart; `--streams` clients (raw asyncio
HTTP/1.1 through the proxy, one connection each, all open at once) read them. Plain
HTTP keeps the client's and the proxy's TLS out of the figure: what is measured is the
proxy itself. Two configurations take turns: `bare` (`mitmdump` as a forward proxy with
`stream_large_bodies=1`, so that it streams too) and `gateway` (`mitmdump -s
hoop_addon/addon.py`, the benchmark policy of `bench/chain.py`: JWT identity, 20
masking rules, response masking of `$.choices[*].delta.content`, recording, audit).

Per configuration: first event p50/p99 (ms from the request's last byte), the delay
each later event adds to the upstream's gap (p50/p99, ms), streams dropped (fewer
events than sent, or an error), the proxy's CPU seconds and its RSS growth while the
streams run (MB, the peak sampled every 100 ms over the RSS before). Printed as a
table, written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chain import UPSTREAM_KEY, Target, bench_policy  # noqa: E402

from hoop_addon.dev import issuer  # noqa: E402
from hoop_addon.dev.gateway import Gateway  # noqa: E402
from hoop_addon.dev.tls import make_ca  # noqa: E402

CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%b "}}]}\n\n'
WORDS = (b"alpha", b"bravo", b"charlie", b"delta", b"echo", b"foxtrot", b"golf", b"hotel", b"india", b"juliett")
"""The streamed text, one word an event (no digits: a digit group may continue in the
next event, and the gateway then holds it until that event comes)."""


def text(events: int) -> str:
    """The text a stream of `events` events carries."""
    return "".join(WORDS[i % len(WORDS)].decode() + " " for i in range(events))
BODY = json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "Write a poem."}]}).encode()


async def upstream(events: int, gap: float) -> tuple[asyncio.Server, int]:
    """The streaming upstream on 127.0.0.1 (any free port): (server, port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # as LLM APIs' servers do: no Nagle delay (with the peer's delayed ACK, ~40 ms) per event
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n")
            for i in range(events):
                if i:
                    await asyncio.sleep(gap)
                chunk = CHUNK % WORDS[i % len(WORDS)]
                writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await writer.drain()
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    return server, server.sockets[0].getsockname()[1]


async def one_stream(proxy_port: int, url: str, auth: str | None, events: int) -> tuple[float, list[float]] | None:
    """One stream through the proxy: (first event delay, arrival time of every event
    with text), in seconds, or None when it was dropped (an error, or not the whole text)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        head = (f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(BODY)}\r\n" + (f"Proxy-Authorization: Basic {auth}\r\n" if auth else "") + "\r\n")
        writer.write(head.encode() + BODY)
        await writer.drain()
        sent = time.perf_counter()
        status = await reader.readuntil(b"\r\n\r\n")
        if not status.startswith(b"HTTP/1.1 200"):
            writer.close()
            return None
        arrivals, buffer, content = [], b"", []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            buffer += await reader.readexactly(size)
            await reader.readexactly(2)
            now = time.perf_counter()
            while (end := buffer.find(b"\n\n")) >= 0:
                event, buffer = buffer[:end], buffer[end + 2:]
                if event.startswith(b"data: {"):
                    piece = json.loads(event[6:])["choices"][0]["delta"].get("content", "")
                    if piece:
                        arrivals.append(now)
                        content.append(piece)
        writer.close()
        if "".join(content) != text(events):
            return None
        return arrivals[0] - sent, arrivals
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return None


async def run_streams(target: Target, proxy_port: int, url: str, auth: str | None, n: int, events: int, gap: float) -> dict[str, float]:
    """`n` concurrent streams through one proxy, with its CPU and RSS sampled."""
    cpu_before, rss_before = target.cpu_seconds(), target.rss_kb()
    peak = rss_before or 0
    running = True

    async def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, target.rss_kb() or 0)
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(*(one_stream(proxy_port, url, auth, events) for _ in range(n)))
    running = False
    await sampler
    cpu = (target.cpu_seconds() or 0) - (cpu_before or 0)
    done = [r for r in results if r is not None]
    firsts = sorted(r[0] for r in done)
    # what the proxy adds to the upstream's gap between two events of a stream
    added = sorted(max(0.0, (b - a) - gap) for _, arrivals in done for a, b in zip(arrivals, arrivals[1:]))
    return {
        "streams": n, "dropped": n - len(done),
        "first_p50_ms": statistics.median(firsts) * 1e3 if firsts else float("nan"),
        "first_p99_ms": firsts[int(len(firsts) * 0.99) - 1] * 1e3 if firsts else float("nan"),
        "added_p50_ms": statistics.median(added) * 1e3 if added else float("nan"),
        "added_p99_ms": added[int(len(added) * 0.99) - 1] * 1e3 if added else float("nan"),
        "cpu_s": cpu, "rss_growth_mb": (peak - (rss_before or 0)) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams per configuration (default 1000)")
    parser.add_argument("--events", type=int, default=20, help="events per stream (default 20)")
    parser.add_argument("--gap-ms", type=float, default=50.0, help="upstream gap between events, ms (default 50)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the configurations taking turns (default 2)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/streams.json"), help="where to write the results")
    args = parser.parse_args()
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    import base64

    gap = args.gap_ms / 1e3
    server, port = await upstream(args.events, gap)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with tempfile.TemporaryDirectory(prefix="hoop-bench-streams-") as tmp:
        work = Path(tmp)
        ca = make_ca(work / "pki")
        (work / "rules").mkdir()
        dev = issuer.ensure(work / "home")
        (work / "rules" / "bench.yaml").write_text(bench_policy(dev.jwks_path))
        token = issuer.mint(work / "home", "bench-agent", ["agents"], ttl=7200)
        quiet = {"termlog_verbosity": "error", "flow_detail": "0", "connection_strategy": "lazy"}
        bare = Gateway(work / "rules", work / "bare", ca.cert_path, options={**quiet, "stream_large_bodies": "1"}, bare=True).start()
        gateway = Gateway(work / "rules", work / "gateway", ca.cert_path, env={"HOOP_BENCH_KEY": UPSTREAM_KEY},
                          options={**quiet, "hoop_reload": "0"}).start()
        auth = base64.b64encode(f"agent:{token}".encode()).decode()
        configs = [("bare", bare, None), ("gateway", gateway, auth)]
        measured: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
        try:
            for i in range(args.rounds):
                for name, proxy, proxy_auth in configs[i % 2:] + configs[: i % 2]:
                    print(f"round {i + 1}/{args.rounds}: {args.streams} streams through {name} ...", file=sys.stderr)
                    target = Target(name, url, None, ca.cert_path, proxy.proc.pid)
                    measured[name].append(await run_streams(target, proxy.port, url, proxy_auth, args.streams, args.events, gap))
        finally:
            gateway.stop()
            bare.stop()
            server.close()
    results = {name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]} for name, rounds in measured.items()}
    keys = list(results["bare"])
    print(f"{'metric':<16}{'bare':>12}{'gateway':>12}")
    for key in keys:
        print(f"{key:<16}{results['bare'][key]:>12.2f}{results['gateway'][key]:>12.2f}")
    g, b = results["gateway"], results["bare"]
    print()
    for name, value, met in (
        ("first event p99 <= bare + 5 ms", f"{g['first_p99_ms'] - b['first_p99_ms']:+.2f} ms", g["first_p99_ms"] <= b["first_p99_ms"] + 5),
        ("no stream dropped", f"{int(g['dropped'])} dropped", g["dropped"] == 0),
    ):
        print(f"{'met   ' if met else 'MISSED'} {name:<32} {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results, "rounds": measured}, indent=2))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
