"""The Stage base fails closed when a hook raises (mitmproxy would carry on)."""

from mitmproxy import http
from mitmproxy.test import taddons, tflow

from hoop_addon.stages import Stage, hoop


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
