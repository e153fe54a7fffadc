"""The Stage base fails closed when a hook raises (mitmproxy would carry on); refusals."""

from mitmproxy import http
from mitmproxy.test import taddons, tflow

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
