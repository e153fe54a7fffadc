"""MCP tool pins in a shared state store: what one gateway process saw of a server's
tools (a first definition pinned, a changed one held) every process sharing the store
knows, and an acceptance through any process's control API holds on all.

`SharedPinStore` has `hoop_addon.mcp.pinning.PinStore`'s interface and rules (`revise`,
`acceptable_pin`); each call is one short transaction on table `hoop_pins`, one row
per (route, tool), read and written under a lock on the row (SQLite: the writing
transaction; PostgreSQL: `SELECT ... FOR UPDATE`, and a first pin by `INSERT ... ON
CONFLICT DO NOTHING`, so two processes pinning one tool at once keep the first).
The calls are synchronous (the MCP stage makes them on the event loop, one per tool
listed or call checked). A store that fails raises `PinError` `state_unavailable`: a
listing is then withheld and a call refused, as the stage does with any `PinError`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from hoop_addon.mcp.pinning import MAX_PINS, Change, Pin, PinError, acceptable_pin, fingerprint, revise
from hoop_addon.state.approvals import StateError

if TYPE_CHECKING:
    from hoop_addon.state.sql import Run, SQLStore

_COLUMNS = "fingerprint, pinned_at, changed, definition, changed_at, reported"


class SharedPinStore:
    """Pins by (route name, tool name) in `store` (an SQL state store), at most
    `max_pins` over all processes; `clock` gives Unix seconds."""

    def __init__(self, store: SQLStore, max_pins: int = MAX_PINS, clock: Callable[[], float] = time.time) -> None:
        self.store, self._max, self._clock = store, max_pins, clock

    def __repr__(self) -> str:
        return f"<SharedPinStore {self.store.name}>"

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Run]:
        try:
            with self.store.transaction() as run:
                yield run
        except StateError as exc:
            raise PinError("state_unavailable", str(exc)) from None

    def _pin(self, run: Run, route: str, tool: str, lock: bool = False) -> Pin | None:
        rows = run(f"SELECT {_COLUMNS} FROM hoop_pins WHERE route = ? AND tool = ?{self.store.for_update if lock else ''}",
                   route, tool)
        if not rows:
            return None
        pinned, pinned_at, changed, definition, changed_at, reported = rows[0]
        return Pin(pinned, pinned_at, changed, orjson.loads(definition) if definition else None, changed_at, bool(reported))

    @staticmethod
    def _write(run: Run, route: str, tool: str, pin: Pin) -> None:
        run("UPDATE hoop_pins SET fingerprint = ?, pinned_at = ?, changed = ?, definition = ?, changed_at = ?, "
            "reported = ? WHERE route = ? AND tool = ?",
            pin.fingerprint, pin.pinned_at, pin.changed,
            orjson.dumps(pin.definition).decode() if pin.definition is not None else None, pin.changed_at,
            int(pin.reported), route, tool)

    def __len__(self) -> int:
        with self._transaction() as run:
            return int(run("SELECT count(*) FROM hoop_pins")[0][0])

    def observe(self, route: str, tool: dict[str, Any]) -> Change | None:
        """As `PinStore.observe`, over every process's pins. Raises `PinError`
        (`pins_full`, `state_unavailable`)."""
        name, now, seen = tool["name"], self._clock(), fingerprint(tool)
        with self._transaction() as run:
            pin = self._pin(run, route, name, lock=True)
            if pin is None:
                if int(run("SELECT count(*) FROM hoop_pins")[0][0]) >= self._max:
                    raise PinError("pins_full", f"more than {self._max} MCP tools are pinned in this gateway's store")
                if run("INSERT INTO hoop_pins (route, tool, fingerprint, pinned_at, reported) VALUES (?, ?, ?, ?, 0) "
                       "ON CONFLICT (route, tool) DO NOTHING RETURNING tool", route, name, seen, now):
                    return None
                pin = self._pin(run, route, name, lock=True)  # another process pinned it a moment ago
                assert pin is not None  # rows are only deleted by hand
            change = revise(pin, route, tool, seen, now)
            self._write(run, route, name, pin)
            return change

    def reported(self, change: Change) -> None:
        """As `PinStore.reported`. Raises `PinError` (`state_unavailable`)."""
        with self._transaction() as run:
            run("UPDATE hoop_pins SET reported = 1 WHERE route = ? AND tool = ? AND changed = ?",
                change.route, change.tool, change.new)

    def held(self, route: str, tool: str) -> bool:
        """As `PinStore.held`. Raises `PinError` (`state_unavailable`)."""
        with self._transaction() as run:
            pin = self._pin(run, route, tool)
        return pin is not None and pin.changed is not None

    def acceptable(self, route: str, tool: str, new: str) -> str:
        """As `PinStore.acceptable`. Raises `PinError`."""
        with self._transaction() as run:
            return acceptable_pin(self._pin(run, route, tool), route, tool, new)

    def accept(self, route: str, tool: str, new: str) -> tuple[str, str]:
        """As `PinStore.accept`, checked and written in one transaction. Raises `PinError`."""
        with self._transaction() as run:
            old = acceptable_pin(self._pin(run, route, tool, lock=True), route, tool, new)
            self._write(run, route, tool, Pin(new, self._clock()))
        return old, new

    def pending(self) -> list[dict[str, Any]]:
        """As `PinStore.pending`, of every process. Raises `PinError` (`state_unavailable`)."""
        with self._transaction() as run:
            rows = run("SELECT route, tool, fingerprint, changed, changed_at, definition FROM hoop_pins "
                       "WHERE changed IS NOT NULL ORDER BY route, tool")
        return [{"route": route, "tool": tool, "pinned": pinned, "changed": changed, "changed_at": changed_at,
                 "definition": orjson.loads(definition)} for route, tool, pinned, changed, changed_at, definition in rows]
