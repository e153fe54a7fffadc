"""The Stage base fails closed when a hook raises (mitmproxy would carry on); refusals."""

from mitmproxy import http
from mitmproxy.test import taddons, tflow

from hoop_addon.control.metrics import REGISTRY, STAGE_SECONDS
from hoop_addon.stages import Stage, hoop, refuse


class Broken(Stage):
    def request(self, flow: http.HTTPFlow) -> None:
        flow.intercept()  # as a stage holding a flow for approval does
        raise RuntimeError("bug")


def test_a_raising_hook_refuses_the_flow_and_never_leaves_it_intercepted() -> None:
    stage = Broken()
    with taddons.context(stage):
        flow = tflow.tflow()
        stage.request(flow)
    assert flow.response is not None and flow.response.status_code == 500
    assert hoop(flow)["decision"]["reason"] == "internal_error"
    assert not flow.intercepted


def test_a_refusal_keeps_the_shadow_rules_noted_before_it() -> None:
    """A log-mode rule matched, then a later rule or stage refused the flow: the audit
    line must still say what the shadow rule would have done."""
    flow = tflow.tflow()
    shadow = [{"rule": "watch", "action": "block", "reason": "r"}]
    hoop(flow)["decision"] = {"outcome": "allow", "shadow": shadow}
    refuse(flow, 403, "guard", "blocked", "blocked by rule 'x'")
    assert hoop(flow)["decision"] == {"outcome": "deny", "stage": "guard", "reason": "blocked",
                                      "message": "blocked by rule 'x'", "shadow": shadow}


def test_every_hook_is_timed_into_a_standard_histogram() -> None:
    """`hoop_stage_seconds` keeps its own counters (no lock per observation): its
    exposition must still be a Prometheus histogram, buckets cumulative, `le` inclusive."""

    class Timed(Stage):
        def request(self, flow: http.HTTPFlow) -> None:
            pass

    Timed().request(tflow.tflow())
    observe = STAGE_SECONDS.timer("Timed", "response")
    for seconds in (1e-5, 3e-4, 5e-4, 2.0):
        observe(seconds)
    samples = {(s.name, s.labels.get("le")): s.value for m in REGISTRY.collect() for s in m.samples
               if s.labels.get("stage") == "Timed" and s.labels.get("hook") == "response"}
    assert samples[("hoop_stage_seconds_bucket", "1e-05")] == 1
    assert samples[("hoop_stage_seconds_bucket", "0.00025")] == 1
    assert samples[("hoop_stage_seconds_bucket", "0.0005")] == 3
    assert samples[("hoop_stage_seconds_bucket", "1.0")] == 3
    assert samples[("hoop_stage_seconds_bucket", "+Inf")] == samples[("hoop_stage_seconds_count", None)] == 4
    assert abs(samples[("hoop_stage_seconds_sum", None)] - 2.00081) < 1e-9
    requests = [s for m in REGISTRY.collect() for s in m.samples
                if s.name == "hoop_stage_seconds_count" and s.labels == {"stage": "Timed", "hook": "request"}]
    assert requests[0].value == 1


def test_a_refused_request_keeps_no_body_and_a_forwarded_one_keeps_its_own() -> None:
    """refuse() before forwarding drops the request body (it may hold a token or values
    not masked yet: mitmproxy's UIs show the flow, and may save it); after forwarding,
    the request as sent stays."""
    from mitmproxy.test import tflow

    from hoop_addon.stages import hoop, refuse

    refused = tflow.tflow()
    refused.request.content = b'{"email": "jane.doe@example.com"}'
    refuse(refused, 422, "mask", "unmaskable_request", "request could not be inspected")
    assert refused.request.raw_content == b"" and refused.response.status_code == 422

    forwarded = tflow.tflow()
    forwarded.request.content = b'{"email": "[REDACTED:EMAIL]"}'
    hoop(forwarded)["forwarded"] = True
    refuse(forwarded, 502, "mask", "unmaskable_response", "upstream response withheld")
    assert forwarded.request.raw_content == b'{"email": "[REDACTED:EMAIL]"}'


def test_a_refused_admitted_request_drops_the_headers_and_cookies_its_rules_mask() -> None:
    """Under a route whose request rules name `x-user-email` and cookie `uid`, a refusal
    before forwarding removes them (unmasked yet) with the body and the query."""
    import dataclasses

    from mitmproxy.test import tflow

    from hoop_addon.policy.model import Route
    from hoop_addon.stages import mark_admitted, refuse
    from tests.support.masking import rule

    named = dataclasses.replace(rule(), headers=("x-user-email",), cookies=("uid",))
    from hoop_addon.policy.model import Names

    route = Route("r", ("example.com",), ("*",), frozenset(), Names(), Names(), (named,))
    flow = tflow.tflow()
    flow.request.path = "/v1/x?owner=jane.doe@example.com"
    flow.request.headers.update({"X-User-Email": "jane.doe@example.com", "Cookie": "uid=jane.doe@example.com", "Accept": "*/*"})
    mark_admitted(flow, route)
    refuse(flow, 422, "mask", "unmaskable_request", "request could not be inspected")
    assert "X-User-Email" not in flow.request.headers and "Cookie" not in flow.request.headers
    assert flow.request.headers["Accept"] == "*/*" and flow.request.path == "/v1/x"
