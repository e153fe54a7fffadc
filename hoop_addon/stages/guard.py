"""Stage 3 (before masking): block rules, and which requests need approval."""

from __future__ import annotations

import secrets

from mitmproxy import http

from hoop_addon.masking.codec import BodyTooLarge, decode
from hoop_addon.masking.engine import MaskError
from hoop_addon.policy.model import BlockRule
from hoop_addon.policy.conditions import RequestFacts, UninspectableBody, evaluate, request_key
from hoop_addon.stages import Stage, allowed, hoop, refuse
from hoop_addon.stages.mask import Mask
from hoop_addon.stages.policy import PolicyStage


class Guard(Stage):
    """Evaluates the policy's `block` and `approvals` rules on the request as the agent
    sent it (decoded, not yet masked: see `hoop_addon.policy.conditions`).

    - a `block` rule answers 403 `{"error": "blocked", "message": "blocked by rule
      'NAME': REASON", "stage": "guard"}`;
    - `log` rules (shadow mode), block or approval, only add `{"rule", "action":
      "block" | "approval", "reason"}` items to `hoop.shadow` and to the decision, so
      the audit line says what would have happened;
    - an approval rule sets `hoop.approval = {"rule", "status": "required", "key"}` for
      the Approve stage (after masking) to hold the flow or answer with a ticket.

    A body a rule must parse and cannot (not JSON, undecodable) is refused with 422.
    The body is decoded with the Mask stage's bounded decoder and limit
    (`hoop_mask_max_body`), never mitmproxy's unbounded one: a few KB of gzip can
    decode to gigabytes. A body decoding past the limit is refused with 413.
    """

    def __init__(self, policy: PolicyStage, mask: Mask) -> None:
        self.policy, self.mask = policy, mask  # the Mask stage owns the decoded-size limit
        self.secret = secrets.token_bytes(32)  # ticket keys: per process, never written down

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow) or (active := self.policy.active) is None:
            return
        policy = active.policy
        if not policy.block_rules and not policy.approval_rules:
            return
        record, request = hoop(flow), flow.request
        identity = record["identity"]
        try:
            # bounded: a decompression bomb is refused before it is held in memory
            body = decode(request.raw_content or b"", request.headers.get("Content-Encoding", ""), self.mask.max_body)
            facts = RequestFacts(
                record.get("route"), request.method, identity["issuer"], identity["subject"], identity["groups"],
                list(request.headers.items(multi=True)), body, request.path,
            )
            block, shadow, approval = evaluate(policy.block_rules, policy.approval_rules, facts)
        except BodyTooLarge as exc:
            refuse(flow, 413, "guard", "request_too_large", f"request body could not be inspected: {exc}")
            return
        except (UninspectableBody, MaskError, ValueError) as exc:
            refuse(flow, 422, "guard", "uninspectable_request", f"request body could not be inspected: {exc}")
            return
        if shadow:
            record.setdefault("shadow", []).extend(  # a shadow limit may have noted one already
                {"rule": r.name, "action": "block" if isinstance(r, BlockRule) else "approval", "reason": r.reason}
                for r in shadow
            )
            record["decision"]["shadow"] = record["shadow"]
        if block is not None:
            refuse(flow, 403, "guard", "blocked", f"blocked by rule '{block.name}': {block.reason}")
            record["decision"]["rule"] = block.name
            return
        if approval is not None:
            key = request_key(self.secret, identity["issuer"], identity["subject"], record.get("route"), request.method, request.url, body)
            record["approval"] = {"rule": approval.name, "status": "required", "key": key}
