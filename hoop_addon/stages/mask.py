"""Stage 3: mask what the route's rules select, in requests and in responses."""

from __future__ import annotations

from mitmproxy import http

from hoop_addon.masking import MaskError, mask_body
from hoop_addon.stages import Stage, allowed, hoop, refuse, route_of


class Mask(Stage):
    """Applies the route's masking rules to request bodies before they go upstream and
    to response bodies before they reach the client (or the recording).

    Bodies are decoded from their content-encoding, masked, and re-encoded. A body the
    rules cannot inspect is never passed on: the request is refused (422) or the
    response is withheld (502). Response streaming is turned off for routes that mask
    responses, because a streamed body would bypass the masker. Evidence (rule, detector counts, JSONPath;
    never values) goes to `hoop.masked`.
    """

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response and (route := route_of(flow)) is not None and route.rules_for("response"):
            flow.response.stream = False

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow) or (route := route_of(flow)) is None:
            return
        if not (rules := route.rules_for("request")):
            return
        try:
            new, evidence = mask_body(
                flow.request.get_content(strict=True) or b"", flow.request.headers.get("Content-Type", ""), rules, "request"
            )
        except (MaskError, ValueError) as exc:
            refuse(flow, 422, "mask", "unmaskable_request", f"request body could not be inspected: {exc}")
            return
        if new is not None:
            flow.request.content = new
        hoop(flow).setdefault("masked", []).extend(evidence)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or not hoop(flow).get("forwarded") or (route := route_of(flow)) is None:
            return
        if not (rules := route.rules_for("response")):
            return
        try:
            new, evidence = mask_body(
                flow.response.get_content(strict=True) or b"", flow.response.headers.get("Content-Type", ""), rules, "response"
            )
        except (MaskError, ValueError) as exc:
            refuse(flow, 502, "mask", "unmaskable_response", f"upstream response withheld: it could not be inspected: {exc}")
            return
        if new is not None:
            flow.response.content = new
        hoop(flow).setdefault("masked", []).extend(evidence)
