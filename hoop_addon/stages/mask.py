"""Stage 3: mask what the route's rules select, in requests and in responses."""

from __future__ import annotations

from mitmproxy import http

from hoop_addon.masking import MaskError, mask_body
from hoop_addon.policy.model import Direction
from hoop_addon.stages import Stage, allowed, hoop, refuse, route_of


class Mask(Stage):
    """Applies the route's masking rules to request bodies before they go upstream and
    to response bodies before they reach the client (or the recording).

    Bodies are decoded from their content-encoding, masked, and re-encoded. A body the
    rules cannot inspect is never passed on: the request is refused (422) or the
    response is withheld (502). Response streaming is turned off for routes that mask
    responses, because a streamed body would bypass the masker. Evidence (rule,
    detector counts, JSONPath; never values) goes to `hoop.masked`.
    """

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response and (route := route_of(flow)) is not None and route.rules_for("response"):
            flow.response.stream = False

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and allowed(flow):
            self._mask(flow, flow.request, "request")

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and hoop(flow).get("forwarded"):
            self._mask(flow, flow.response, "response")

    def _mask(self, flow: http.HTTPFlow, message: http.Message, part: Direction) -> None:
        if (route := route_of(flow)) is None or not (rules := route.rules_for(part)):
            return
        try:
            body = message.get_content(strict=True) or b""
            new, evidence = mask_body(body, message.headers.get("Content-Type", ""), rules, part)
        except (MaskError, ValueError) as exc:
            if part == "request":
                refuse(flow, 422, "mask", "unmaskable_request", f"request body could not be inspected: {exc}")
            else:
                refuse(flow, 502, "mask", "unmaskable_response", f"upstream response withheld: it could not be inspected: {exc}")
            return
        if new is not None:
            message.content = new
        hoop(flow).setdefault("masked", []).extend(evidence)
