"""Stage 0b (before identity): serve OAuth 2.0 protected-resource metadata (RFC 9728)
for the MCP routes the gateway fronts, which a client reads before it has a token."""

from __future__ import annotations

import orjson
from mitmproxy import http
from mitmproxy.net.http import url
from mitmproxy.proxy.mode_specs import ReverseMode

from hoop_addon.mcp.metadata import document, resource_path
from hoop_addon.policy.model import Route
from hoop_addon.stages import Stage, hoop
from hoop_addon.stages.policy import PolicyStage


def resource_uri(flow: http.HTTPFlow, route: Route, path: str) -> str:
    """The resource URI (RFC 8707 §2) of MCP route `route` as the client of `flow`
    addresses it at `path`: the block's `resource` when it names one; else the URL the
    client sent to (in reverse mode the gateway's own listening address and scheme,
    since the Host header now names the upstream; else the request's target)."""
    if route.mcp is not None and route.mcp.resource:
        return route.mcp.resource
    client, request = flow.client_conn, flow.request
    if isinstance(client.proxy_mode, ReverseMode) and client.sockname:
        scheme = "https" if client.tls_established else "http"
        return f"{scheme}://{url.hostport(scheme, client.sockname[0], client.sockname[1])}{path}"
    return f"{request.scheme}://{url.hostport(request.scheme, request.host, request.port)}{path}"


class ResourceMetadata(Stage):
    """Answers `GET /.well-known/oauth-protected-resource[/PATH]` (RFC 9728 §3) when
    an MCP route matches the resource at PATH (host, port, path, as a POST to it would
    be routed): 200 with its metadata document (`hoop_addon.mcp.metadata.document`:
    resource URI, the policy's issuers as authorization servers, the route's scopes),
    without a token, since a client reads it to learn where to get one. Anything else
    goes on to the chain. The audit entry's decision is `{"outcome": "served",
    "stage": "metadata"}`."""

    def __init__(self, policy: PolicyStage) -> None:
        self.policy = policy

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if flow.response is not None or request.method not in ("GET", "HEAD") or (active := self.policy.active) is None:
            return
        if (path := resource_path(request.path.split("?", 1)[0])) is None:
            return
        route = active.policy.route_for(request.host, request.port, path, "POST")
        if route is None or route.mcp is None:
            return
        scopes = sorted(route.allow_scopes.anywhere | {name for _, name in route.allow_scopes.scoped})
        doc = document(resource_uri(flow, route, path), [i.issuer for i in active.policy.issuers], scopes, route.name)
        hoop(flow).update(policy_hash=active.policy.digest, route=route.name,
                          decision={"outcome": "served", "stage": "metadata"})
        flow.response = http.Response.make(200, orjson.dumps(doc), {"Content-Type": "application/json",
                                                                  "Cache-Control": "max-age=300"})
