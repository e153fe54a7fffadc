"""The masking engine: find what detectors match and replace it, in any body shape.

Pure functions over bytes and parsed JSON; no mitmproxy. All detectors of a rule are
compiled into one RE2 alternation, so a text is scanned once whatever the number of
detectors, in linear time; validators (Luhn, ...) run only on candidate matches.

JSON bodies are parsed with orjson; rules with RFC 9535 JSONPath `paths` mask the
strings (and numbers) under the selected nodes, rules without paths mask every string.
`text/event-stream` bodies (LLM streaming) are masked event by event: each `data:` line
is a JSON document or text. Anything a rule cannot inspect raises `MaskError`, and the
caller refuses the flow: nothing is forwarded unmasked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import re2

from hoop_addon.detectors import Detector
from hoop_addon.policy.model import MaskRule

MAX_EVIDENCE_PATHS = 20


class MaskError(Exception):
    """A body could not be inspected as the policy requires (message says why;
    it never contains body content)."""


class Scanner:
    """One combined RE2 scan over a fixed set of detectors."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        self.detectors = {f"d{i}": d for i, d in enumerate(detectors)}
        self.regex = re2.compile("|".join(f"(?P<{g}>{d.pattern})" for g, d in self.detectors.items()))
        self._single: dict[str, Any] = {}  # group -> that detector alone, compiled on demand

    def spans(self, text: str) -> list[tuple[int, int, Detector]]:
        """The validated matches in `text`: (start, end, detector), in order, disjoint.
        Offsets are in characters."""
        found = []
        for m in self.regex.finditer(text):
            detector = self.detectors[m.lastgroup]
            if detector.validator is None or detector.validator(m.group()):
                found.append((m.start(), m.end(), detector))
            elif inner := self._inner(m.lastgroup, text, m.start(), m.end()):
                found.append(inner)
        return found

    def _inner(self, failed: str, text: str, start: int, end: int) -> tuple[int, int, Detector] | None:
        """The longest validated match of any detector inside a candidate that failed
        validation: a greedy candidate may have swallowed digits around a valid value
        (`4111 1111 1111 1111 12`), or be another detector's value (an SSN read as a
        too-short card). Tries spans between word boundaries only; runs on failures only."""
        cuts = [k for k in range(start, end + 1) if k in (start, end) or _wordchar(text[k - 1]) != _wordchar(text[k])]
        for i, j in sorted(((i, j) for i in cuts for j in cuts if i < j), key=lambda c: c[0] - c[1]):
            value = text[i:j]
            for group, detector in self.detectors.items():
                if group == failed and (i, j) == (start, end):
                    continue
                single = self._single.get(group) or self._single.setdefault(group, re2.compile(detector.pattern))
                if single.fullmatch(value) and (detector.validator is None or detector.validator(value)):
                    return i, j, detector
        return None

    def redact(self, text: str, counts: dict[str, int]) -> str:
        """`text` with every validated match replaced by `[REDACTED:LABEL]`; adds the
        number of replacements per detector name to `counts`."""
        spans = self.spans(text)
        _count(spans, counts)
        return _spread([text], spans)[0] if spans else text


def _wordchar(c: str) -> bool:
    """RE2's `\\w` (ASCII), which its `\\b` is defined by."""
    return c.isascii() and (c.isalnum() or c == "_")


def _count(spans: Iterable[tuple[int, int, Detector]], counts: dict[str, int]) -> None:
    for _, _, detector in spans:
        counts[detector.name] = counts.get(detector.name, 0) + 1


def _spread(pieces: Sequence[str], spans: Sequence[tuple[int, int, Detector]]) -> list[str]:
    """Redact `spans` of the concatenation of `pieces`, keeping the pieces apart: the
    replacement goes into the piece where a match starts, and the matched characters
    are removed from every piece they span (a value split across stream events)."""
    joined = "".join(pieces)
    result = []
    start = 0
    for piece in pieces:
        end = start + len(piece)
        parts, pos = [], start
        for m_start, m_end, detector in spans:
            if m_end <= start or m_start >= end:
                continue
            if m_start >= start:
                parts += (joined[pos:m_start], f"[REDACTED:{detector.label}]")
            pos = min(m_end, end)
        parts.append(joined[pos:end])
        result.append("".join(parts))
        start = end
    return result


_SCANNERS: dict[tuple[Detector, ...], Scanner] = {}


def scanner_for(rule: MaskRule) -> Scanner:
    """The (cached) combined scanner of a rule's detectors."""
    scanner = _SCANNERS.get(rule.detectors)
    if scanner is None:
        scanner = _SCANNERS[rule.detectors] = Scanner(rule.detectors)
    return scanner


class Evidence:
    """What was masked, per rule: counts per detector and where (JSONPath or part),
    never the values. `records()` gives the JSON-safe list for metadata and audit."""

    def __init__(self) -> None:
        self._rules: dict[str, tuple[dict[str, int], list[str]]] = {}

    def add(self, rule: MaskRule, counts: dict[str, int], where: str) -> None:
        if not counts:
            return
        total, paths = self._rules.setdefault(rule.name, ({}, []))
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
        if where not in paths and len(paths) < MAX_EVIDENCE_PATHS:
            paths.append(where)

    def records(self, part: str) -> list[dict[str, Any]]:
        return [
            {"rule": name, "part": part, "operator": "redact", "count": sum(c.values()), "detectors": c, "where": w}
            for name, (c, w) in self._rules.items()
        ]


def mask_body(body: bytes, content_type: str, rules: Sequence[MaskRule], part: str) -> tuple[bytes | None, list[dict[str, Any]]]:
    """Mask a decoded HTTP body.

    `content_type` is the raw header value; `part` is "request" or "response" (for the
    evidence). Returns (the new body, or None when nothing changed; the evidence
    records). Raises `MaskError` when a rule cannot inspect the body: not UTF-8, or
    not JSON although a rule selects JSONPath.
    """
    evidence = Evidence()
    if not body or not rules:
        return None, []
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime == "text/event-stream":
        new = _mask_sse(body, rules, evidence)
    elif mime == "application/json" or mime.endswith("+json") or any(r.paths for r in rules):
        doc, changed = mask_json(_parse_json(body), rules, evidence)
        new = orjson.dumps(doc) if changed else None
    else:
        text = _text(body)
        masked = _mask_text(text, rules, evidence, part)
        new = masked.encode() if masked != text else None
    return new, evidence.records(part)


def mask_json(doc: Any, rules: Iterable[MaskRule], evidence: Evidence) -> tuple[Any, bool]:
    """Mask a parsed JSON document (in place where it is a container).

    Returns (the masked document, whether anything changed): a scalar root is
    replaced, not mutated. Raises `MaskError` on nesting too deep to walk.
    """
    box = [doc]
    changed = False
    for rule in rules:
        scanner = scanner_for(rule)
        for location, parent, key in _leaves(box, rule):
            counts: dict[str, int] = {}
            value = parent[key]
            masked = scanner.redact(value if isinstance(value, str) else str(value), counts)
            if counts:
                parent[key] = masked
                evidence.add(rule, counts, _jsonpath(location))
                changed = True
        changed |= _mask_keys(box, rule, scanner, evidence)
    return box[0], changed


def _mask_keys(box: list[Any], rule: MaskRule, scanner: Scanner, evidence: Evidence) -> bool:
    """Mask object member names at or under the rule's selected nodes, keeping member
    order; names that would collide after masking get a `#2`, `#3`... suffix."""
    roots = [n.location for _, q in rule.paths for n in q.finditer(box[0])] if rule.paths else [()]
    changed = False

    def walk(value: Any, location: tuple[str | int, ...]) -> None:
        nonlocal changed
        if isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*location, index))
        elif isinstance(value, dict):
            renamed: dict[str, Any] = {}
            for key, item in value.items():
                walk(item, (*location, key))
                counts: dict[str, int] = {}
                new = scanner.redact(key, counts)
                if counts:
                    evidence.add(rule, counts, _jsonpath(location) + " (member name)")
                    base, n = new, 1
                    while new in renamed or (new in value and new != key):
                        n += 1
                        new = f"{base}#{n}"
                renamed[new] = item
            if list(renamed) != list(value):
                value.clear()
                value.update(renamed)
                changed = True

    try:
        for root in roots:
            node = box[0]
            for step in root:
                node = node[step]
            walk(node, tuple(root))
    except RecursionError:
        raise MaskError("JSON is nested too deeply to inspect") from None
    return changed


Leaf = tuple[tuple[str | int, ...], Any, str | int]


def _leaves(box: list[Any], rule: MaskRule, numbers: bool = True) -> list[Leaf]:
    """Every string (and, with `numbers`, number) at or under the nodes the rule
    selects in `box[0]` (all of them when it has no paths), once each, as
    (location in the document, parent container, key)."""
    roots = [n.location for _, q in rule.paths for n in q.finditer(box[0])] if rule.paths else [()]
    found: dict[tuple[str | int, ...], Leaf] = {}

    def walk(parent: Any, key: str | int, location: tuple[str | int, ...]) -> None:
        value = parent[key]
        if isinstance(value, dict):
            for child in list(value):
                walk(value, child, (*location, child))
        elif isinstance(value, list):
            for index in range(len(value)):
                walk(value, index, (*location, index))
        elif isinstance(value, str) or numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            found[location] = (location, parent, key)

    try:
        for root in roots:
            parent: Any = box
            for step in (0, *root)[:-1]:
                parent = parent[step]
            walk(parent, (0, *root)[-1], tuple(root))
    except RecursionError:
        raise MaskError("JSON is nested too deeply to inspect") from None
    return list(found.values())


def _jsonpath(location: Sequence[str | int]) -> str:
    """RFC 9535 normalized path of a location (§2.7), e.g. `$['messages'][0]`."""
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f"['{_quote(s)}']" for s in location)


_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "'": "\\'", "\\": "\\\\"}


def _quote(name: str) -> str:
    """A member name escaped as RFC 9535 §2.7 requires in normalized paths."""
    return "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 else c) for c in name)


def _mask_text(text: str, rules: Iterable[MaskRule], evidence: Evidence, where: str) -> str:
    for rule in rules:
        if rule.paths:
            raise MaskError(f"rule '{rule.name}' selects JSON paths but the body is not JSON")
        counts: dict[str, int] = {}
        text = scanner_for(rule).redact(text, counts)
        evidence.add(rule, counts, where)
    return text


def _mask_sse(body: bytes, rules: Sequence[MaskRule], evidence: Evidence) -> bytes | None:
    """Mask a server-sent event stream (WHATWG HTML §9.2), as a stream.

    Each `data:` line is a JSON document (or text). The strings found at the same
    location in successive events (e.g. `$.choices[0].delta.content`) are one text
    split into pieces, so they are scanned concatenated and a value split across
    events is still caught; the replacement lands in the piece where it starts.
    """
    lines = _text(body).split("\n")
    docs: dict[int, list[Any]] = {}  # line index -> [parsed JSON], boxed
    texts: list[int] = []
    for i, line in enumerate(lines):
        if not line.startswith("data:"):
            continue
        data = _data(line)
        if not data or data == "[DONE]":
            continue
        if data[0] in "{[":
            docs[i] = [_parse_json(data.encode())]
        else:
            texts.append(i)
    changed: set[int] = set()
    for rule in rules:
        scanner = scanner_for(rule)
        streams: dict[tuple[str | int, ...], list[tuple[int, Any, str | int]]] = {}
        for i, box in docs.items():
            for location, parent, key in _leaves(box, rule, numbers=False):
                streams.setdefault(location, []).append((i, parent, key))
        for location, pieces in streams.items():
            values = [parent[key] for _, parent, key in pieces]
            if spans := scanner.spans("".join(values)):
                for (i, parent, key), new in zip(pieces, _spread(values, spans)):
                    parent[key] = new
                    changed.add(i)
                counts: dict[str, int] = {}
                _count(spans, counts)
                evidence.add(rule, counts, _jsonpath(location))
        if texts:
            if rule.paths:
                raise MaskError(f"rule '{rule.name}' selects JSON paths but an event's data is not JSON")
            values = [_data(lines[i]) for i in texts]
            if spans := scanner.spans("".join(values)):
                for i, new in zip(texts, _spread(values, spans)):
                    lines[i] = "data: " + new + ("\r" if lines[i].endswith("\r") else "")
                    changed.add(i)
                counts = {}
                _count(spans, counts)
                evidence.add(rule, counts, "data")
    for i in changed & docs.keys():
        lines[i] = "data: " + orjson.dumps(docs[i][0]).decode() + ("\r" if lines[i].endswith("\r") else "")
    return "\n".join(lines).encode() if changed else None


def _data(line: str) -> str:
    return line[5:].removeprefix(" ").rstrip("\r")


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MaskError(f"body is not valid JSON ({exc.args[0].split(':')[0]})") from None


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise MaskError("body is not UTF-8 text") from None
