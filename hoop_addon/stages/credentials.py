"""Stage 4: the gateway, not the agent, holds the upstream credential."""

from __future__ import annotations

from mitmproxy import http

from hoop_addon.recording import SCRUBBED
from hoop_addon.stages import Stage, allowed, hoop, route_of


class InjectCredential(Stage):
    """Last stage before the upstream: removes the agent's credential (the route's
    credential header, and the query parameter for the query kind) and sets the
    route's credential, then marks the flow `hoop.forwarded`.

    Once the request has gone (`responseheaders`, or `error`), the credential is
    replaced by `[SCRUBBED]` in the flow itself, so that nothing later (recording,
    audit, mitmdump's own output, addons, metrics) can see it. Only where it was put
    is recorded in metadata (`hoop.credential`: the header name, or `query:NAME`).
    """

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow):
            return
        record = hoop(flow)
        if (route := route_of(flow)) is not None and (credential := route.credential) is not None:
            request = flow.request
            if credential.param is None:
                request.headers[credential.header] = credential.value
                record["credential"] = credential.header
            else:
                request.headers.pop(credential.header, None)
                request.query[credential.param] = credential.value
                record["credential"] = f"query:{credential.param}"
        record["forwarded"] = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._withdraw(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._withdraw(flow)

    def _withdraw(self, flow: http.HTTPFlow) -> None:
        if "credential" not in hoop(flow) or (route := route_of(flow)) is None or (credential := route.credential) is None:
            return
        if credential.param is None:
            flow.request.headers[credential.header] = SCRUBBED
        elif credential.param in flow.request.query:
            flow.request.query[credential.param] = SCRUBBED
