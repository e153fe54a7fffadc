"""The leak classes of issue 16, end to end: a real mitmdump with one whole-body rule
using every built-in detector (headers, query and body, both directions), a local
HTTPS upstream that records what it received and answers with a scripted body (sent
in small HTTP chunks), and httpx as the agent. Each test asserts on what the upstream
received, what the agent received and what the recordings (`.mitm` and audit log)
hold: nothing planted survives anywhere.
"""

from __future__ import annotations

import http.server
import json
import random
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from hoop_addon.dev.gateway import Gateway
from hoop_addon.dev.tls import CA
from tests.conftest import write_policy
from tests.support.idp import LocalIdP
from tests.support.upstreams import https_server, serve_connections

EMAIL = "jane.doe@example.com"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n-----END RSA PRIVATE KEY-----"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

POLICY = """\
version: 1
issuers:
  - name: test-idp
    issuer: {issuer}
    audience: hoop-gateway
    jwks: {jwks}
    algorithms: [RS256, ES256]
masking:
  - name: everything
    direction: both
    headers: [x-data]
    cookies: [uid]
    query: true
    detectors: [email, phone, payment_card, us_ssn, iban, ipv4, ipv6, aws_access_key_id, aws_secret_access_key,
                openai_api_key, anthropic_api_key, github_token, gitlab_token, slack_token, stripe_key,
                google_api_key, jwt, pem_private_key]
routes:
  - name: scripted
    match:
      hosts: [localhost]
    allow:
      groups: [agents]
    masking: [everything]
"""


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Scripted:
    """An HTTPS upstream: records each request; answers `replies[path]` = (content
    type, body), sent in 5-byte HTTP/1.1 chunks, or 200 `ok` as text."""

    cert: Path
    key: Path
    received: list[Received] = field(default_factory=list)
    replies: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.received.append(Received(self.command, self.path, dict(self.headers.items()), body))
                ctype, reply = outer.replies.get(self.path.split("?")[0], ("text/plain", b"ok"))
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(reply), 5):
                    piece = reply[i : i + 5]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_PUT = _answer

        self.server, self.url = https_server(Handler, self.cert, self.key)


@pytest.fixture(scope="module")
def scripted(pki: tuple[CA, Path, Path]) -> Iterator[Scripted]:
    server = Scripted(pki[1], pki[2])
    yield server
    server.server.shutdown()
    server.server.server_close()


def _running(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path], name: str, policy: str,
             options: dict[str, str] | None = None) -> Iterator[Gateway]:
    """A gateway (mitmdump with the chain) on `policy`, running while the fixture lives."""
    work = tmp_path_factory.mktemp(name)
    gw = Gateway(write_policy(work / "rules", idp, policy), work, pki[0].cert_path, options=options)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def leak_gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    yield from _running(tmp_path_factory, idp, pki, "leak-gateway", POLICY, {"store_streamed_bodies": "true"})


@pytest.fixture
def agent(leak_gateway: Gateway, idp: LocalIdP) -> Iterator[httpx.Client]:
    trust = ssl.create_default_context(cafile=str(leak_gateway.ca_cert))
    token = idp.mint(subject="leak-agent", groups=["agents"])
    with httpx.Client(proxy=leak_gateway.proxy(token), verify=trust, timeout=10) as client:
        yield client


def evidence(gateway: Gateway) -> bytes:
    """Everything the gateway wrote: recordings and the audit log (and its own log)."""
    files = [p for p in sorted(gateway.recordings.rglob("*")) if p.is_file()]
    return b"".join(p.read_bytes() for p in files) + gateway.output.encode()


def assert_nowhere(values: tuple[str, ...], *places: bytes | str) -> None:
    for place in places:
        data = place.encode() if isinstance(place, str) else place
        for value in values:
            assert value.encode() not in data, f"{value!r} leaked"


def sse(docs: list[dict], eol: str = "\n", multiline: bool = False) -> bytes:
    out = ""
    for doc in docs:
        lines = orjson.dumps(doc, option=orjson.OPT_INDENT_2 if multiline else 0).decode().split("\n")
        out += "".join(f"data: {ln}{eol}" for ln in lines) + eol
    return (out + f"data: [DONE]{eol}{eol}").encode()


def delta(piece: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}


def streamed(body: bytes) -> str:
    """What an SSE client reads: delta contents and tool-call arguments, concatenated."""
    text, out = body.decode().replace("\r\n", "\n").replace("\r", "\n"), []
    for event in text.split("\n\n"):
        data = "\n".join(ln[5:].removeprefix(" ") for ln in event.split("\n") if ln.startswith("data:"))
        if data.startswith("{"):
            d = json.loads(data)["choices"][0]["delta"]
            out.append(d.get("content") or "")
            out += [c["function"]["arguments"] for c in d.get("tool_calls") or []]
    return "".join(out)


def _escaped(value: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in value)


STREAMS = {
    "pem-end-line-cut": (
        "text/event-stream",
        sse([delta(p) for p in (f"key {PEM[:-12]}", f"{PEM[-12:]} done")]),
        (PEM.split("\n")[1], "MIIEow"),
    ),
    "keyword-in-earlier-piece": (
        "text/event-stream",
        sse([delta("aws_secret_access_key: "), delta(f"{AWS_SECRET} ok")]),
        (AWS_SECRET,),
    ),
    "crlf-multiline-data": ("text/event-stream", sse([delta(f"mail {EMAIL} now")], "\r\n", multiline=True), (EMAIL,)),
    "cr-multiline-data": ("text/event-stream", sse([delta(f"mail {EMAIL} now")], "\r", multiline=True), (EMAIL,)),
    "escaped-tool-args": (
        "text/event-stream",
        sse([{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}]}
             for p in ('{"to":"' + _escaped(EMAIL)[:20], _escaped(EMAIL)[20:] + '"}')]),
        (EMAIL, _escaped(EMAIL)),
    ),
    "ollama-ndjson": (
        "application/x-ndjson",
        b"".join(orjson.dumps({"message": {"role": "assistant", "content": p}, "done": False}) + b"\n"
                 for p in ("mail jane.d", "oe@example.com ok")) + b'{"done":true}\n',
        ("jane.d", "oe@example.com"),
    ),
}


@pytest.mark.parametrize("case", list(STREAMS))
def test_split_streams_are_masked_for_the_agent_and_the_recording(
    case: str, leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    ctype, body, planted = STREAMS[case]
    scripted.replies[f"/stream/{case}"] = (ctype, body)

    with agent.stream("POST", f"{scripted.url}/stream/{case}", json={"q": 1}) as reply:
        got = b"".join(reply.iter_raw())
    (entry, *_) = [e for e in leak_gateway.wait_audit(100, timeout=1) if e.get("path", "").endswith(case)] or [{}]

    assert reply.status_code == 200 and b"unmaskable" not in got, got
    assert b"[REDACTED:" in got
    assert_nowhere(planted, got, streamed(got) if ctype == "text/event-stream" else b"", evidence(leak_gateway))
    assert entry.get("decision", {}).get("outcome", "allow") == "allow"


# --- item 5: binary bodies are never text-masked -------------------------------------

PROTOBUF = b"\x0a\x14" + EMAIL.encode() + b"\x10\x01"  # valid UTF-8, field 1 = a string of 20 bytes


@pytest.mark.parametrize("ctype", ["application/x-protobuf", "application/grpc+proto", "application/octet-stream", "image/png", "application/pdf"])
def test_a_binary_request_body_is_refused_with_415_naming_its_type(
    ctype: str, leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    before = len(scripted.received)

    reply = agent.post(f"{scripted.url}/binary", content=PROTOBUF, headers={"Content-Type": ctype})

    assert reply.status_code == 415, reply.text
    assert reply.json()["error"] == "unsupported_media_type" and ctype in reply.json()["message"]
    assert len(scripted.received) == before  # nothing reached the upstream


def test_a_binary_response_is_withheld_naming_its_type_never_rewritten(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    scripted.replies["/binary-reply"] = ("application/x-protobuf", PROTOBUF)

    reply = agent.get(f"{scripted.url}/binary-reply")

    assert reply.status_code == 502 and "application/x-protobuf" in reply.json()["message"]
    assert_nowhere((EMAIL,), reply.content, evidence(leak_gateway))


def test_a_multipart_upload_masks_its_text_parts_and_passes_its_binary_part_untouched(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" + bytes(range(256))
    files = {"image": ("photo.png", png, "image/png")}
    data = {"note": f"from {EMAIL}", "meta": '{"owner":"' + _escaped(EMAIL) + '"}'}

    reply = agent.post(f"{scripted.url}/upload", files=files, data=data)

    assert reply.status_code == 200, reply.text
    received = scripted.received[-1].body
    assert png in received  # byte for byte
    assert b"from [REDACTED:EMAIL]" in received
    assert_nowhere((EMAIL, _escaped(EMAIL)), received, evidence(leak_gateway))


# --- item 8: shadow-only policies never refuse -----------------------------------------

SHADOW = POLICY.replace("    direction: both\n", "    direction: both\n    action: log\n")


@pytest.fixture(scope="module")
def shadow_gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    yield from _running(tmp_path_factory, idp, pki, "shadow-gateway", SHADOW)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        pytest.param({"Content-Type": "application/x-protobuf"}, PROTOBUF, id="protobuf"),
        pytest.param({"Content-Type": "application/json"}, b'{"not": json', id="invalid-json"),
        pytest.param({"Content-Type": "text/plain"}, b"\xff\xfe\x00bin", id="not-utf8"),
    ],
)
def test_a_shadow_only_policy_forwards_what_it_cannot_read(
    headers: dict[str, str], body: bytes, shadow_gateway: Gateway, scripted: Scripted, idp: LocalIdP
) -> None:
    trust = ssl.create_default_context(cafile=str(shadow_gateway.ca_cert))
    token = idp.mint(subject="shadow-agent", groups=["agents"])
    with httpx.Client(proxy=shadow_gateway.proxy(token), verify=trust, timeout=10) as client:
        reply = client.post(f"{scripted.url}/shadow", content=body, headers=headers)

    assert reply.status_code == 200, reply.text
    assert scripted.received[-1].body == body  # as the agent sent it


def test_a_body_no_stage_can_decode_is_refused_even_under_shadow_rules(
    shadow_gateway: Gateway, scripted: Scripted, idp: LocalIdP
) -> None:
    """Shadow rules never refuse, but the search for gateway tokens must read every body
    of an identified request: one in a content-coding it cannot decode is refused (422
    `uninspectable_body`), and nothing is forwarded."""
    trust = ssl.create_default_context(cafile=str(shadow_gateway.ca_cert))
    token = idp.mint(subject="shadow-agent", groups=["agents"])
    before = len(scripted.received)
    with httpx.Client(proxy=shadow_gateway.proxy(token), verify=trust, timeout=10) as client:
        reply = client.post(f"{scripted.url}/shadow", content=b"\x1f\x8b not really",
                            headers={"Content-Type": "text/plain", "Content-Encoding": "gzip, br"})

    assert reply.status_code == 422 and reply.json()["error"] == "uninspectable_body", reply.text
    assert len(scripted.received) == before


def test_a_shadow_only_stream_goes_out_as_the_upstream_sent_it(shadow_gateway: Gateway, scripted: Scripted, idp: LocalIdP) -> None:
    body = sse([delta(f"mail {EMAIL[:8]}"), delta(f"{EMAIL[8:]} ok")]) + b"\xff\xfe not utf-8\n\n"
    scripted.replies["/shadow-stream"] = ("text/event-stream", body)
    trust = ssl.create_default_context(cafile=str(shadow_gateway.ca_cert))
    token = idp.mint(subject="shadow-agent", groups=["agents"])
    with httpx.Client(proxy=shadow_gateway.proxy(token), verify=trust, timeout=10) as client:
        with client.stream("GET", f"{scripted.url}/shadow-stream") as reply:
            got = b"".join(reply.iter_raw())

    assert got == body


# --- items 4, 6 and 10: separators, greedy candidates, sub-spans -------------------------

SEPARATED = (
    "4111.1111.1111.1111", "4111\u00a01111\u00a01111\u00a01111", "4111\u20091111\u20091111\u20091111",
    "4111\u200b1111\u200b1111\u200b1111", "078 05 1120", "078.05.1120", "DE89.3704.0044.0532.0130.00",
    "DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000",
)
LOOKALIKES = ("DE89 3704 0044 0532 0130 01", "2001:db8:1:::2:1", "4111 1111 1111 1112")


def test_separated_values_are_masked_and_invalid_lookalikes_left_whole(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    notes = [f"value {v} end" for v in (*SEPARATED, "ref 1234 5555 5555 5555 4444 ok", *LOOKALIKES)]
    scripted.replies["/separators"] = ("application/json", orjson.dumps({"echo": notes}))

    reply = agent.post(f"{scripted.url}/separators", json={"notes": notes})

    assert reply.status_code == 200, reply.text
    for got in (orjson.loads(scripted.received[-1].body)["notes"], reply.json()["echo"]):
        assert got[: len(SEPARATED)] == ["value [REDACTED:" + ("CARD]" if i < 4 else "SSN]" if i < 6 else "IBAN]") + " end"
                                         for i in range(len(SEPARATED))]
        assert got[len(SEPARATED)] == "value ref 1234 [REDACTED:CARD] ok end"
        assert got[len(SEPARATED) + 1 :] == [f"value {v} end" for v in LOOKALIKES]  # not masked as anything
    recorded = evidence(leak_gateway)
    assert_nowhere((*SEPARATED, "5555 5555 5555 4444"), recorded)


# --- item 2: encodings inside other encodings ------------------------------------------


def test_escaped_json_in_a_header_a_query_value_a_multipart_part_and_text_ndjson_is_masked(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    doc = '{"owner":"' + _escaped(EMAIL) + '"}'
    ndjson = b'{"a":"x"}\n' + doc.encode() + b"\n"

    r1 = agent.post(f"{scripted.url}/nested", params={"filter": doc}, headers={"X-Data": doc, "Content-Type": "text/plain"},
                    content=ndjson)
    first = scripted.received[-1]
    r2 = agent.post(f"{scripted.url}/nested-multipart", files={"meta": ("m.json", doc.encode(), "application/json")})
    second = scripted.received[-1]

    assert r1.status_code == r2.status_code == 200
    assert json.loads(first.headers["X-Data"]) == {"owner": "[REDACTED:EMAIL]"}
    query = httpx.URL(first.path).params["filter"]
    assert json.loads(query) == {"owner": "[REDACTED:EMAIL]"}
    assert [json.loads(ln) for ln in first.body.splitlines()] == [{"a": "x"}, {"owner": "[REDACTED:EMAIL]"}]
    assert b'{"owner":"[REDACTED:EMAIL]"}' in second.body
    assert_nowhere((EMAIL, _escaped(EMAIL), _escaped(EMAIL)[:30]), first.body, second.body, first.path, evidence(leak_gateway))


def test_percent_encoded_cookie_and_header_values_are_masked_upstream_and_in_the_recording(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    """`cookies: [uid]` and `headers: [x-data]` read a value percent-decoded, as a query
    value is: the upstream gets it masked and still percent-encoded; `UID` is another
    cookie (RFC 6265 names are case-sensitive), left as it is."""
    encoded = "jane.doe%40example.com"
    reply = agent.get(f"{scripted.url}/named-fields", headers={
        "Cookie": f"uid=mail%3A%20{encoded}; theme=dark; UID=not-named", "X-Data": f"to%20{encoded}"})

    assert reply.status_code == 200, reply.text
    received = scripted.received[-1]
    cookies = dict(pair.split("=", 1) for pair in received.headers["Cookie"].split("; "))
    assert cookies == {"uid": "mail:%20[REDACTED:EMAIL]", "theme": "dark", "UID": "not-named"}
    assert received.headers["X-Data"] == "to [REDACTED:EMAIL]"
    entries = [e for e in leak_gateway.wait_audit(1) if e.get("path", "").startswith("/named-fields")]
    assert entries and {"cookie:uid", "header:x-data"} <= {w for m in entries[-1]["masked"] for w in m["where"]}
    assert_nowhere((EMAIL, encoded), received.headers["Cookie"], received.headers["X-Data"], evidence(leak_gateway))


def test_a_named_value_encoded_several_times_is_masked_at_its_depth_and_past_four_refused(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    """Seeded: the email percent-encoded 1 to 4 times (`%2540` is two), in the named
    cookie and header: the upstream gets it masked, encoded as many times, never the
    value at any depth; encoded 5 times it cannot be read to the end: refused (422),
    nothing forwarded. (An outside attack found `jane.doe%2540example.com` passing.)"""
    from urllib.parse import quote, unquote

    rng = random.Random(2)
    for _ in range(8):
        depth = rng.randint(1, 4)
        value = EMAIL
        for _ in range(depth):
            value = quote(value, safe="")
        reply = agent.get(f"{scripted.url}/named-fields", headers={"Cookie": f"uid={value}", "X-Data": value})
        assert reply.status_code == 200, reply.text
        received = scripted.received[-1]
        cookie, header = received.headers["Cookie"].removeprefix("uid="), received.headers["X-Data"]
        for sent in (cookie, header):
            for _ in range(depth):
                sent = unquote(sent)
            assert sent == "[REDACTED:EMAIL]", (depth, cookie, header)
    too_deep = EMAIL
    for _ in range(5):
        too_deep = quote(too_deep, safe="")
    before = len(scripted.received)
    reply = agent.get(f"{scripted.url}/named-fields", headers={"X-Data": too_deep})
    assert reply.status_code == 422 and "4 times" in reply.text, reply.text
    assert len(scripted.received) == before
    assert_nowhere((EMAIL, "jane.doe%40", "jane.doe%2540", "jane.doe%252540"), evidence(leak_gateway))


# --- item 3: places not covered yet: path, query names, trailers ------------------------


def test_values_in_the_url_path_and_query_names_are_masked_upstream_in_the_audit_and_the_flow_log(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    reply = agent.get(f"{scripted.url}/v1/users/{EMAIL}/cards/4111%201111%201111%201111", params={"078-05-1120": "yes"})

    assert reply.status_code == 200, reply.text
    received = scripted.received[-1]
    assert received.path.startswith("/v1/users/%5BREDACTED:EMAIL%5D/cards/%5BREDACTED:CARD%5D?"), received.path
    assert httpx.URL(received.path).params == httpx.QueryParams({"[REDACTED:SSN]": "yes"})
    entries = [e for e in leak_gateway.wait_audit(1) if "/v1/users/" in e.get("path", "")]
    assert entries and "[REDACTED:EMAIL]" in httpx.URL("https://x" + entries[-1]["path"]).path
    assert_nowhere((EMAIL, "jane.doe%40example.com", "4111%201111", "078-05-1120"), received.path, evidence(leak_gateway))


# --- item 9: every format the providers issue ------------------------------------------


def test_every_provider_token_format_is_masked_both_ways_and_in_the_recording(
    leak_gateway: Gateway, scripted: Scripted, agent: httpx.Client
) -> None:
    """One seeded value of every format of every built-in detector (bench/corpus.py's
    generators, docs/detectors.md's table) in a request and in the response."""
    from tests.unit.masking.test_detectors import CORPUS

    rng = CORPUS.Rng("e2e formats")
    values = {f"{d}:{f}": make(rng) for d, formats in CORPUS.VALID.items() for f, make in formats.items()}
    scripted.replies["/formats"] = ("application/json", orjson.dumps({"echo": list(values.values())}))

    reply = agent.post(f"{scripted.url}/formats", json={"notes": [f"note {v} end" for v in values.values()]})

    assert reply.status_code == 200, reply.text
    sent, received = orjson.loads(scripted.received[-1].body)["notes"], reply.json()["echo"]
    for got in (sent, received):
        left = [name for name, text in zip(values, got, strict=True) if CORPUS.survived(values[name], text)]
        assert left == [], f"{len(left)} of {len(values)} formats left in clear: {left}"
    assert_nowhere(tuple(v for v in values.values() if len(v) >= 12), evidence(leak_gateway))


# --- item 7: one costly pattern cannot stall the event loop -----------------------------

SLOW_POLICY = POLICY.replace("masking:\n", """\
detectors:
  - name: costly
    pattern: '(?:a|e).{{40}}z\\b'
masking:
  - name: slow
    direction: both
    detectors: [costly, email]
""", 1).replace("    masking: [everything]\n", "    masking: [slow]\n")


@pytest.fixture(scope="module")
def budget_gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    yield from _running(tmp_path_factory, idp, pki, "budget-gateway", SLOW_POLICY, {"hoop_mask_budget": "0.05"})


def test_a_body_past_the_masking_time_budget_is_refused_and_counted_never_forwarded(
    budget_gateway: Gateway, scripted: Scripted, idp: LocalIdP
) -> None:
    """A pattern RE2's DFA cannot cache costs ~0.4 s per MB; a 4 MB body of words
    (with an email in each value) takes far past a 0.05 s budget: refused 422, not
    forwarded, audited and counted; a small body under the same policy passes."""
    import random
    import string

    from prometheus_client.parser import text_string_to_metric_families

    rng = random.Random(7)
    words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(8000))
    trust = ssl.create_default_context(cafile=str(budget_gateway.ca_cert))
    token = idp.mint(subject="budget-agent", groups=["agents"])
    with httpx.Client(proxy=budget_gateway.proxy(token), verify=trust, timeout=30) as client:
        before = len(scripted.received)
        large = client.post(f"{scripted.url}/budget", json={"notes": [f"{words} {EMAIL}"] * 64})
        forwarded = scripted.received[before:]
        small = client.post(f"{scripted.url}/budget", json={"notes": [f"hello {EMAIL}"]})

    assert large.status_code == 422, large.text
    assert "mask_budget_exceeded" in large.text and "time budget" in large.text
    assert forwarded == []
    assert small.status_code == 200 and orjson.loads(scripted.received[-1].body) == {"notes": ["hello [REDACTED:EMAIL]"]}
    refused = [e["decision"] for e in budget_gateway.wait_audit(2) if e["decision"]["outcome"] == "deny"]
    assert [(d["stage"], d["reason"]) for d in refused] == [("mask", "mask_budget_exceeded")]
    metrics = httpx.get(f"{budget_gateway.control_url}/metrics").text
    counted = [s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == "hoop_refusals_total" and s.labels.get("reason") == "mask_budget_exceeded"]
    assert counted == [1.0]


class H2Trailers:
    """An HTTP/2 upstream (h2, TLS with ALPN `h2`) that answers every request with a
    small body and a trailer section `trailers` (RFC 9113 §8.1), as gRPC does."""

    def __init__(self, cert: Path, key: Path, trailers: list[tuple[str, str]]) -> None:
        import socket

        self.trailers = trailers
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols(["h2"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://localhost:{self.listener.getsockname()[1]}"
        serve_connections(self.listener, self._connection)

    def _connection(self, raw) -> None:
        import h2.config
        import h2.connection
        import h2.events

        with self.context.wrap_socket(raw, server_side=True) as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            tls.sendall(conn.data_to_send())
            while data := tls.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "text/plain")])
                        conn.send_data(event.stream_id, b"body without values")
                        conn.send_headers(event.stream_id, self.trailers, end_stream=True)
                tls.sendall(conn.data_to_send())


def test_http2_response_trailers_are_masked_for_the_agent_and_the_recording(
    leak_gateway: Gateway, pki: tuple[CA, Path, Path], idp: LocalIdP
) -> None:
    """HTTP/2 trailers after the body (gRPC's `grpc-message`): a value in a trailer is
    masked like one in a header, for the agent (curl writes trailers with the headers)
    and in the recording. (mitmproxy cannot read HTTP/1.1 trailers at all: such a
    message ends the connection, nothing of it is forwarded.)"""
    import shutil
    import subprocess

    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    upstream = H2Trailers(pki[1], pki[2], [("grpc-status", "2"), ("grpc-message", f"no account for {EMAIL}")])
    token = idp.mint(subject="trailer-agent", groups=["agents"])

    run = subprocess.run(
        [curl, "-sS", "--max-time", "10", "--http2", "-D", "-", "--proxy", leak_gateway.proxy(token),
         "--cacert", str(leak_gateway.ca_cert), f"{upstream.url}/trailers"],
        capture_output=True, timeout=20,
    )
    upstream.listener.close()

    assert run.returncode == 0, run.stderr
    assert b"body without values" in run.stdout
    assert b"grpc-message: no account for [REDACTED:EMAIL]" in run.stdout, run.stdout
    assert_nowhere((EMAIL,), run.stdout, evidence(leak_gateway))


@pytest.fixture(scope="module")
def patient_gateway(tmp_path_factory: pytest.TempPathFactory, idp: LocalIdP, pki: tuple[CA, Path, Path]) -> Iterator[Gateway]:
    yield from _running(tmp_path_factory, idp, pki, "patient-gateway", SLOW_POLICY, {"hoop_mask_budget": "30"})


def test_a_costly_body_is_masked_off_the_event_loop_so_other_flows_go_on(
    patient_gateway: Gateway, scripted: Scripted, idp: LocalIdP
) -> None:
    """A 1 MB body under a pattern RE2's DFA cannot cache takes seconds to scan; within
    the budget it is masked on the stage's worker thread, so a small request sent after
    it is answered first (with the scan on the event loop it waited behind it). An
    outside review measured an 8 s stall of every other request before."""
    import concurrent.futures
    import random
    import time

    rng = random.Random(3)
    slow = "".join(rng.choice("aezb ") for _ in range(1024 * 1024)) + f" {EMAIL}"
    trust = ssl.create_default_context(cafile=str(patient_gateway.ca_cert))
    token = idp.mint(subject="patient-agent", groups=["agents"])
    finished: list[str] = []

    def post(name: str, body: str) -> httpx.Response:
        with httpx.Client(proxy=patient_gateway.proxy(token), verify=trust, timeout=60) as client:
            reply = client.post(f"{scripted.url}/{name}", content=body.encode(), headers={"Content-Type": "text/plain"})
        finished.append(name)
        return reply

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        large = pool.submit(post, "large", slow)
        time.sleep(0.3)  # the large body is in the gateway and being scanned
        small = pool.submit(post, "small", f"hello {EMAIL}")
        assert small.result().status_code == 200 and large.result().status_code == 200

    assert finished == ["small", "large"]
    bodies = {r.path: r.body for r in scripted.received if r.path in ("/small", "/large")}
    assert bodies["/small"] == b"hello [REDACTED:EMAIL]" and bodies["/large"].endswith(b" [REDACTED:EMAIL]")
