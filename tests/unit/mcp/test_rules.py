"""MCP tool rules: the `mcp:` block of a route as the loader reads it (and refuses it),
which call each identity may make, and which tools its `tools/list` keeps."""

from __future__ import annotations

import textwrap
from pathlib import Path

import orjson
import pytest

from hoop_addon.mcp.jsonrpc import parse_body
from hoop_addon.mcp.rules import decide, decide_server, may_list
from hoop_addon.policy.conditions import UninspectableBody
from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.model import McpPolicy

ISSUER = """\
issuers:
  - name: idp
    issuer: https://idp.example
    audience: hoop-gateway
    jwks: https://idp.example/jwks.json
"""

MCP = """\
routes:
  - name: tools
    match: {hosts: [mcp.example], paths: [/mcp]}
    allow: {groups: [agents]}
    mcp:
      default: deny
      rules:
        - name: no-prod-deletes
          tools: [delete_*]
          when:
            arguments: [{path: $.bucket, matches: "^prod-"}]
          action: deny
          reason: production buckets are never deleted by agents
        - name: deletes-need-review
          tools: [delete_*]
          action: approve
          approvers: {groups: [reviewers]}
          timeout: 60
        - name: interns-read-only
          tools: ["*"]
          when: {groups: [interns]}
          action: deny
        - name: readers
          tools: [echo, "get_*"]
          prompts: [summary]
          resources: ["file:///public/*"]
          when: {issuers: [idp]}
          action: allow
"""

AGENT = {"issuer": "https://idp.example", "subject": "agent-1", "groups": ["agents"]}
INTERN = {"issuer": "https://idp.example", "subject": "intern-1", "groups": ["agents", "interns"]}


def load(tmp_path: Path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(ISSUER + textwrap.dedent(text))
    return load_policy(path, resolve_env=False)


def mcp_policy(tmp_path: Path) -> McpPolicy:
    route = load(tmp_path, MCP).routes[0]
    assert route.mcp is not None
    return route.mcp


def message(method: str, target: str, arguments: dict | None = None):
    member = "uri" if method == "resources/read" else "name"
    params = {member: target, **({"arguments": arguments} if arguments is not None else {})}
    (msg,), _ = parse_body(orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
    return msg


def test_the_block_loads_with_rules_in_order(tmp_path: Path) -> None:
    policy = load(tmp_path, MCP)
    mcp = policy.routes[0].mcp
    assert mcp is not None and mcp.default == "deny"
    assert [(r.name, r.action) for r in mcp.rules] == [
        ("no-prod-deletes", "deny"), ("deletes-need-review", "approve"), ("interns-read-only", "deny"), ("readers", "allow")]
    approval = policy.approval_rule("deletes-need-review")
    assert approval is not None and approval.timeout == 60 and approval.mode == "hold"
    assert approval.approver_groups.has("https://idp.example", "reviewers")
    assert policy.approval_rule("readers") is None and policy.approval_rule("nothing") is None
    assert mcp.rules[3].issuers == frozenset({"https://idp.example"})


@pytest.mark.parametrize(("method", "target", "arguments", "identity", "expected"), [
    ("tools/call", "echo", {"text": "hi"}, AGENT, ("allow", "readers")),
    ("tools/call", "get_user", None, AGENT, ("allow", "readers")),
    ("tools/call", "delete_bucket", {"bucket": "prod-eu"}, AGENT, ("deny", "no-prod-deletes")),
    ("tools/call", "delete_bucket", {"bucket": "dev-eu"}, AGENT, ("approve", "deletes-need-review")),
    ("tools/call", "delete_bucket", {"bucket": ["prod-eu"]}, AGENT, ("approve", "deletes-need-review")),  # a list is no string
    ("tools/call", "echo", {}, INTERN, ("deny", "interns-read-only")),
    ("tools/call", "Echo", {}, AGENT, ("deny", None)),  # globs are case-sensitive: the default decides
    ("tools/call", "summary", {}, AGENT, ("deny", None)),  # `prompts:` globs do not name tools
    ("prompts/get", "summary", {}, AGENT, ("allow", "readers")),
    ("resources/read", "file:///public/a.txt", None, AGENT, ("allow", "readers")),
    ("resources/read", "file:///etc/passwd", None, AGENT, ("deny", None)),
    ("tools/call", "echo", {}, {**AGENT, "issuer": "https://other.example"}, ("deny", None)),
])
def test_first_matching_rule_decides(tmp_path: Path, method, target, arguments, identity, expected) -> None:
    outcome, rule = decide(mcp_policy(tmp_path), message(method, target, arguments), identity)
    assert (outcome, rule.name if rule else None) == expected


def test_tools_list_hides_only_tools_every_call_of_is_denied(tmp_path: Path) -> None:
    mcp = mcp_policy(tmp_path)
    assert [t for t in ("echo", "get_user", "delete_bucket", "secret_tool") if may_list(mcp, t, AGENT)] == [
        "echo", "get_user", "delete_bucket"]  # a deny rule on some arguments leaves the approvable tool visible
    assert [t for t in ("echo", "delete_bucket") if may_list(mcp, t, INTERN)] == ["delete_bucket"]


def test_default_allow_lists_and_allows_the_unnamed(tmp_path: Path) -> None:
    route = load(tmp_path, """\
        routes:
          - name: tools
            match: {hosts: [mcp.example]}
            allow: {groups: [agents]}
            mcp:
              default: allow
              rules:
                - {name: no-shell, tools: [shell], action: deny}
        """).routes[0]
    assert decide(route.mcp, message("tools/call", "anything", {}), AGENT) == ("allow", None)
    assert not may_list(route.mcp, "shell", AGENT) and may_list(route.mcp, "anything", AGENT)


def test_empty_block_denies_every_governed_call(tmp_path: Path) -> None:
    route = load(tmp_path, "routes:\n  - {name: t, match: {hosts: [m]}, allow: {groups: [a]}, mcp: {}}\n").routes[0]
    assert route.mcp == McpPolicy() and decide(route.mcp, message("tools/call", "echo", {}), AGENT) == ("deny", None)


def test_arguments_nested_too_deep_cannot_be_inspected(tmp_path: Path) -> None:
    route = load(tmp_path, """\
        routes:
          - name: tools
            match: {hosts: [mcp.example]}
            allow: {groups: [agents]}
            mcp:
              rules:
                - {name: deep, tools: ["*"], when: {arguments: [{path: "$..x", matches: y}]}, action: deny}
        """).routes[0]
    deep: dict = {}
    for _ in range(200):  # within what orjson parses (254), past the JSONPath library's depth limit
        deep = {"a": deep}
    msg = message("tools/call", "echo", {"a": deep})
    with pytest.raises(UninspectableBody):
        decide(route.mcp, msg, AGENT)


RULE = "routes:\n  - name: t\n    match: {{hosts: [m]}}\n    allow: {{groups: [a]}}\n    mcp:\n{block}"


@pytest.mark.parametrize(("block", "key", "says"), [
    ("      defualt: deny\n", "routes[0].mcp.defualt", "did you mean 'default'"),
    ("      default: maybe\n", "routes[0].mcp.default", "'maybe' is not one of: allow, deny"),
    ("      rules:\n        - {name: r, action: allow}\n", "routes[0].mcp.rules[0]", "names what it governs"),
    ("      rules:\n        - {name: r, tools: [x], action: block}\n", "routes[0].mcp.rules[0].action", "not one of: allow, deny, approve"),
    ("      rules:\n        - {name: r, tools: [x], action: approve}\n", "routes[0].mcp.rules[0].approvers", "required key is missing"),
    ("      rules:\n        - {name: r, tools: [x], action: approve, approvers: {}}\n", "routes[0].mcp.rules[0].approvers",
     "nobody can approve"),
    ("      rules:\n        - {name: r, tools: [x], action: deny, timeout: 5}\n", "routes[0].mcp.rules[0].timeout",
     "only an 'approve' rule has timeout"),
    ("      rules:\n        - {name: r, tools: [x], action: deny, when: {issuers: [okta]}}\n",
     "routes[0].mcp.rules[0].when.issuers[0]", "unknown issuer 'okta'"),
    ("      rules:\n        - {name: r, tools: [x], action: deny, when: {arguments: [{path: 'a.b', matches: x}]}}\n",
     "routes[0].mcp.rules[0].when.arguments[0].path", "invalid JSONPath"),
    ("      rules:\n        - {name: r, tools: [x], action: deny, when: {arguments: [{path: $.a, matches: '('}]}}\n",
     "routes[0].mcp.rules[0].when.arguments[0].matches", "invalid RE2 pattern"),
    ("      rules:\n        - {name: r, tools: [x], action: deny, when: {grups: [a]}}\n", "routes[0].mcp.rules[0].when.grups",
     "did you mean 'groups'"),
    ("      rules:\n        - {name: r, tools: [x], action: deny}\n        - {name: r, tools: [y], action: deny}\n",
     "routes[0].mcp.rules[1].name", "duplicate MCP rule name 'r'"),
    ("      rules: {name: r}\n", "routes[0].mcp.rules", "expected a list"),
    ("      pinning: block\n", "routes[0].mcp.pinning", "one of"),
    ("      pinning: hide\n", "routes[0].mcp", "name pin_approvers.groups"),
    ("      pin_approvers: {grups: [a]}\n", "routes[0].mcp.pin_approvers.grups", "did you mean 'groups'"),
    ("      rules:\n        - {name: r, server_methods: [sampling/*], action: approve, approvers: {groups: [a]}}\n",
     "routes[0].mcp.rules[0].action", "a server's request cannot be held"),
    ("      rules:\n        - {name: r, server_methods: [x], action: deny, when: {arguments: [{path: $.a, matches: b}]}}\n",
     "routes[0].mcp.rules[0].when.arguments", "cannot have them"),
    ("      rules:\n        - {name: r, server_method: [x], action: deny}\n", "routes[0].mcp.rules[0]", "names what it governs"),
])
def test_invalid_blocks_are_refused_with_file_line_and_key(tmp_path: Path, block: str, key: str, says: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, RULE.format(block=block))
    assert caught.value.key == key and says in caught.value.message and caught.value.line > 0


def test_pinning_defaults_to_alert_and_hide_names_who_accepts(tmp_path: Path) -> None:
    assert load(tmp_path, RULE.format(block="      default: allow\n")).routes[0].mcp.pinning == "alert"
    mcp = load(tmp_path, RULE.format(block="      pinning: hide\n      pin_approvers: {groups: [sre], subjects: [bob]}\n")).routes[0].mcp
    assert mcp.pinning == "hide" and mcp.may_accept(None, "bob", ()) and mcp.may_accept(None, "eve", ["sre"])
    assert not mcp.may_accept(None, "eve", ["agents"])


def test_an_mcp_rule_name_is_not_reused_by_an_approval_rule(tmp_path: Path) -> None:
    text = RULE.format(block="      rules:\n        - {name: shared, tools: [x], action: deny}\n") + textwrap.dedent("""\
        approvals:
          - name: shared
            when: {routes: [t]}
            approvers: {groups: [a]}
        """)
    with pytest.raises(PolicyError, match="duplicate block/approval rule name 'shared'"):
        load(tmp_path, text)


def test_the_readme_example_loads(tmp_path: Path) -> None:
    """The policy of README's "Governing MCP tool calls" section is accepted, and says
    what the section says it does."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("## Governing MCP tool calls", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "policy.yaml").write_text(example)
    policy = load_policy(tmp_path / "policy.yaml", resolve_env=False)
    (route,) = policy.routes
    assert route.mcp is not None and [r.name for r in route.mcp.rules] == [
        "no-prod-deletes", "deletes-need-review", "readers", "no-sampling-for-contractors"]
    assert route.mcp.pinning == "hide" and route.mcp.may_accept(None, "s", ["sre"])
    agent = {"issuer": "https://corp.okta.com/oauth2/default", "subject": "a", "groups": ["agents"]}
    assert decide(route.mcp, message("tools/call", "delete_ticket", {"project": "prod-x"}), agent)[0] == "deny"
    assert decide(route.mcp, message("tools/call", "delete_ticket", {"project": "dev-x"}), agent)[0] == "approve"
    assert decide(route.mcp, message("resources/read", "ticket://42"), agent)[0] == "allow"
    assert decide(route.mcp, message("tools/call", "shell"), agent)[0] == "deny"
    contractor = {**agent, "groups": ["agents", "contractors"]}
    assert decide_server(route.mcp, "elicitation/create", contractor)[0] == "deny"
    assert decide_server(route.mcp, "sampling/createMessage", agent) == ("allow", None)


def test_server_methods_rules_judge_what_the_server_sends_first_match_else_allow(tmp_path: Path) -> None:
    mcp = load(tmp_path, RULE.format(block="""\
      rules:
        - {name: echo-ok, tools: [echo], action: allow}
        - {name: interns-no-sampling, server_methods: [sampling/*], when: {groups: [interns]}, action: deny}
        - {name: quiet, server_methods: ["notifications/message", "elicitation/*"], action: deny, reason: quiet please}
""")).routes[0].mcp
    assert [(r.name, r.server_methods) for r in mcp.rules][1:] == [
        ("interns-no-sampling", ("sampling/*",)), ("quiet", ("notifications/message", "elicitation/*"))]
    assert decide_server(mcp, "sampling/createMessage", INTERN)[1].name == "interns-no-sampling"
    assert decide_server(mcp, "sampling/createMessage", AGENT) == ("allow", None)
    assert decide_server(mcp, "elicitation/create", AGENT)[0] == "deny"
    assert decide_server(mcp, "notifications/progress", AGENT) == ("allow", None)
    assert decide_server(mcp, "echo", AGENT) == ("allow", None)  # a tool glob never judges a server's method
    assert may_list(mcp, "echo", AGENT)
