"""OAuth 2.0 protected-resource metadata for MCP routes (pure: no mitmproxy).

The MCP authorization spec (2025-11-25) makes an MCP server an OAuth 2.0 resource
server: a 401 names where its metadata is (`WWW-Authenticate: Bearer
resource_metadata="<url>"`, RFC 9728 §5.1), and that document (RFC 9728 §2) names the
authorization servers a client gets a token from. The gateway answers for the MCP
routes it fronts. Tokens are bound to the resource (RFC 8707): a route whose `mcp:`
block names its `resource` accepts only tokens whose `aud` holds that URI.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_url(resource: str) -> str:
    """The metadata URL of `resource` (an absolute http(s) URI): the well-known path
    inserted between its authority and its path (RFC 9728 §3.1), a query kept,
    `https://gw.example/mcp` -> `https://gw.example/.well-known/oauth-protected-resource/mcp`."""
    parts = urlsplit(resource)
    path = parts.path.rstrip("/") if parts.path != "/" else ""
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{path}" + (f"?{parts.query}" if parts.query else "")


def resource_path(path: str) -> str | None:
    """The path of the resource whose metadata request `path` (no query) asks for:
    `/.well-known/oauth-protected-resource/mcp` -> `/mcp`, the bare well-known path ->
    `/`; None for any other path."""
    if path == WELL_KNOWN:
        return "/"
    if path.startswith(WELL_KNOWN + "/"):
        return path[len(WELL_KNOWN):]
    return None


def document(resource: str, authorization_servers: list[str], scopes: list[str], name: str) -> dict[str, Any]:
    """The protected-resource metadata (RFC 9728 §2) of `resource`: its
    `authorization_servers` (issuer URLs), `bearer_methods_supported` (the
    Authorization header only, RFC 6750 §2.1: the gateway refuses tokens in the query
    and does not read form bodies), `scopes_supported` when the route admits by scope,
    and `resource_name` (the route's name)."""
    doc: dict[str, Any] = {
        "resource": resource, "authorization_servers": authorization_servers,
        "bearer_methods_supported": ["header"], "resource_name": name,
    }
    if scopes:
        doc["scopes_supported"] = scopes
    return doc


def challenge(base: str, resource: str) -> str:
    """The `WWW-Authenticate` value `base` (a Bearer challenge, RFC 6750 §3) with the
    `resource_metadata` parameter of `resource` added (RFC 9728 §5.1)."""
    return f'{base}, resource_metadata="{metadata_url(resource)}"'
