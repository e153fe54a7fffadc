"""Policy loading: the example rule set, every kind of `PolicyError` (file, line, dotted
key, message), credentials from the environment, and route matching."""

from __future__ import annotations

import textwrap
from pathlib import Path

import orjson
import pytest

from hoop_addon.masking.body import mask_body
from hoop_addon.policy.loader import PolicyError, load_policy
from hoop_addon.policy.model import Policy

RULES = Path(__file__).resolve().parents[3] / "rules"

ISSUER = """\
issuers:
  - name: idp
    issuer: https://idp.example
    audience: hoop-gateway
    jwks: https://idp.example/jwks.json
"""


def write(directory: Path, text: str, name: str = "policy.yaml") -> Path:
    """Write dedented YAML `text` as `directory/name` and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path: Path) -> PolicyError:
    """The `PolicyError` that loading `path` (without the environment) raises."""
    with pytest.raises(PolicyError) as caught:
        load_policy(path, resolve_env=False)
    return caught.value


def route_policy(route: str, *, resolve_env: bool = False, directory: Path) -> Policy:
    """Load the test issuer plus one route given as YAML (indented under `routes:`)."""
    text = ISSUER + "routes:\n" + textwrap.indent(textwrap.dedent(route), "  ")
    return load_policy(write(directory, text), resolve_env=resolve_env)


class TestExampleRules:
    def test_example_rules_directory_loads_without_environment(self) -> None:
        policy = load_policy(RULES, resolve_env=False)

        assert policy.files == (str(RULES / "gateway.yaml"),)
        assert len(policy.digest) == 64
        (issuer,) = policy.issuers
        assert (issuer.name, issuer.issuer, issuer.audiences, issuer.algorithms) == (
            "dev", "hoop-dev", ("hoop-gateway",), ("ES256",)
        )
        assert issuer.jwks == str((RULES.parent / ".hoop/dev-issuer/jwks.json").resolve())
        assert policy.token_sources == {"authorization", "x_api_key", "proxy_password"}
        assert policy.unmatched == "deny"
        assert [r.name for r in policy.routes] == ["openai", "anthropic", "local-traces", "local-anthropic", "local-llm"]
        assert [r.api for r in policy.routes] == ["openai", "anthropic", None, "anthropic", "openai"]
        anthropic = policy.routes[1]
        assert anthropic.credential is not None and anthropic.credential.header == "x-api-key"
        openai = policy.routes[0]
        assert [m.name for m in openai.masking] == ["pii-in-prompts", "secrets-in-prompts", "pii-in-completions"]
        assert openai.credential is not None
        assert (openai.credential.header, openai.credential.value) == ("Authorization", "Bearer ${OPENAI_API_KEY}")

    def test_example_rules_route_openai_traffic(self) -> None:
        policy = load_policy(RULES, resolve_env=False)

        route = policy.route_for("api.openai.com", 443, "/v1/chat/completions", "POST")

        assert route is not None and route.name == "openai"
        assert route.admits("https://idp.example", "anyone", ("agents",))
        assert not route.admits("https://idp.example", "anyone", ("developers",))
        assert [r.name for r in route.rules_for("response")] == ["pii-in-completions"]

    def test_an_unknown_api_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "p.yaml").write_text(
            "version: 1\nroutes:\n  - name: r\n    api: gemini\n    match: {hosts: [h]}\n    allow: {groups: [g]}\n")
        with pytest.raises(PolicyError, match="unknown api 'gemini': one of openai, anthropic"):
            load_policy(tmp_path, resolve_env=False)

    def test_digest_changes_when_a_file_changes(self, tmp_path: Path) -> None:
        path = write(tmp_path, "defaults:\n  unmatched: deny\n")
        before = load_policy(path).digest
        assert load_policy(path).digest == before

        write(tmp_path, "defaults:\n  unmatched: allow\n")

        assert load_policy(path).digest != before


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [
        pytest.param(
            """\
            routes:
              - name: r
                match: hosts: [a.example]
            """,
            3, "(yaml)", "mapping values are not allowed here", id="yaml-syntax",
        ),
        pytest.param(
            """\
            routes:
              - name: r
                match:
                  hostz: [a.example]
            """,
            4, "routes[0].match.hostz", "unknown key (did you mean 'hosts'?)", id="unknown-key-did-you-mean",
        ),
        pytest.param(
            """\
            version: 1
            rutes: []
            """,
            2, "rutes", "unknown key (did you mean 'routes'?)", id="unknown-top-level-key",
        ),
        pytest.param(
            """\
            issuers:
              - name: idp
                audience: hoop-gateway
                jwks: https://idp.example/jwks.json
            """,
            2, "issuers[0].issuer", "required key is missing", id="missing-required-key",
        ),
        pytest.param(
            """\
            issuers:
              - name: idp
                issuer: https://idp.example
                audience: hoop-gateway
                jwks: https://idp.example/jwks.json
                leeway: abc
            """,
            6, "issuers[0].leeway", "expected int, got str", id="wrong-type-int",
        ),
        pytest.param(
            """\
            routes:
              - name: r
                match:
                  hosts: {a.example: yes}
            """,
            4, "routes[0].match.hosts", "expected a list, got a mapping", id="mapping-instead-of-list",
        ),
        pytest.param(
            """\
            detectors:
              - name: employee_id
                pattern: (?<=EMP)\\d{6}
            """,
            3, "detectors[0].pattern", "invalid RE2 pattern", id="invalid-re2-pattern",
        ),
        pytest.param(
            """\
            detectors:
              - name: employee_id
                pattern: EMP(\\d{6})
            """,
            3, "detectors[0].pattern", "pattern must not contain capturing groups", id="capturing-group",
        ),
        pytest.param(
            """\
            detectors:
              - name: wide
                pattern: .{300}x
            """,
            3, "detectors[0].pattern", "pattern compiles to an RE2 program of 2405 instructions, more than 2000", id="program-too-large",
        ),
        pytest.param(
            """\
            masking:
              - name: m
                paths:
                  - $.messages[*].content
                  - $.messages[
                detectors: [email]
            """,
            5, "masking[0].paths[1]", "invalid JSONPath", id="invalid-jsonpath",
        ),
        pytest.param(
            """\
            masking:
              - name: m
                detectors: [email, emial]
            """,
            3, "masking[0].detectors[1]", "unknown detector 'emial' (did you mean 'email'?)", id="unknown-detector",
        ),
        pytest.param(
            """\
            masking:
              - name: m
                detectors: []
            """,
            3, "masking[0].detectors", "name at least one detector", id="no-detector",
        ),
        pytest.param(
            """\
            routes:
              - name: r
                match: {hosts: [a.example]}
                allow: {groups: [agents]}
                masking: [pii]
            """,
            5, "routes[0].masking[0]", "unknown masking rule 'pii'", id="unknown-masking-rule",
        ),
        pytest.param(
            """\
            defaults:
              unmatched: deny
              unmatched: allow
            """,
            3, "defaults.unmatched", "duplicate key", id="duplicate-yaml-key",
        ),
        pytest.param(
            """\
            routes:
              - name: r
                match: {hosts: [a.example]}
                allow: {groups: [agents]}
                credential:
                  header: Authorization
                  value: Bearer sk-literal-secret
            """,
            7, "routes[0].credential.value", "write secrets as ${ENV_VAR} references, never literally",
            id="literal-credential",
        ),
        pytest.param(
            """\
            routes:
              - name: r
                match: {hosts: [a.example]}
                allow: {}
            """,
            4, "routes[0].allow", "admits nobody: name allow.groups or allow.subjects", id="allow-names-nobody",
        ),
        pytest.param(
            """\
            issuers:
              - name: idp
                issuer: https://idp.example
                audience: hoop-gateway
                jwks: http://idp.example/jwks.json
            """,
            5, "issuers[0].jwks", "JWKS over plain http is only allowed on loopback", id="plain-http-jwks",
        ),
        pytest.param(
            """\
            issuers:
              - name: idp
                issuer: https://idp.example
                audience: hoop-gateway
                jwks: https://idp.example/jwks.json
                algorithms: [RS256, HS256]
            """,
            6, "issuers[0].algorithms[1]", "'HS256' is not one of: RS256, RS384, RS512, ES256, ES384, ES512",
            id="unsupported-algorithm",
        ),
        pytest.param(
            """\
            routes:
              - name: r
                match: {hosts: [a.example]}
                allow: {groups: [agents]}
            """,
            1, "issuers", "routes need at least one trusted issuer", id="routes-without-issuer",
        ),
    ],
)
def test_policy_error_names_file_line_and_key(tmp_path: Path, text: str, line: int, key: str, message: str) -> None:
    path = write(tmp_path, text)

    error = load_error(path)

    assert (error.file, error.line, error.key) == (str(path), line, key)
    assert error.message.startswith(message)
    assert str(error) == f"{path}:{line}: {key}: {error.message}"


def test_duplicate_route_name_across_files_names_the_first_file(tmp_path: Path) -> None:
    route = """\
        routes:
          - name: llm
            match: {hosts: [a.example]}
            allow: {groups: [agents]}
        """
    first = write(tmp_path, ISSUER + textwrap.dedent(route), name="a.yaml")
    second = write(tmp_path, route, name="b.yaml")

    error = load_error(tmp_path)

    assert (error.file, error.line, error.key) == (str(second), 2, "routes[0].name")
    assert error.message == f"duplicate route name 'llm' (first in {first}:7)"


def test_duplicate_masking_rule_name_across_files_names_the_first_file(tmp_path: Path) -> None:
    rule = """\
        masking:
          - name: pii
            detectors: [email]
        """
    first = write(tmp_path, rule, name="10-pii.yaml")
    write(tmp_path, rule, name="20-more.yml")

    error = load_error(tmp_path)

    assert (error.line, error.key) == (2, "masking[0].name")
    assert error.message == f"duplicate masking rule name 'pii' (first in {first}:2)"


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        pytest.param("", "(dir)", "no *.yaml policy files here", id="directory-without-yaml"),
        pytest.param("absent", "(path)", "no such policy file or directory", id="missing-path"),
    ],
)
def test_unusable_path_is_an_error_without_line(tmp_path: Path, name: str, key: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("not a policy")
    path = tmp_path / name

    error = load_error(path)

    assert (error.file, error.line, error.key, error.message) == (str(path), 0, key, message)
    assert str(error) == f"{path}: {message}"


@pytest.mark.parametrize("jwks", ["http://127.0.0.1:8080/jwks.json", "http://localhost/jwks.json", "http://[::1]/jwks.json"])
def test_plain_http_jwks_is_allowed_on_loopback(tmp_path: Path, jwks: str) -> None:
    policy = load_policy(write(tmp_path, ISSUER.replace("https://idp.example/jwks.json", jwks)))

    assert policy.issuers[0].jwks == jwks


def test_relative_jwks_path_resolves_against_the_policy_file(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path / "rules", ISSUER.replace("https://idp.example/jwks.json", "../keys/jwks.json")))

    assert policy.issuers[0].jwks == str(tmp_path.resolve() / "keys" / "jwks.json")


class TestCredentials:
    ROUTE = """\
        - name: r
          match: {hosts: [a.example]}
          allow: {groups: [agents]}
          credential:
            header: Authorization
            value: Bearer ${HOOP_UNIT_TEST_KEY}
        """

    def test_unset_variable_is_an_error_when_resolving(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("HOOP_UNIT_TEST_KEY", raising=False)

        with pytest.raises(PolicyError) as caught:
            route_policy(self.ROUTE, resolve_env=True, directory=tmp_path)

        error = caught.value
        assert (error.line, error.key) == (12, "routes[0].credential.value")
        assert error.message == "environment variable HOOP_UNIT_TEST_KEY is not set"

    def test_set_variable_is_substituted(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HOOP_UNIT_TEST_KEY", "sk-from-env")

        credential = route_policy(self.ROUTE, resolve_env=True, directory=tmp_path).routes[0].credential

        assert credential is not None
        assert (credential.header, credential.value) == ("Authorization", "Bearer sk-from-env")

    def test_reference_is_kept_unresolved_without_resolve_env(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("HOOP_UNIT_TEST_KEY", raising=False)

        credential = route_policy(self.ROUTE, directory=tmp_path).routes[0].credential

        assert credential is not None and credential.value == "Bearer ${HOOP_UNIT_TEST_KEY}"


class TestRouteMatching:
    ROUTES = """\
        routes:
          - name: admin
            match:
              hosts: [API.example.com]
              paths: [/v1/admin/*]
            allow: {groups: [admins]}
          - name: api
            match:
              hosts: ["*.example.com"]
              paths: [/v1/*]
              methods: [get, post]
            allow: {groups: [agents]}
          - name: alt-port
            match:
              hosts: ["localhost:8443"]
            allow: {subjects: [svc-1]}
        """

    @pytest.fixture
    def policy(self, tmp_path: Path) -> Policy:
        return load_policy(write(tmp_path, ISSUER + textwrap.dedent(self.ROUTES)))

    @pytest.mark.parametrize(
        ("host", "port", "path", "method", "expected"),
        [
            pytest.param("api.example.com", 443, "/v1/admin/users", "GET", "admin", id="first-match-wins"),
            pytest.param("API.EXAMPLE.COM", 443, "/v1/admin/users", "GET", "admin", id="host-case-insensitive"),
            pytest.param("api.example.com", 443, "/v1/chat/completions", "post", "api", id="star-spans-slashes"),
            pytest.param("eu.api.example.com", 8080, "/v1/models", "GET", "api", id="host-glob-any-port"),
            pytest.param("example.com", 443, "/v1/models", "GET", None, id="glob-needs-subdomain"),
            pytest.param("api.example.com", 443, "/v1/models", "DELETE", None, id="method-not-listed"),
            pytest.param("api.example.com", 443, "/V1/models", "GET", None, id="path-case-sensitive"),
            pytest.param("api.example.com", 443, "/v2/models", "GET", None, id="path-not-matched"),
            pytest.param("localhost", 8443, "/anything", "PATCH", "alt-port", id="host-port-pattern"),
            pytest.param("localhost", 443, "/anything", "PATCH", None, id="host-port-pattern-wrong-port"),
        ],
    )
    def test_route_for(self, policy: Policy, host: str, port: int, path: str, method: str, expected: str | None) -> None:
        route = policy.route_for(host, port, path, method)

        assert (route.name if route else None) == expected

    def test_route_admits_by_group_or_subject(self, policy: Policy) -> None:
        admin, _, alt = policy.routes

        assert admin.admits("https://idp.example", "alice", ("staff", "admins"))
        assert not admin.admits("https://idp.example", "alice", ("staff",))
        assert alt.admits("https://idp.example", "svc-1", ())
        assert not alt.admits("https://idp.example", "svc-2", ("admins",))


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [("", "deny"), ("defaults:\n  unmatched: allow\n", "allow"), ("defaults: {}\n", "deny")],
)
def test_unmatched_traffic_default(tmp_path: Path, defaults: str, expected: str) -> None:
    assert load_policy(write(tmp_path, ISSUER + defaults)).unmatched == expected


def test_value_not_fitting_its_explicit_tag_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`!!int abc` makes the YAML constructor raise ValueError: it must be a PolicyError
    (file:line:key), and `hoop policy check` must print it without a traceback."""
    from hoop_addon.cli.main import main

    path = write(tmp_path, ISSUER + "defaults:\n  max_pending: !!int abc\n")

    error = load_error(path)

    assert (error.file, error.line, error.key) == (str(path), 7, "defaults.max_pending")
    assert "invalid int value 'abc'" in error.message
    assert main(["policy", "check", str(path)]) != 0
    captured = capsys.readouterr()
    assert f"{path}:7: defaults.max_pending: invalid int value 'abc'" in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


def test_file_unreadable_while_loading_is_a_policy_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that disappears between listing and reading (a hot reload mid-save)."""
    path = write(tmp_path, ISSUER)

    def vanished(self: Path) -> bytes:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(Path, "read_bytes", vanished)
    error = load_error(path)

    assert (error.file, error.line, error.key) == (str(path), 0, "(file)")
    assert error.message == "cannot read: No such file or directory"


def test_watcher_survives_an_unexpected_error_and_applies_a_later_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Any exception from a reload is a refused reload; the watcher task stays alive,
    the old policy keeps enforcing, and a later valid change still applies."""
    import asyncio

    from mitmproxy.test import taddons

    from hoop_addon.stages import policy as stage_module

    route = "routes:\n  - name: r\n    match: {hosts: [a.example]}\n    allow: {groups: [agents]}\n"
    path = write(tmp_path / "rules", ISSUER + route)
    real_load, calls = stage_module._load, []

    def flaky_load(where: str) -> stage_module.Enforcement:
        calls.append(where)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real_load(where)

    async def run() -> None:
        stage = stage_module.PolicyStage()
        with taddons.context(stage) as tctx:
            tctx.configure(stage, hoop_rules=str(path.parent), hoop_reload="0")
            first = stage.active.policy.digest
            monkeypatch.setattr(stage_module, "_load", flaky_load)
            stage.reload_interval = 0.01
            watcher = asyncio.get_running_loop().create_task(stage._watch())

            async def until(check) -> None:
                for _ in range(500):
                    if check():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"timed out; watcher done={watcher.done()}")

            path.write_text(path.read_text() + "# change 1\n")
            await until(lambda: calls)
            await asyncio.sleep(0.05)
            assert not watcher.done() and stage.active.policy.digest == first
            path.write_text(path.read_text() + "# change 2, a bit longer\n")
            await until(lambda: stage.active.policy.digest != first)
            watcher.cancel()

    with caplog.at_level("ERROR"):
        asyncio.run(run())
    assert "policy reload refused" in caplog.text and "unexpected RuntimeError: disk on fire" in caplog.text


TWO_ISSUERS = """\
issuers:
  - {name: okta, issuer: https://okta.example, audience: gw, jwks: https://okta.example/jwks}
  - {name: partner, issuer: https://partner.example, audience: gw, jwks: https://partner.example/jwks}
"""
OKTA, PARTNER = "https://okta.example", "https://partner.example"


class TestNamesPerIssuer:
    """Each trusted issuer mints its own group, subject, client id and scope names: with
    several issuers, a name says whose it is (`okta:agents`), and only that issuer's
    identities hold it."""

    def load(self, tmp_path: Path, text: str) -> Policy:
        return load_policy(write(tmp_path, TWO_ISSUERS + text), resolve_env=False)

    @pytest.mark.parametrize("key", ["groups", "subjects", "client_ids", "scopes"])
    def test_a_qualified_name_is_held_from_its_issuer_only(self, tmp_path: Path, key: str) -> None:
        route = self.load(tmp_path, f"routes:\n  - {{name: r, match: {{hosts: [a]}}, allow: {{{key}: ['okta:n']}}}}\n").routes[0]
        held = {"groups": ("x", ("n",), None, ()), "subjects": ("n", (), None, ()),
                "client_ids": ("x", (), "n", ()), "scopes": ("x", (), None, ("n",))}[key]

        assert route.admits(OKTA, *held)
        assert not route.admits(PARTNER, *held)

    @pytest.mark.parametrize(
        "text, where",
        [
            ("routes:\n  - {name: r, match: {hosts: [a]}, allow: {groups: [agents]}}\n", "routes[0].allow.groups[0]"),
            ("routes:\n  - {name: r, match: {hosts: [a]}, allow: {subjects: ['nobody:x']}}\n", "routes[0].allow.subjects[0]"),
            ("routes:\n  - {name: r, match: {hosts: [a]}, allow: {groups: ['okta:a']}}\n"
             "approvals:\n  - {name: p, when: {routes: [r]}, approvers: {groups: [sre]}}\n", "approvals[0].approvers.groups[0]"),
            ("routes:\n  - {name: r, match: {hosts: [a]}, allow: {groups: ['okta:a']}}\n"
             "block:\n  - {name: b, when: {groups: [interns]}}\n", "block[0].when.groups[0]"),
            ("routes:\n  - {name: r, match: {hosts: [a]}, allow: {groups: ['okta:a']}}\n"
             "limits:\n  - {name: l, when: {subjects: [bot]}, requests_per_minute: 1}\n", "limits[0].when.subjects[0]"),
        ],
    )
    def test_a_bare_name_is_refused_when_several_issuers_could_mint_it(self, tmp_path: Path, text: str, where: str) -> None:
        with pytest.raises(PolicyError, match="could come from any of the 2 trusted issuers") as caught:
            self.load(tmp_path, text)
        assert caught.value.key == where

    def test_approvers_and_conditions_are_per_issuer(self, tmp_path: Path) -> None:
        policy = self.load(tmp_path, (
            "routes:\n  - {name: r, match: {hosts: [a]}, allow: {groups: ['okta:a', 'partner:a']}}\n"
            "approvals:\n  - {name: p, when: {groups: ['partner:a']}, approvers: {groups: ['okta:sre']}}\n"
        ))
        rule = policy.approval_rules[0]

        assert rule.approver_groups.any_of(OKTA, ["sre"]) and not rule.approver_groups.any_of(PARTNER, ["sre"])
        assert rule.when.groups.has(PARTNER, "a") and not rule.when.groups.has(OKTA, "a")

    def test_with_one_issuer_a_bare_name_is_that_issuers(self, tmp_path: Path) -> None:
        policy = load_policy(write(tmp_path, ISSUER + "routes:\n  - {name: r, match: {hosts: [a]}, allow: {groups: [agents, 'idp:ops']}}\n"))

        assert policy.routes[0].admits("https://idp.example", "x", ("agents",))
        assert policy.routes[0].admits("https://idp.example", "x", ("ops",))


class TestOtlpAttributes:
    """`otlp_attributes` names OTLP attributes by key (globs) instead of a JSONPath."""

    def rule_of(self, tmp_path: Path, attributes: str):
        text = ISSUER + f"masking:\n  - name: traces\n    detectors: [email]\n    otlp_attributes: {attributes}\n" + (
            "routes:\n  - name: r\n    match: {hosts: [a.example]}\n    allow: {groups: [g]}\n    masking: [traces]\n"
        )
        (rule,) = load_policy(write(tmp_path, text), resolve_env=False).routes[0].masking
        return rule

    def test_keys_and_globs_select_string_values_of_matching_attributes(self, tmp_path: Path) -> None:
        rule = self.rule_of(tmp_path, '[gen_ai.input.messages, "llm.input_messages.*", "user.?d"]')
        assert [p for p, _ in rule.paths] == [
            "$..attributes[?@.key=='gen_ai.input.messages'].value..['stringValue','bytesValue']",
            "$..attributes[?match(@.key, 'llm[.]input_messages[.].*')].value..['stringValue','bytesValue']",
            "$..attributes[?match(@.key, 'user[.].d')].value..['stringValue','bytesValue']",
        ]
        def attr(key: str, value: dict) -> dict:
            return {"key": key, "value": value}

        mail = {"stringValue": "a@b.example"}
        span = {"name": "c@d.example", "attributes": [
            attr("gen_ai.input.messages", {"stringValue": '[{"content": "e@f.example"}]'}),
            attr("llm.input_messages.0.message.content", {"arrayValue": {"values": [mail]}}),
            attr("llmXinput_messages.0", mail), attr("user.id", mail), attr("user.email", mail),
        ]}
        body = orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]})
        new, records = mask_body(body, "application/json", [rule], "request", path="/v1/traces")
        got = orjson.loads(new)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        values = [orjson.dumps(a["value"]).decode() for a in got["attributes"]]
        assert [("example" in v) for v in values] == [False, False, True, False, True]
        assert got["name"] == "c@d.example"  # not an attribute
        assert records[0]["otlp"] == {"spans": 1, "attributes": 3}

    @pytest.mark.parametrize(("attributes", "message"), [
        ("[]", "name at least one attribute key"),
        ("['gen_ai.*[0]']", "attribute key glob 'gen_ai.*[0]': use letters"),
        ("[\"a'b\"]", "attribute key glob \"a'b\": use letters"),
        ("{a: b}", "expected a list"),
    ])
    def test_bad_lists_are_policy_errors(self, tmp_path: Path, attributes: str, message: str) -> None:
        error = load_error(write(tmp_path, f"masking:\n  - name: t\n    detectors: [email]\n    otlp_attributes: {attributes}\n"))
        assert error.key.startswith("masking[0].otlp_attributes") and error.line == 4
        assert error.message.startswith(message), error.message

    def test_not_with_body_false(self, tmp_path: Path) -> None:
        text = "masking:\n  - name: t\n    detectors: [email]\n    body: false\n    headers: [x]\n    otlp_attributes: [a]\n"
        error = load_error(write(tmp_path, text))
        assert error.message == "selects body values: not with body: false"



class TestAwsSigV4:
    ROUTE = """\
    - name: bucket
      match: {{hosts: [s3.amazonaws.com]}}
      allow: {{groups: [agents]}}
      credential:
        aws_sigv4: {body}
    """

    def test_keys_resolve_from_the_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KEY_ID", "AKIDEXAMPLE")
        monkeypatch.setenv("SECRET", "wJalrXUtnFEMI")
        body = "{access_key_id: '${KEY_ID}', secret_access_key: '${SECRET}', region: eu-west-1, service: s3}"
        policy = route_policy(self.ROUTE.format(body=body), resolve_env=True, directory=tmp_path)
        credential = policy.routes[0].credential
        assert credential.aws is not None and (credential.aws.region, credential.aws.service) == ("eu-west-1", "s3")
        assert credential.aws.secret_access_key == "wJalrXUtnFEMI" and "wJalrXUtnFEMI" in credential.secrets
        assert "wJalrXUtnFEMI" not in repr(credential.aws)

    @pytest.mark.parametrize(("body", "key", "message"), [
        ("{access_key_id: AKID, secret_access_key: '${S}', region: us-east-1, service: s3}",
         "aws_sigv4.access_key_id", "write secrets as ${ENV_VAR} references"),
        ("{access_key_id: '${K}', secret_access_key: '${S}', service: s3}", "aws_sigv4.region", "required key is missing"),
        ("{access_key_id: '${K}', secret_access_key: '${S}', region: US East, service: s3}", "aws_sigv4.region",
         "use lower-case letters"),
        ("{access_key_id: '${K}', secret_access_key: '${S}', region: us-east-1, service: s3, token: x}", "aws_sigv4.token",
         "unknown key"),
    ])
    def test_errors_name_the_key(self, tmp_path: Path, body: str, key: str, message: str) -> None:
        with pytest.raises(PolicyError) as caught:
            route_policy(self.ROUTE.format(body=body), directory=tmp_path)
        assert caught.value.key.endswith(key) and caught.value.message.startswith(message), str(caught.value)
