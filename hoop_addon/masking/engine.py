"""The masking engine: find what detectors match in values and JSON documents, and
replace it.

Pure functions over text and parsed JSON; no mitmproxy. Each value is scanned once for
all the rules that look at it (see `Scanner`: one RE2 set pass, then one linear-time
pass per detector that occurs in it), and overlapping matches of different detectors
are masked as one; validators (Luhn, ...) run only on candidate matches. A match
belongs to the first rule, in policy order, that names its detector (an enforcing rule
before any `action: log` one): that rule's operator replaces it and its evidence counts
it; a shadow rule's matches are counted, marked `shadow`, and left as they are.

JSON bodies are parsed with orjson; rules with RFC 9535 JSONPath `paths` mask the
strings (and numbers) under the selected nodes, rules without paths mask every string;
each distinct set of paths is evaluated once per document. A selected string that is
itself a JSON document (tool-call `arguments`) is masked as JSON. Whole bodies, by
media type, are `hoop_addon.masking.body`'s; streams `hoop_addon.masking.sse`'s.
Anything a rule cannot inspect raises `MaskError`, and the caller refuses the flow:
nothing is forwarded unmasked.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import re2

from hoop_addon.masking.detectors import Detector
from hoop_addon.masking.normalize import escape, unescape, view
from hoop_addon.masking.vault import TokenSession
from hoop_addon.policy.model import MaskRule

MAX_EVIDENCE_PATHS = 20
MAX_DEPTH = 128
"""Deepest JSON nesting inspected; deeper documents are refused."""
Replace = Callable[[str, Detector], str]
_OPTIONS = re2.Options()
_OPTIONS.max_mem = 64 << 20  # room for the DFA of a set of many detectors (default 8 MiB)
Span = tuple[int, int, Detector]
Location = tuple[str | int, ...]
"""Where a value is in a JSON document: member names and array indexes from the root."""
Leaf = tuple[Location, Any, str | int]


class MaskError(Exception):
    """A body could not be inspected as the policy requires (message says why;
    it never contains body content)."""


class MaskBudgetExceeded(MaskError):
    """Masking one body (or one piece of a stream) took longer than its time budget."""


@dataclass(slots=True)
class MaskContext:
    """What operators need beyond the rule: `secret`, the HMAC key of `hash`
    (bytes), and `tokens`, the session's vault of `tokenize` (and of restoring); and
    `deadline`, a `time.monotonic()` instant (seconds) past which masking stops
    (`charge` raises), or None for no budget."""

    secret: bytes | None = None
    tokens: TokenSession | None = None
    deadline: float | None = None
    _replacers: dict[str, Replace] = dataclasses.field(default_factory=dict, repr=False)

    def charge(self) -> None:
        """Called after each scan: raises `MaskBudgetExceeded` once the deadline has
        passed, so that one body cannot hold the event loop for long (a scan runs to
        its end: its cost is bounded by the detectors' program size and the body size)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise MaskBudgetExceeded("masking took longer than its time budget (hoop_mask_budget)")

    def replacer(self, rule: MaskRule) -> Replace:
        """The function giving a match's replacement under `rule.operator` (the value
        itself for a shadow rule). Raises `MaskError` if the operator lacks what it
        needs (no secret, no session)."""
        if (found := self._replacers.get(rule.name)) is None:
            found = self._replacers[rule.name] = self._replacer(rule)
        return found

    def _replacer(self, rule: MaskRule) -> Replace:
        if rule.shadow:
            return _unchanged
        if rule.operator == "partial":
            keep = rule.keep
            return lambda v, d: "*" * len(v) if len(v) <= keep else "*" * (len(v) - keep) + v[len(v) - keep :]
        if rule.operator == "hash":
            if not self.secret:
                raise MaskError(f"rule '{rule.name}' hashes values but no masking secret is configured")
            key = self.secret
            return lambda v, d: f"[{d.label}:{hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:16]}]"
        if rule.operator == "tokenize":
            if self.tokens is None:
                raise MaskError(f"rule '{rule.name}' tokenizes values but the flow has no session")
            tokens = self.tokens
            return lambda v, d: tokens.token(d.label, v)
        return _redacted


def operate(replace: Replace, value: str, detector: Detector) -> str:
    """`replace(value, detector)` for a matched span of the original text: a span
    holding JSON escapes (found in the text as read, see `Scanner.spans`) is given to
    the operator decoded, so `hash` and `tokenize` see the value itself, and its
    replacement is escaped again for the JSON text it goes into."""
    if "\\" not in value:
        return replace(value, detector)
    return escape(replace(unescape(value), detector))


def _redacted(value: str, detector: Detector) -> str:
    return f"[REDACTED:{detector.label}]"


def _unchanged(value: str, detector: Detector) -> str:
    return value


class Scanner:
    """The validated matches of a fixed, ordered set of detectors in a text.

    One detector's match never hides another's: an RE2 set (one DFA pass over the
    UTF-8 bytes, RE2's native input) tells which detectors occur at all, each of those
    then scans the text on its own, and overlapping matches of different detectors are
    merged into one span that belongs to the detector listed first (callers list the
    enforcing rules' detectors before the shadow rules'). A text with no sensitive
    value, the common case, costs the one set pass. Validators (Luhn, ...) run on
    candidate matches only; what a failed candidate means is `_found`'s."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        self.detectors = tuple(detectors)
        self.regexes = tuple(re2.compile(d.pattern, _OPTIONS) for d in self.detectors)
        self.present = re2.Set.SearchSet(_OPTIONS)
        for d in self.detectors:
            self.present.Add(d.pattern)
        self.present.Compile()

    def spans(self, text: str) -> list[Span]:
        """The validated matches in `text`: (start, end, detector), in order, disjoint
        (overlapping ones merged, see the class). Offsets are in characters. A value
        written with JSON escapes, compatibility characters (NBSP, fullwidth digits)
        or zero-width characters is found in the text as read (`normalize.view`) and
        its span is the one it has in `text`."""
        found = self._found(text)
        if (read := view(text)) is not None:
            shown, starts, ends = read
            found += [(starts[s], ends[e - 1], rank) for s, e, rank in self._found(shown)]
        found.sort()
        merged: list[tuple[int, int, int]] = []
        for start, end, rank in found:
            if merged and start < merged[-1][1]:
                last = merged[-1]
                merged[-1] = (last[0], max(last[1], end), min(last[2], rank))
            else:
                merged.append((start, end, rank))
        return [(start, end, self.detectors[rank]) for start, end, rank in merged]

    def _found(self, text: str) -> list[tuple[int, int, int]]:
        """The validated matches in `text` as (start, end, rank of the detector), unsorted.

        Two rules keep this linear and precise. A failed candidate of a detector whose
        values are digit groups (`Detector.grouped`: cards, IBANs) is retried on the
        whole run of groups it belongs to, window by window of consecutive groups, so a
        greedy candidate that swallowed digits around a valid value, or stopped short of
        one running past its end, does not hide it. A candidate of a detector that
        `claims` its shape (an IBAN-shaped value, an IPv6-shaped one) is one value, valid
        or not: no other detector's match strictly inside it counts."""
        data = text.encode()
        present = range(1) if len(self.detectors) == 1 else sorted(self.present.Match(data) or ())
        ascii_only = len(data) == len(text)
        found: list[tuple[int, int, int]] = []
        claimed: dict[int, list[tuple[int, int]]] = {}  # rank -> failed candidates, in order
        for rank in present:
            detector = self.detectors[rank]
            last_byte = last_char = 0
            covered = 0  # end of the last run of groups retried: candidates inside it are done
            for m in self.regexes[rank].finditer(data):
                start, end = m.span()
                if not ascii_only:  # byte offsets to character offsets, in one pass over the text
                    start_char = last_char + len(data[last_byte:start].decode())
                    end_char = start_char + len(data[start:end].decode())
                    last_byte, last_char = end, end_char
                    start, end = start_char, end_char
                if start < covered:
                    continue
                value = text[start:end]
                if (detector.validator is None or detector.validator(value)) and detector.in_context(text, start):
                    found.append((start, end, rank))
                    if detector.claims:  # a valid IBAN's digits are not also a card number
                        claimed.setdefault(rank, []).append((start, end))
                else:
                    before = len(found)
                    if detector.grouped:
                        covered = self._groups(text, start, end, rank, found)
                    if detector.claims and len(found) == before:  # nothing valid in it: one invalid value
                        claimed.setdefault(rank, []).append((start, end))
        return _unclaimed(found, claimed) if claimed else found

    def _groups(self, text: str, start: int, end: int, rank: int, found: list[tuple[int, int, int]]) -> int:
        """Retry a failed candidate `text[start:end]` of a grouped detector over its whole
        run of groups (one separator of ` .-` between groups of `Detector.grouped`
        characters): from each group, the longest window of consecutive groups that the
        detector matches whole and validates is added to `found` and the search goes on
        after it. Windows are at most `_MAX_GROUPED` characters long, so this is linear
        in the run. Returns where the run ends."""
        detector, regex = self.detectors[rank], self.regexes[rank]
        chars = detector.grouped
        bounds: list[tuple[int, int]] = []  # (start, end) of each group
        i, n = start, len(text)
        while i < n and text[i] in chars:
            j = i
            while j < n and text[j] in chars:
                j += 1
            bounds.append((i, j))
            if j + 1 < n and text[j] in " .-" and text[j + 1] in chars:
                i = j + 1
            else:
                i = j
                break
        run_end = max(i, end)
        g = 0
        while g < len(bounds):
            best = None
            for h in range(g, len(bounds)):
                s, e = bounds[g][0], bounds[h][1]
                if e - s > _MAX_GROUPED:
                    break
                value = text[s:e]
                if regex.fullmatch(value) and (detector.validator is None or detector.validator(value)) and detector.in_context(text, s):
                    best = (s, e, h)
            if best is None:
                g += 1
                continue
            found.append((best[0], best[1], rank))
            g = best[2] + 1
        return run_end


def _unclaimed(found: list[tuple[int, int, int]], claimed: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
    """`found` without the matches strictly inside a failed candidate of another
    detector that claims its shape (`claimed`: rank -> sorted, disjoint spans)."""
    starts = {rank: [s for s, _ in spans] for rank, spans in claimed.items()}
    kept = []
    for f in found:
        for rank, spans in claimed.items():
            if rank == f[2]:
                continue
            i = bisect.bisect_right(starts[rank], f[0]) - 1
            if i >= 0 and spans[i][1] >= f[1] and spans[i] != f[:2]:
                break
        else:
            kept.append(f)
    return kept


_MAX_GROUPED = 48
"""Longest window of digit groups retried (characters): a 19-digit card with a
separator between every digit is 37."""


def spread(pieces: Sequence[str], spans: Sequence[Span], replace: Replace = _redacted) -> list[str]:
    """Replace `spans` of the concatenation of `pieces`, keeping the pieces apart: the
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
                parts += (joined[pos:m_start], replace(joined[m_start:m_end], detector))
            pos = min(m_end, end)
        parts.append(joined[pos:end])
        result.append("".join(parts))
        start = end
    return result


_SCANNERS: dict[tuple[Detector, ...], Scanner] = {}
_COMBINED: dict[tuple[int, ...], tuple[tuple[MaskRule, ...], Scanner | None, dict[Detector, MaskRule]]] = {}
_MAX_COMBINED = 4096


def scanner_of(detectors: tuple[Detector, ...]) -> Scanner:
    """The (cached) combined scanner of `detectors`."""
    scanner = _SCANNERS.get(detectors)
    if scanner is None:
        scanner = _SCANNERS[detectors] = Scanner(detectors)
    return scanner


def combined(rules: Sequence[MaskRule]) -> tuple[Scanner | None, dict[Detector, MaskRule]]:
    """One scan for all `rules` (the rules that look at one value): the scanner of
    their detectors (None if they have none) and each detector's owner, the first rule
    naming it, enforcing rules first, whose operator replaces its matches and whose
    evidence counts them."""
    key = tuple(map(id, rules))  # cheap to hash; the entry keeps its rules, so ids stay theirs
    found = _COMBINED.get(key)
    if found is None or any(a is not b for a, b in zip(found[0], rules)):
        owner: dict[Detector, MaskRule] = {}
        for rule in sorted(rules, key=lambda r: r.shadow):  # stable: policy order within each
            for detector in rule.detectors:
                owner.setdefault(detector, rule)
        if len(_COMBINED) >= _MAX_COMBINED:  # policy reloads leave old rule sets behind
            _COMBINED.clear()
        found = _COMBINED[key] = (tuple(rules), scanner_of(tuple(owner)) if owner else None, owner)
    return found[1], found[2]


class Evidence:
    """What was masked (or, by a shadow rule, would have been), per rule: counts per
    detector and where (JSONPath or part), never the values. `records()` gives the
    JSON-safe list for metadata and audit."""

    def __init__(self) -> None:
        self._rules: dict[str, tuple[MaskRule, dict[str, int], list[str]]] = {}
        self._notes: dict[str, dict[str, Any]] = {}

    def add(self, rule: MaskRule, counts: dict[str, int], where: str) -> None:
        if not counts:
            return
        _, total, paths = self._rules.setdefault(rule.name, (rule, {}, []))
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
        if where not in paths and len(paths) < MAX_EVIDENCE_PATHS:
            paths.append(where)

    def annotate(self, rule: str, key: str, value: Any) -> None:
        """Adds `key: value` (JSON-safe counts, never values) to the record of the rule
        named `rule`, e.g. what a codec counted (`hoop_addon.masking.otlp`)."""
        self._notes.setdefault(rule, {})[key] = value

    def records(self, part: str) -> list[dict[str, Any]]:
        """One record per rule that masked something: `{"rule", "part", "operator",
        "count", "detectors": {name: count}, "where": [JSONPath or part, ...]}`, plus
        `"shadow": true` for a shadow (`action: log`) rule, which masked nothing, and what
        `annotate` added."""
        return [
            {"rule": name, "part": part, "operator": rule.operator, "count": sum(c.values()), "detectors": c, "where": w,
             **({"shadow": True} if rule.shadow else {}), **self._notes.get(name, {})}
            for name, (rule, c, w) in self._rules.items()
        ]


class _Repeated(Exception):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> None:
    if len({k for k, _ in pairs}) != len(pairs):
        raise _Repeated


_REPEATS = json.JSONDecoder(object_pairs_hook=_no_repeats)  # built once: json.loads would build one a call


def unique_members(raw: bytes | str) -> None:
    """Raise `MaskError` if an object in the JSON text `raw` (orjson parsed it: valid
    UTF-8 JSON) repeats a member name: orjson keeps the last value and other parsers the
    first, so a raw body forwarded unchanged could carry a value that was never
    inspected (RFC 8259 §4: names SHOULD be unique)."""
    text = raw.decode().removeprefix("\ufeff") if isinstance(raw, bytes) else raw
    try:
        _REPEATS.decode(text)
    except _Repeated:
        raise MaskError("a JSON object repeats a member name; parsers differ on which value counts") from None


def mask_text(
    text: str, rules: Sequence[MaskRule], context: MaskContext, evidence: Evidence, where: str | Callable[[], str]
) -> str:
    """`text` masked by all `rules` at once (whole text, paths ignored): the same object
    when nothing was replaced. Evidence is located at `where`, a part name such as
    `request`, `query`, `header:x-user`, or a function giving it (a JSONPath), called
    only when something matched."""
    scanner, owner = combined(rules)
    spans = scanner.spans(text) if scanner else None
    context.charge()
    if not spans:
        return text
    counts: dict[str, tuple[MaskRule, dict[str, int]]] = {}
    for _, _, detector in spans:
        rule = owner[detector]
        rule_counts = counts.setdefault(rule.name, (rule, {}))[1]
        rule_counts[detector.name] = rule_counts.get(detector.name, 0) + 1
    located = where() if callable(where) else where
    for rule, rule_counts in counts.values():
        evidence.add(rule, rule_counts, located)
    if not (enforced := [s for s in spans if not owner[s[2]].shadow]):
        return text  # shadow rules' matches only: counted, not replaced
    return spread([text], enforced, lambda value, detector: operate(context.replacer(owner[detector]), value, detector))[0]


def mask_json(
    doc: Any, rules: Iterable[MaskRule], evidence: Evidence, context: MaskContext | None = None,
    changed_at: list[Location] | None = None,
) -> tuple[Any, bool]:
    """Mask a parsed JSON document (in place where it is a container): each string
    (and number) once, by all the rules selecting it; then member names.

    Returns (the masked document, whether anything changed): a scalar root is
    replaced, not mutated. `changed_at`, when given, gets the location of each value
    replaced and of each object whose member names changed (for a codec that writes
    the edits back into its own form, `hoop_addon.masking.otlp`). Raises `MaskError` on
    nesting deeper than `MAX_DEPTH`.
    """
    context = context or MaskContext()
    box = [doc]
    values: dict[Location, tuple[Any, str | int, list[MaskRule]]] = {}
    objects: dict[Location, tuple[dict[str, Any], list[MaskRule]]] = {}
    selections: dict[tuple[str, ...], _Selection] = {}  # rules often share their paths
    for rule in rules:
        paths = tuple(p for p, _ in rule.paths)
        if (selection := selections.get(paths)) is None:
            selection = selections[paths] = _select(box, rule)
        for location, parent, key in selection.leaves:
            values.setdefault(location, (parent, key, []))[2].append(rule)
        for location, node in selection.objects:
            objects.setdefault(location, (node, []))[1].append(rule)
    changed = False
    for location, (parent, key, covering) in values.items():
        value = parent[key]
        if isinstance(value, str) and (inner := _json_in_string(value)) is not None:
            relocated = _Relocated(evidence, evidence_path(location, covering))
            new_inner, inner_changed = mask_json(inner, [_whole(r) for r in covering], relocated, context)
            if inner_changed:
                parent[key] = orjson.dumps(new_inner).decode()
                changed = True
                if changed_at is not None:
                    changed_at.append(location)
            else:
                unique_members(value)  # left as it is: see `hoop_addon.masking.body`
            continue
        text = value if isinstance(value, str) else str(value)
        masked = mask_text(text, covering, context, evidence, lambda: evidence_path(location, covering))
        if masked is not text:
            parent[key] = masked
            changed = True
            if changed_at is not None:
                changed_at.append(location)
    for location, (node, covering) in objects.items():
        if _mask_members(node, location, covering, context, evidence):
            changed = True
            if changed_at is not None:
                changed_at.append(location)
    return box[0], changed


class _Relocated(Evidence):
    """Evidence for a JSON document inside a string: located under the string's path."""

    def __init__(self, outer: Evidence, where: str) -> None:
        self.outer, self.where = outer, where

    def add(self, rule: MaskRule, counts: dict[str, int], where: str) -> None:
        self.outer.add(rule, counts, f"{self.where} (JSON in string: {where})")


@functools.lru_cache(maxsize=1024)
def _whole(rule: MaskRule) -> MaskRule:
    """The rule over a whole document (JSON in a string): the same object each time,
    so the scanner cache (`combined`, keyed by rule identity) keeps hitting."""
    return dataclasses.replace(rule, paths=()) if rule.paths else rule


def _json_in_string(value: str) -> Any:
    """The object or array a string holds as JSON text (tool-call `arguments`), else None."""
    if value.lstrip()[:1] not in ("{", "["):
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, (dict, list)) else None


def _mask_members(
    node: dict[str, Any], location: Location, rules: Sequence[MaskRule], context: MaskContext, evidence: Evidence
) -> bool:
    """Mask the member names of one object, keeping member order; names that would
    collide after masking get a `#2`, `#3`... suffix. Returns whether any changed."""
    renamed: dict[str, Any] = {}
    for key, item in node.items():
        new = mask_text(key, rules, context, evidence, lambda: evidence_path(location, rules) + " (member name)")
        if new is not key:
            base, n = new, 1
            while new in renamed or (new in node and new != key):
                n += 1
                new = f"{base}#{n}"
        renamed[new] = item
    if list(renamed) == list(node):
        return False
    node.clear()
    node.update(renamed)
    return True


@dataclass(slots=True)
class _Selection:
    """What a rule's paths select in a document: the strings and numbers (`leaves`),
    the objects whose member names it masks (`objects`), each once, and the locations
    the paths select themselves (`roots`; `()`, the document, for a rule without paths)."""

    leaves: list[Leaf]
    objects: list[tuple[Location, dict[str, Any]]]
    roots: frozenset[Location]


def leaves(doc: Any, rule: MaskRule, numbers: bool = True) -> list[Leaf]:
    """Every string (and, with `numbers`, number) at or under the nodes `rule` selects
    in `doc` (all of them when it has no paths), once each, as (location in the
    document, parent container, key); a scalar root's parent is a one-item list.
    Raises `MaskError` beyond `MAX_DEPTH`."""
    return _select([doc], rule, numbers).leaves


def selected(doc: Any, rule: MaskRule) -> tuple[list[Leaf], frozenset[Location]]:
    """`leaves(doc, rule)`, and the locations `rule`'s paths select themselves (a leaf
    among them was named by a path; one not among them is inside a selected object or
    array)."""
    selection = _select([doc], rule)
    return selection.leaves, selection.roots


def _select(box: list[Any], rule: MaskRule, numbers: bool = True) -> _Selection:
    roots = [n.location for _, q in rule.paths for n in q.finditer(box[0])] if rule.paths else [()]
    found: dict[Location, Leaf] = {}
    objects: dict[Location, dict[str, Any]] = {}

    def walk(parent: Any, key: str | int, location: Location) -> None:
        if len(location) > MAX_DEPTH:
            raise MaskError(f"JSON is nested deeper than {MAX_DEPTH} levels")
        value = parent[key]
        if isinstance(value, dict):
            objects[location] = value
            for child in list(value):
                walk(value, child, (*location, child))
        elif isinstance(value, list):
            for index in range(len(value)):
                walk(value, index, (*location, index))
        elif isinstance(value, str) or numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            found[location] = (location, parent, key)

    for root in roots:
        parent: Any = box
        for step in (0, *root)[:-1]:
            parent = parent[step]
        walk(parent, (0, *root)[-1], tuple(root))
    return _Selection(list(found.values()), list(objects.items()), frozenset(tuple(r) for r in roots))


def evidence_path(location: Sequence[str | int], rules: Sequence[MaskRule]) -> str:
    """`jsonpath(location)` for evidence, which is audited and recorded: a member name
    on the way that holds a value the rules detect is shown redacted
    (`$['[REDACTED:EMAIL]']`), never as it is."""
    scanner, _ = combined(rules)
    location = tuple(location)
    key = (location, scanner)
    if (found := _PATHS.get(key)) is not None:
        return found
    steps, redacted = list(location), False
    for i, step in enumerate(steps):
        if scanner is not None and isinstance(step, str) and (spans := scanner.spans(step)):
            steps[i], redacted = spread([step], spans)[0], True
    path = jsonpath(steps)
    # An API's values sit at the same few locations, and a path costs a scan of each
    # member name plus the quoting: kept, unless a name held a detected value (the
    # cache must not hold sensitive names) or the names are long (nor large ones).
    if not redacted and sum(len(step) for step in location if isinstance(step, str)) <= _MAX_CACHED_NAMES:
        if len(_PATHS) >= _MAX_PATHS:
            _PATHS.clear()
        _PATHS[key] = path
    return path


_PATHS: dict[tuple[Location, Scanner | None], str] = {}
_MAX_PATHS = 4096
_MAX_CACHED_NAMES = 256  # characters, all member names of a location together


def jsonpath(location: Sequence[str | int]) -> str:
    """RFC 9535 normalized path of a location (§2.7), e.g. `$['messages'][0]`."""
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f"['{s.translate(_ESCAPES)}']" for s in location)


# What RFC 9535 §2.7 escapes in a normalized path's member names: the named escapes,
# other control characters as \u00XX.
_NAMED_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "'": "\\'", "\\": "\\\\"}
_ESCAPES = str.maketrans({**{chr(c): f"\\u{c:04x}" for c in range(0x20)}, **_NAMED_ESCAPES})


