"""Evaluate block and approval rule conditions against one request (pure: no mitmproxy).

Conditions are evaluated on the request as the agent sent it, before masking: a policy
author who writes "block bodies containing `rm -rf`" or "approve requests mentioning
customer e-mails" means the real content, which masking would hide. Whatever is shown
to an approver is built later, from the masked body.
"""

from __future__ import annotations

import hmac
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from jsonpath_rfc9535 import JSONPathRecursionError

from hoop_addon.masking import otlp
from hoop_addon.masking.engine import MaskError
from hoop_addon.policy.model import ApprovalRule, BlockRule, Conditions


class UninspectableBody(ValueError):
    """A rule needs the body as JSON and it is not JSON (fail closed: the caller refuses)."""


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What conditions look at. `route` is the route name (None: no route), `method`
    upper case, `issuer` the URL of the identity's issuer, `headers` (name, value) pairs with any name case, `body` the decoded
    (content-encoding removed) bytes, `path` the URL path (None: unknown), by which an
    OTLP/HTTP protobuf export is read in its OTLP/JSON shape (`hoop_addon.masking.otlp`)."""

    route: str | None
    method: str
    issuer: str | None
    subject: str
    groups: Sequence[str]
    headers: Sequence[tuple[str, str]]
    body: bytes
    path: str | None = None


def estimate_tokens(body: bytes | int) -> int:
    """A rough LLM token count of a body (or of a size in bytes): one token per 4
    bytes, rounded up (OpenAI's rule of thumb for English text; no tokenizer, so it
    costs nothing and never fails)."""
    size = body if isinstance(body, int) else len(body)
    return (size + 3) // 4


def matches(when: Conditions, facts: RequestFacts, parsed: dict[str, Any]) -> bool:
    """True when every condition of `when` holds for `facts`.

    `parsed` is a per-request cache shared across rules (key "json": the parsed body),
    so a body is parsed once however many rules look at it. Cheap conditions are
    checked first. Raises `UninspectableBody` when a JSONPath condition must be
    evaluated and the non-empty body is not JSON, or is nested too deep for it.
    """
    if when.routes and facts.route not in when.routes:
        return False
    if when.methods and facts.method.upper() not in when.methods:
        return False
    if when.subjects and not when.subjects.has(facts.issuer, facts.subject):
        return False
    if when.groups and not when.groups.any_of(facts.issuer, facts.groups):
        return False
    if when.body_over is not None and len(facts.body) <= when.body_over:
        return False
    if when.tokens_over is not None and estimate_tokens(facts.body) <= when.tokens_over:
        return False
    for name, pattern in when.headers:
        values = [v for k, v in facts.headers if k.lower() == name]
        if not any(pattern.search(v) for v in values):
            return False
    if when.body:
        text = facts.body.decode("utf-8", errors="replace")
        if not any(p.search(text) for p in when.body):
            return False
    if when.json:
        if not facts.body.strip():
            return False
        if "json" not in parsed:
            parsed["json"] = _document(facts)
        if not json_found(when.json, parsed["json"]):
            return False
    return True


def json_found(conditions: Sequence[tuple[str, Any, Any]], document: Any) -> bool:
    """True when one of `conditions` ((JSONPath source, compiled RFC 9535 query, RE2
    pattern) triples) selects a string value of `document` (parsed JSON) that its
    pattern is found in. Raises `UninspectableBody` when `document` is nested too deep
    for a query."""
    try:
        return any(
            isinstance(value, str) and bool(pattern.search(value))
            for _, query, pattern in conditions
            for value in query.find(document).values()
        )
    except (JSONPathRecursionError, RecursionError):
        # a descendant query (`$..x`) on a deeply nested body hits the JSONPath
        # library's depth limit: the body cannot be inspected, so it is refused
        # (422), not an unexpected error (500)
        raise UninspectableBody("the body is nested too deep to inspect with JSONPath") from None


def _document(facts: RequestFacts) -> Any:
    """The body as JSONPath conditions read it: JSON, or an OTLP/HTTP protobuf export in
    its OTLP/JSON shape (the shape masking rules read). `UninspectableBody` otherwise."""
    message = otlp.message_for(facts.path, "request")
    mime = next((v for k, v in facts.headers if k.lower() == "content-type"), "").split(";", 1)[0].strip().lower()
    if message is not None and mime in otlp.PROTOBUF_TYPES:
        try:
            return otlp.to_dict(otlp.parse_protobuf(facts.body, message))
        except MaskError as exc:
            raise UninspectableBody(str(exc)) from None
    try:
        return orjson.loads(facts.body)
    except orjson.JSONDecodeError:
        raise UninspectableBody("the body is not JSON, and a rule inspects it with JSONPath") from None


def evaluate(
    block_rules: Sequence[BlockRule], approval_rules: Sequence[ApprovalRule], facts: RequestFacts
) -> tuple[BlockRule | None, list[BlockRule | ApprovalRule], ApprovalRule | None]:
    """Apply a policy's rules, in order, to one request.

    Returns (the first matching `block` rule or None; the matching `log` (shadow) rules
    before the rule that decides; the first matching enforced approval rule or None:
    approval is only looked for when nothing blocks). Raises `UninspectableBody`.
    """
    parsed: dict[str, Any] = {}
    shadow: list[BlockRule | ApprovalRule] = []
    for rule in block_rules:
        if matches(rule.when, facts, parsed):
            if rule.action == "block":
                return rule, shadow, None
            shadow.append(rule)
    for approval in approval_rules:
        if matches(approval.when, facts, parsed):
            if approval.action == "require":
                return None, shadow, approval
            shadow.append(approval)
    return None, shadow, None


def request_key(secret: bytes, issuer: str, subject: str, route: str | None, method: str, url: str, body: bytes) -> str:
    """What makes two requests "the same request" for ticket mode: HMAC-SHA256 (RFC
    2104) under a per-process `secret` of the identity (issuer URL and subject: a
    subject is only unique at its issuer), route, method, URL and body.
    Keyed, so it can be written to flow metadata without letting anyone test guesses
    of an unmasked body against it. Returns 64 hex characters."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (issuer, subject, route or "", method.upper(), url):
        mac.update(part.encode() + b"\0")
    mac.update(body)
    return mac.hexdigest()
