"""Govern an MCP event stream message by message (pure: no mitmproxy).

The server speaks to the client on event streams (streamable HTTP): the answer stream
of a POST, and the stream a client opens with GET (MCP 2025-11-25, "Listening for
Messages from the Server"). Each event's data is one JSON-RPC message (WHATWG HTML
§9.2 event stream format; batches are gone since revision 2025-06-18): a response, a
server-to-client request (`sampling/createMessage`, `elicitation/create`, ...) or a
notification. `EventGate` reads the stream as it arrives, in chunks cut anywhere, and
passes each event whole or withholds it; one that cannot be read as a message raises,
so that the caller ends the stream (fail closed: no event goes on half-checked).

`AwaitedAnswers` remembers the server's requests the client was given, so that only
answers to those are let through to the server.
"""

from __future__ import annotations

import codecs
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import orjson

from hoop_addon.masking.sse import MAX_EVENT
from hoop_addon.mcp.jsonrpc import PARSE_ERROR, JsonRpcError, Message, parse_message

# An event ends at a blank line; a line ends at CRLF, LF or CR (WHATWG §9.2.5), a CR
# before a LF not being a line end of its own. Our own fixed, linear patterns.
_TERMINATOR = re.compile(r"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_LINE_END = re.compile(r"\r\n|\r|\n")


def event_data(lines: list[str]) -> str | None:
    """The data of an event given as its `lines` (no line ends): its `data` fields'
    values joined with a newline, as a client reads them (one space after the colon
    dropped), or None when the event has no data worth reading (only comments, `id`,
    `retry`, or blank data: a client dispatches nothing it could parse)."""
    data = [ln[5:].removeprefix(" ") for ln in lines if ln.startswith("data:") or ln == "data"]
    joined = "\n".join(data)
    return joined if data and joined.strip() else None


class EventGate:
    """Reads an event stream (UTF-8 bytes, content-decoded, fed in chunks of any size)
    and lets each event through whole once `judge` has seen its message.

    `judge(message)` gets each event's data parsed strictly as one JSON-RPC message
    (`parse_message`: repeated member names, odd ids, a batch refused) and returns
    None to pass the event as it came (byte for byte), or a short text: the event is
    then withheld, replaced by the SSE comment `: hoop: <text>` (which clients ignore).
    Events without data pass. `judge` may raise to end the stream.

    `feed(chunk, final)` returns the bytes to send on; it raises `JsonRpcError`
    (-32700) for a stream that is not UTF-8, an event larger than `max_event`
    characters, or an event whose data is not one valid JSON-RPC message (-32600),
    after which the caller ends the stream: nothing of that event is returned. A
    leading byte-order mark is dropped (clients drop it too)."""

    def __init__(self, judge: Callable[[Message], str | None], max_event: int = MAX_EVENT) -> None:
        self.judge, self.max_event = judge, max_event
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._pending = ""
        self._scanned = 0  # where the search for the next terminator resumes
        self._started = False
        self.events = 0  # events with a message judged
        self.withheld = 0

    def feed(self, chunk: bytes, final: bool = False) -> bytes:
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError:
            raise JsonRpcError(PARSE_ERROR, "the event stream is not UTF-8") from None
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        pending = self._pending + text
        out: list[str] = []
        start = 0  # of the current event; sliced once, not per event (a buffered body holds many)
        while (end := _TERMINATOR.search(pending, max(start, self._scanned))) is not None:
            if not final and end.end() == len(pending) and pending.endswith("\r"):
                break  # the CR may be the first half of a CRLF still to come: one terminator, not two
            out.append(self._event(pending[start:end.end()], pending[start:end.start()]))
            start = end.end()
        self._pending = pending[start:]
        if len(self._pending) > self.max_event:
            raise JsonRpcError(PARSE_ERROR, f"an event of the stream is longer than {self.max_event} characters")
        # a line end may still grow (CR, then LF): resume the search just before it
        self._scanned = max(0, len(self._pending) - 2)
        if final and self._pending:
            out.append(self._event(self._pending, self._pending))
            self._pending = ""
        return "".join(out).encode()

    def _event(self, raw: str, body: str) -> str:
        """What goes on for the event `raw` (with its terminator; `body` without)."""
        data = event_data([ln for ln in _LINE_END.split(body) if ln])
        if data is None:
            return raw
        message = parse_message(data.encode())
        self.events += 1
        if (why := self.judge(message)) is None:
            return raw
        self.withheld += 1
        return ": hoop: " + _LINE_END.sub(" ", why) + "\n\n"


def id_key(mid: Any) -> str:
    """A JSON-RPC id as a key that keeps its JSON type (1, 1.0 and "1" differ)."""
    return orjson.dumps(mid).decode()


class AwaitedAnswers:
    """The ids of the server's requests given to a client, per conversation (`key`:
    route, identity and MCP session), so that the client's answers are accepted only
    for those, once each. At most `per_key` ids are kept per conversation and
    `keys` conversations (the oldest forgotten first: its answers are then refused,
    fail closed). In this process's memory."""

    def __init__(self, per_key: int = 1024, keys: int = 10_000) -> None:
        self.per_key, self.keys = per_key, keys
        self._ids: OrderedDict[Hashable, OrderedDict[str, None]] = OrderedDict()

    def expect(self, key: Hashable, mid: Any) -> None:
        """Remember that the client was given the server's request `mid` in `key`."""
        ids = self._ids.setdefault(key, OrderedDict())
        self._ids.move_to_end(key)
        ids[id_key(mid)] = None
        while len(ids) > self.per_key:
            ids.popitem(last=False)
        while len(self._ids) > self.keys:
            self._ids.popitem(last=False)

    def awaits(self, key: Hashable, mid: Any) -> bool:
        """True when `mid` is a request of the server the client was given in `key` and
        has not answered yet."""
        return id_key(mid) in self._ids.get(key, ())

    def answered(self, key: Hashable, mid: Any) -> None:
        """The client's answer to `mid` in `key` went to the server: no second one."""
        if (ids := self._ids.get(key)) is not None:
            ids.pop(id_key(mid), None)

    def forget(self, key: Hashable) -> None:
        """The conversation `key` ended (its session was deleted)."""
        self._ids.pop(key, None)
