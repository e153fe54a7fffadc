"""Protected-resource metadata (RFC 9728) of MCP routes: where it lives, what it says,
the challenge that points to it; and the `resource` of an `mcp:` block (RFC 8707)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hoop_addon.mcp.metadata import WELL_KNOWN, challenge, document, metadata_url, resource_path
from hoop_addon.policy.loader import PolicyError, load_policy


@pytest.mark.parametrize(("resource", "url", "path"), [
    ("https://gw.example/mcp", "https://gw.example/.well-known/oauth-protected-resource/mcp", "/mcp"),
    ("https://gw.example:8443/a/b/", "https://gw.example:8443/.well-known/oauth-protected-resource/a/b", "/a/b"),
    ("https://gw.example", "https://gw.example/.well-known/oauth-protected-resource", "/"),
    ("https://gw.example/", "https://gw.example/.well-known/oauth-protected-resource", "/"),
    ("http://127.0.0.1:9/mcp?tenant=1", "http://127.0.0.1:9/.well-known/oauth-protected-resource/mcp?tenant=1", "/mcp"),
])
def test_the_well_known_path_goes_between_authority_and_path(resource: str, url: str, path: str) -> None:
    assert metadata_url(resource) == url
    assert resource_path("/" + url.split("?")[0].split("/", 3)[3]) == path  # and back: the path it is asked for


def test_other_paths_are_not_metadata_requests() -> None:
    assert resource_path("/mcp") is None and resource_path(WELL_KNOWN + "x") is None
    assert resource_path("/.well-known/openid-configuration") is None


def test_document_and_challenge() -> None:
    doc = document("https://gw.example/mcp", ["https://idp.example"], [], "tools")
    assert doc == {"resource": "https://gw.example/mcp", "authorization_servers": ["https://idp.example"],
                   "bearer_methods_supported": ["header"], "resource_name": "tools"}
    assert document("https://gw.example/mcp", [], ["tickets:read"], "t")["scopes_supported"] == ["tickets:read"]
    assert challenge('Bearer realm="hoop"', "https://gw.example/mcp") == (
        'Bearer realm="hoop", resource_metadata="https://gw.example/.well-known/oauth-protected-resource/mcp"')


ROUTE = """\
version: 1
issuers:
  - {{name: idp, issuer: https://idp.example, audience: hoop, jwks: https://idp.example/jwks}}
routes:
  - name: t
    match: {{hosts: [m]}}
    allow: {{groups: [a]}}
    mcp: {{resource: {resource}}}
"""


def test_a_resource_uri_is_absolute_http_s_without_fragment(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(ROUTE.format(resource="https://gw.example/mcp"))
    assert load_policy(tmp_path / "policy.yaml", resolve_env=False).routes[0].mcp.resource == "https://gw.example/mcp"
    for bad, says in [("/mcp", "absolute http(s) URI"), ("'https://gw.example/mcp#x'", "without a fragment"),
                      ("http://gw.example/mcp", "must be https"), ("urn:x", "absolute http(s) URI")]:
        (tmp_path / "policy.yaml").write_text(textwrap.dedent(ROUTE.format(resource=bad)))
        with pytest.raises(PolicyError) as caught:
            load_policy(tmp_path / "policy.yaml", resolve_env=False)
        assert caught.value.key == "routes[0].mcp.resource" and says in caught.value.message
