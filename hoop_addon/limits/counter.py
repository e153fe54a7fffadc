"""Counting for rate limits and budgets (pure: no mitmproxy; the clock is injectable).

A `Window` counts what happened in the last `span` seconds in `slots` equal slots
(a ring: the oldest slot is dropped as time moves on), so a limit is a sliding window
at the slot's resolution, not a fixed window that lets twice the limit through around
its edge. `Counters` keeps one window per (limit name, key, kind), bounded: the least
recently used windows are forgotten first (an idle key's count would be 0 anyway by
the time it is forgotten, unless more than `max_windows` keys are active at once).

The rate-limit stage uses `take` (check and charge, all or nothing) and `settle`
(release a reservation, charge what was used); `hoop_addon.state.counters` implements
the same two across the processes sharing a state store.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence


class Window:
    """A sliding-window counter over `span` seconds in `slots` slots.

    `used(now)` is the sum of the last `span` seconds; `add(now, n)` adds `n` >= 0;
    `release(now, at, n)` takes back `n` added at time `at` (a reservation settled: from
    `at`'s slot, never below 0; nothing once that slot has left the window);
    `retry_after(now, need, limit)`
    is how many seconds until `used + need <= limit`, given no new charges (0 if it
    already holds; `math.inf` if `need > limit`: it never will).
    """

    __slots__ = ("span", "width", "counts", "epoch")

    def __init__(self, span: float, slots: int) -> None:
        self.span, self.width = span, span / slots
        self.counts = [0.0] * slots
        self.epoch = 0  # index of the newest slot, in slot widths since the Unix epoch

    def _roll(self, now: float) -> int:
        current = int(now // self.width)
        gone = current - self.epoch
        if gone > 0:
            n = len(self.counts)
            for i in range(1, min(gone, n) + 1):
                self.counts[(self.epoch + i) % n] = 0.0
            self.epoch = current
        return current % len(self.counts)

    def used(self, now: float) -> float:
        self._roll(now)
        return sum(self.counts)

    def add(self, now: float, n: float) -> None:
        self.counts[self._roll(now)] += n

    def release(self, now: float, at: float, n: float) -> None:
        self._roll(now)
        slot = int(at // self.width)
        if self.epoch - len(self.counts) < slot <= self.epoch:  # still in the window
            i = slot % len(self.counts)
            self.counts[i] = max(0.0, self.counts[i] - n)

    def retry_after(self, now: float, need: float, limit: float) -> float:
        if need > limit:
            return math.inf
        self._roll(now)
        excess = sum(self.counts) + need - limit
        if excess <= 0:
            return 0.0
        k = len(self.counts)
        start = (self.epoch + 1) % k  # the oldest slot
        for age in range(k):
            excess -= self.counts[(start + age) % k]
            if excess <= 0:
                # that slot leaves the window at the end of its width
                return max(0.0, (self.epoch + 1 + age) * self.width - now)
        return self.span


Need = tuple[str, Hashable, str, float, float, bool]
"""(limit name, key, kind, amount, the limit's value for that kind, enforced: False
for a shadow limit, which refuses nothing)."""
Settlement = tuple[str, Hashable, str, float, float, float]
"""(limit name, key, kind, when the reservation was made (Unix seconds), amount
reserved, amount used)."""


# Each kind of limit: its window span (seconds) and slot count (resolution span/slots).
KINDS: dict[str, tuple[float, int]] = {
    "requests_per_minute": (60.0, 60),
    "tokens_per_minute": (60.0, 60),
    "tokens_per_day": (86_400.0, 96),
}


class Counters:
    """Windows by (limit name, key, kind), at most `max_windows` (least recently used
    forgotten first). `clock` gives Unix seconds. Used from one event loop: not
    thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time, max_windows: int = 100_000) -> None:
        self.clock = clock
        self.max_windows = max_windows
        self._windows: OrderedDict[tuple[str, Hashable, str], Window] = OrderedDict()

    def _window(self, name: str, key: Hashable, kind: str) -> Window:
        ident = (name, key, kind)
        window = self._windows.get(ident)
        if window is None:
            window = self._windows[ident] = Window(*KINDS[kind])
            while len(self._windows) > self.max_windows:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(ident)
        return window

    def retry_after(self, name: str, key: Hashable, kind: str, need: float, limit: float) -> float:
        """Seconds until `need` more fits under `limit` in this window (0: now)."""
        return self._window(name, key, kind).retry_after(self.clock(), need, limit)

    def charge(self, name: str, key: Hashable, kind: str, n: float) -> None:
        """Count `n` >= 0 (requests or tokens) now."""
        self._window(name, key, kind).add(self.clock(), n)

    def release(self, name: str, key: Hashable, kind: str, at: float, n: float) -> None:
        """Take back `n` charged at `at` (Unix seconds, from `clock`): a reservation
        that is settled. A window already forgotten has nothing to take back."""
        if (window := self._windows.get((name, key, kind))) is not None:
            window.release(self.clock(), at, n)

    def used(self, name: str, key: Hashable, kind: str) -> float:
        """What the window holds now."""
        return self._window(name, key, kind).used(self.clock())

    def take(self, needs: Sequence[Need]) -> list[float]:
        """For each need, the seconds until it fits (0: now; `math.inf`: never), as
        `retry_after`; when every enforced need fits, all needs are charged now (else
        none is)."""
        waits = [self.retry_after(name, key, kind, amount, limit) for name, key, kind, amount, limit, _ in needs]
        if not any(wait and enforced for wait, (*_, enforced) in zip(waits, needs)):
            for name, key, kind, amount, _, _ in needs:
                self.charge(name, key, kind, amount)
        return waits

    def settle(self, settlements: Sequence[Settlement]) -> None:
        """Release each reservation (see `release`) and charge what was used now."""
        for name, key, kind, at, reserved, used in settlements:
            self.release(name, key, kind, at, reserved)
            self.charge(name, key, kind, used)
