"""Masking a server-sent event stream (WHATWG HTML §9.2) or an NDJSON stream as it
passes, chunk by chunk.

LLM APIs stream a reply as many events, each carrying a piece of text at the same
place (`$.choices[0].delta.content`, Anthropic's `$.delta.text`, tool-call
`arguments`...). A value can be split across events and an event across network
chunks, so `EventStreamMasker.feed` takes arbitrary byte chunks, keeps the incomplete
event, and for each "streamed" location (a rule's JSONPath selection, or one of the
known delta fields) keeps only the tail of the text that could still be the beginning
of a value: the trailing run of characters that can occur inside one (for digit
groups, the whole group run; for a PEM key, from its BEGIN line). Everything before it
is masked and sent at once; the tail goes out, masked, with the next piece. Events that
carry no text (pings, usage or role-only chunks) pass while the tail stays held; if an
event carries text elsewhere, or ends the text (`finish_reason`, `content_block_stop`,
...), or the stream ends, the tail is sent first in an extra event built from the last
one that had it. So time to first token is not held back by a window, and
nothing is buffered beyond the current word. The held text is read as its reader
reads it (JSON escapes in tool-call arguments decoded, see `normalize`), a PEM key is
held until its whole END line, and the last characters sent stay in view for a
keyword-gated detector (`aws_secret_access_key`) whose keyword went out earlier.

NDJSON streams (`application/x-ndjson`: Ollama's `/api/chat` and `/api/generate`)
are masked the same way with `framing="ndjson"`: each line is one event's data.

Tokens of the `tokenize` operator (`<EMAIL_1>`) in the stream are restored for the
session, split or not; `recorded` then keeps the masked, unrestored bytes, which is
what the recording must hold.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from hoop_addon.masking.engine import (
    Evidence, Leaf, Location, MaskContext, MaskError, combined, evidence_path, leaves, mask_text, operate, selected,
)
from hoop_addon.masking.normalize import partial_escape, view
from hoop_addon.masking.vault import TokenSession
from hoop_addon.policy.model import MaskRule

MAX_HOLD = 8 * 1024
"""Most characters held back at one location; beyond, the older part is sent."""
MAX_EVENT = 8 * 1024 * 1024
"""Largest single event accepted (an event is only parsed once complete)."""

# Fixed, linear patterns of our own (RE2 is for policy-written ones): stdlib `re` is
# faster on short Python strings.
# A line end is CRLF, LF or CR (WHATWG §9.2.5); a CR before a LF is not a line end of its own.
_TERMINATOR = re.compile(r"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
# Characters that never occur inside a detected value: a held tail starts after them.
_SEPARATORS = frozenset(" \t\r\n\"',;[]{}\\|")
# Digit groups (cards, phones, IBANs) span spaces and punctuation.
_GROUPED = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ +().-/")
_PEM = "-----BEGIN "
_PEM_END = re.compile(r"-----END [A-Z0-9 ]*PRIVATE KEY-----")


def is_delta(location: Location) -> bool:
    """True for the text fields LLM APIs stream in pieces: OpenAI chat
    `choices[i].delta.content` / `.refusal` / `.tool_calls[j].function.arguments`,
    OpenAI completions `choices[i].text`, OpenAI Responses `delta`, Anthropic
    `delta.text` / `delta.partial_json` / `delta.thinking`, Gemini
    `candidates[i].content.parts[j].text`, Ollama `message.content` / `.thinking`
    (chat) and `response` / `thinking` (generate)."""
    n = len(location)
    return (
        location in _TOP_DELTAS
        or (n == 2 and location[0] == "message" and location[1] in ("content", "thinking"))
        or (n == 2 and location[0] == "delta" and location[1] in ("text", "partial_json", "thinking"))
        or (n == 3 and location[0] == "choices" and location[2] == "text")
        or (n == 4 and location[0] == "choices" and location[2] == "delta" and location[3] in ("content", "refusal"))
        or (n == 6 and location[0] == "candidates" and location[2:4] == ("content", "parts") and location[5] == "text")
        or (
            n == 7
            and location[0] == "choices"
            and location[2:4] == ("delta", "tool_calls")
            and location[5:] == ("function", "arguments")
        )
    )


_EVENT_FIELDS = frozenset({
    "type", "object", "role", "id", "item_id", "call_id", "responseId", "model", "modelVersion", "name", "status",
    "finish_reason", "finishReason", "stop_reason", "stop_sequence", "done_reason", "system_fingerprint",
    "service_tier", "created_at", "event", "jsonrpc", "method",
})
"""Member names of the strings that name or type a stream's event or its parts (OpenAI
chat and Responses, Anthropic, Gemini, Ollama, JSON-RPC): whole in each event, never
pieces of a text running across events."""


def _names_event(location: Location) -> bool:
    """Whether the string at `location` names or types its event (`_EVENT_FIELDS`)."""
    return bool(location) and location[-1] in _EVENT_FIELDS


def safe_cut(text: str, hold: int = 0) -> int:
    """Where `text` (a stream's pending text) may be cut: everything before the
    offset cannot be part of a value that continues in the next piece. `hold` is the
    longest value (`Detector.max_length`) that may span separators: its length minus
    one is always held."""
    i = max(len(text) - max(hold - 1, 0), 0)
    while i > 0 and text[i - 1] not in _SEPARATORS:
        i -= 1
    j = i
    while j > 0 and text[j - 1] in _GROUPED:
        j -= 1
    if any(c.isalnum() for c in text[j:i]):
        i = j
    if (pem := text.rfind(_PEM)) >= 0 and not _PEM_END.search(text, pem):  # held until its whole END line
        i = min(i, pem)
    return max(i, len(text) - MAX_HOLD)


_TOP_DELTAS = frozenset({("delta",), ("response",), ("thinking",)})


def _cut(pending: str, hold: int) -> int:
    """`safe_cut` of a stream's pending text as its reader reads it (`normalize.view`:
    escaped JSON in tool-call arguments, NBSP between digit groups), never inside an
    escape sequence cut short at the end."""
    if (partial := partial_escape(pending)) is not None:  # read without it: its backslash is no separator
        return min(_cut(pending[:partial], hold), partial)
    read = view(pending)
    if read is None:
        return safe_cut(pending, hold)
    shown, starts, _ = read
    c = safe_cut(shown, hold)
    return starts[c] if c < len(shown) else len(pending)


@dataclass
class _Stream:
    """One streamed location: the text held back and the last event that carried it."""

    held: str = ""
    rules: list[MaskRule] = field(default_factory=list)
    hold: int = 0  # the longest max_length of the rules' detectors
    window: int = 0  # the longest keyword window of the rules' detectors
    before: str = ""  # the last `window` characters sent: a keyword the held text's value needs
    template: tuple[list[str], str, Any] | None = None  # (other lines, line ending, masked data)


@dataclass
class _Event:
    lines: list[str]  # non-data lines, with their endings
    eol: str
    doc: Any = None  # parsed JSON data, or None for text data
    text: str | None = None
    streamed: dict[Location, list[MaskRule]] = field(default_factory=dict)


class EventStreamMasker:
    """Masks a `text/event-stream` body (`framing="sse"`) or an NDJSON stream
    (`framing="ndjson"`, one JSON document a line) fed in arbitrary chunks.

    `rules` apply with `context` (operators); `evidence` collects what was masked;
    `restore` is the session whose tokens are put back (None: no restoring); with
    `record`, `recorded` accumulates the masked, unrestored output. `feed(chunk)`
    returns the bytes to send now (UTF-8, identity-encoded); `feed(chunk, final=True)`
    ends the stream and returns the rest. Raises `MaskError` when an event cannot be
    inspected (not UTF-8, JSON expected but not found, an event over `MAX_EVENT`).
    """

    def __init__(
        self,
        rules: Sequence[MaskRule],
        context: MaskContext,
        evidence: Evidence,
        restore: TokenSession | None = None,
        record: bool = False,
        framing: str = "sse",
    ) -> None:
        if framing not in ("sse", "ndjson"):
            raise ValueError(f"unknown stream framing {framing!r}")
        self.framing = framing
        self.rules = [r for r in rules if r.body]
        self._whole = [r for r in self.rules if not r.paths]
        self.context, self.evidence, self.restore = context, evidence, restore
        self.recorded: bytearray | None = bytearray() if record else None
        self.restored = 0
        self.masked = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._buffer = ""
        self._started = False
        self._streams: dict[Location, _Stream] = {}

    def feed(self, chunk: bytes, final: bool = False) -> bytes:
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError:
            raise MaskError("body is not UTF-8 text") from None
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")  # WHATWG: clients ignore it, so must the masker's line parser
        self._buffer += text
        out: list[str] = []
        recorded: list[str] = []
        pos = 0
        if self.framing == "ndjson":
            while (end := self._buffer.find("\n", pos)) >= 0:
                self._line(self._buffer[pos : end + 1], out, recorded)
                pos = end + 1
            if final and pos < len(self._buffer):  # a last line without its newline: given one
                self._line(self._buffer[pos:] + "\n", out, recorded)
                pos = len(self._buffer)
        while self.framing == "sse" and (m := _TERMINATOR.search(self._buffer, pos)):
            if m.end() == len(self._buffer) and self._buffer[-1] == "\r" and not final:
                break  # a CR that a LF may follow in the next chunk
            self._event(self._buffer[pos : m.end()], out, recorded)
            pos = m.end()
        self._buffer = self._buffer[pos:]
        if final:
            if self._buffer:
                self._event(self._buffer, out, recorded)
                self._buffer = ""
            self._flush(set(), out, recorded)
        elif len(self._buffer) > MAX_EVENT:
            raise MaskError(f"an event exceeds {MAX_EVENT} bytes")
        if self.recorded is not None:
            self.recorded += "".join(recorded).encode()
        return "".join(out).encode()

    def _line(self, raw: str, out: list[str], recorded: list[str]) -> None:
        """One NDJSON line (with its line end): a JSON document, masked like an event's data."""
        text = raw.rstrip("\r\n")
        if not text.strip():
            _unchanged(raw, out, recorded)
            return
        event = _Event([], raw[len(text) :])
        try:
            event.doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            if all(r.shadow for r in self.rules):
                _unchanged(raw, out, recorded)
                return
            raise MaskError("an NDJSON line is not valid JSON") from None
        if not self._mask_event(event, out, recorded):
            _unchanged(raw, out, recorded)

    def _event(self, raw: str, out: list[str], recorded: list[str]) -> None:
        lines = _LINE.findall(raw)
        data = [ln for ln in lines if ln.startswith("data:") or ln.rstrip("\r\n") == "data"]
        if self._whole and len(data) < len(lines):  # comments, `event:`, `id:` lines: text too
            lines = [ln if ln in data else self._mask_line(ln) for ln in lines]
            raw = "".join(lines)
        if not data:
            _unchanged(raw, out, recorded)
            return
        value = "\n".join(_field(ln) for ln in data)
        eol = data[0][len(data[0].rstrip("\r\n")) :] or "\n"
        event = _Event([ln for ln in lines if ln not in data], eol)
        if not value.strip() or value == "[DONE]":
            self._flush(set(), out, recorded)
            _unchanged(raw, out, recorded)
            return
        # Only enforcing rules decide what passes: what shadow rules cannot inspect goes on.
        if value.lstrip()[:1] in ("{", "["):
            try:
                event.doc = orjson.loads(value)
            except orjson.JSONDecodeError:
                if all(r.shadow for r in self.rules):
                    _unchanged(raw, out, recorded)
                    return
                raise MaskError("an event's data is not valid JSON") from None
        else:
            for rule in self.rules:
                if rule.paths and not rule.shadow:
                    raise MaskError(f"rule '{rule.name}' selects JSON paths but an event's data is not JSON")
            event.text = value
        changed = self._mask_event(event, out, recorded)
        if not changed:
            _unchanged(raw, out, recorded)

    def _mask_line(self, line: str) -> str:
        """A line other than `data:` (a comment, `event:`, `id:`), masked by the rules
        without paths: clients hand `event` and `id` to the application."""
        text = line.rstrip("\r\n")
        masked = mask_text(text, self._whole, self.context, self.evidence, "event field")
        if masked is text:
            return line
        self.masked += 1
        return masked + line[len(text) :]

    def _mask_event(self, event: _Event, out: list[str], recorded: list[str]) -> bool:
        """Mask one event's data; append it (and any flushed tails) to the outputs.
        Returns False when the event is unchanged and the caller sends it as is."""
        changed = False
        box = [event.doc if event.text is None else event.text]
        # Which strings are streamed (pieces of one text) and which rules look at them.
        if event.text is not None:
            event.streamed[("data",)] = [r for r in self.rules if not r.paths]  # shadow rules with paths: not JSON
            parents = {("data",): (box, 0)}
        else:
            parents = {}
            selections: dict[tuple[str, ...], tuple[list[Leaf], frozenset[Location]]] = {}  # rules often share paths
            whole: dict[Location, tuple[Any, str | int, list[MaskRule]]] = {}  # masked at once, not streamed
            for rule in self.rules:
                selection = tuple(p for p, _ in rule.paths)
                if (found := selections.get(selection)) is None:
                    found = selections[selection] = selected(box[0], rule)
                found_leaves, named = found
                for location, parent, key in found_leaves:
                    # A string is one text across events (a value split between two
                    # events is caught) unless it names or types its event (`type`,
                    # `role`, `id`...) and no path names it: those are masked in their
                    # own event, never held and joined into a later one.
                    if isinstance(parent[key], str) and (
                        (rule.paths and location in named) or not _names_event(location)  # a delta names no event
                    ):
                        event.streamed.setdefault(location, []).append(rule)
                        parents[location] = (parent, key)
                    else:
                        whole.setdefault(location, (parent, key, []))[2].append(rule)
            for location, (parent, key, rules) in whole.items():
                value = parent[key]
                text = value if isinstance(value, str) else str(value)
                masked = mask_text(text, rules, self.context, self.evidence, lambda: evidence_path(location, rules))
                if masked is not text:
                    parent[key] = masked
                    self.masked += 1
                    changed = True
            if self.restore is not None and len(self.restore):
                for location, parent, key in leaves(box[0], _ALL, numbers=False):
                    if location not in parents and is_delta(location):
                        event.streamed[location] = []
                        parents[location] = (parent, key)
        # Tails held at locations this event does not continue go out first, if it carries
        # text elsewhere or ends the text; across a ping, a usage or role-only chunk they
        # stay held: the value they may begin can continue in the next piece.
        ends = _ends_text(box[0])
        if event.streamed or ends:
            self._flush(set(event.streamed), out, recorded)
        for location, rules in event.streamed.items():
            parent, key = parents[location]
            piece = parent[key]
            stream = self._streams.setdefault(location, _Stream())
            if stream.rules != rules:
                stream.rules = rules
                stream.hold = max((d.max_length or 0 for r in rules for d in r.detectors), default=0)
                stream.window = max((d.window for r in rules for d in r.detectors if d.keywords), default=0)
            emitted = self._advance(stream, location, piece, final=ends)  # the last piece holds nothing back
            if emitted != piece:
                changed = True
            parent[key] = emitted
        if not changed and not self._restorable(box[0]):
            self._remember(event, box[0])
            return False
        data_recorded = self._serialize(event, box[0])
        self._remember(event, box[0])
        restored = self._restore_doc(box[0])
        recorded.append(data_recorded)
        out.append(self._serialize(event, restored) if restored is not None else data_recorded)
        return True

    def _advance(self, stream: _Stream, location: Location, piece: str, final: bool) -> str:
        """Append `piece` to the location's held text; return the masked part that
        may go out now, keep the rest held."""
        pending = stream.held + piece
        scanner, owner = combined(stream.rules)
        spans = []
        if scanner:  # what was sent before is read too: a keyword-gated value's keyword may be there
            before = len(stream.before)
            spans = [(s - before, e - before, d) for s, e, d in scanner.spans(stream.before + pending) if s >= before]
            self.context.charge()
        cut = len(pending) if final else _cut(pending, stream.hold)
        for s, e, _ in spans:
            if s < cut < e:
                cut = s
                break
        parts, pos = [], 0
        for s, e, detector in spans:
            if e > cut:
                break
            rule = owner[detector]
            parts += (pending[pos:s], operate(self.context.replacer(rule), pending[s:e], detector))
            pos = e
            self.evidence.add(rule, {detector.name: 1}, evidence_path(location, stream.rules) if location != ("data",) else "data")
            if not rule.shadow:  # a shadow rule's match is evidence, not a masked value
                self.masked += 1
        parts.append(pending[pos:cut])
        stream.held = pending[cut:]
        if stream.window:
            stream.before = (stream.before + pending[:cut])[-stream.window :]
        return "".join(parts)

    def _flush(self, continuing: set[Location], out: list[str], recorded: list[str]) -> None:
        """Send, in an extra event copied from the last one that had it, the held
        tail of every location not in `continuing`."""
        for location, stream in self._streams.items():
            if location in continuing or not stream.held or stream.template is None:
                continue
            lines, eol, data = stream.template
            text = self._advance(stream, location, "", final=True)
            if location == ("data",):
                doc: Any = text
            else:
                doc = orjson.loads(orjson.dumps(data))  # a copy: the template may serve again
                _blank(doc, set(self._streams))
                _set(doc, location, text)
            event = _Event(lines, eol)
            recorded.append(self._serialize(event, doc))
            restored = self._restore_doc(doc)
            out.append(self._serialize(event, restored) if restored is not None else recorded[-1])

    def _remember(self, event: _Event, doc: Any) -> None:
        """Keep this event as the template of its streamed locations' extra events."""
        if not event.streamed:
            return
        lines = [ln for ln in event.lines if not ln.startswith("id:") and ln.strip()]
        for location in event.streamed:  # the document is not changed after this
            self._streams[location].template = (lines, event.eol, doc)

    def _restorable(self, doc: Any) -> bool:
        return self.restore is not None and len(self.restore) > 0 and "<" in (doc if isinstance(doc, str) else orjson.dumps(doc).decode())

    def _restore_doc(self, doc: Any) -> Any:
        """A copy of `doc` with the session's tokens restored, or None if none were."""
        if self.restore is None or not len(self.restore):
            return None
        if isinstance(doc, str):
            text, n = self.restore.restore(doc)
            self.restored += n
            return text if n else None
        copy = orjson.loads(orjson.dumps(doc))
        total = 0
        for _, parent, key in leaves(copy, _ALL, numbers=False):
            parent[key], n = self.restore.restore(parent[key])
            total += n
        self.restored += total
        return copy if total else None

    def _serialize(self, event: _Event, doc: Any) -> str:
        eol = event.eol
        if self.framing == "ndjson":
            return orjson.dumps(doc).decode() + eol
        if isinstance(doc, str):
            data = "".join(f"data: {line}{eol}" for line in doc.split("\n"))
        else:
            data = f"data: {orjson.dumps(doc).decode()}{eol}"
        lines = [ln for ln in event.lines if ln.strip()]
        return "".join(lines) + data + eol


_ALL = MaskRule("(restore)", frozenset({"response"}), (), ())


_END_TYPES = frozenset({"content_block_stop", "message_delta", "message_stop", "response.completed"})


def _ends_text(doc: Any) -> bool:
    """Whether an event ends the streamed text: a `finish_reason` (OpenAI) or
    `finishReason` (Gemini) in a choice or candidate, or an end event type (Anthropic's
    `content_block_stop`, `message_delta`, `message_stop`; OpenAI Responses' `*.done`,
    `response.completed`), or a JSON-RPC 2.0 message (MCP's streamable HTTP: each event
    is a whole message, which no later event continues; a tail held back would go out
    in an extra event that the client drops as a second answer to the same id; a
    batch of them too)."""
    if isinstance(doc, list):
        return bool(doc) and all(isinstance(d, dict) and d.get("jsonrpc") == "2.0" for d in doc)
    if not isinstance(doc, dict):
        return False
    if doc.get("done") is True or doc.get("jsonrpc") == "2.0":  # Ollama's last line; a JSON-RPC message
        return True
    kind = doc.get("type")
    if isinstance(kind, str) and (kind in _END_TYPES or kind.endswith(".done")):
        return True
    for key, finish in (("choices", "finish_reason"), ("candidates", "finishReason")):
        if isinstance(items := doc.get(key), list) and any(isinstance(i, dict) and i.get(finish) for i in items):
            return True
    return False


def _unchanged(raw: str, out: list[str], recorded: list[str]) -> None:
    """An event or line that goes on as it came: to the client and to the recording."""
    out.append(raw)
    recorded.append(raw)


def _field(line: str) -> str:
    value = line.rstrip("\r\n")[5:]
    return value[1:] if value.startswith(" ") else value


def _set(doc: Any, location: Location, value: str) -> None:
    node = doc
    for step in location[:-1]:
        node = node[step]
    node[location[-1]] = value


def _blank(doc: Any, locations: set[Location]) -> None:
    """Empty the streamed strings of a template, so an extra event repeats no text."""
    for location in locations:
        node = doc
        try:
            for step in location[:-1]:
                node = node[step]
            if isinstance(node[location[-1]], str):
                node[location[-1]] = ""
        except (KeyError, IndexError, TypeError):
            continue
