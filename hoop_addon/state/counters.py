"""Rate-limit and budget counters in a shared state store: a limit holds across every
gateway process sharing the store (SQLite or PostgreSQL).

The same sliding windows as `hoop_addon.limits.counter` (its `KINDS`: span and slot
count per kind), one row per (window, slot) in table `hoop_counters`. `take` checks
and charges in one transaction: it adds each need to its current slot (`INSERT ...
ON CONFLICT DO UPDATE SET n = n + ...`, which locks that row until the transaction
ends, so two processes charging one window are serialized by the database, never a
read-modify-write race in Python), reads the window's slots, and rolls everything back
when an enforced need does not fit. Rows are locked in one order (by window, then
slot) so that two transactions cannot deadlock; slots that left their window are
deleted as `take` goes. Every call may raise `StateError` (the caller fails closed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import orjson

from hoop_addon.limits.counter import KINDS, Need, Settlement, Window

if TYPE_CHECKING:
    from hoop_addon.state.sql import Run, SQLStore


class _Refused(Exception):
    """Rolls a `take` back; carries its waits."""

    def __init__(self, waits: list[float]) -> None:
        self.waits = waits


def _window(name: str, key: Hashable, kind: str) -> str:
    return orjson.dumps([name, key, kind]).decode()


class SharedCounters:
    """Counters in `store` (an SQL state store) with the interface of
    `hoop_addon.limits.counter.Counters` that the rate-limit stage uses (`take`,
    `settle`, `clock`: Unix seconds)."""

    def __init__(self, store: SQLStore, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock

    def __repr__(self) -> str:
        return f"<SharedCounters {self.store.name}>"

    @staticmethod
    def _charge(run: Run, ident: str, kind: str, now: float, amount: float) -> int:
        span, slots = KINDS[kind]
        width = span / slots
        current = int(now // width)
        run("INSERT INTO hoop_counters (ident, slot, n, expires) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (ident, slot) DO UPDATE SET n = hoop_counters.n + excluded.n",
            ident, current, amount, (current + 1) * width + span)
        return current

    def take(self, needs: Sequence[Need]) -> list[float]:
        """For each need, the seconds until it fits (0: now; `math.inf`: never) over
        every process's charges; when every enforced need fits, all are charged (else
        none is), atomically. Raises `StateError`."""
        now = self.clock()
        idents = [_window(name, key, kind) for name, key, kind, *_ in needs]
        waits = [0.0] * len(needs)
        try:
            with self.store.transaction() as run:
                run("DELETE FROM hoop_counters WHERE expires <= ?", now)
                for i in sorted(range(len(needs)), key=idents.__getitem__):
                    _, _, kind, amount, limit, _ = needs[i]
                    span, slots = KINDS[kind]
                    current = self._charge(run, idents[i], kind, now, amount)
                    window = Window(span, slots)
                    window.epoch = current
                    for slot, n in run("SELECT slot, n FROM hoop_counters WHERE ident = ? AND slot > ?",
                                       idents[i], current - slots):
                        window.counts[slot % slots] = n
                    window.counts[current % slots] -= amount  # the window as it was before this need
                    waits[i] = window.retry_after(now, amount, limit)
                if any(wait and enforced for wait, (*_, enforced) in zip(waits, needs)):
                    raise _Refused(waits)
        except _Refused:
            pass  # rolled back: nothing charged
        return waits

    def settle(self, settlements: Sequence[Settlement]) -> None:
        """Release each reservation (from the slot of `at`, never below 0; nothing once
        that slot left its window) and charge what was used now, in one transaction.
        Raises `StateError`."""
        now = self.clock()
        with self.store.transaction() as run:
            for name, key, kind, at, reserved, used in sorted(settlements, key=lambda s: _window(*s[:3])):
                span, slots = KINDS[kind]
                ident, slot = _window(name, key, kind), int(at // (span / slots))
                run("UPDATE hoop_counters SET n = CASE WHEN n > ? THEN n - ? ELSE 0 END WHERE ident = ? AND slot = ?",
                    reserved, reserved, ident, slot)
                self._charge(run, ident, kind, now, used)
