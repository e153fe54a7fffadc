"""Stage 4: the gateway, not the agent, holds the upstream credential."""

from __future__ import annotations

from mitmproxy import http

from hoop_addon.stages import Stage, allowed, hoop, route_of


class InjectCredential(Stage):
    """Last stage before the upstream: sets the route's credential header (the agent's
    own value, if any, is replaced) and marks the flow `hoop.forwarded`. Only the
    header's name is recorded in metadata, never its value."""

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow):
            return
        record = hoop(flow)
        if (route := route_of(flow)) is not None and route.credential is not None:
            flow.request.headers[route.credential.header] = route.credential.value
            record["credential"] = route.credential.header
        record["forwarded"] = True
