"""A seeded, generated planted-data corpus for the masking stage: recall and false
positives per detector, per value format and per body shape.

Each detector has generators of valid values in every format it claims to cover
(card numbers with spaces, dots, NBSP...; each GitLab token prefix; compressed IPv6...)
and of look-alikes that must be left alone (a Luhn-invalid card, an IBAN with a bad
check, a malformed IPv6 address, version strings, git SHAs). Every value is planted in
every shape: plain text, JSON (raw and `\\u`-escaped), forms, NDJSON (declared and as
`text/plain`), multipart parts (text, JSON, base64), a query value and name, a header
holding JSON, the URL path, and streams (SSE with LF and CRLF multi-line events,
streamed tool-call arguments, NDJSON streams) cut at seeded positions.

The masking stage runs as the gateway runs it (`hoop_addon.stages.mask.Mask` on a
mitmproxy flow; streams through the stage's stream callable), with one whole-body
rule using every built-in detector, for headers, query and body. A planted value
*survives* when its text, or its run of letters and digits, is in what would be
forwarded (decoded: JSON unescaped, base64 decoded, URL unquoted); a request refused
(fail closed) is counted apart. A look-alike is a *false positive* when it is not in
the output as it was.

Run: `make bench-masking` (or `python bench/corpus.py [--seed N] [--per-format N]
[--json FILE]`).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
import sys
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
from mitmproxy import http  # noqa: E402
from mitmproxy.test import taddons, tflow  # noqa: E402

from hoop_addon.masking.detectors import BUILTIN  # noqa: E402
from hoop_addon.masking.engine import MaskError  # noqa: E402
from hoop_addon.policy.model import MaskRule  # noqa: E402
from hoop_addon.stages import mask as mask_stage  # noqa: E402
from tests.support.hooks import call  # noqa: E402

Rng = random.Random
ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"
HEADER = "x-data"


def _luhn_complete(prefix: str, length: int, rng: Rng) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        digits = [int(c) for c in body + check]
        total = sum(digits[-1::-2]) + sum((2 * d) // 10 + (2 * d) % 10 for d in digits[-2::-2])
        if total % 10 == 0:
            return body + check
    raise AssertionError


def _group(digits: str, sizes: tuple[int, ...], sep: str) -> str:
    out, pos = [], 0
    for size in sizes:
        out.append(digits[pos : pos + size])
        pos += size
    if pos < len(digits):
        out.append(digits[pos:])
    return sep.join(p for p in out if p)


SEPARATORS = {"space": " ", "dash": "-", "dot": ".", "nbsp": "\u00a0", "thin": "\u2009", "zwsp": "\u200b"}


def card(rng: Rng, sep: str) -> str:
    return _group(_luhn_complete(rng.choice(("4", "51", "55", "2221")), 16, rng), (4, 4, 4, 4), sep)


def bad_card(rng: Rng, sep: str) -> str:
    number = card(rng, "")
    last = str((int(number[-1]) + 1) % 10)
    return _group(number[:-1] + last, (4, 4, 4, 4), sep)


def ssn(rng: Rng, sep: str) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}{sep}{rng.randint(1, 99):02d}{sep}{rng.randint(1, 9999):04d}"


def iban(rng: Rng, sep: str, valid: bool = True) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(18))
    digits = "".join(str(int(c, 36)) for c in bban + "DE00")
    check = 98 - int(digits) % 97
    if not valid:
        check = check % 97 + 1 if check != 97 else 2
    return _group(f"DE{check:02d}{bban}", (4, 4, 4, 4, 4, 2), sep)


def _rand(rng: Rng, chars: str, n: int) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


def aws_secret(rng: Rng) -> str:
    while True:
        key = _rand(rng, ALNUM + "/+", 40)
        if any(c.isupper() for c in key) and any(c.islower() for c in key) and any(c.isdigit() for c in key):
            return key


def jwt(rng: Rng, signed: bool) -> str:
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    header = part({"alg": "HS256" if signed else "none", "typ": "JWT"})
    payload = part({"sub": _rand(rng, ALNUM, 10), "iat": rng.randint(10**9, 2 * 10**9)})
    return f"{header}.{payload}." + (_rand(rng, B64URL, 43) if signed else "")


def jwt_spaced(rng: Rng) -> str:
    """A JWS whose header JSON has white space after `{` (`ew...`), as some libraries write it."""
    header = base64.urlsafe_b64encode(b'{\n  "alg": "ES256"\n}').rstrip(b"=").decode()
    return f"{header}.{_rand(rng, B64URL, 40)}.{_rand(rng, B64URL, 86)}"


def pem(rng: Rng, kind: str) -> str:
    lines = [_rand(rng, ALNUM + "+/", 64) for _ in range(rng.randint(3, 6))]
    label = f"{kind} PRIVATE KEY" if kind else "PRIVATE KEY"
    return f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"


def ipv6(rng: Rng, form: str) -> str:
    groups = [f"{rng.randint(1, 0xFFFF):x}" for _ in range(8)]
    if form == "full":
        return ":".join(groups)
    if form == "compressed":
        return "2001:db8::" + groups[0]
    if form == "loopback":
        return "::1"
    if form == "trailing":
        return f"2001:db8:{groups[1]}::"
    if form == "prefix":
        return f"2001:db8:{groups[1]}::/48"
    if form == "ipv4-mapped":
        return f"::ffff:192.0.2.{rng.randint(1, 254)}"
    if form == "host prefix":
        return f"2001:db8::{groups[4]}/128"
    return f"fe80::{groups[2]}:{groups[3]}%eth0"  # zone id (RFC 6874)


# detector -> format -> generator of a valid value
VALID: dict[str, dict[str, Callable[[Rng], str]]] = {
    "email": {
        "plain": lambda r: f"{_rand(r, string.ascii_lowercase, 6)}.{_rand(r, string.ascii_lowercase, 5)}@example.com",
        "plus": lambda r: f"{_rand(r, string.ascii_lowercase, 5)}+tag@mail.example.org",
    },
    "phone": {
        "e164": lambda r: f"+1 415 {r.randint(200, 999)} {r.randint(1000, 9999)}",
        "nanp": lambda r: f"({r.randint(200, 999)}) {r.randint(200, 999)}-{r.randint(1000, 9999)}",
    },
    "payment_card": {
        **{name: (lambda s: lambda r: card(r, s))(sep) for name, sep in {"compact": "", **SEPARATORS}.items()},
        "after digits": lambda r: f"{r.randint(1000, 9999)} {card(r, ' ')}",  # a greedy candidate stops short of it
        "before digits": lambda r: f"{card(r, ' ')} {r.randint(10, 99)}",  # a greedy candidate swallows more
    },
    "us_ssn": {"dash": lambda r: ssn(r, "-"), "space": lambda r: ssn(r, " "), "dot": lambda r: ssn(r, ".")},
    "iban": {
        "compact": lambda r: iban(r, ""),
        "space": lambda r: iban(r, " "),
        "dot": lambda r: iban(r, "."),
        "nbsp": lambda r: iban(r, "\u00a0"),
        "zwsp": lambda r: iban(r, "\u200b"),
    },
    "ipv4": {"dotted": lambda r: ".".join(str(r.randint(1, 254)) for _ in range(4))},
    "ipv6": {f: (lambda f: lambda r: ipv6(r, f))(f) for f in ("full", "compressed", "loopback", "trailing", "prefix", "zone", "ipv4-mapped", "host prefix")},
    "aws_access_key_id": {p: (lambda p: lambda r: p + _rand(r, string.ascii_uppercase + string.digits, 16))(p) for p in ("AKIA", "ASIA", "ABIA", "ACCA")},
    "aws_secret_access_key": {"keyword": lambda r: "aws_secret_access_key=" + aws_secret(r)},
    "openai_api_key": {
        "sk": lambda r: "sk-" + _rand(r, ALNUM, 48),
        "sk-proj": lambda r: "sk-proj-" + _rand(r, B64URL, 60),
        "sk-svcacct": lambda r: "sk-svcacct-" + _rand(r, B64URL, 60),
        "sk-admin": lambda r: "sk-admin-" + _rand(r, B64URL, 60),
    },
    "anthropic_api_key": {
        "sk-ant-api03": lambda r: "sk-ant-api03-" + _rand(r, B64URL, 80),
        "sk-ant-admin01": lambda r: "sk-ant-admin01-" + _rand(r, B64URL, 80),
    },
    "github_token": {
        **{p: (lambda p: lambda r: p + _rand(r, ALNUM, 36))(p) for p in ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")},
        "github_pat_": lambda r: "github_pat_" + _rand(r, ALNUM, 22) + "_" + _rand(r, ALNUM, 59),
    },
    "gitlab_token": {
        p: (lambda p: lambda r: p + _rand(r, B64URL, 20))(p)
        for p in ("glpat-", "glrt-", "glrtr-", "gldt-", "glcbt-", "glft-", "gloas-", "glptt-", "glimt-", "glagent-", "glsoat-", "glffct-", "glwt-")
    }
    | {
        "routable": lambda r: "glpat-" + _rand(r, B64URL, 27) + ".01." + _rand(r, ALNUM.lower(), 9),
        "instance prefix": lambda r: "acme-glpat-" + _rand(r, B64URL, 20),
        "GR1348941": lambda r: "GR1348941" + _rand(r, B64URL, 20),
    },
    "slack_token": {
        **{p: (lambda p: lambda r: f"{p}{r.randint(10**10, 10**11)}-{r.randint(10**10, 10**11)}-{_rand(r, ALNUM, 24)}")(p)
           for p in ("xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-", "xoxo-", "xoxc-", "xoxd-")},
        "xoxe": lambda r: "xoxe.xoxp-1-" + _rand(r, ALNUM, 140),
        "xoxe-": lambda r: "xoxe-1-" + _rand(r, ALNUM, 140),
        "xapp": lambda r: f"xapp-1-A{_rand(r, string.ascii_uppercase + string.digits, 10)}-{r.randint(10**12, 10**13)}-{_rand(r, string.hexdigits.lower(), 64)}",
        "workflow": lambda r: "https://hooks.slack.com/workflows/T" + _rand(r, string.ascii_uppercase + string.digits, 8)
        + "/A" + _rand(r, string.ascii_uppercase + string.digits, 10) + "/" + str(r.randint(10**17, 10**18)) + "/" + _rand(r, ALNUM, 24),
        "webhook": lambda r: "https://hooks.slack.com/services/T" + _rand(r, string.ascii_uppercase + string.digits, 8)
        + "/B" + _rand(r, string.ascii_uppercase + string.digits, 8) + "/" + _rand(r, ALNUM, 24),
    },
    "stripe_key": {p: (lambda p: lambda r: p + _rand(r, ALNUM, 24))(p) for p in ("sk_live_", "rk_test_", "pk_live_", "whsec_")},
    "google_api_key": {
        "AIza": lambda r: "AIza" + _rand(r, B64URL, 35),
        "GOCSPX": lambda r: "GOCSPX-" + _rand(r, B64URL, 28),
        "ya29": lambda r: "ya29." + _rand(r, B64URL, 120),
        "refresh 1//": lambda r: "1//0" + _rand(r, B64URL, 99),
    },
    "jwt": {"signed": lambda r: jwt(r, True), "unsigned": lambda r: jwt(r, False), "spaced header": jwt_spaced},
    "pem_private_key": {k or "pkcs8": (lambda k: lambda r: pem(r, k))(k) for k in ("RSA", "EC", "OPENSSH", "ENCRYPTED", "")},
}

# look-alikes that no detector may alter
LOOKALIKES: dict[str, Callable[[Rng], str]] = {
    "bad-luhn card": lambda r: bad_card(r, " "),
    "bad-check iban": lambda r: iban(r, " ", valid=False),
    "ssn area 000": lambda r: f"000-{r.randint(10, 99)}-{r.randint(1000, 9999)}",
    "version": lambda r: f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 30)}",
    "git sha": lambda r: _rand(r, "0123456789abcdef", 40),
    "timestamp": lambda r: f"2025-{r.randint(1, 12):02d}-{r.randint(10, 28)}T12:30:45Z",
    "order id": lambda r: f"order-{r.choice('1789')}{r.randint(10**14, 10**15)}",  # no card starts so (ISO/IEC 7812 MII)
    "bad ipv6": lambda r: f"2001:db8:{r.randint(1, 0xFFFF):x}:::{r.randint(1, 0xFFFF):x}:1",
    "c++ scope": lambda r: f"std::{r.choice(['add', 'bad', 'face', 'fee'])}(x)",
    "mac address": lambda r: ":".join(f"{r.randint(0, 255):02x}" for _ in range(6)),
    "jwt-like, no alg": lambda r: base64.urlsafe_b64encode(b'{"typ":"JWT"}').rstrip(b"=").decode() + "." + _rand(r, B64URL, 20) + ".",
    "slack word": lambda r: f"xoxb-{r.choice(['svg', 'png'])}",
    "clock": lambda r: f"{r.randint(10, 23)}:{r.randint(10, 59)}:{r.randint(10, 59)}",
}

RULE = MaskRule(
    "corpus", frozenset({"request", "response"}), (), tuple(BUILTIN.values()), headers=(HEADER,), query=True,
)


class Refused(Exception):
    pass


class _Route:
    """The one thing of a route the stage reads here."""

    tokenizes = False

    def rules_for(self, direction: str) -> tuple[MaskRule, ...]:
        return (RULE,)


def _flow(response: bool = False) -> http.HTTPFlow:
    flow = tflow.tflow(resp=response)
    flow.request.headers.clear()
    flow.request.path = "/v1/items"
    flow.request.content = b""
    flow.metadata["hoop"] = {"forwarded": True, "decision": {"outcome": "allow"}}
    mask_stage.route_of = lambda f: _Route()  # the corpus masks every flow with RULE
    return flow


_STAGE = mask_stage.Mask()
_OPTIONS = taddons.context(_STAGE)  # the stage reads mitmproxy options (ctx.options)
_OPTIONS.__enter__()


def run_request(build: Callable[[http.Request], None]) -> http.Request:
    """A request built by `build`, through the masking stage; `Refused` if it refused."""
    flow = _flow()
    build(flow.request)
    call(_STAGE.request, flow)
    if flow.response is not None and flow.response.status_code >= 400:
        raise Refused
    return flow.request


def run_stream(content_type: str, chunks: list[bytes]) -> bytes:
    """A streamed response of `chunks` through the stage's stream callable."""
    flow = _flow(response=True)
    flow.response.headers.clear()
    flow.response.headers["Content-Type"] = content_type
    flow.response.stream = True
    _STAGE.responseheaders(flow)
    stream = flow.response.stream
    if not callable(stream):  # the stage buffers this type: mask the whole body
        flow.response.content = b"".join(chunks)
        call(_STAGE.response, flow)
        if flow.response.status_code >= 400:
            raise Refused
        return flow.response.content
    out = b"".join(b"".join(stream(c)) for c in [*chunks, b""])
    if b"unmaskable_response" in out:
        raise Refused
    return out


def _cuts(data: bytes, rng: Rng, n: int = 6) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), min(n, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def _esc(value: str) -> str:
    """JSON string content with every character `\\u`-escaped."""
    return "".join(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else json.dumps(c)[1:-1] for c in value)


def _json_strings(data: bytes | str) -> str:
    """Every string of the JSON documents in `data` (one per line for NDJSON), joined."""
    out: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                out.append(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            out.append(node)
            if node.lstrip()[:1] in ("{", "["):
                try:
                    walk(json.loads(node))
                except ValueError:
                    pass

    for line in (data.decode() if isinstance(data, bytes) else data).splitlines() or [""]:
        try:
            walk(json.loads(line))
        except ValueError:
            out.append(line)
    try:
        walk(json.loads(data))
    except ValueError:
        pass
    return "\n".join(out)


def _sse_text(data: bytes) -> str:
    """What a client reads of an SSE body: the streamed text (delta content, tool-call
    arguments, decoded as JSON) concatenated across events, and every other string."""
    text = data.decode().replace("\r\n", "\n").replace("\r", "\n")
    content, args, rest = [], [], []
    for event in text.split("\n\n"):
        value = "\n".join(ln[5:].removeprefix(" ") for ln in event.split("\n") if ln.startswith("data:"))
        if not value or value == "[DONE]":
            continue
        rest.append(_json_strings(value))
        try:
            delta = json.loads(value)["choices"][0]["delta"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        content.append(delta.get("content") or "")
        args += [c["function"].get("arguments", "") for c in delta.get("tool_calls") or []]
    return "\n".join(["".join(content), _json_strings("".join(args)), "".join(args), *rest])


def _sse(docs: list[dict], eol: str = "\n", split_lines: bool = False) -> bytes:
    events = []
    for doc in docs:
        if split_lines:  # one JSON document over several `data:` lines (joined by LF: pretty-printed)
            lines = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode().split("\n")
            events.append("".join(f"data: {ln}{eol}" for ln in lines) + eol)
            continue
        data = orjson.dumps(doc).decode()
        events.append(f"data: {data}{eol}{eol}")
    return ("".join(events) + f"data: [DONE]{eol}{eol}").encode()


def _pieces(text: str, rng: Rng) -> list[str]:
    points = sorted(rng.sample(range(1, len(text)), min(4, len(text) - 1)))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


def _delta(piece: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}


def _args(piece: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}}]}


def _multipart(parts: list[tuple[str, str, bytes, dict[str, str]]]) -> tuple[str, bytes]:
    boundary = "corpusBOUNDARY7"
    out = b""
    for name, ctype, content, extra in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\nContent-Type: {ctype}\r\n'
        head += "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        out += head.encode() + b"\r\n" + content + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", out + f"--{boundary}--\r\n".encode()


def _body(ctype: str, body: bytes) -> Callable[[http.Request], None]:
    def build(request: http.Request) -> None:
        request.method = "POST"
        request.headers["Content-Type"] = ctype
        request.content = body
    return build


def _request_text(request: http.Request) -> str:
    parts = [urllib.parse.unquote(request.path), "\n".join(f"{k}: {v}" for k, v in request.headers.items())]
    for k, v in request.query.items(multi=True):
        parts += [k, v, _json_strings(v)]
    body = request.get_content(strict=False) or b""
    text = body.decode(errors="replace")
    parts += [text, _json_strings(text)]
    if request.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
        parts += [v for kv in urllib.parse.parse_qsl(text) for v in kv]
    for header in request.headers.get_all(HEADER):
        parts.append(_json_strings(header))
    for chunk in text.split("\r\n\r\n")[1:]:  # multipart parts' base64
        try:
            parts.append(base64.b64decode(chunk.split("\r\n")[0], validate=True).decode(errors="replace"))
        except ValueError:
            pass
        parts.append(_json_strings(chunk.split("\r\n--")[0]))
    return "\n".join(parts)


def shapes(value: str, rng: Rng) -> dict[str, Callable[[], str]]:
    """Body shape -> a function that plants `value`, masks, and returns what would go out, decoded."""
    doc = {"model": "m", "messages": [{"role": "user", "content": f"my value is {value} thanks"}]}
    said = f"note {value} end"

    def req(build: Callable[[http.Request], None]) -> Callable[[], str]:
        return lambda: _request_text(run_request(build))

    def stream(ctype: str, chunks: Callable[[], list[bytes]], reveal: Callable[[bytes], str]) -> Callable[[], str]:
        return lambda: reveal(run_stream(ctype, chunks()))

    ndjson_lines = b"".join(orjson.dumps({"message": {"role": "assistant", "content": p}, "done": False}) + b"\n"
                            for p in _pieces(said, rng)) + b'{"done":true}\n'
    mp_text = _multipart([("note", "text/plain", said.encode(), {})])
    mp_json = _multipart([("meta", "application/json", ('{"v":"' + _esc(value) + '"}').encode(), {})])
    mp_b64 = _multipart([("file", "text/plain", base64.b64encode(said.encode()), {"Content-Transfer-Encoding": "base64"})])

    def query_name(r: http.Request) -> None:
        r.query = [(value, "1")]

    def query_escaped(r: http.Request) -> None:
        r.query = [("filter", '{"q":"' + _esc(value) + '"}')]

    def path(r: http.Request) -> None:
        r.path = "/v1/users/" + urllib.parse.quote(value, safe="@+") + "/profile"

    return {
        "text": req(_body("text/plain", said.encode())),
        "json": req(_body("application/json", orjson.dumps(doc))),
        "json \\u-escaped": req(_body("application/json", ('{"content":"' + _esc(said) + '"}').encode())),
        "form": req(_body("application/x-www-form-urlencoded", urllib.parse.urlencode({"note": said}).encode())),
        "ndjson": req(_body("application/x-ndjson", orjson.dumps(doc) + b"\n" + orjson.dumps({"v": said}) + b"\n")),
        "ndjson as text/plain": req(_body("text/plain", orjson.dumps({"v": "x"}) + b"\n" + ('{"v":"' + _esc(said) + '"}').encode() + b"\n")),
        "multipart text": req(_body(*mp_text)),
        "multipart json \\u": req(_body(*mp_json)),
        "multipart base64": req(_body(*mp_b64)),
        "header json \\u": req(lambda r: r.headers.__setitem__(HEADER, '{"v":"' + _esc(value) + '"}')),
        "query value": req(lambda r: r.query.__setitem__("q", said)),
        "query json \\u": req(query_escaped),
        "query name": req(query_name),
        "url path": req(path),
        "sse delta LF": stream("text/event-stream", lambda: _cuts(_sse([_delta(p) for p in _pieces(said, rng)]), rng), _sse_text),
        "sse multi-line CRLF": stream("text/event-stream", lambda: _cuts(_sse([_delta(said)], "\r\n", True), rng), _sse_text),
        "sse multi-line CR": stream("text/event-stream", lambda: _cuts(_sse([_delta(said)], "\r", True), rng), _sse_text),
        "sse tool args \\u": stream(
            "text/event-stream",
            lambda: _cuts(_sse([_args(p) for p in _pieces('{"v":"' + _esc(value) + '"}', rng)]), rng),
            _sse_text,
        ),
        "ndjson stream": stream("application/x-ndjson", lambda: _cuts(ndjson_lines, rng), lambda d: _json_strings(d) + "\n" + "".join(
            json.loads(ln).get("message", {}).get("content", "") for ln in d.decode().splitlines() if ln.strip())),
    }


def _core(value: str) -> str:
    return "".join(c for c in value if c.isalnum())


def survived(value: str, out: str) -> bool:
    """Whether `value` (or its letters and digits, in a row) is in `out`."""
    core = _core(value)
    return value in out or (len(core) >= 6 and core in _core(out))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--per-format", type=int, default=2, help="values generated per detector format")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    # (detector, format, shape) -> [planted, caught, refused]
    valid: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    fake: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # (look-alike, shape) -> [planted, altered, refused]
    for detector, formats in VALID.items():
        for fmt, make in formats.items():
            for _ in range(args.per_format):
                value = make(rng)
                for shape, run in shapes(value, rng).items():
                    cell = valid[(detector, fmt, shape)]
                    cell[0] += 1
                    try:
                        out = run()
                    except (Refused, MaskError):
                        cell[2] += 1
                        continue
                    cell[1] += not survived(value, out)
    for name, make in LOOKALIKES.items():
        for _ in range(args.per_format * 2):
            value = make(rng)
            for shape, run in shapes(value, rng).items():
                cell = fake[(name, shape)]
                cell[0] += 1
                try:
                    out = run()
                except (Refused, MaskError):
                    cell[2] += 1
                    continue
                cell[1] += value not in out
    report = _report(valid, fake)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def _sum(cells: list[list[int]]) -> list[int]:
    return [sum(c[i] for c in cells) for i in range(3)]


def _row(name: str, planted: int, good: int, refused: int, width: int = 26) -> str:
    return f"{name:<{width}}{planted:>8}{100 * good / planted:>9.1f}%{refused:>9}"


def _report(valid: dict, fake: dict) -> dict:
    by: dict[str, dict[str, list[list[int]]]] = {"detector": defaultdict(list), "format": defaultdict(list), "shape": defaultdict(list)}
    for (detector, fmt, shape), cell in valid.items():
        by["detector"][detector].append(cell)
        by["format"][f"{detector}:{fmt}"].append(cell)
        by["shape"][shape].append(cell)
    fake_shape: dict[str, list[list[int]]] = defaultdict(list)
    fake_kind: dict[str, list[list[int]]] = defaultdict(list)
    for (kind, shape), cell in fake.items():
        fake_shape[shape].append(cell)
        fake_kind[kind].append(cell)
    report: dict = {"recall": {}, "false_positives": {}}
    total = _sum(list(valid.values()))
    print(f"planted {total[0]} values: recall {100 * total[1] / total[0]:.1f}%, refused {total[2]}")
    for key, groups in by.items():
        print(f"\nrecall per {key}" + " " * (26 - 11 - len(key)) + f"{'planted':>8}{'caught':>10}{'refused':>9}")
        report["recall"][key] = {}
        for name, cells in groups.items():
            planted, caught, refused = _sum(cells)
            report["recall"][key][name] = [planted, caught, refused]
            print(_row(name, planted, caught, refused))
    ftotal = _sum(list(fake.values()))
    print(f"\nlook-alikes {ftotal[0]}: altered {ftotal[1]} ({100 * ftotal[1] / ftotal[0]:.1f}%), refused {ftotal[2]}")
    for key, groups in (("look-alike", fake_kind), ("shape", fake_shape)):
        print(f"\nfalse positives per {key}" + " " * max(26 - 20 - len(key), 1) + f"{'planted':>8}{'altered':>10}{'refused':>9}")
        report["false_positives"][key] = {}
        for name, cells in groups.items():
            planted, altered, refused = _sum(cells)
            report["false_positives"][key][name] = [planted, altered, refused]
            print(_row(name, planted, altered, refused))
    report["total"] = {"planted": total[0], "caught": total[1], "refused": total[2], "lookalikes": ftotal[0], "altered": ftotal[1],
                       "lookalikes_refused": ftotal[2]}
    return report


if __name__ == "__main__":
    main()
