"""Which MCP calls an identity may make, and which tools it may see (pure: no mitmproxy).

A governed call (`tools/call`, `prompts/get`, `resources/read`) is judged by the first
rule of the route's `mcp:` block that matches it (`ToolRule`), else by the block's
`default`. Arguments are matched as the agent sent them, before masking, as block rules
match bodies (see `hoop_addon.policy.conditions`).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from hoop_addon.mcp.jsonrpc import Message
from hoop_addon.policy.conditions import json_found
from hoop_addon.policy.model import McpPolicy, ToolRule


def _governs(rule: ToolRule, method: str, target: str, identity: dict[str, Any]) -> bool:
    """True when `rule` names `target` for `method` and its identity conditions hold."""
    return any(fnmatch.fnmatchcase(target, g) for g in rule.globs(method)) and rule.holds_for(
        identity.get("issuer"), identity.get("subject", ""), identity.get("groups") or ())


def decide(policy: McpPolicy, call: Message, identity: dict[str, Any]) -> tuple[str, ToolRule | None]:
    """The outcome ("allow", "deny" or "approve") of governed `call` (its `target` is
    set) by `identity` (the Identify stage's note: `issuer`, `subject`, `groups`), and the
    rule that decided it (None: the default). Raises
    `hoop_addon.policy.conditions.UninspectableBody` when an argument condition cannot
    be evaluated (arguments nested too deep)."""
    method, target = call.method or "", call.target or ""
    arguments = call.params.get("arguments") if isinstance(call.params, dict) else None
    document = arguments if isinstance(arguments, dict) else {}
    for rule in policy.rules:
        if _governs(rule, method, target, identity) and (
            not rule.arguments or json_found(rule.arguments, document)
        ):
            return rule.action, rule
    return policy.default, None


def may_list(policy: McpPolicy, tool: str, identity: dict[str, Any]) -> bool:
    """True when `identity` could have some call of `tool` allowed or approved, i.e. the
    tool stays in its `tools/list`: a tool that every call of would be denied is hidden.
    A deny rule with argument conditions does not hide the tool (other arguments may
    pass), an allow or approve rule that may apply shows it."""
    for rule in policy.rules:
        if not _governs(rule, "tools/call", tool, identity):
            continue
        if rule.action != "deny":
            return True
        if not rule.arguments:
            return False
    return policy.default == "allow"


def decide_server(policy: McpPolicy, method: str, identity: dict[str, Any]) -> tuple[str, ToolRule | None]:
    """The outcome ("allow" or "deny") of a message the server sends the client with
    `method` (one of `hoop_addon.mcp.jsonrpc.SERVER_REQUESTS` / `SERVER_NOTIFICATIONS`:
    the caller refuses any other) on the stream of `identity`, and the rule that decided
    it: the first rule whose `server_methods` globs match `method` and whose identity
    conditions hold; none: "allow" (the revision's methods are allowed unless a rule
    denies them; the block's `default` is for the client's calls)."""
    for rule in policy.rules:
        if any(fnmatch.fnmatchcase(method, g) for g in rule.server_methods) and rule.holds_for(
            identity.get("issuer"), identity.get("subject", ""), identity.get("groups") or ()
        ):
            return rule.action, rule
    return "allow", None
