"""Prometheus metrics of the gateway (prometheus-client), in a registry of their own.

Exposed in the Prometheus text format (`exposition()`) on the control port's
`/metrics`. No label ever holds a token, a credential or a body value: labels are
route and rule names from the policy, reason codes, stage and hook names.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

disable_created_metrics()  # `*_created` samples double the exposition and say nothing useful here
REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "hoop_requests", "Flows finished, by route and decision.", ["route", "outcome"], registry=REGISTRY
)
JWT_FAILURES = Counter(
    "hoop_jwt_failures", "Refused tokens, by reason (expired, bad_signature, ...).", ["reason"], registry=REGISTRY
)
MASKED_VALUES = Counter(
    "hoop_masked_values", "Values masked, by masking rule and part (request/response).", ["rule", "part"], registry=REGISTRY
)
BLOCKS = Counter("hoop_blocks", "Requests blocked, by rule.", ["rule"], registry=REGISTRY)
REFUSALS = Counter(
    "hoop_refusals",
    "Flows the gateway refused or withheld, by stage and reason code (expired, unmaskable_request, recording_failed, ...).",
    ["stage", "reason"], registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "hoop_rate_limited", "Flows over a rate limit or budget, by limit (refused, or only counted in shadow mode).",
    ["limit"], registry=REGISTRY,
)
ENFORCING = Gauge(
    "hoop_enforcing", "1 while the gateway can enforce its policy (what /healthz says), else 0.", registry=REGISTRY
)
SHADOW_MATCHES = Counter(
    "hoop_shadow_matches",
    "What shadow-mode (`action: log`) rules would have done, by rule and kind (block, approval: requests; masking: values).",
    ["rule", "kind"], registry=REGISTRY,
)
APPROVALS_PENDING = Gauge("hoop_approvals_pending", "Flows held for approval now.", registry=REGISTRY)
APPROVAL_OLDEST = Gauge(
    "hoop_approval_oldest_pending_seconds", "How long the oldest pending approval has waited, in seconds (0: none).",
    registry=REGISTRY,
)
APPROVALS_DECIDED = Counter(
    "hoop_approvals_decided", "Approval decisions, by outcome (approved/denied/timeout).", ["outcome"], registry=REGISTRY
)
APPROVAL_WAIT = Histogram(
    "hoop_approval_wait_seconds",
    "Time a held flow waited for its decision, in seconds.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
MCP_TOOL_CHANGES = Counter(
    "hoop_mcp_tool_changes",
    "MCP tool definitions found changed since they were pinned, by route and the policy's action (alert/hide).",
    ["route", "action"], registry=REGISTRY,
)
RECORDING_BYTES = Counter("hoop_recording_bytes", "Bytes written to session recordings.", registry=REGISTRY)
SEAL_FAILURES = Counter("hoop_recording_seal_failures", "Recordings that could not be sealed (signed).", registry=REGISTRY)


@functools.cache
def labelled(metric: Counter, *values: str) -> Counter:
    """`metric.labels(*values)`, the child counter, looked up once: prometheus-client
    validates the values and takes a lock on every `labels()` call, ~4.5 us, a few
    times a flow. Label values are policy names and fixed codes, a bounded set. (A
    child removed from its metric would stay here: none is ever removed.)"""
    return metric.labels(*values)


class StageTimes(Collector):
    """The histogram `hoop_stage_seconds{stage, hook}`: time spent in a stage's hook,
    in seconds (async hooks include their awaits).

    Every flow hook of every stage is timed, about 14 observations a flow, so the
    observation must cost next to nothing: `timer()` gives a function that adds one
    duration (seconds) to plain Python counters, a bisection and two additions,
    instead of prometheus-client's `Histogram`, which takes a lock per observation.
    That is safe because the hooks and the `/metrics` handler all run on mitmproxy's
    event loop thread. `collect()` is prometheus-client's custom-collector interface
    and yields the standard histogram samples (cumulative `le` buckets, `_sum`,
    `_count`).
    """

    BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)

    def __init__(self) -> None:
        # per (stage, hook): observation counts per bucket (the last one is +Inf), then the sum
        self._series: dict[tuple[str, str], list[float]] = {}

    def timer(self, stage: str, hook: str) -> Callable[[float], None]:
        """The function that records one duration (seconds) of `stage`'s `hook`."""
        series = self._series.setdefault((stage, hook), [0] * (len(self.BUCKETS) + 1) + [0.0])
        bounds, total = self.BUCKETS, len(self.BUCKETS) + 1

        def observe(seconds: float) -> None:
            series[bisect.bisect_left(bounds, seconds)] += 1
            series[total] += seconds

        return observe

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "hoop_stage_seconds", "Time spent in a stage's hook, in seconds (async hooks include their awaits).",
            labels=["stage", "hook"],
        )
        for labels, series in self._series.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*map(floatToGoString, self.BUCKETS), "+Inf"), series):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, series[-1])
        yield family


STAGE_SECONDS = StageTimes()
REGISTRY.register(STAGE_SECONDS)


def exposition() -> bytes:
    """All metrics in the Prometheus text exposition format (version 0.0.4)."""
    return generate_latest(REGISTRY)
