"""Route matching sees only canonical paths and hosts: what an upstream or a resolver
would read as another path or host is refused before any route is matched against it;
and a request must name the server it is sent to."""

import pytest
from mitmproxy import http

from hoop_addon.stages.admit import canonical_host, canonical_path, misdirected


@pytest.mark.parametrize("path", ["/", "*", "/v1/chat/completions", "/v1/", "/v1/a%20b", "/files/report.v2.json"])
def test_canonical_paths_pass(path: str) -> None:
    assert canonical_path(path)


@pytest.mark.parametrize(
    "path",
    ["/v1/files/../chat/completions", "/v1//chat", "/v1/./chat", "/v1/..", "/v1/%63hat", "/v1%2Fchat", "/v1%5cchat", "/v1/x%2E%2E", "v1/chat",
     "/v1/..;/admin", "/v1/..;x", "/v1/;/chat", "/v2/x\\..\\..\\admin"],
)
def test_paths_an_upstream_would_normalise_are_refused(path: str) -> None:
    assert not canonical_path(path)


def test_path_parameters_that_are_not_dot_segments_pass() -> None:
    assert canonical_path("/v1/files;version=2/content")


@pytest.mark.parametrize("host", ["api.openai.com", "localhost", "127.0.0.1", "::1", "2001:db8::1", "1e100.net", "a.b.c"])
def test_canonical_hosts_pass(host: str) -> None:
    assert canonical_host(host)


@pytest.mark.parametrize(
    "host", ["127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.0.0.01", "api.openai.com.", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "foo.123"]
)
def test_other_spellings_of_a_host_are_refused(host: str) -> None:
    assert not canonical_host(host)


def _request(url: str, host: str | None, http2: bool = False) -> http.Request:
    request = http.Request.make("POST", url, b"{}")
    if host is None:
        request.headers.pop("Host", None)
    else:
        request.headers["Host"] = host
    if http2:
        request.http_version = "HTTP/2.0"
        request.authority = host or ""
    return request


@pytest.mark.parametrize(
    ("url", "host", "sni"),
    [
        ("https://api.openai.com/v1/chat", "api.openai.com", "api.openai.com"),
        ("https://API.openai.com/v1/chat", "api.OpenAI.com:443", None),
        ("https://127.0.0.1:8443/v1/chat", "127.0.0.1:8443", None),
        ("http://localhost:8000/v1/chat", None, None),
        ("https://xn--bcher-kva.example/v1/chat", "xn--bcher-kva.example", "xn--bcher-kva.example"),  # host reads bücher.example
        ("https://[::1]:8443/v1/chat", "[::1]:8443", None),
    ],
)
def test_a_request_naming_its_own_server_is_not_misdirected(url: str, host: str | None, sni: str | None) -> None:
    assert misdirected(_request(url, host), sni) is None


@pytest.mark.parametrize(
    ("url", "host", "sni", "http2", "why"),
    [
        ("https://api.openai.com/v1/chat", "evil.example", None, False, "Host header"),
        ("https://api.openai.com/v1/chat", "api.openai.com:8443", None, False, "Host header"),
        ("https://api.openai.com/v1/chat", "api.openai.com", "evil.example", False, "TLS server name"),
        ("https://api.openai.com/v1/chat", "evil.example", None, True, "Host header"),
        ("https://api.openai.com/v1/chat", "not a host!", None, False, "malformed"),
    ],
)
def test_a_request_naming_another_server_is_misdirected(url: str, host: str, sni: str | None, http2: bool, why: str) -> None:
    assert why in (misdirected(_request(url, host, http2), sni) or "")


def test_an_absolute_form_target_naming_another_server_is_misdirected() -> None:
    """Inside a tunnel to api.openai.com, `POST https://evil.example/...` with a matching
    Host: the server uses the target's authority (RFC 9112 §3.2.2)."""
    request = _request("https://api.openai.com/v1/chat", "api.openai.com")
    request.authority = "evil.example"
    assert "request target" in (misdirected(request, "api.openai.com") or "")


def test_two_host_headers_are_misdirected() -> None:
    request = _request("https://api.openai.com/v1/chat", "api.openai.com")
    request.headers.add("Host", "evil.example")
    assert misdirected(request, None) == "more than one Host header"
