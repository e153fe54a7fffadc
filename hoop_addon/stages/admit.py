"""Stage 2: which route a request is on, and whether its identity is admitted there."""

from __future__ import annotations

from mitmproxy import http

from hoop_addon.stages import Stage, admit, hoop, refuse
from hoop_addon.stages.policy import PolicyStage


class Admit(Stage):
    """Matches the request to the first route of the policy (host, path glob, method)
    and checks the identity (subject, groups, client id, scopes) against the route's
    `allow`: deny by default. Refusals are 403 with a JSON reason naming the route and
    nothing else of the policy, decided on the request headers, before any body is read
    into the chain. Admitted requests are never streamed. The host matched is the one
    the gateway connects to, never the client-supplied `Host` header."""

    def __init__(self, policy: PolicyStage) -> None:
        self.policy = policy

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or (active := self.policy.active) is None:
            return
        record = hoop(flow)
        request = flow.request
        route = active.policy.route_for(request.host, request.port, request.path.split("?", 1)[0], request.method)
        if route is None:
            if active.policy.unmatched == "allow":
                admit(flow, None)
            else:
                refuse(flow, 403, "route", "no_route", "no route of the policy matches this request")
            return
        identity = record["identity"]
        if not route.admits(identity["subject"], identity["groups"], identity["client_id"], identity["scopes"]):
            record["route"] = route.name
            refuse(flow, 403, "route", "not_admitted", f"this identity is not admitted to route '{route.name}'")
            return
        admit(flow, route)
        # A streamed request body would be sent upstream before the `request` hook runs,
        # i.e. before masking and credential injection: the chain inspects whole requests
        # (mitmproxy's body_size_limit bounds them).
        request.stream = False
