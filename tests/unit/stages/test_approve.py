"""The Approve stage inside mitmproxy's test harness: the mitmproxy commands an operator
uses in the console or mitmweb (`hoop.pending`, `hoop.approve`, `hoop.deny`), and a
held flow resumed without a decision."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from hoop_addon.control.metrics import REGISTRY
from hoop_addon.identity.verifier import Verifier
from hoop_addon.policy.model import ApprovalRule, Conditions, Policy, Names
from hoop_addon.stages import hoop, mark_admitted
from hoop_addon.stages.approve import Approve
from hoop_addon.stages.control import Control
from hoop_addon.stages.policy import Enforcement, PolicyStage

RULE = ApprovalRule("risky", Conditions(methods=frozenset({"POST"})), Names(frozenset({"sre"})), Names(), "why")


class Events:
    """Stands in for the Audit stage: keeps the events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def event(self, name: str, flow: Any = None, **fields: Any) -> dict[str, Any]:
        self.events.append((name, fields))
        return fields


@pytest.fixture
def stage() -> Approve:
    policy = PolicyStage()
    policy.active = Enforcement(
        Policy(files=(), digest="0" * 64, issuers=(), token_sources=frozenset(), unmatched="deny", routes=(),
               approval_rules=(RULE,)),
        Verifier((), {}),
    )
    return Approve(policy, Control(), Events())  # type: ignore[arg-type]


def held_flow() -> Any:
    flow = tflow.tflow()
    flow.request.method = "POST"
    mark_admitted(flow, None)
    hoop(flow)["identity"] = {"subject": "agent-1", "issuer": "i", "groups": ["agents"], "token_id": None}
    hoop(flow)["approval"] = {"rule": "risky", "status": "required", "key": "k"}
    return flow


async def hold(stage: Approve, flow: Any) -> asyncio.Task[None]:
    task = asyncio.ensure_future(stage.request(flow))
    for _ in range(100):
        await asyncio.sleep(0)
        if flow.intercepted:
            return task
    raise AssertionError("the flow was not held")


def test_console_commands_approve_as_the_local_operator(stage: Approve) -> None:
    asyncio.run(_console_commands_approve_as_the_local_operator(stage))


async def _console_commands_approve_as_the_local_operator(stage: Approve) -> None:
    with taddons.context(stage) as tctx:
        flow = held_flow()
        task = await hold(stage, flow)
        (line,) = tctx.master.commands.execute("hoop.pending")
        approval_id = line.split()[0]
        assert "rule=risky requester=agent-1 POST" in line
        assert REGISTRY.get_sample_value("hoop_approvals_pending") == 1
        stage.queue.clock = lambda: stage.queue.store.items[approval_id].created + 42.5
        assert REGISTRY.get_sample_value("hoop_approval_oldest_pending_seconds") == 42.5
        tctx.master.commands.execute(f'hoop.approve {approval_id} "checked by hand"')
        await asyncio.wait_for(task, 5)
        assert flow.response is None and not flow.intercepted
        assert REGISTRY.get_sample_value("hoop_approvals_pending") == 0 and REGISTRY.get_sample_value("hoop_approval_oldest_pending_seconds") == 0.0
        record = hoop(flow)["approval"]
        assert record["status"] == "approved"
        assert record["decisions"][0] | {"at": None} == {
            "approver": "local-operator", "issuer": None, "via": "mitmproxy", "approve": True,
            "reason": "checked by hand", "at": None,
        }
        assert hoop(flow)["decision"]["approval"]["status"] == "approved"


def test_console_deny_by_flow_id_answers_403(stage: Approve) -> None:
    asyncio.run(_console_deny_by_flow_id_answers_403(stage))


async def _console_deny_by_flow_id_answers_403(stage: Approve) -> None:
    with taddons.context(stage) as tctx:
        flow = held_flow()
        shadow = [{"rule": "watch", "action": "block", "reason": "r"}]
        hoop(flow)["decision"]["shadow"] = shadow
        task = await hold(stage, flow)
        tctx.master.commands.execute(f"hoop.deny {flow.id}")
        await asyncio.wait_for(task, 5)
        assert flow.response.status_code == 403 and not flow.intercepted
        decision = hoop(flow)["decision"]
        assert decision["reason"] == "approval_denied" and decision["shadow"] == shadow  # still audited
        with pytest.raises(exceptions.CommandError, match="already denied"):
            tctx.master.commands.execute(f"hoop.approve {hoop(flow)['approval']['id']}")


def test_resuming_without_a_decision_denies(stage: Approve) -> None:
    asyncio.run(_resuming_without_a_decision_denies(stage))


async def _resuming_without_a_decision_denies(stage: Approve) -> None:
    with taddons.context(stage):
        flow = held_flow()
        task = await hold(stage, flow)
        flow.resume()  # mitmproxy's own "resume", not hoop.approve
        await asyncio.wait_for(task, 5)
        assert flow.response.status_code == 403
        assert hoop(flow)["approval"]["decisions"][0]["reason"] == "resumed in mitmproxy without hoop.approve"


def test_shutdown_denies_held_flows(stage: Approve) -> None:
    asyncio.run(_shutdown_denies_held_flows(stage))


async def _shutdown_denies_held_flows(stage: Approve) -> None:
    with taddons.context(stage):
        flows = [held_flow() for _ in range(3)]
        tasks = [await hold(stage, f) for f in flows]
        await stage.done()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert [f.response.status_code for f in flows] == [403] * 3
        assert {hoop(f)["decision"]["reason"] for f in flows} == {"gateway_shutdown"}


def test_tickets_nobody_decided_are_audited_when_they_time_out(stage: Approve) -> None:
    asyncio.run(_tickets_nobody_decided_are_audited_when_they_time_out(stage))


async def _tickets_nobody_decided_are_audited_when_they_time_out(stage: Approve) -> None:
    ticket_rule = ApprovalRule("tickets", Conditions(methods=frozenset({"POST"})), Names(frozenset({"sre"})), Names(), "why",
                               timeout=60, mode="ticket")
    stage.policy.active = Enforcement(replace(stage.policy.active.policy, approval_rules=(ticket_rule,)), stage.policy.active.verifier)
    with taddons.context(stage):
        flow = held_flow()
        hoop(flow)["approval"]["rule"] = "tickets"
        await stage.request(flow)
        assert flow.response.status_code == 202
        now = stage.queue.clock()
        stage.queue.clock = lambda: now + 60
        stage.running()
        await asyncio.sleep(1.1)  # one sweep
        stage.sweeper.cancel()
        (name, fields), = [e for e in stage.audit.events if e[0] == "approval_decided"]
        assert fields["reason"] == "timeout" and fields["approval"]["status"] == "timeout"
        assert fields["identity"]["subject"] == "agent-1" and fields["approver"] is None


def test_pending_lines_and_previews_are_inert(stage: Approve) -> None:
    asyncio.run(_pending_lines_and_previews_are_inert(stage))


async def _pending_lines_and_previews_are_inert(stage: Approve) -> None:
    """`hoop.pending` shows the requester and URL with controls and bidi characters
    escaped; the preview is the body read as UTF-8 (é stays é, a bad byte is U+FFFD),
    never as Latin-1."""
    with taddons.context(stage) as tctx:
        flow = held_flow()
        hoop(flow)["identity"]["subject"] = "agent\x1b[2J\u202e-1"
        flow.request.path = "/v1/\x85chat"
        flow.request.headers["Content-Type"] = "text/plain; charset=latin-1"
        flow.request.content = "café ".encode() + b"\xff"
        task = await hold(stage, flow)
        (line,) = tctx.master.commands.execute("hoop.pending")
        assert "requester=agent\\x1b[2J\\u202e-1" in line and "\x1b" not in line and "\u202e" not in line
        (item,) = stage.queue.pending()
        assert item.request["preview"] == "café \ufffd"
        tctx.master.commands.execute(f"hoop.deny {item.id}")
        await asyncio.wait_for(task, 5)
