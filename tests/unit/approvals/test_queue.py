"""The approval queue (who may decide, min_approvals, timeouts, cap, tickets) and the
webhook payload's escaping."""

from __future__ import annotations

import pytest

from hoop_addon.state.approvals import DECIDED_KEPT_S
from hoop_addon.approvals.queue import LOCAL_OPERATOR, ApprovalError, ApprovalQueue, Approver, QueueFull
from hoop_addon.policy.model import ApprovalRule, Conditions, Names
from hoop_addon.approvals.webhook import payload, slack_quote

REQUESTER = {"subject": "agent-7", "issuer": "https://idp", "groups": ["agents"], "token_id": None}
SUMMARY = {"route": "llm", "method": "POST", "url": "https://api/v1/x", "preview": "{}"}
ALICE = Approver("alice", ("sre",), "https://idp")
BOB = Approver("bob", ("sre",), "https://idp")
MALLORY = Approver("mallory", ("agents",), "https://idp")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def rule(**kw) -> ApprovalRule:
    args = dict(name="r", when=Conditions(methods=frozenset({"POST"})), approver_groups=Names(frozenset({"sre"})),
                approver_subjects=Names(frozenset({"carol"})), reason="why")
    return ApprovalRule(**{**args, **kw})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(clock: Clock) -> ApprovalQueue:
    return ApprovalQueue(clock)


def test_approver_in_group_approves(queue: ApprovalQueue, clock: Clock) -> None:
    item = queue.open(rule(), REQUESTER, SUMMARY, "k", 10)
    clock.now += 2.5
    queue.decide(item.id, ALICE, True, "looks fine")
    record = item.record()
    assert item.outcome == "approved" and record["status"] == "approved" and record["waited_s"] == 2.5
    assert record["decisions"][0] | {"at": None} == {
        "approver": "alice", "issuer": "https://idp", "via": "api", "approve": True, "reason": "looks fine", "at": None
    }
    assert queue.pending() == []


def test_named_subject_may_approve(queue: ApprovalQueue) -> None:
    item = queue.open(rule(), REQUESTER, SUMMARY, "k", 10)
    queue.decide(item.id, Approver("carol", ()), True, "")
    assert item.outcome == "approved"


@pytest.mark.parametrize(
    ("approver", "code"),
    [(MALLORY, "not_an_approver"), (Approver("agent-7", ("sre",)), "self_approval")],
)
def test_outsider_and_requester_cannot_decide(queue: ApprovalQueue, approver: Approver, code: str) -> None:
    item = queue.open(rule(), REQUESTER, SUMMARY, "k", 10)
    for approve in (True, False):
        with pytest.raises(ApprovalError) as caught:
            queue.decide(item.id, approver, approve, "")
        assert caught.value.code == code and caught.value.status == 403
    assert item.outcome is None and item.decisions == []


def test_local_operator_decides_any_rule_but_not_as_requester(queue: ApprovalQueue) -> None:
    item = queue.open(rule(), REQUESTER, SUMMARY, "k", 10)
    queue.decide(item.id, Approver.local_operator(), False, "no")
    assert item.outcome == "denied" and item.decisions[0]["approver"] == LOCAL_OPERATOR
    own = queue.open(rule(), {**REQUESTER, "subject": LOCAL_OPERATOR}, SUMMARY, "k", 10)
    with pytest.raises(ApprovalError, match="own request"):
        queue.decide(own.id, Approver.local_operator(), True, "")


def test_min_approvals_needs_distinct_approvers(queue: ApprovalQueue) -> None:
    item = queue.open(rule(min_approvals=2), REQUESTER, SUMMARY, "k", 10)
    queue.decide(item.id, ALICE, True, "")
    assert item.outcome is None
    with pytest.raises(ApprovalError) as caught:
        queue.decide(item.id, ALICE, True, "again")
    assert caught.value.code == "already_approved"
    queue.decide(item.id, BOB, True, "")
    assert item.outcome == "approved"
    with pytest.raises(ApprovalError) as caught:
        queue.decide(item.id, BOB, False, "too late")
    assert caught.value.code == "already_decided"


def test_one_deny_denies(queue: ApprovalQueue) -> None:
    item = queue.open(rule(min_approvals=2), REQUESTER, SUMMARY, "k", 10)
    queue.decide(item.id, ALICE, True, "")
    queue.decide(item.id, BOB, False, "no")
    assert item.outcome == "denied"


def test_timeout_denies_and_unknown_ids_are_404(queue: ApprovalQueue, clock: Clock) -> None:
    item = queue.open(rule(timeout=60), REQUESTER, SUMMARY, "k", 10)
    clock.now += 59
    assert queue.expire() == []
    clock.now += 1
    assert queue.expire() == [item] and item.outcome == "timeout"
    with pytest.raises(ApprovalError) as caught:
        queue.decide(item.id, ALICE, True, "")
    assert caught.value.code == "already_decided" and caught.value.status == 409
    clock.now += DECIDED_KEPT_S
    with pytest.raises(ApprovalError) as caught:
        queue.get(item.id)
    assert caught.value.code == "not_found" and caught.value.status == 404


def test_cap_refuses_with_retry_after(queue: ApprovalQueue, clock: Clock) -> None:
    for _ in range(3):
        queue.open(rule(timeout=100), REQUESTER, SUMMARY, "k", 3)
    clock.now += 40
    with pytest.raises(QueueFull) as caught:
        queue.open(rule(), REQUESTER, SUMMARY, "k", 3)
    assert caught.value.retry_after == 61
    queue.decide(queue.pending()[0].id, ALICE, False, "")
    queue.open(rule(), REQUESTER, SUMMARY, "k", 3)  # room again


def test_shutdown_denies_every_pending(queue: ApprovalQueue) -> None:
    items = [queue.open(rule(), REQUESTER, SUMMARY, "k", 10) for _ in range(3)]
    assert queue.shutdown() == items
    assert {i.outcome for i in items} == {"shutdown"} and queue.pending() == []


def test_ticket_passes_once_within_window(queue: ApprovalQueue, clock: Clock) -> None:
    ticket_rule = rule(mode="ticket", ticket_window=600)
    item = queue.open(ticket_rule, REQUESTER, SUMMARY, "key-1", 10)
    assert queue.ticket("agent-7", "key-1") is item  # a retry before the decision finds the same ticket
    assert queue.ticket("agent-7", "key-2") is None and queue.ticket("someone-else", "key-1") is None
    queue.decide(item.id, ALICE, True, "")
    clock.now += 599
    found = queue.ticket("agent-7", "key-1")
    assert found is item
    queue.redeem(found)
    assert queue.ticket("agent-7", "key-1") is None  # the second retry finds nothing
    with pytest.raises(ApprovalError):
        queue.redeem(found)


def test_ticket_window_ends(queue: ApprovalQueue, clock: Clock) -> None:
    item = queue.open(rule(mode="ticket", ticket_window=600), REQUESTER, SUMMARY, "k", 10)
    queue.decide(item.id, ALICE, True, "")
    clock.now += 600
    assert queue.ticket("agent-7", "k") is None


def test_ids_are_unguessable(queue: ApprovalQueue) -> None:
    ids = {queue.open(rule(), REQUESTER, SUMMARY, "k", 100).id for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 16 for i in ids)


class TestWebhookPayload:
    def test_slack_text_cannot_be_forged(self) -> None:
        hostile = "hi`\n*Approved by* <@U123|admin> <https://evil|click> &amp; \u2028done"
        quoted = slack_quote(hostile)
        assert "\n" not in quoted and "\u2028" not in quoted
        assert "<" not in quoted and ">" not in quoted
        assert quoted.count("`") == 2 and quoted.startswith("`") and quoted.endswith("`")
        assert "&amp;amp;" in quoted and "&lt;@U123|admin&gt;" in quoted

    def test_payload_has_generic_record_and_slack_text(self, queue: ApprovalQueue) -> None:
        summary = {**SUMMARY, "preview": "x\nApproved: yes <!channel>"}
        item = queue.open(rule(), {**REQUESTER, "subject": "a`b"}, summary, "k", 10)
        body = payload(item.record(), "http://127.0.0.1:8081")
        assert body["approval"]["id"] == item.id and body["approval"]["request"]["preview"] == summary["preview"]
        lines = body["text"].split("\n")
        assert len(lines) == 6  # the request's newline did not add a line
        assert "<!channel>" not in body["text"] and "&lt;!channel&gt;" in body["text"]
        assert "`a'b`" in body["text"]

    def test_payload_names_the_mcp_call(self, queue: ApprovalQueue) -> None:
        summary = {**SUMMARY, "mcp": {"method": "tools/call", "target": "delete_`bucket\n<!here>"}}
        body = payload(queue.open(rule(), REQUESTER, summary, "k", 10).record(), None)
        (line,) = [ln for ln in body["text"].split("\n") if ln.startswith("MCP call: ")]
        assert line == "MCP call: `tools/call` `delete_'bucket\\x0a&lt;!here&gt;`"  # inert: no new line, no mention

    def test_long_values_are_cut(self) -> None:
        assert len(slack_quote("x" * 5000)) == 300 + 3
