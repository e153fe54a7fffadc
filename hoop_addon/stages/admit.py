"""Stage 2: which route a request is on, and whether its identity is admitted there."""

from __future__ import annotations

import re

from mitmproxy import http

from hoop_addon.stages import Stage, hoop, mark_admitted, refuse
from hoop_addon.stages.policy import PolicyStage


# `%` + an unreserved character (RFC 3986 §2.3), `/` or `\\`: upstreams decode these,
# so `/v1/%63hat` or `/v1%2Fchat` would be served as a path no route glob was matched against.
_NEEDLESS_ESCAPE = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DdEeFf]|5[CcFf]|7[Ee])")


def canonical_path(path: str) -> bool:
    """True for a path an upstream cannot normalise into another one: it starts with
    `/` (or is `*`), has no empty, `.` or `..` segments (RFC 3986 §5.2.4) and no
    percent-encoded unreserved characters, slashes or backslashes."""
    if path == "*":
        return True
    segments = path.split("/")
    return (
        path.startswith("/")
        and not any(s in ("", ".", "..") for s in segments[1:-1])
        and segments[-1] not in (".", "..")
        and not _NEEDLESS_ESCAPE.search(path)
    )


class Admit(Stage):
    """Matches the request to the first route of the policy (host, path glob, method)
    and checks the identity (subject, groups, client id, scopes) against the route's
    `allow`: deny by default. Refusals are 403 with a JSON reason naming the route and
    nothing else of the policy, decided on the request headers, before any body is read
    into the chain. Admitted requests are never streamed. The host matched is the one
    the gateway connects to, never the client-supplied `Host` header, and the path is
    matched only in canonical form (see `canonical_path`), so the route a request is
    judged under is the one the upstream will serve it as."""

    def __init__(self, policy: PolicyStage) -> None:
        self.policy = policy

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or (active := self.policy.active) is None:
            return
        record = hoop(flow)
        request = flow.request
        path = request.path.split("?", 1)[0]
        if not canonical_path(path):
            refuse(flow, 400, "route", "non_canonical_path",
                   "the request path is not in canonical form (dot or empty segments, or needless percent-encoding)")
            return
        route = active.policy.route_for(request.host, request.port, path, request.method)
        if route is None:
            if active.policy.unmatched == "allow":
                mark_admitted(flow, None)
            else:
                refuse(flow, 403, "route", "no_route", "no route of the policy matches this request")
            return
        identity = record["identity"]
        if not route.admits(identity["subject"], identity["groups"], identity["client_id"], identity["scopes"]):
            record["route"] = route.name
            refuse(flow, 403, "route", "not_admitted", f"this identity is not admitted to route '{route.name}'")
            return
        mark_admitted(flow, route)
        # A streamed request body would be sent upstream before the `request` hook runs,
        # i.e. before masking and credential injection: the chain inspects whole requests
        # (mitmproxy's body_size_limit bounds them).
        request.stream = False
