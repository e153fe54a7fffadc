"""Benchmark the gateway against bare mitmdump and direct calls, in one run.

    python bench/chain.py [--quick] [--rounds N] [--json bench/results/chain.json]

Three configurations, each against the same local HTTPS upstream (a separate process):
`direct` (client -> upstream), `bare` (`mitmdump -q`, TLS interception only) and
`gateway` (`mitmdump -s hoop_addon/addon.py` with a benchmark policy: JWT identity,
20 masking rules on requests and responses, recording and audit). Bare mitmdump holds a
streamed response until it is complete, so its SSE "first event" is its last: a fourth
configuration, `bare-stream` (`mitmdump -q --set stream_large_bodies=1`), is measured on
SSE only, as the baseline a streaming gateway should be held to. `bare-http` and
`gateway-http` are the same two proxies forwarding to a plain-HTTP upstream, so that no
TLS hides the proxy's own cost: the issue's targets are read from their ratios. Measured: p50/p99
latency of 1, 8 and 64 KB JSON chat POSTs, SSE time to first event and total,
throughput at 1, 8 and 32 concurrent clients with the proxy's CPU time per request,
and the proxy's RSS growth over a long run.

Client, proxy and upstream share this machine's cores, and a shared machine drifts
within seconds (bare mitmdump's p50 moved by 30 % between blocks of a run): so latency
and SSE samples interleave the configurations request by request (each going first in
turn), and every configuration is measured in the same moments. Throughput, a load,
cannot share its moments: the configurations take turns in slices of about a second,
keeping their clients and connections, so each one's slices spread over the same
stretch of time. All of it is repeated in rounds, and the gateway/bare ratio of a
metric is the median of its per-round ratios; the values printed are per-metric
medians. Absolute figures are machine-bound: the ratios are the result. Printed as a
table, written as JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from hoop_addon.dev import issuer
from hoop_addon.dev.gateway import Gateway, free_port
from hoop_addon.dev.tls import issue_server_cert, make_ca

UPSTREAM_KEY = "sk-bench-upstream-key"
SIZES_KB = (1, 8, 64)
CONCURRENCY = (1, 8, 32)
SETTLE_SECONDS = 1.5  # after a load: the gateway's checkpoint ticker runs each second
FILLER = "The agent reviewed the quarterly report and summarised the findings for the team. "
PII = " Contact jane.doe@example.com or card 4242 4242 4242 4242."

DETECTORS = ["email", "payment_card", "us_ssn", "aws_access_key_id", "openai_api_key", "jwt"]


def bench_policy(jwks: Path) -> str:
    """A policy with 20 masking rules (10 on requests, 10 on responses)."""
    rules, names = [], []
    for i in range(10):
        for part, paths in (("request", ["$.messages[*].content"]), ("response", ["$.choices[*].message.content", "$.choices[*].delta.content"])):
            name = f"{part}-{i}"
            names.append(name)
            detectors = [DETECTORS[(i + k) % len(DETECTORS)] for k in range(3)]
            rules.append(
                f"  - name: {name}\n    direction: {part}\n    paths:\n"
                + "".join(f"      - {p}\n" for p in paths)
                + f"    detectors: [{', '.join(detectors)}]\n"
            )
    return (
        "version: 1\nissuers:\n  - name: dev\n    issuer: hoop-dev\n    audience: hoop-gateway\n"
        f"    jwks: {jwks}\n    algorithms: [ES256]\nmasking:\n" + "".join(rules)
        + "routes:\n  - name: llm\n    match:\n      hosts: [127.0.0.1]\n      paths: [/v1/*]\n"
        "    allow:\n      groups: [agents]\n"
        f"    masking: [{', '.join(names)}]\n"
        "    credential:\n      header: Authorization\n      value: Bearer ${HOOP_BENCH_KEY}\n"
    )


def chat(size_kb: int, stream: bool = False) -> bytes:
    text = (FILLER * (size_kb * 1024 // len(FILLER) + 1))[: size_kb * 1024 - len(PII)] + PII
    return json.dumps({"model": "bench", "stream": stream, "messages": [{"role": "user", "content": text}]}).encode()


class Target:
    """How a client reaches the upstream in one configuration."""

    def __init__(self, name: str, url: str, proxy: str | None, ca: Path, pid: int | None, sse_only: bool = False) -> None:
        self.name, self.url, self.proxy, self.pid, self.sse_only = name, url, proxy, pid, sse_only
        self.ssl = ssl.create_default_context(cafile=str(ca))

    def client(self) -> httpx.Client:
        return httpx.Client(proxy=self.proxy, verify=self.ssl, trust_env=False, timeout=30)

    def cpu_seconds(self) -> float | None:
        """The proxy's user + system CPU time in seconds (Linux /proc), None for direct calls."""
        if self.pid is None:
            return None
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int | None:
        """The proxy's resident set size in KiB (Linux /proc), None for direct calls."""
        if self.pid is None:
            return None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None


def post(client: httpx.Client, url: str, body: bytes) -> None:
    r = client.post(url, content=body, headers={"Content-Type": "application/json"})
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")


def _rotated(items: list[Target], i: int) -> list[Target]:
    return items[i % len(items):] + items[: i % len(items)]


def latency(targets: list[Target], size_kb: int, n: int) -> dict[str, dict[str, float]]:
    """p50/p99 of `n` sequential chat POSTs of `size_kb` KB per target, in ms. The
    targets take turns request by request (each going first in turn), so that all of
    them are measured in the same moments of a drifting machine."""
    body, path = chat(size_kb), "/v1/chat/completions"
    clients = {t.name: t.client() for t in targets}
    try:
        for t in targets:
            for _ in range(max(10, n // 10)):
                post(clients[t.name], t.url + path, body)
        samples: dict[str, list[float]] = {t.name: [] for t in targets}
        for i in range(n):
            for t in _rotated(targets, i):
                t0 = time.perf_counter()
                post(clients[t.name], t.url + path, body)
                samples[t.name].append(time.perf_counter() - t0)
    finally:
        for client in clients.values():
            client.close()
    return {name: _percentiles(s) for name, s in samples.items()}


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50_ms": statistics.median(samples) * 1e3, "p99_ms": samples[int(len(samples) * 0.99) - 1] * 1e3}


def sse(targets: list[Target], n: int) -> dict[str, dict[str, float]]:
    """Median time to the first `data:` line and to the end of a streamed chat
    completion per target, in ms; the targets take turns stream by stream."""
    body, path = chat(1, stream=True), "/v1/chat/completions"
    clients = {t.name: t.client() for t in targets}
    ttft: dict[str, list[float]] = {t.name: [] for t in targets}
    total: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for i in range(n + 5):
            for t in _rotated(targets, i):
                t0 = time.perf_counter()
                first = None
                with clients[t.name].stream("POST", t.url + path, content=body, headers={"Content-Type": "application/json"}) as r:
                    for line in r.iter_lines():
                        if first is None and line.startswith("data:"):
                            first = time.perf_counter() - t0
                if i >= 5:  # warm-up
                    ttft[t.name].append(first or 0.0)
                    total[t.name].append(time.perf_counter() - t0)
    finally:
        for client in clients.values():
            client.close()
    return {
        name: {"ttft_p50_ms": statistics.median(ttft[name]) * 1e3, "total_p50_ms": statistics.median(total[name]) * 1e3}
        for name in ttft
    }


def throughput(targets: list[Target], clients: int, seconds: float, slices: int) -> dict[str, tuple[float, float | None]]:
    """Per target: requests per second of 8 KB chat POSTs by `clients` concurrent
    keep-alive clients, and the proxy's CPU milliseconds per request (None for direct
    calls). A load cannot share its moments with another, so the targets take turns in
    `slices` slices of `seconds / slices` each (each going first in turn), keeping their
    clients and connections between slices; a target's rate sums its slices, which
    spread over the same stretch of time as every other target's. A proxy's CPU is
    counted from the first slice to `SETTLE_SECONDS` after the last, not per slice: the
    gateway signs its sessions' checkpoints a second after their flows, and that work
    is its own whichever target's slice it falls in."""
    body, path = chat(8), "/v1/chat/completions"
    pools: dict[str, list[httpx.Client]] = {}
    served = {t.name: 0 for t in targets}
    elapsed = {t.name: 0.0 for t in targets}

    def load(target: Target, client: httpx.Client, stop: float) -> int:
        done = 0
        while time.perf_counter() < stop:
            post(client, target.url + path, body)
            done += 1
        return done

    try:
        for t in targets:
            pools[t.name] = [t.client() for _ in range(clients)]
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            for t in targets:  # every client connects (proxy tunnel, TLS) before anything is timed
                list(pool.map(lambda c, t=t: post(c, t.url + path, body), pools[t.name]))
            used = {t.name: t.cpu_seconds() for t in targets}
            for i in range(slices):
                for t in _rotated(targets, i):
                    t0 = time.perf_counter()
                    stop = t0 + seconds / slices
                    served[t.name] += sum(pool.map(lambda c, t=t, stop=stop: load(t, c, stop), pools[t.name]))
                    elapsed[t.name] += time.perf_counter() - t0
        time.sleep(SETTLE_SECONDS)
        cpu: dict[str, float | None] = {}
        for t in targets:
            now, before = t.cpu_seconds(), used[t.name]
            cpu[t.name] = now - before if now is not None and before is not None else None
    finally:
        for pool_clients in pools.values():
            for client in pool_clients:
                client.close()
    if not all(served.values()):
        raise RuntimeError(f"a target completed no request in its throughput slices: {served}")
    return {
        name: (served[name] / elapsed[name], cpu[name] / served[name] * 1e3 if cpu[name] is not None else None)
        for name in served
    }


def rss_growth(target: Target, requests: int) -> dict[str, float | None]:
    """Proxy RSS before and after `requests` 1 KB POSTs over 8 clients."""
    body, url = chat(1), f"{target.url}/v1/chat/completions"
    per_client = requests // 8
    lock, done = threading.Lock(), [0]

    def worker(_: int) -> None:
        with target.client() as client:
            for _ in range(per_client):
                post(client, url, body)
                with lock:
                    done[0] += 1

    before = target.rss_kb()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    after = target.rss_kb()
    growth = (after - before) / before * 100 if before and after else None
    return {"rss_before_mb": before and before / 1024, "rss_after_mb": after and after / 1024, "rss_growth_pct": growth}


def measure_round(targets: list[Target], quick: bool) -> dict[str, dict[str, float | None]]:
    """One round of every metric but RSS, per configuration (SSE only for a
    `sse_only` one). Latency and SSE interleave the configurations request by request;
    throughput, a load, in slices of about a second."""
    n = 60 if quick else 200
    full = [t for t in targets if not t.sse_only]
    result: dict[str, dict[str, float | None]] = {t.name: {} for t in targets}
    for size in SIZES_KB:
        for name, values in latency(full, size, n).items():
            for key, value in values.items():
                result[name][f"{key} {size}KB"] = value
    for name, values in sse(targets, 10 if quick else 40).items():
        result[name].update(values)
    for clients in CONCURRENCY:
        for name, (rate, cpu_ms) in throughput(full, clients, 1.5 if quick else 4.0, 2 if quick else 4).items():
            result[name][f"req/s x{clients}"] = rate
            result[name][f"cpu ms/req x{clients}"] = cpu_ms
    return result


def median_of(rounds: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each metric's median over the rounds."""
    return {
        metric: statistics.median(values) if (values := [r[metric] for r in rounds if r[metric] is not None]) else None
        for metric in rounds[0]
    }


def paired_ratios(gateway: list[dict[str, float | None]], bare: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each metric's median over the rounds of gateway/bare in the same round."""
    ratios: dict[str, float | None] = {}
    for metric in gateway[0]:
        pairs = [g[metric] / b[metric] for g, b in zip(gateway, bare) if g[metric] is not None and b[metric]]
        ratios[metric] = statistics.median(pairs) if pairs else None
    return ratios


def print_table(results: dict[str, dict[str, float | None]], *ratio_columns: dict[str, float | None]) -> None:
    """The results per configuration, then gateway/bare over HTTPS and over plain HTTP."""
    names = list(results)
    print(f"{'metric':<22}" + "".join(f"{n:>13}" for n in names) + f"{'gw/bare':>9}{'gw/bare http':>13}")
    for metric in results["gateway"]:
        row = [results[n].get(metric) for n in names]
        ratios = [column.get(metric) for column in ratio_columns]
        print(f"{metric:<22}" + "".join(f"{v:>13.2f}" if v is not None else f"{'-':>13}" for v in row)
              + "".join(f"{r:>{w}.2f}" if r is not None else " " * w for r, w in zip(ratios, (9, 13), strict=True)))


def paired_difference(gateway: list[dict[str, float | None]], other: list[dict[str, float | None]], metric: str) -> float:
    """The median over the rounds of gateway minus `other` in the same round."""
    return statistics.median((g[metric] or 0) - (o[metric] or 0) for g, o in zip(gateway, other))


def verdicts(
    results: dict[str, dict[str, float | None]], ratios: dict[str, float | None], measured: dict[str, list[dict[str, float | None]]]
) -> list[tuple[str, str, bool]]:
    """The issue's targets: (target, measured, met). Time to first event is compared
    like the ratios: per round, then the median."""
    ttft = paired_difference(measured["gateway"], measured["bare-stream"], "ttft_p50_ms")
    buffered = paired_difference(measured["gateway"], measured["bare"], "ttft_p50_ms")
    growth = results["gateway"]["rss_growth_pct"]
    checks = [  # plain HTTP: the proxy's own cost
        ("p50 8 KB <= 1.3x bare", ratios["p50_ms 8KB"], lambda r: r <= 1.3),
        ("p50 64 KB <= 1.5x bare", ratios["p50_ms 64KB"], lambda r: r <= 1.5),
        ("cpu ms/req x32 <= 1.5x bare", ratios["cpu ms/req x32"], lambda r: r <= 1.5),
        ("req/s x32 >= 0.7x bare", ratios["req/s x32"], lambda r: r >= 0.7),
    ]
    found = [(name, f"{r:.2f}x", ok(r)) for name, r, ok in checks if r is not None]
    found.append(("SSE first event <= bare + 1 ms", f"{ttft:+.2f} ms (streaming bare; {buffered:+.2f} ms buffering bare)", ttft <= 1.0))
    if growth is not None:
        found.append(("RSS growth < 10 %", f"{growth:+.1f} %", growth < 10))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run, not a measurement)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the configurations taking turns (default 3)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/chain.json"), help="where to write the results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hoop-bench-") as tmp:
        work = Path(tmp)
        ca = make_ca(work / "pki")
        cert, key = issue_server_cert(ca, ["127.0.0.1"], work / "pki")
        port = free_port()
        upstream = subprocess.Popen(
            [sys.executable, "-m", "hoop_addon.dev.upstream", "--port", str(port), "--cert", str(cert), "--key", str(key)],
            stdout=subprocess.PIPE,
        )
        upstream.stdout.readline()  # "fake LLM upstream on ..." once it listens
        url = f"https://127.0.0.1:{port}"
        plain_port = free_port()
        plain = subprocess.Popen(
            [sys.executable, "-m", "hoop_addon.dev.upstream", "--port", str(plain_port)], stdout=subprocess.PIPE,
        )
        plain.stdout.readline()
        plain_url = f"http://127.0.0.1:{plain_port}"
        (work / "rules").mkdir()
        dev = issuer.ensure(work / "home")
        (work / "rules" / "bench.yaml").write_text(bench_policy(dev.jwks_path))
        token = issuer.mint(work / "home", "bench-agent", ["agents"], ttl=7200)

        quiet = {"termlog_verbosity": "error", "flow_detail": "0"}
        bare = Gateway(work / "rules", work / "bare", ca.cert_path, options=quiet, bare=True).start()
        streaming = Gateway(
            work / "rules", work / "bare-stream", ca.cert_path, options={**quiet, "stream_large_bodies": "1"}, bare=True
        ).start()
        gateway = Gateway(
            work / "rules", work / "gateway", ca.cert_path, env={"HOOP_BENCH_KEY": UPSTREAM_KEY}, options={**quiet, "hoop_reload": "0"}
        ).start()
        try:
            targets = [
                Target("direct", url, None, ca.cert_path, None),
                Target("bare", url, bare.proxy(), bare.ca_cert, bare.proc.pid),
                Target("bare-stream", url, streaming.proxy(), streaming.ca_cert, streaming.proc.pid, sse_only=True),
                Target("gateway", url, gateway.proxy(token), gateway.ca_cert, gateway.proc.pid),
                # the same proxies forwarding plain HTTP: no TLS hides the proxy's own cost
                Target("bare-http", plain_url, bare.proxy(), bare.ca_cert, bare.proc.pid),
                Target("gateway-http", plain_url, gateway.proxy(token), gateway.ca_cert, gateway.proc.pid),
            ]
            rounds = 1 if args.quick else max(1, args.rounds)
            measured: dict[str, list[dict[str, float | None]]] = {t.name: [] for t in targets}
            for i in range(rounds):
                print(f"round {i + 1}/{rounds} ...", file=sys.stderr)
                for name, values in measure_round(_rotated(targets, i), args.quick).items():  # each goes first in turn
                    measured[name].append(values)
            results = {name: median_of(r) for name, r in measured.items()}
            ratios = paired_ratios(measured["gateway"], measured["bare"])
            http_ratios = paired_ratios(measured["gateway-http"], measured["bare-http"])
            for target in (t for t in targets if t.name in ("bare", "gateway")):  # RSS: one long run each
                print(f"measuring {target.name}'s memory ...", file=sys.stderr)
                for key, value in rss_growth(target, 2_000 if args.quick else 20_000).items():
                    results[target.name][key] = value
            for key in ("rss_before_mb", "rss_after_mb", "rss_growth_pct"):
                ratios[key] = http_ratios[key] = None
        except Exception:
            print(f"gateway log tail:\n{gateway.output[-3000:]}", file=sys.stderr)
            raise
        finally:
            gateway.stop()
            streaming.stop()
            bare.stop()
            for process in (upstream, plain):
                process.send_signal(signal.SIGTERM)
                process.wait(10)
    print_table(results, ratios, http_ratios)
    print()
    for name, measured_value, met in verdicts(results, http_ratios, measured):
        print(f"{'met   ' if met else 'MISSED'} {name:<32} {measured_value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(
        {"quick": args.quick, "rounds": rounds, "cpus": os.cpu_count(), "results": results, "gateway/bare": ratios,
         "gateway/bare (plain HTTP)": http_ratios, "rounds_measured": measured}, indent=2,
    ))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
