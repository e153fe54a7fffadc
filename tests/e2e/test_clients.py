"""Every agent can use the gateway: provider SDKs in base-URL mode (`hoop serve
--reverse`) and through the forward proxy, the Responses and Anthropic Messages APIs,
the gateway token where each SDK puts its key, and refusals in each provider's error
shape, so that the SDK's exception carries the gateway's reason."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import requests

from hoop_addon.dev.gateway import Gateway, free_port
from hoop_addon.dev.upstream import FakeOpenAI
from tests.conftest import UPSTREAM_KEY, write_policy
from tests.support.agents import assert_absent, header, recorded_bytes
from tests.support.idp import LocalIdP

PLANTED = ("jane.doe@example.com", "4242 4242 4242 4242", "help@upstream.example", "4111 1111 1111 1111")
PROMPT = "I am jane.doe@example.com, card 4242 4242 4242 4242"
NODE_DIR = Path(__file__).resolve().parents[1] / "node"

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256, ES256]
identity:
  token_sources: [authorization, x_api_key, proxy_password]
masking:
  - name: pii-anthropic
    direction: both
    paths: [$.messages, $.system, $.content, $.content_block, $.delta.text]
    detectors: [email, payment_card]
  - name: pii
    direction: both
    paths:
      - $.messages[*].content
      - $.system
      - $.input
      - $.instructions
      - $.choices[*].message.content
      - $.choices[*].delta.content
      - $.output[*].content[*].text
      - $.delta
      - $.text
      - $.response.output[*].content[*].text
    detectors: [email, payment_card]
limits:
  - name: burst
    per: [subject]
    when: {{subjects: [bursty]}}
    requests_per_minute: 2
routes:
  - name: no-credential      # the agent's own keys pass here; gateway tokens never
    match: {{hosts: [localhost], paths: [/v1/echo]}}
    allow: {{groups: [agents]}}
  - name: anthropic
    api: anthropic
    match: {{hosts: [localhost], paths: [/v1/messages], methods: [POST]}}
    allow: {{groups: [agents]}}
    masking: [pii-anthropic]
    credential: {{header: x-api-key, value: "${{HOOP_TEST_UPSTREAM_KEY}}"}}
  - name: openai
    api: openai
    match: {{hosts: [localhost], paths: [/v1/*], methods: [POST]}}
    allow: {{groups: [agents]}}
    masking: [pii]
    credential: {{header: Authorization, value: "Bearer ${{HOOP_TEST_UPSTREAM_KEY}}"}}
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki, upstream_server: FakeOpenAI) -> Iterator[tuple[Gateway, str]]:
    """`hoop serve --reverse <upstream>@PORT`: the gateway, and the base URL agents use."""
    work = tmp_path_factory.mktemp("clients")
    port = free_port()
    gw = Gateway(write_policy(work / "rules", idp, POLICY), work, pki[0].cert_path,
                 env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True, args=["--reverse", f"{upstream_server.url}@{port}"])
    gw.start()
    yield gw, f"http://127.0.0.1:{port}"
    gw.stop()


def _check_exchange(gw: Gateway, upstream: FakeOpenAI, got: str, token: str, key_header: str) -> None:
    """What the client got, what the upstream received and what was recorded."""
    assert "[REDACTED:EMAIL]" in got and "Echo:" in got
    assert_absent(got, PLANTED)
    received = upstream.received[-1]
    assert_absent(received.body, PLANTED)
    assert b"[REDACTED:EMAIL]" in received.body
    expected = f"Bearer {UPSTREAM_KEY}" if key_header == "Authorization" else UPSTREAM_KEY
    assert header(received, key_header) == expected
    for name, value in received.headers:  # the gateway token, and no other agent credential
        assert token not in value and "agent-own-key" not in value, name
    assert [n for n, _ in received.headers if n.lower() in ("authorization", "x-api-key")] == [key_header.lower()] or \
        [n.lower() for n, _ in received.headers if n.lower() in ("authorization", "x-api-key")] == [key_header.lower()]
    entry = gw.wait_audit(1)[-1]
    assert entry["decision"]["outcome"] == "allow" and entry["masked"]
    data = recorded_bytes(gw)
    assert_absent(data, (*PLANTED, token, UPSTREAM_KEY))


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_base_url_chat_and_responses(base, upstream: FakeOpenAI, idp: LocalIdP, stream: bool) -> None:
    gw, url = base
    token = idp.mint(groups=["agents"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": PROMPT}], stream=True) if c.choices)
    else:
        text = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}]).choices[0].message.content
    _check_exchange(gw, upstream, text, token, "Authorization")

    if stream:
        events = list(client.responses.create(model="m", input=PROMPT, instructions="be brief", stream=True))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed"
        assert_absent(events[-1].response.output_text, PLANTED)
    else:
        text = client.responses.create(model="m", input=[{"role": "user", "content": PROMPT}], instructions="be brief").output_text
    _check_exchange(gw, upstream, text, token, "Authorization")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("slot", ["api_key", "auth_token"])
def test_anthropic_sdk_base_url(base, upstream: FakeOpenAI, idp: LocalIdP, stream: bool, slot: str) -> None:
    """The token as the SDK's API key (`X-Api-Key`) or auth token (`Authorization: Bearer`)."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    client = anthropic.Anthropic(base_url=url, max_retries=0, **{slot: token})
    args = {"model": "claude", "max_tokens": 64, "system": "user: jane.doe@example.com",
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]}
    if stream:
        with client.messages.stream(**args) as events:
            text = "".join(events.text_stream)
    else:
        text = client.messages.create(**args).content[0].text
    _check_exchange(gw, upstream, text, token, "x-api-key")


def test_anthropic_sdk_forward_proxy_own_key_removed(gateway: Gateway, upstream: FakeOpenAI, idp: LocalIdP,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Through HTTPS_PROXY (token as the proxy password), the SDK's own key never reaches
    the upstream: on a route with a credential every agent-sent credential header goes."""
    work = tmp_path / "gw"
    gw = Gateway(write_policy(work / "rules", idp, POLICY), work, upstream_ca(gateway), env={"HOOP_TEST_UPSTREAM_KEY": UPSTREAM_KEY}, serve=True)
    gw.start()
    try:
        token = idp.mint(groups=["agents"])
        monkeypatch.setenv("HTTPS_PROXY", gw.proxy(token))
        monkeypatch.setenv("SSL_CERT_FILE", str(gw.ca_cert))
        client = anthropic.Anthropic(base_url=upstream.url, api_key="agent-own-key", max_retries=0)
        text = client.messages.create(model="c", max_tokens=9, messages=[{"role": "user", "content": PROMPT}],
                                      extra_headers={"Api-Key": "agent-own-key"}).content[0].text
        _check_exchange(gw, upstream, text, token, "x-api-key")
        assert header(upstream.received[-1], "api-key") is None
    finally:
        gw.stop()


def upstream_ca(gateway: Gateway) -> Path:
    """The upstream CA the shared gateway trusts (from its command line)."""
    arg = next(a for a in gateway.argv if a.startswith("ssl_verify_upstream_trusted_ca="))
    return Path(arg.split("=", 1)[1])


def test_requests_base_url(base, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    """`requests` ignores SSL_CERT_FILE: base-URL mode on loopback needs no CA at all."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    answer = requests.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                           json={"model": "m", "messages": [{"role": "user", "content": PROMPT}]}, timeout=10)
    assert answer.status_code == 200
    _check_exchange(gw, upstream, answer.json()["choices"][0]["message"]["content"], token, "Authorization")


@pytest.mark.parametrize("identity_header", ["Authorization", "X-Api-Key"])
def test_a_gateway_token_never_travels_upstream_in_any_credential_header(base, upstream: FakeOpenAI, idp: LocalIdP,
                                                                         identity_header: str) -> None:
    """On a route without a credential the agent's own keys pass, but a gateway token in
    any header (any form: Bearer, Basic's password, bare, in a cookie) is removed."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    other = idp.mint(subject="someone-else", groups=["agents"])
    carried = {"Authorization": f"Bearer {token}"} if identity_header == "Authorization" else {"X-Api-Key": token}
    extra = {
        "X-Api-Key": f"Bearer {other}", "Api-Key": other, "X-Goog-Api-Key": f"key={other}",
        "Cookie": f"theme=dark; session={other}", "X-Custom-Auth": f"Token {other}",
    } if identity_header == "Authorization" else {
        "Api-Key": "Basic " + base64.b64encode(f"a:{other}".encode()).decode(), "X-Goog-Api-Key": "agent-own-google-key",
    }
    answer = httpx.post(f"{url}/v1/echo", headers={**carried, **extra}, content=b"{}", timeout=10)
    assert answer.status_code == 200
    received = upstream.received[-1]
    for name, value in received.headers:
        assert token not in value and other.split(".")[1] not in value and "ZXlK" not in value, name
    if identity_header == "X-Api-Key":
        assert header(received, "X-Goog-Api-Key") == "agent-own-google-key"  # not a gateway token: the agent's to send
    assert_absent(recorded_bytes(gw), (token, other.split(".")[1]))


def test_refusals_in_each_sdk_carry_the_reason(base, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    gw, url = base
    outsider = idp.mint(groups=["interns"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai.OpenAI(base_url=f"{url}/v1", api_key=outsider, max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
    assert "not_admitted" in str(caught.value) and "route 'openai'" in str(caught.value)
    assert caught.value.body["code"] == "not_admitted"
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        anthropic.Anthropic(base_url=url, api_key=outsider, max_retries=0).messages.create(
            model="c", max_tokens=9, messages=[{"role": "user", "content": "hi"}])
    assert "not_admitted" in str(refused.value) and refused.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.AuthenticationError) as bad:
        anthropic.Anthropic(base_url=url, api_key="not-a-token", max_retries=0).messages.create(
            model="c", max_tokens=9, messages=[{"role": "user", "content": "hi"}])
    assert "(hoop: malformed)" in str(bad.value)
    with pytest.raises(openai.AuthenticationError) as expired:
        openai.OpenAI(base_url=f"{url}/v1", api_key=idp.mint(groups=["agents"], expires_in=-3600), max_retries=0).responses.create(
            model="m", input="hi")
    assert "expired" in str(expired.value)
    assert not any(r.path.endswith(("/messages", "/responses", "/completions")) for r in upstream.received)


def test_rate_limit_is_a_429_in_the_provider_shape(base, upstream: FakeOpenAI, idp: LocalIdP) -> None:
    gw, url = base
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=idp.mint(subject="bursty", groups=["agents"]), max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "rate_limited" in str(limited.value) and int(limited.value.response.headers["Retry-After"]) >= 1


@pytest.mark.skipif(shutil.which("node") is None, reason="Node is not installed")
@pytest.mark.parametrize("stream", [False, True])
def test_node_openai_package_base_url(base, upstream: FakeOpenAI, idp: LocalIdP, stream: bool) -> None:
    """Node's fetch ignores HTTPS_PROXY: the `openai` npm package reaches the gateway by
    its base URL (tests/node/agent.mjs; `make test` installs tests/node's packages)."""
    gw, url = base
    token = idp.mint(groups=["agents"])
    done = subprocess.run(["node", str(NODE_DIR / "agent.mjs"), f"{url}/v1", PROMPT, "stream" if stream else "plain"],
                          env={"OPENAI_API_KEY": token, "PATH": "/usr/bin:/bin:/usr/local/bin"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    _check_exchange(gw, upstream, done.stdout, token, "Authorization")
    refused = subprocess.run(["node", str(NODE_DIR / "agent.mjs"), f"{url}/v1", "hi", "plain"],
                             env={"OPENAI_API_KEY": idp.mint(groups=["interns"]), "PATH": "/usr/bin:/bin:/usr/local/bin"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "not_admitted" in refused.stderr



def _smuggled(token: str, rng) -> list[tuple[str, dict[str, str], str, bytes]]:
    """Seeded smuggling attempts of `token`: (name, headers, path and query, body)."""
    import json as _json
    from urllib.parse import quote

    def partly_escaped(text: str) -> str:
        cut = rng.randint(3, 40)
        return "".join(f"%{ord(c):02X}" for c in text[:cut]) + text[cut:]

    def b64(text: str, urlsafe: bool) -> str:
        data = (rng.choice(["", "a:", "xy:"]) + text).encode()
        return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()

    wrappers = {
        "suffix": lambda t: t + rng.choice(["xyz", "AAA", "-x", "_9"]),
        "prefix+suffix": lambda t: rng.choice(["v1:", "id=", "x"]) + t + rng.choice(["xyz", ";x=1", ""]),
        "percent, part": partly_escaped,
        "percent, all": lambda t: quote(t, safe=""),
        "base64": lambda t: b64(t, False),
        "base64url": lambda t: b64(t, True),
    }
    attempts = []
    for wrap_name, wrap in wrappers.items():
        carried = wrap(token)
        attempts += [
            (f"header {wrap_name}", {"X-Custom": carried}, "/v1/echo", b"{}"),
            (f"cookie {wrap_name}", {"Cookie": f"theme=dark; s={carried}"}, "/v1/echo", b"{}"),
            (f"json body {wrap_name}", {}, "/v1/echo", _json.dumps({"api_key": carried}).encode()),
            (f"query {wrap_name}", {}, f"/v1/echo?q={quote(carried, safe='%')}", b"{}"),
        ]
    hexed = rng.choice([str.lower, str.upper])(token.encode().hex())
    twice = quote(quote(token, safe=""), safe="")  # %2565%2579...: a second decoding reads the token
    cut = rng.randint(40, len(token) - 40)
    attempts += [
        ("header hex", {"X-Custom": hexed}, "/v1/echo", b"{}"),
        ("query hex", {}, f"/v1/echo?q={hexed}", b"{}"),
        ("json body hex", {}, "/v1/echo", _json.dumps({"api_key": hexed}).encode()),
        ("header percent twice", {"X-Custom": twice}, "/v1/echo", b"{}"),
        ("form body percent twice", {"Content-Type": "application/x-www-form-urlencoded"}, "/v1/echo", f"key={twice}".encode()),
        ("split across two headers", {"X-A": token[:cut], "X-B": token[cut:]}, "/v1/echo", b"{}"),
        ("split across apart headers", {"X-A": token[:cut], "X-Z": "z", "X-B": token[cut:]}, "/v1/echo", b"{}"),
        ("split in the body", {}, "/v1/echo", _json.dumps({"a": token[:cut], "note": "x", "b": token[cut:]}).encode()),
        # a third outside attack: a header's name, text glued to nested base64, mixed chains
        ("header name", {f"X-{token}": "1"}, "/v1/echo", b"{}"),
        ("header glued base64 twice", {"X-Foo": "pre" + b64(b64(token, False), True)}, "/v1/echo", b"{}"),
        ("json body base64 three times", {}, "/v1/echo", _json.dumps({"a": b64(b64(b64(token, False), False), True)}).encode()),
        ("json body base64 of hex", {}, "/v1/echo", _json.dumps({"a": "p" + b64(token.encode().hex(), False)}).encode()),
        ("query glued base64 twice", {}, f"/v1/echo?q=pre{quote(b64(b64(token, True), False), safe='')}", b"{}"),
    ]
    escaped = "".join(f"\\u{ord(c):04x}" if i % 7 == 0 else c for i, c in enumerate(token))
    attempts.append(("json body \\u-escaped", {}, "/v1/echo", ('{"api_key": "' + escaped + '"}').encode()))
    attempts.append(("url path", {}, f"/v1/echo/{token}x", b"{}"))
    return attempts


def test_a_gateway_token_smuggled_in_any_form_never_reaches_the_upstream_or_the_recording(
    base, upstream: FakeOpenAI, idp: LocalIdP
) -> None:
    """Seeded: the caller's token with text around it, percent-encoded (all or part),
    base64 / base64url (at every offset), JSON-escaped, in a custom header, a cookie,
    a JSON body field, a query value or the path. Each request is either forwarded
    without it in any form or refused with nothing forwarded; the recording never holds
    it. (An outside review found a suffix, base64 and partial percent-encoding passing.)"""
    import random

    from hoop_addon.identity.smuggling import encoded_forms

    gw, url = base
    rng = random.Random(16)
    token = idp.mint(subject="smuggler", groups=["agents"])
    signing_input = token.rsplit(".", 1)[0]
    looks_for = (signing_input.encode(), *encoded_forms(token))
    hexed = token.encode().hex()
    outcomes: dict[str, int] = {}
    for name, headers, target, body in _smuggled(token, rng):
        before = len(upstream.received)
        answer = httpx.post(f"{url}{target}", headers={"Authorization": f"Bearer {token}", **headers}, content=body, timeout=10)
        forwarded = upstream.received[before:]
        if answer.status_code in (400, 401):
            assert forwarded == [], name
        else:
            assert answer.status_code in (200, 404), (name, answer.status_code, answer.text)
            (received,) = forwarded
            seen = (received.path.encode() + repr(received.headers).encode() + received.body)
            joined = "".join(v for _, v in received.headers).encode() + received.body  # parts put back together
            from urllib.parse import unquote_to_bytes
            for form in looks_for:
                assert form not in seen and form not in unquote_to_bytes(unquote_to_bytes(seen)), name
                assert form not in joined, name
            assert hexed.lower().encode() not in seen.lower(), name
        outcomes[name] = answer.status_code
    assert_absent(recorded_bytes(gw), (signing_input, token))
    assert len(outcomes) == 39 and set(outcomes.values()) <= {200, 400, 401, 404}
    print(f"smuggling attempts: {len(outcomes)}; refused {sum(v != 200 for v in outcomes.values())}")
