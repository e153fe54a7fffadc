"""Tool definition pinning: a fingerprint of each tool an MCP server lists, the first
time it is listed, so that a later change of its definition (a "rug pull": the same
tool name, a new description or input schema) is caught (pure: no mitmproxy).

A fingerprint is the SHA-256 (FIPS 180-4) of the tool's canonical JSON: the object
`{"description", "inputSchema", "name"}` (an absent member as null) serialized with
sorted member names, no whitespace, UTF-8 (orjson `OPT_SORT_KEYS`), as lower-case hex.
Pins are kept per server (the route) and tool name: `PinStore` in this process's
memory (a restart pins afresh), or with a shared state store `hoop_addon.state.pins`,
which applies the same rules (`revise`, `acceptable_pin`) to rows every gateway
process sees: a rug pull one process saw is held on all, an acceptance through one
control API holds on all.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_PINS = 65_536
"""Most tools pinned in one process (all routes together): a server listing more
cannot be pinned, and its listing is withheld (fail closed)."""


class PinError(ValueError):
    """A pin that cannot be kept or accepted: `code` (a reason code for metrics and the
    control API: `pins_full`, `no_change`, `stale_fingerprint`; `state_unavailable`
    when a shared store fails) and a sentence."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def fingerprint(tool: dict[str, Any]) -> str:
    """The SHA-256 hex fingerprint of a `tools/list` entry `tool` (a dict with a string
    `name`): of its name, description and input schema only (a title or annotations
    may change freely). Raises `TypeError` for a value orjson cannot serialize
    (JSON-parsed input always can)."""
    canonical = {"name": tool.get("name"), "description": tool.get("description"), "inputSchema": tool.get("inputSchema")}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(slots=True)
class Pin:
    """The pinned fingerprint of one tool of one server, when it was first seen
    (`pinned_at`, Unix seconds), and a changed definition awaiting acceptance: its
    fingerprint (`changed`), the definition itself (`definition`: shown to the people
    who may accept it, never audited), when it was first seen (`changed_at`) and
    whether it was reported (`reported`)."""

    fingerprint: str
    pinned_at: float
    changed: str | None = None
    definition: dict[str, Any] | None = field(default=None, repr=False)
    changed_at: float | None = None
    reported: bool = False  # the change is audited: later listings of it are not `first`


def revise(pin: Pin, route: str, tool: dict[str, Any], seen: str, now: float) -> Change | None:
    """Apply a listing of `tool` (fingerprint `seen`, at `now`) to its existing `pin`
    (mutated): equal to the pin clears a pending change (None); a different one is
    the pending change (a new one unreported) and is returned as a `Change`."""
    if seen == pin.fingerprint:
        pin.changed = pin.definition = pin.changed_at = None
        pin.reported = False
        return None
    if seen != pin.changed:
        pin.changed, pin.definition, pin.changed_at, pin.reported = seen, tool, now, False
    return Change(route, tool["name"], pin.fingerprint, seen, not pin.reported)


def acceptable_pin(pin: Pin | None, route: str, tool: str, new: str) -> str:
    """The fingerprint of `pin` (tool `tool` of `route`) that accepting `new` would
    replace. Raises `PinError` `no_change` (nothing awaits acceptance) or
    `stale_fingerprint` (the pending definition is another one)."""
    if pin is None or pin.changed is None:
        raise PinError("no_change", f"no changed definition of tool '{tool}' on route '{route}' awaits acceptance")
    if pin.changed != new:
        raise PinError("stale_fingerprint", f"the pending definition of tool '{tool}' is {pin.changed}, not {new}")
    return pin.fingerprint


@dataclass(frozen=True, slots=True)
class Change:
    """A tool whose listed definition differs from its pin: `first` when this change
    is not reported yet (`PinStore.reported`: then it is audited and alerted; later
    listings of the same change are not)."""

    route: str
    tool: str
    old: str
    new: str
    first: bool


class PinStore:
    """Pins by (route name, tool name). `observe` records a listing, `reported` notes
    a change audited, `held` says whether a tool's changed definition awaits
    acceptance, `accept` makes it the pin."""

    def __init__(self, max_pins: int = MAX_PINS, clock=time.time) -> None:
        self._pins: dict[tuple[str, str], Pin] = {}
        self._max, self._clock = max_pins, clock

    def __len__(self) -> int:
        return len(self._pins)

    def observe(self, route: str, tool: dict[str, Any]) -> Change | None:
        """Record that server `route` lists `tool` (a dict with a string `name`): pin it
        if it is new; a definition equal to the pin clears a pending change (the server
        went back); a different one is a `Change`, also returned for a change already
        pending (`first` False once reported, True again when it changed yet again). Raises
        `PinError` (`pins_full`) when a new tool cannot be pinned."""
        key, now = (route, tool["name"]), self._clock()
        seen = fingerprint(tool)
        pin = self._pins.get(key)
        if pin is None:
            if len(self._pins) >= self._max:
                raise PinError("pins_full", f"more than {self._max} MCP tools are pinned in this gateway process")
            self._pins[key] = Pin(seen, now)
            return None
        return revise(pin, route, tool, seen, now)

    def reported(self, change: Change) -> None:
        """Note that `change` was audited: until the tool changes again, later listings
        of it are not `first`. (A change whose audit failed stays unreported, and held.)"""
        pin = self._pins.get((change.route, change.tool))
        if pin is not None and pin.changed == change.new:
            pin.reported = True

    def held(self, route: str, tool: str) -> bool:
        """True when tool `tool` of `route` has a changed definition not yet accepted."""
        pin = self._pins.get((route, tool))
        return pin is not None and pin.changed is not None

    def acceptable(self, route: str, tool: str, new: str) -> str:
        """The pinned fingerprint that accepting `new` for `tool` on `route` would
        replace. Raises `PinError`: `no_change` when nothing awaits acceptance,
        `stale_fingerprint` when the pending definition is another one (it changed
        again since the reviewer saw `new`)."""
        return acceptable_pin(self._pins.get((route, tool)), route, tool, new)

    def accept(self, route: str, tool: str, new: str) -> tuple[str, str]:
        """Make the pending definition of `tool` on `route`, whose fingerprint must be
        `new` (what the reviewer saw), its pin. Returns (old, new) fingerprints. Raises
        `PinError` as `acceptable` does."""
        old = self.acceptable(route, tool, new)
        self._pins[(route, tool)] = Pin(new, self._clock())
        return old, new

    def pending(self) -> list[dict[str, Any]]:
        """The changes awaiting acceptance, as JSON-safe records: `route`, `tool`,
        `pinned` and `changed` fingerprints, `changed_at` (Unix seconds), `definition`
        (the new tool object as the server listed it)."""
        return [
            {"route": route, "tool": tool, "pinned": pin.fingerprint, "changed": pin.changed, "changed_at": pin.changed_at,
             "definition": pin.definition}
            for (route, tool), pin in sorted(self._pins.items()) if pin.changed is not None
        ]
