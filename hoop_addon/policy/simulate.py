"""What the chain would decide for one request, without a proxy (pure).

`simulate()` applies a policy the way the stages do, in their order: route match,
admission, block and approval rules (on the unmasked body), body masking of the request
and, if given, of the response. It is what `hoop policy test` and `hoop policy replay`
run, so a policy change can be checked in CI before it is enforced. Not simulated:
token verification (the identity is given), header/cookie/query masking, tokenize
restoring, recording.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from jsonpath_rfc9535 import JSONPathRecursionError

from hoop_addon.masking.body import mask_body
from hoop_addon.masking.engine import MaskContext, MaskError
from hoop_addon.masking.vault import TokenSession
from hoop_addon.policy.model import Direction, Policy
from hoop_addon.policy.conditions import RequestFacts, UninspectableBody, evaluate

_DEFAULT_PORTS = {"http": 80, "https": 443}
SIMULATION_SECRET = b"hoop policy simulation"  # `hash` needs a key; its output is never shown


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request (and optionally its response) to simulate. `headers` are (name,
    value) pairs; bodies are decoded bytes; `response_body` None: no response part."""

    method: str
    url: str
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    response_headers: Sequence[tuple[str, str]] = ()
    response_body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified identity the request is simulated for."""

    subject: str
    groups: tuple[str, ...] = ()
    client_id: str | None = None
    scopes: tuple[str, ...] = ()
    issuer: str | None = None  # the issuer's URL or its name in the policy; None: the policy's only issuer


@dataclass(slots=True)
class Outcome:
    """What the chain would do. `outcome`: allow, approve (held for approval), block
    (a block rule), deny (no route, not admitted, or a body the rules cannot inspect).
    `reason` is the refusal code, `rule` the block or approval rule, `shadow` the
    `log`-mode (shadow) rules that matched: block, approval, and masking rules that
    would have masked a value; `masked` the number of values masked per enforcing
    masking rule (request and response together)."""

    outcome: str
    route: str | None = None
    reason: str | None = None
    rule: str | None = None
    shadow: tuple[str, ...] = ()
    masked: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-safe form, for `--json` output."""
        return {"outcome": self.outcome, "route": self.route, "reason": self.reason, "rule": self.rule,
                "shadow": list(self.shadow), "masked": self.masked}


def simulate(policy: Policy, exchange: Exchange, caller: Caller) -> Outcome:
    """The outcome of `exchange` for `caller` under `policy` (see the module docstring).
    Never raises for bad bodies or URLs: they give the `deny` outcome the gateway would
    give (a request it cannot parse or inspect is refused)."""
    try:
        url = urlsplit(exchange.url)
        port = url.port or _DEFAULT_PORTS.get(url.scheme or "https", 443)  # ValueError: port not 0..65535
    except ValueError:
        return Outcome("deny", reason="invalid_url")
    host = (url.hostname or "").lower()
    method = exchange.method.upper()
    by_name = {i.name: i.issuer for i in policy.issuers}
    issuer = by_name.get(caller.issuer or "", caller.issuer) or (policy.issuers[0].issuer if len(policy.issuers) == 1 else None)
    route = policy.route_for(host, port, url.path or "/", method)
    if route is None:
        if policy.unmatched != "allow":
            return Outcome("deny", reason="no_route")
    elif not route.admits(issuer, caller.subject, caller.groups, caller.client_id, caller.scopes):
        return Outcome("deny", route.name, "not_admitted")
    name = route.name if route else None
    facts = RequestFacts(name, method, issuer, caller.subject, caller.groups, list(exchange.headers), exchange.body,
                         url.path or "/")
    try:
        block, shadow, approval = evaluate(policy.block_rules, policy.approval_rules, facts)
    except (UninspectableBody, JSONPathRecursionError, RecursionError):
        # not JSON, or nested too deep for JSONPath: the Guard refuses it (422)
        return Outcome("deny", name, "uninspectable_request")
    shadowed = tuple(r.name for r in shadow)
    if block is not None:
        return Outcome("block", name, "blocked", block.name, shadowed)
    result = Outcome("approve" if approval else "allow", name, None, approval.name if approval else None, shadowed)
    if route is None:
        return result
    context = MaskContext(SIMULATION_SECRET, TokenSession(max_tokens=100_000))
    parts: list[tuple[Direction, Sequence[tuple[str, str]], bytes]] = [("request", exchange.headers, exchange.body)]
    if exchange.response_body is not None:
        parts.append(("response", exchange.response_headers, exchange.response_body))
    for part, headers, body in parts:
        try:
            _, evidence = mask_body(body, _content_type(headers), route.rules_for(part), part, context, url.path or "/")
        except (MaskError, JSONPathRecursionError, RecursionError):
            # a body the masker cannot handle, or a JSONPath too deep for it: refused
            return Outcome("deny", name, f"unmaskable_{part}", None, shadowed, result.masked)
        for item in evidence:
            if item.get("shadow"):
                result.shadow += (item["rule"],) if item["rule"] not in result.shadow else ()
            else:
                result.masked[item["rule"]] = result.masked.get(item["rule"], 0) + item["count"]
    return result


def _content_type(headers: Sequence[tuple[str, str]]) -> str:
    return next((v for k, v in headers if k.lower() == "content-type"), "")
