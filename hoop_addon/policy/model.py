"""The typed policy model: what `rules/*.yaml` compiles into.

Everything here is immutable and validated: a `Policy` only exists once every file of
the rule set has loaded without error (see `hoop_addon.policy.loader`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from jsonpath_rfc9535 import JSONPathQuery

from hoop_addon.masking.detectors import Detector
from hoop_addon.providers.aws import AwsSigV4

TokenSource = Literal["authorization", "proxy_password", "proxy_bearer", "x_api_key"]
Direction = Literal["request", "response"]
Operator = Literal["redact", "partial", "hash", "tokenize"]


@dataclass(frozen=True, slots=True)
class Issuer:
    """A trusted token issuer (an OIDC provider or the development issuer).

    `issuer` is matched exactly against the token's `iss` claim (RFC 7519 §4.1.1);
    `audiences` must intersect the token's `aud`; `algorithms` is the allow-list applied
    to the token header (RFC 8725 §3.1), never taken from the token itself.
    `jwks` is an absolute file path or an http(s) URL; None means OpenID Connect
    Discovery from `<issuer>/.well-known/openid-configuration`. `groups_claim` is a
    dotted claim path (e.g. `realm_access.roles`). `leeway` is in seconds.
    `token_type`, when set (e.g. `at+jwt`, RFC 9068 §2.1), is the `typ` header every
    token must carry: ID tokens are then refused. `refetch_cooldown` is the minimum
    number of seconds between two JWKS fetches caused by unknown `kid`s.
    `client_id_claim` names the claim holding the client id (e.g. Okta's `cid`); None
    means `client_id` (RFC 9068), else `azp` (OIDC).
    """

    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks: str | None
    algorithms: tuple[str, ...]
    groups_claim: str = "groups"
    leeway: int = 30
    token_type: str | None = None
    refetch_cooldown: int = 30
    client_id_claim: str | None = None


@dataclass(frozen=True, slots=True)
class MaskRule:
    """A masking rule: which detectors to run, where, and in which direction.

    `paths` are compiled RFC 9535 JSONPath queries with their source text; an empty
    tuple means the whole body is scanned as text. `operator` is how a match is
    replaced: `redact` gives `[REDACTED:LABEL]`, `partial` keeps the last `keep`
    characters, `hash` gives a keyed HMAC-SHA256 pseudonym, `tokenize` a session token
    `<LABEL_n>` restored in responses. `on_invalid_json` says what a body that is not
    JSON under a rule with `paths` gets: `block` (refused) or `text` (scanned whole).
    `body` is False for a rule that only masks the named `headers` / `cookies`
    (lower-case names) or the `query` string. `action` "log" is shadow mode: the rule's
    matches are found and counted as evidence (marked `shadow`) but not replaced, and
    a value an enforcing rule masks is that rule's, never a shadow rule's.
    """

    name: str
    directions: frozenset[Direction]
    paths: tuple[tuple[str, JSONPathQuery], ...]
    detectors: tuple[Detector, ...]
    operator: Operator = "redact"
    keep: int = 4
    on_invalid_json: Literal["block", "text"] = "block"
    body: bool = True
    headers: tuple[str, ...] = ()
    cookies: tuple[str, ...] = ()
    query: bool = False
    action: Literal["mask", "log"] = "mask"

    @property
    def shadow(self) -> bool:
        """True for a shadow-mode rule (`action: log`): it finds and counts, never masks."""
        return self.action == "log"


@dataclass(frozen=True, slots=True)
class Credential:
    """An upstream credential the gateway holds, already resolved from the environment
    or a secret file.

    `header` is the request header the gateway takes over on the route: the agent's
    value is always removed. Without `param`, `header` is then set to `value` (a raw
    header value such as `Bearer sk-...` or `Basic dXNlcjpwdw==`); with `param`, the
    query parameter `param` is set to `value` instead (the agent's own one replaced).
    `secrets` are the values its `${...}` references resolved to (and, for `basic`, the
    encoded pair): what a response must not carry back to the agent. With `aws`, the
    gateway signs each request with AWS SigV4 instead (`hoop_addon.providers.aws`;
    `header` is Authorization, `value` empty).
    """

    header: str
    value: str = field(repr=False)
    param: str | None = None
    secrets: tuple[str, ...] = field(default=(), repr=False)
    aws: AwsSigV4 | None = None


@dataclass(frozen=True, slots=True)
class Names:
    """Subjects, groups, client ids or scopes a policy names (in `allow`, `approvers`,
    `when`, `limits.when`). A name written `<issuer name>:<name>` (`okta:agents`) is
    held only by identities from that issuer: `scoped` holds it as (issuer URL, name);
    a bare name (`anywhere`) is held from any trusted issuer, which the loader accepts
    only when the policy trusts one issuer (each issuer mints its own names). Falsy
    when empty."""

    anywhere: frozenset[str] = frozenset()
    scoped: frozenset[tuple[str, str]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.anywhere or self.scoped)

    def has(self, issuer: str | None, name: str | None) -> bool:
        """True when `name`, from an identity of `issuer` (URL), is one of these."""
        return name is not None and (name in self.anywhere or (issuer, name) in self.scoped)

    def any_of(self, issuer: str | None, names: Iterable[str]) -> bool:
        """True when one of `names` (of an identity of `issuer`) is one of these."""
        return any(self.has(issuer, n) for n in names)

    def all_in(self, issuer: str | None, names: Iterable[str]) -> bool:
        """True when the identity's `names` (of `issuer`) include every one of these."""
        held = set(names)
        return self.anywhere <= held and all(i == issuer and n in held for i, n in self.scoped)


McpAction = Literal["allow", "deny", "approve"]


@dataclass(frozen=True, slots=True)
class ToolRule:
    """A rule of a route's `mcp:` block, applied to each governed MCP call: `tools/call`
    (its tool name is matched against the `tools` globs), `prompts/get` (`prompts`) and
    `resources/read` (its URI against `resources`); globs are `fnmatch`, case-sensitive.
    A call matches when a glob of its kind matches and every condition given holds:
    the identity is of one of `issuers` (URLs), holds one of `groups`, is one of
    `subjects`, and one of `arguments` ((JSONPath source, compiled RFC 9535 query, RE2
    pattern) triples, evaluated on `params.arguments`) selects a string it is found in.
    `action` "approve" holds the call for `approval` (an `ApprovalRule` of the same
    name, hold mode). `server_methods` are globs of the methods of messages the server
    sends the client (`sampling/createMessage`, `elicitation/*`, `notifications/message`),
    judged by the identity conditions only ("allow" or "deny": a server's request
    cannot be held), see `hoop_addon.mcp.rules.decide_server`."""

    name: str
    action: McpAction
    reason: str
    tools: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    server_methods: tuple[str, ...] = ()
    issuers: frozenset[str] = frozenset()
    groups: Names = Names()
    subjects: Names = Names()
    arguments: tuple[tuple[str, JSONPathQuery, Any], ...] = ()
    approval: ApprovalRule | None = None

    def globs(self, method: str) -> tuple[str, ...]:
        """The globs this rule has for the target of MCP `method` (empty: not governed)."""
        return {"tools/call": self.tools, "prompts/get": self.prompts, "resources/read": self.resources}.get(method, ())

    def holds_for(self, issuer: str | None, subject: str, groups: Iterable[str]) -> bool:
        """True when the identity conditions (issuers, subjects, groups) hold."""
        return (
            (not self.issuers or issuer in self.issuers)
            and (not self.subjects or self.subjects.has(issuer, subject))
            and (not self.groups or self.groups.any_of(issuer, groups))
        )


@dataclass(frozen=True, slots=True)
class McpPolicy:
    """A route's `mcp:` block: the route carries MCP (JSON-RPC 2.0 over streamable
    HTTP); `rules` apply to governed calls in order (first match), `default` ("allow"
    or "deny") to a call no rule matches. `pinning` is what a tool whose definition
    changed since it was first listed gets (`hoop_addon.mcp.pinning`): "alert" (audited,
    counted, webhook; still listed and callable) or "hide" (also removed from
    `tools/list` and its calls denied until accepted); `pin_approvers` may accept a
    changed definition (groups and subjects). `resource` (RFC 8707), when set, is the
    route's resource URI: only tokens whose `aud` holds it are accepted on the route,
    and it is the `resource` of its protected-resource metadata (RFC 9728)."""

    rules: tuple[ToolRule, ...] = ()
    default: Literal["allow", "deny"] = "deny"
    pinning: Literal["alert", "hide"] = "alert"
    pin_approver_groups: Names = Names()
    pin_approver_subjects: Names = Names()
    resource: str | None = None

    def may_accept(self, issuer: str | None, subject: str, groups: Iterable[str]) -> bool:
        """True when an identity (issuer URL, subject, groups) may accept a changed tool
        definition on this route."""
        return self.pin_approver_subjects.has(issuer, subject) or self.pin_approver_groups.any_of(issuer, groups)


@dataclass(frozen=True, slots=True)
class Route:
    """A route: which requests it matches, who it admits, what it masks.

    `hosts` and `paths` are shell-style globs (`fnmatch`, case-insensitive for hosts,
    `*` also matches `/` in paths); a host glob with a `:` is matched against
    `host:port`. `methods` is empty for any method. `api` names the provider API the
    route serves (`hoop_addon.providers.errors.APIS`), whose error shape refusals take.
    `mcp` makes it an MCP route (see `McpPolicy` and `hoop_addon.stages.mcp`).
    `tokenizes` (derived) is whether an
    enforcing rule of the route tokenizes: its flows then need a vault session.
    """

    name: str
    hosts: tuple[str, ...]
    paths: tuple[str, ...]
    methods: frozenset[str]
    allow_groups: Names
    allow_subjects: Names
    masking: tuple[MaskRule, ...]
    credential: Credential | None = None
    allow_client_ids: Names = Names()
    allow_scopes: Names = Names()
    retention: int | None = None
    api: str | None = None  # `openai` | `anthropic`: refusals in that provider's error shape
    mcp: McpPolicy | None = None  # an MCP route: its calls are governed by these rules
    _rules: dict[str, tuple[MaskRule, ...]] = field(init=False, repr=False, compare=False)
    tokenizes: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # once per route, not on every flow
        rules = {d: tuple(r for r in self.masking if d in r.directions) for d in ("request", "response")}
        object.__setattr__(self, "_rules", rules)
        object.__setattr__(self, "tokenizes", any(r.operator == "tokenize" and not r.shadow for r in self.masking))

    def matches(self, host: str, port: int, path: str, method: str) -> bool:
        """True when `host` (any case) and `port`, `path` (query excluded) and `method`
        all match."""
        host = host.lower()
        authority = f"{host}:{port}"
        return (
            (not self.methods or method.upper() in self.methods)
            and any(fnmatch.fnmatchcase(authority if ":" in h else host, h) for h in self.hosts)
            and any(fnmatch.fnmatchcase(path, p) for p in self.paths)
        )

    def admits(
        self, issuer: str, subject: str, groups: tuple[str, ...], client_id: str | None = None, scopes: tuple[str, ...] = ()
    ) -> bool:
        """True when the caller (an identity of `issuer`, a URL) may use the route (deny
        by default): its subject, one of its groups or its client id is named in `allow`
        (when `allow` names any of them), and it holds every scope `allow.scopes` lists."""
        named = self.allow_subjects or self.allow_groups or self.allow_client_ids
        known = (
            self.allow_subjects.has(issuer, subject)
            or self.allow_groups.any_of(issuer, groups)
            or self.allow_client_ids.has(issuer, client_id)
        )
        return (known or not named) and self.allow_scopes.all_in(issuer, scopes)

    def rules_for(self, direction: Direction) -> tuple[MaskRule, ...]:
        """The masking rules that apply to `direction` ("request" or "response")."""
        return self._rules[direction]


@dataclass(frozen=True, slots=True)
class Conditions:
    """When a block or approval rule applies: every condition given must hold (an
    empty set or None is "any"); within one list, any item may match.

    `routes` are route names; `groups` match if the identity has any of them;
    `headers` pairs a lower-case header name with a compiled RE2 pattern searched in
    its value (a missing header does not match); `body_over` is a body size in bytes
    and `tokens_over` an estimated token count (see `hoop_addon.policy.conditions.estimate_tokens`),
    both exclusive; `body` holds RE2 patterns searched in the body as text; `json`
    holds (JSONPath source, compiled RFC 9535 query, RE2 pattern) triples: a match is a
    selected string value the pattern is found in.
    """

    routes: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    groups: Names = Names()
    subjects: Names = Names()
    headers: tuple[tuple[str, Any], ...] = ()
    body_over: int | None = None
    tokens_over: int | None = None
    body: tuple[Any, ...] = ()
    json: tuple[tuple[str, JSONPathQuery, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class BlockRule:
    """Refuse matching requests (`action` "block": 403 naming the rule and `reason`)
    or only audit that they would have been (`action` "log": shadow mode)."""

    name: str
    when: Conditions
    action: Literal["block", "log"]
    reason: str


@dataclass(frozen=True, slots=True)
class ApprovalRule:
    """Matching requests wait for `min_approvals` approvals from people in
    `approver_groups` or `approver_subjects` (never the requester). `timeout` (seconds)
    denies a request nobody decided. `mode` "hold" keeps the request open until the
    decision; "ticket" answers at once with an approval id, and an approved ticket lets
    the same identity's identical request through once within `ticket_window` seconds.
    `action` "log" is shadow mode: a match is only audited as "would have needed
    approval", and the request goes on.
    """

    name: str
    when: Conditions
    approver_groups: Names
    approver_subjects: Names
    reason: str
    min_approvals: int = 1
    timeout: int = 300
    mode: Literal["hold", "ticket"] = "hold"
    ticket_window: int = 900
    action: Literal["require", "log"] = "require"


LimitKey = Literal["subject", "group", "route", "client_id"]


DEFAULT_OUTPUT_TOKENS = 1024  # `default_output_tokens` when a limit does not set it


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit or budget (`limits:`): at most `requests_per_minute` requests,
    `tokens_per_minute` and `tokens_per_day` LLM tokens (prompt tokens estimated from
    the request, completion tokens as the provider's `usage` reports them, else
    estimated from the response's bytes), counted
    over sliding windows, separately for each value of `per` (e.g. ("subject",): each
    caller has its own count; ("group",): the members of a group share one; (): one
    count for everybody). It applies to the flows matching `routes`, `groups` and
    `subjects` (empty: any). `action` "log" is shadow mode: a flow over the limit is
    only audited and counted as such.

    A request is admitted only if its prompt estimate plus its output bound fit (the
    bound the request declares, e.g. `max_tokens`, else `default_output_tokens`): that
    much is reserved at once, so concurrent requests cannot together pass the limit,
    and is corrected to what was used when the response is known."""

    name: str
    per: tuple[LimitKey, ...] = ("subject",)
    routes: frozenset[str] = frozenset()
    groups: Names = Names()
    subjects: Names = Names()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    action: Literal["enforce", "log"] = "enforce"
    default_output_tokens: int = DEFAULT_OUTPUT_TOKENS

    def applies(self, route: str | None, issuer: str | None, subject: str, groups: tuple[str, ...] | list[str]) -> bool:
        """True when a flow on `route` by `subject` (of `issuer`) with `groups` is counted."""
        return (
            (not self.routes or route in self.routes)
            and (not self.subjects or self.subjects.has(issuer, subject))
            and (not self.groups or self.groups.any_of(issuer, groups))
        )

    def keys(self, route: str | None, identity: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The counts a flow is charged to: one per combination of `per` (a caller in
        two counted groups is charged to both groups' counts). Names are only unique at
        their issuer (see `Names`), so a subject, client id or group is keyed as
        (issuer, value): the same name at two issuers has two counts."""
        issuer = identity.get("issuer")
        groups = [(issuer, g) for g in identity.get("groups") or () if not self.groups or self.groups.has(issuer, g)] or [None]
        values = {
            "subject": [(issuer, identity.get("subject"))], "route": [route],
            "client_id": [(issuer, identity.get("client_id"))], "group": groups,
        }
        keys: list[tuple[Any, ...]] = [()]
        for dimension in self.per:
            keys = [(*k, v) for k in keys for v in values[dimension]]
        return keys


@dataclass(frozen=True, slots=True)
class RecordingPolicy:
    """How sessions are recorded and the audit log kept (`recording:` and `audit:`).

    `signing` "required" refuses to start without a signing key; "unsigned" is the
    development mode (manifests and checkpoints unsigned: verify reports them so).
    A recording is checkpointed every `checkpoint_flows` flows or `checkpoint_seconds`
    (signing is per checkpoint, not per flow: under load one signature covers many),
    and rotated to a new part at `rotate_bytes` or `rotate_seconds` (0: never).
    `scrub_cookies` and `scrub_query` name cookies and query parameters recorded as
    `[SCRUBBED]` (beside the built-in list of secret query parameters). `retention`
    (seconds; None: forever) applies to routes without their own. The audit log is
    checkpointed every `audit_checkpoint_entries` entries or `audit_checkpoint_seconds`.
    """

    signing: Literal["required", "unsigned"] = "required"
    checkpoint_flows: int = 100
    checkpoint_seconds: int = 1
    rotate_bytes: int = 0
    rotate_seconds: int = 0
    scrub_cookies: tuple[str, ...] = ()
    scrub_query: tuple[str, ...] = ()
    retention: int | None = None
    audit_checkpoint_entries: int = 100
    audit_checkpoint_seconds: int = 30


@dataclass(frozen=True, slots=True)
class Policy:
    """A complete, validated rule set.

    `digest` is the SHA-256 (hex) of the loaded files' names and bytes, in load order:
    the policy hash written into every audit line. `token_sources` names where identity
    tokens are accepted from. `unmatched` says what happens to traffic no route matches.
    `block_rules` and `approval_rules` apply in file order (first match);
    `max_pending` caps the approvals waiting at once. `recording` holds the recording
    and audit settings; a route's `retention` (seconds) overrides its default.
    `limits` are the rate limits and budgets, all of which apply. `binds_resources`
    (derived) is whether an MCP route names its `resource` (RFC 8707).
    """

    files: tuple[str, ...]
    digest: str
    issuers: tuple[Issuer, ...]
    token_sources: frozenset[TokenSource]
    unmatched: Literal["deny", "allow"]
    routes: tuple[Route, ...]
    block_rules: tuple[BlockRule, ...] = ()
    approval_rules: tuple[ApprovalRule, ...] = ()
    max_pending: int = 100
    recording: RecordingPolicy = RecordingPolicy()
    limits: tuple[Limit, ...] = ()
    binds_resources: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # once per policy: whether a route binds tokens to its resource (RFC 8707), so
        # that identity looks the route up only then
        object.__setattr__(self, "binds_resources", any(r.mcp is not None and r.mcp.resource for r in self.routes))

    def approval_rule(self, name: str) -> ApprovalRule | None:
        """The approval rule named `name`: of `approval_rules`, or of an MCP rule of a
        route (`action: approve`); None when no rule has that name."""
        for rule in self.approval_rules:
            if rule.name == name:
                return rule
        for route in self.routes:
            for tool_rule in route.mcp.rules if route.mcp else ():
                if tool_rule.name == name and tool_rule.approval is not None:
                    return tool_rule.approval
        return None

    def route_for(self, host: str, port: int, path: str, method: str) -> Route | None:
        """The first route, in file order, that matches the request; None if none does."""
        for route in self.routes:
            if route.matches(host, port, path, method):
                return route
        return None
