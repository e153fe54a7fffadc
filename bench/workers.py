"""Benchmark `hoop serve --workers 2` against one worker and one bare mitmdump, in one run.

    python bench/workers.py [--quick] [--rounds N] [--json bench/results/workers.json]

Three proxies in front of the same local plain-HTTP upstream (a separate process; no
TLS hides the proxies' own cost): `bare` (`mitmdump -q`), `1 worker` (`hoop serve`)
and `2 workers` (`hoop serve --workers 2`, the default SQLite store), both gateways
with `bench/chain.py`'s policy (JWT identity, 20 masking rules, recording, audit)
plus one approval rule. Throughput: 8 KB chat POSTs by 32 concurrent keep-alive
clients, the configurations taking turns in slices (`chain.throughput`), each round's
ratios taken in that round and their median reported; a proxy's CPU per request sums
its processes (the workers, not the supervisor). Decision latency across workers: a
request held by one worker is approved through the other worker's own control port;
measured from sending the decision to the held client's answer (forwarding and the
upstream's answer included), p50 and p99 over the rounds' samples. The load generator
and the upstream share the machine: their CPU per request is measured too, so the
cores each configuration's rate needs in all (proxy + client + upstream) are printed
beside the machine's count. Figures are machine-bound: the ratios are the result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from chain import UPSTREAM_KEY, Target, bench_policy, chat, throughput  # bench/ is the script's directory
from hoop_addon.dev import issuer
from hoop_addon.dev.gateway import Gateway, free_port
from hoop_addon.dev.tls import make_ca

CLIENTS = 32
APPROVAL = (
    "approvals:\n  - name: risky\n    when: {headers: {X-Risk: '^high$'}}\n"
    "    approvers: {groups: [reviewers]}\n    timeout: 60\n"
)


class Processes(Target):
    """A target whose proxy is several processes: the children of `parent` (the
    supervisor's workers); CPU time is their sum."""

    def __init__(self, name: str, url: str, proxy: str, ca: Path, parent: int) -> None:
        super().__init__(name, url, proxy, ca, parent)
        self.workers = [int(pid) for pid in subprocess.run(["ps", "--ppid", str(parent), "-o", "pid="],
                                                           capture_output=True, text=True, check=True).stdout.split()]

    def cpu_seconds(self) -> float | None:
        total = 0.0
        for pid in self.workers:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


def decision_latency(gateway: Gateway, url: str, agent: str, approver: str, samples: int) -> list[float]:
    """Seconds from sending each approval (through the worker that does not hold the
    request) to the held client's answer, `samples` times."""
    latencies = []
    client = httpx.Client(proxy=gateway.proxy(agent), trust_env=False, timeout=60)
    api = httpx.Client(headers={"Authorization": f"Bearer {approver}"}, trust_env=False, timeout=10)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for i in range(samples):
                held = pool.submit(client.post, f"{url}/v1/chat/completions", content=chat(1),
                                   headers={"X-Risk": "high", "Content-Type": "application/json"})
                approval, holder = _held(gateway)
                other = gateway.control_port + 1 + (1 - holder)
                t0 = time.perf_counter()
                decided = api.post(f"http://127.0.0.1:{other}/approvals/{approval}/approve")
                response = held.result(30)
                latencies.append(time.perf_counter() - t0)
                if decided.status_code != 200 or response.status_code != 200:
                    raise RuntimeError(f"approval {approval}: decision {decided.status_code}, response {response.status_code}")
                client.close()  # a new connection next time: the kernel picks its worker
                client = httpx.Client(proxy=gateway.proxy(agent), trust_env=False, timeout=60)
    finally:
        client.close()
        api.close()
    return latencies


_seen: set[str] = set()


def _held(gateway: Gateway) -> tuple[str, int]:
    """(approval id, holding worker) of the newest held request, from the workers' chains."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for worker in (0, 1):
            path = gateway.recordings / f"audit-{worker}.jsonl"
            for line in path.read_bytes().splitlines() if path.exists() else []:
                entry = orjson.loads(line)
                if entry["event"] == "approval_requested" and entry["approval"]["id"] not in _seen:
                    _seen.add(entry["approval"]["id"])
                    return entry["approval"]["id"], worker
        time.sleep(0.005)
    raise RuntimeError("no held request appeared in the audit chains")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """User + system CPU seconds of this process (the clients), all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] if len(samples) > 1 else samples[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run, not a measurement)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the configurations taking turns (default 3)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/workers.json"), help="where to write the results")
    args = parser.parse_args()
    rounds = 1 if args.quick else max(1, args.rounds)

    with tempfile.TemporaryDirectory(prefix="hoop-bench-workers-") as tmp:
        work = Path(tmp)
        ca = make_ca(work / "pki")  # the proxies' confdirs need none of it: plain HTTP upstream
        port = free_port()
        upstream = subprocess.Popen([sys.executable, "-m", "hoop_addon.dev.upstream", "--port", str(port)], stdout=subprocess.PIPE)
        upstream.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        (work / "rules").mkdir()
        dev = issuer.ensure(work / "home")
        (work / "rules" / "bench.yaml").write_text(bench_policy(dev.jwks_path) + APPROVAL)
        token = issuer.mint(work / "home", "bench-agent", ["agents"], ttl=7200)
        approver = issuer.mint(work / "home", "approver", ["reviewers"], ttl=7200)
        quiet = {"termlog_verbosity": "error", "flow_detail": "0"}
        env = {"HOOP_BENCH_KEY": UPSTREAM_KEY}
        bare = Gateway(work / "rules", work / "bare", ca.cert_path, options=quiet, bare=True).start()
        one = Gateway(work / "rules", work / "one", ca.cert_path, env=env, options={**quiet, "hoop_reload": "0"},
                      serve=True).start()
        two = Gateway(work / "rules", work / "two", ca.cert_path, env=env, options={**quiet, "hoop_reload": "0"},
                      serve=True, args=["--workers", "2", "--home", str(work / "two" / "home")]).start(timeout=60)
        measured: dict[str, list[tuple[float, float | None]]] = {"bare": [], "1 worker": [], "2 workers": []}
        latencies: list[float] = []
        load_cpu, load_requests = 0.0, 0.0  # the clients' and the upstream's CPU, and the requests it served
        load_average = os.getloadavg()[0]
        try:
            targets = [
                Target("bare", url, bare.proxy(), bare.ca_cert, bare.proc.pid),
                Target("1 worker", url, one.proxy(token), one.ca_cert, one.proc.pid),
                Processes("2 workers", url, two.proxy(token), two.ca_cert, two.proc.pid),
            ]
            for i in range(rounds):
                print(f"round {i + 1}/{rounds} ...", file=sys.stderr)
                order = targets[i % 3:] + targets[:i % 3]  # each goes first in turn
                seconds = 2.0 if args.quick else 6.0
                before = own_cpu() + cpu_of(upstream.pid)
                for name, value in throughput(order, CLIENTS, seconds, 2 if args.quick else 6).items():
                    measured[name].append(value)
                    load_requests += value[0] * seconds + CLIENTS  # the slices, and each client's first request
                load_cpu += own_cpu() + cpu_of(upstream.pid) - before
                latencies += decision_latency(two, url, token, approver, 5 if args.quick else 20)
            split = [sum(b'"event":"request"' in line for line in (two.recordings / f"audit-{w}.jsonl").read_bytes().splitlines())
                     for w in (0, 1)]  # how the kernel spread the connections: requests per worker
        except Exception:
            print(f"2 workers' log tail:\n{two.output[-3000:]}", file=sys.stderr)
            raise
        finally:
            for gateway in (two, one, bare):
                gateway.stop()
            upstream.send_signal(signal.SIGTERM)
            upstream.wait(10)

    def ratio(a: str, b: str, index: int = 0) -> float:
        return statistics.median(x[index] / y[index] for x, y in zip(measured[a], measured[b], strict=True))

    rates = {name: statistics.median(v[0] for v in values) for name, values in measured.items()}
    cpu = {name: statistics.median(v[1] for v in values) if values[0][1] is not None else None for name, values in measured.items()}
    result = {
        "quick": args.quick, "rounds": rounds, "cpus": os.cpu_count(), "clients": CLIENTS,
        "req/s": rates, "cpu ms/req": cpu,
        "2 workers / 1 worker": ratio("2 workers", "1 worker"), "1 worker / bare": ratio("1 worker", "bare"),
        "2 workers / bare": ratio("2 workers", "bare"),
        "decision latency across workers ms": {"p50": percentile(latencies, 50) * 1e3, "p99": percentile(latencies, 99) * 1e3,
                                               "samples": len(latencies)},
        "rounds_measured": measured,
    }
    load_ms = load_cpu / load_requests * 1e3  # client + upstream, per request (the same for every target)
    cores = {name: rates[name] * (cpu[name] + load_ms) / 1e3 for name in measured}
    result.update({"client + upstream cpu ms/req": load_ms, "cores needed": cores, "load average before": load_average,
                   "requests per worker": split})
    print(f"{'throughput, 32 clients, plain HTTP':<36}{'req/s':>9}{'cpu ms/req':>12}{'cores needed':>14}")
    for name in measured:
        print(f"{name:<36}{rates[name]:>9.1f}{cpu[name]:>12.2f}{cores[name]:>14.2f}")
    print(f"(cores needed: the rate times proxy + client + upstream CPU per request, the latter {load_ms:.2f} ms; "
          f"this machine has {os.cpu_count()}, load average {load_average:.2f} before the run)")
    print(f"requests served by worker 0 / worker 1 (SO_REUSEPORT's spread): {split[0]} / {split[1]}")
    print(f"2 workers / 1 worker: {result['2 workers / 1 worker']:.2f}x (target >= 1.6x); 1 worker / bare: "
          f"{result['1 worker / bare']:.2f}x; 2 workers / bare: {result['2 workers / bare']:.2f}x")
    lat = result["decision latency across workers ms"]
    print(f"decision latency across workers ({lat['samples']} samples): p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms")
    print(f"{'met   ' if result['2 workers / 1 worker'] >= 1.6 else 'MISSED'} 2 workers >= 1.6x 1 worker")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
