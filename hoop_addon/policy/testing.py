"""`hoop policy test`: policy unit tests, like `opa test`, run against `simulate()`.

A fixture file is YAML:

    tests:
      - name: agents may call openai; PII is masked
        identity: {subject: agent-1, groups: [agents]}      # client_id, scopes optional
        request:
          method: POST
          url: https://api.openai.com/v1/chat/completions
          headers: {Content-Type: application/json}
          json: {messages: [{role: user, content: "I am jane@example.com"}]}   # or body: "text"
        response: {json: {...}}                              # optional: masks the response too
        expect:
          outcome: allow          # allow | approve | block | deny
          route: openai           # optional checks from here on
          rule: null              # the block or approval rule
          reason: null            # the refusal code (no_route, not_admitted, ...)
          masked: {pii-in-prompts: 1}   # values masked per rule (only the rules listed)
          shadow: []              # log-mode (shadow) rules that matched: block, approval, masking

Fixture errors name the file, line and key, like policy errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from yaml.nodes import Node

from hoop_addon.policy.loader import _CONSTRUCTOR, _compose, _Loc, _Map, _seq
from hoop_addon.policy.model import Policy
from hoop_addon.policy.simulate import Caller, Exchange, Outcome, simulate

OUTCOMES = ("allow", "approve", "block", "deny")


@dataclass(frozen=True, slots=True)
class Case:
    """One fixture: where it is, what to simulate, what to expect (`expect` holds
    only the keys the fixture gives)."""

    name: str
    where: str
    exchange: Exchange
    caller: Caller
    expect: dict[str, Any]


def load_cases(path: Path) -> list[Case]:
    """The cases of a fixture file, or of every `*.yaml`/`*.yml` file of a directory.
    Raises `PolicyError` (file, line, key) on a malformed fixture."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    cases = []
    for file in files:
        node = _compose(file)
        if node is None:
            continue
        doc = _Map(node, _Loc(str(file), file.parent, ""))
        for i, item in _seq(doc.node("tests"), doc.loc.at("tests")):
            cases.append(_case(_Map(item, doc.loc.at("tests").at(i))))
        doc.finish(("tests",))
    return cases


def _case(m: _Map) -> Case:
    name = m.text("name")
    identity = m.sub("identity")
    caller = Caller(identity.text("subject"), identity.texts("groups", ()), identity.text("client_id", "") or None,
                    identity.texts("scopes", ()), identity.text("issuer", "") or None)
    identity.finish()
    request = m.sub("request")
    method, url = request.text("method", "GET"), request.text("url")
    headers, body = _message(request)
    response_headers: tuple[tuple[str, str], ...] = ()
    response_body = None
    if m.has("response"):
        response_headers, response_body = _message(m.sub("response"))
    expect = m.sub("expect")
    keys = ("outcome", "route", "rule", "reason", "masked", "shadow")
    expected = {key: _value(expect.node(key), expect.loc.at(key)) for key in keys if expect.has(key)}
    expect.finish(keys)
    if expected.get("outcome") not in OUTCOMES:
        raise expect.loc.at("outcome").error(expect.where("outcome"), f"expected one of: {', '.join(OUTCOMES)}")
    m.finish()
    return Case(name, f"{m.loc.file}:{m.mapping.start_mark.line + 1}",
                Exchange(method, url, headers, body, response_headers, response_body), caller, expected)


def _message(m: _Map) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """Headers and body of a fixture's request or response (`json` or `body`)."""
    headers: tuple[tuple[str, str], ...] = ()
    if m.has("headers"):
        node = m.node("headers")
        value = _value(node, m.loc.at("headers"))
        if not isinstance(value, dict):  # e.g. a list of "Name: value" strings
            raise m.loc.at("headers").error(node, f"expected a mapping of header names to values, got {type(value).__name__}")
        headers = tuple((str(k), str(v)) for k, v in value.items())
    if m.has("json") and m.has("body"):
        raise m.loc.at("body").error(m.where("body"), "give `json` or `body`, not both")
    body = orjson.dumps(_value(m.node("json"), m.loc.at("json"))) if m.has("json") else m.text("body", "").encode()
    if m.has("json") and not any(k.lower() == "content-type" for k, _ in headers):
        headers += (("Content-Type", "application/json"),)
    m.finish()
    return headers, body


def _value(node: Node, loc: _Loc) -> Any:
    """The plain value of `node`; a value not fitting its tag (`!!int abc`) is a
    `PolicyError` at `loc`, not a traceback."""
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    except (ValueError, TypeError, AttributeError, OverflowError, yaml.YAMLError) as exc:
        raise loc.error(node, f"invalid value: {exc}") from None


def failures(outcome: Outcome, expect: dict[str, Any]) -> list[str]:
    """What differs between `outcome` and the expectations (empty: the case passes)."""
    found = []
    got = outcome.record()
    for key in ("outcome", "route", "rule", "reason"):
        if key in expect and expect[key] != got[key]:
            found.append(f"{key}: expected {expect[key]!r}, got {got[key]!r}")
    for rule, count in (expect.get("masked") or {}).items():
        if outcome.masked.get(rule, 0) != count:
            found.append(f"masked by {rule}: expected {count}, got {outcome.masked.get(rule, 0)}")
    if "shadow" in expect and sorted(expect["shadow"] or []) != sorted(outcome.shadow):
        found.append(f"shadow: expected {sorted(expect['shadow'] or [])}, got {sorted(outcome.shadow)}")
    return found


def run(policy: Policy, cases: list[Case]) -> list[tuple[Case, Outcome, list[str]]]:
    """Simulate every case; returns (case, outcome, failures) in order."""
    results = []
    for case in cases:
        outcome = simulate(policy, case.exchange, case.caller)
        results.append((case, outcome, failures(outcome, case.expect)))
    return results
