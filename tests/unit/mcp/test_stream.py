"""EventGate: an MCP event stream judged message by message, cut anywhere; AwaitedAnswers."""

from __future__ import annotations

import random

import orjson
import pytest

from hoop_addon.mcp.jsonrpc import JsonRpcError, Message
from hoop_addon.mcp.stream import AwaitedAnswers, EventGate


def deny_sampling(seen: list[Message]):
    def judge(message: Message) -> str | None:
        seen.append(message)
        return "withheld sampling/createMessage" if message.method == "sampling/createMessage" else None
    return judge


def event(doc: dict, end: str = "\n", eid: str | None = None) -> str:
    head = f"id: {eid}{end}" if eid else ""
    return f"{head}event: message{end}data: {orjson.dumps(doc).decode()}{end}{end}"


LOG = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hello"}}
SAMPLE = {"jsonrpc": "2.0", "id": 7, "method": "sampling/createMessage", "params": {"messages": [], "maxTokens": 5}}


def feed_cut(gate: EventGate, data: bytes, rng: random.Random) -> bytes:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(1, 9)
        out.append(gate.feed(data[i:i + n]))
        i += n
    out.append(gate.feed(b"", final=True))
    return b"".join(out)


def test_allowed_events_pass_byte_for_byte_and_a_denied_one_becomes_a_comment() -> None:
    seen: list[Message] = []
    stream = ": ping\n\n" + event(LOG, eid="1") + event(SAMPLE, "\r\n") + "retry: 5\n\n" + event(LOG, "\r")
    out = EventGate(deny_sampling(seen)).feed(stream.encode(), final=True).decode()
    assert out == ": ping\n\n" + event(LOG, eid="1") + ": hoop: withheld sampling/createMessage\n\n" + "retry: 5\n\n" + event(LOG, "\r")
    assert [m.method for m in seen] == ["notifications/message", "sampling/createMessage", "notifications/message"]


def test_seeded_streams_cut_anywhere_give_what_the_whole_stream_gives() -> None:
    """200 seeded streams of 1..12 events (LF, CRLF or CR line ends, multi-line data,
    comments, ids, a leading BOM, non-ASCII text), each fed whole and cut into chunks
    of 1..9 bytes: the same output, every message judged once, every denied one gone."""
    rng = random.Random(19)
    judged = withheld = 0
    for _ in range(200):
        parts, denied = [], 0
        for _ in range(rng.randint(1, 12)):
            end = rng.choice(["\n", "\r\n", "\r"])
            kind = rng.random()
            if kind < 0.2:
                parts.append(f": keep-alive é{end}{end}")
                continue
            doc = SAMPLE if kind < 0.4 else {**LOG, "params": {"level": "info", "data": "naïve ✓ " * rng.randint(0, 4)}}
            denied += doc is SAMPLE
            if rng.random() < 0.3:  # the message spread over several data lines
                text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode().split("\n")
                parts.append("".join(f"data: {ln}{end}" for ln in text) + end)
            else:
                parts.append(event(doc, end, eid=str(rng.randint(1, 99)) if rng.random() < 0.5 else None))
        stream = ("\ufeff" if rng.random() < 0.2 else "") + "".join(parts)
        whole_seen: list[Message] = []
        whole = EventGate(deny_sampling(whole_seen)).feed(stream.encode(), final=True)
        cut_seen: list[Message] = []
        cut = feed_cut(EventGate(deny_sampling(cut_seen)), stream.encode(), rng)
        assert cut == whole
        assert [m.raw for m in cut_seen] == [m.raw for m in whole_seen]
        assert b"sampling/createMessage\"" not in cut and cut.count(b": hoop: withheld") == denied
        judged += len(cut_seen)
        withheld += denied
    assert judged > 800 and withheld > 150  # coverage of the generator


@pytest.mark.parametrize("data", [
    b"data: {not json}\n\n",
    b'data: {"jsonrpc": "2.0", "method": "a", "method": "b"}\n\n',  # a repeated member: the client reads the last
    b'data: {"jsonrpc": "1.0", "method": "notifications/message"}\n\n',
    b'data: [{"jsonrpc": "2.0", "method": "notifications/message"}]\n\n',
    b'data: {"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}\n\n',
    b"data: \xff\xfe\n\n",
])
def test_an_event_that_is_not_one_valid_message_raises_and_nothing_of_it_goes_on(data: bytes) -> None:
    gate = EventGate(lambda m: None)
    assert gate.feed(event(LOG).encode()) == event(LOG).encode()
    with pytest.raises(JsonRpcError):
        gate.feed(data, final=True)


def test_an_unended_last_event_is_judged_too_and_a_huge_event_is_refused() -> None:
    seen: list[Message] = []
    gate = EventGate(deny_sampling(seen))
    assert gate.feed(f"data: {orjson.dumps(SAMPLE).decode()}".encode()) == b""
    assert gate.feed(b"", final=True) == b": hoop: withheld sampling/createMessage\n\n"
    with pytest.raises(JsonRpcError, match="longer than 64"):
        EventGate(lambda m: None, max_event=64).feed(b"data: " + b"x" * 100)


def test_answers_are_accepted_once_for_ids_given_and_typed() -> None:
    awaited = AwaitedAnswers(per_key=2)
    awaited.expect("s", 1)
    assert not awaited.awaits("s", "1") and not awaited.awaits("s", 1.5) and not awaited.awaits("other", 1)
    assert awaited.awaits("s", 1)
    awaited.answered("s", 1)
    assert not awaited.awaits("s", 1)
    for mid in (1, 2, 3):
        awaited.expect("s", mid)
    assert not awaited.awaits("s", 1) and awaited.awaits("s", 3)  # the oldest forgotten past per_key
    awaited.forget("s")
    assert not awaited.awaits("s", 2)
