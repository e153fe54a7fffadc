"""Rate limits and budgets per identity, group and route: requests per minute, LLM
tokens per minute and per day."""

from __future__ import annotations

import math
import weakref
from typing import Any

from mitmproxy import http

from hoop_addon.control.metrics import RATE_LIMITED, labelled
from hoop_addon.limits.counter import Counters, Need
from hoop_addon.limits.usage import StreamUsage, Usage, output_bound, usage_in_body
from hoop_addon.masking.codec import decode
from hoop_addon.masking.engine import MaskError
from hoop_addon.policy.conditions import estimate_tokens
from hoop_addon.policy.model import Limit
from hoop_addon.stages import Stage, allowed, hoop, logger, refuse, store_call
from hoop_addon.stages.mask import Mask
from hoop_addon.stages.policy import PolicyStage
from hoop_addon.state.approvals import StateError
from hoop_addon.state.counters import SharedCounters

_TOKEN_KINDS = ("tokens_per_minute", "tokens_per_day")
Charge = tuple[Limit, tuple[Any, ...]]


class RateLimit(Stage):
    """Applies the policy's `limits` to admitted flows (placed after the Mask stage, so
    that it can read a stream's usage as Mask's stream callable emits it).

    - `requestheaders`: a flow that would take a count past `requests_per_minute` is
      refused with 429, `Retry-After` (seconds until the window has room) and reason
      `rate_limited` naming the limit; otherwise each count it falls under is charged.
    - `request`: the prompt's tokens are estimated from the decoded body
      (`estimate_tokens`: bytes / 4); with the output bound the request declares
      (`output_bound`: `max_tokens`, ...; else the limit's `default_output_tokens`)
      they are checked against `tokens_per_minute` and `tokens_per_day` the same way,
      and reserved at once, so that concurrent requests cannot together pass a budget.
    - once the response is known (buffered, or as it streams), or the flow ends in an
      error (the client gone, the upstream unreachable, refused by a later stage), the
      reservation is released and what was used is charged: the provider's reported
      prompt count (else the estimate) and completion tokens (`hoop.usage`:
      `{"prompt_estimate", "output_reserved", "prompt", "completion",
      "completion_estimated"}`). A response that reports no completion count (an
      OpenAI stream without `stream_options.include_usage`, a provider that reports
      none), or a stream cut short before its final count, is charged the estimate of
      the upstream body's bytes (`estimate_tokens`), and `completion_estimated` is
      true: what passed is counted, reported or not (at most the declared bound, which
      the provider enforces). The body read is the upstream's,
      even when a later stage withholds it from the client (the tokens were spent).

    A limit with `action: log` (shadow mode) refuses nothing: an excess is noted in
    `hoop.shadow` (`{"rule", "action": "limit", "reason"}`) and the audit line's
    decision. Counted in `hoop_rate_limited_total{limit}`, enforced or shadow. Counts
    live in this process, or, with a shared state store (`hoop_state`, the one the
    Mask stage's `state` gives), in the store: a limit then holds across every process
    sharing it (`hoop_addon.state.counters`; checking and charging is one transaction).
    A store that fails refuses the flow (503 `limit_store_unavailable`); a settlement
    that fails is logged (the reservation stays charged).
    """

    def __init__(self, policy: PolicyStage, mask: Mask) -> None:
        self.policy, self.mask = policy, mask  # the Mask stage owns the decoded-size limit
        self.counters: Counters | SharedCounters = Counters()
        self.shared = False  # whether `counters` is the shared store's
        self.charges: weakref.WeakKeyDictionary[http.HTTPFlow, list[Charge]] = weakref.WeakKeyDictionary()
        self.streams: weakref.WeakKeyDictionary[http.HTTPFlow, StreamUsage] = weakref.WeakKeyDictionary()
        self.upstream: weakref.WeakKeyDictionary[http.HTTPFlow, http.Response] = weakref.WeakKeyDictionary()
        # (when reserved, [(limit, key, tokens reserved)], declared output bound) per flow
        self.reserved: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[float, list[tuple[Limit, tuple[Any, ...], int]], int | None]] = (
            weakref.WeakKeyDictionary())

    def _applicable(self, flow: http.HTTPFlow) -> list[Charge]:
        if flow.response is not None or not allowed(flow) or (active := self.policy.active) is None:
            return []
        record = hoop(flow)
        identity, route = record.get("identity") or {}, record.get("route")
        return [
            (limit, key)
            for limit in active.policy.limits
            if limit.applies(route, identity.get("issuer"), identity.get("subject", ""), identity.get("groups") or ())
            for key in limit.keys(route, identity)
        ]

    def _counting(self) -> Counters | SharedCounters:
        """The counters in force: the shared store's once one is open (fixed at start-up)."""
        store = self.mask.state()
        if store.blocking and not self.shared:
            self.counters, self.shared = SharedCounters(store), True  # type: ignore[arg-type]
        return self.counters

    async def _take(self, flow: http.HTTPFlow, needs: list[tuple[Limit, tuple[Any, ...], int]], kinds: tuple[str, ...],
                    prompt: int | None = None, declared: int | None = None) -> bool:
        """Check and charge `needs` ((limit, key, amount)) in each of `kinds` the limit
        sets, all or nothing; refuse the flow (True) when one does not fit (429) or the
        shared store fails (503)."""
        counters = self._counting()
        which = [(limit, key, need, kind) for kind in kinds for limit, key, need in needs if getattr(limit, kind)]
        asks: list[Need] = [(limit.name, key, kind, need, getattr(limit, kind), limit.action != "log")
                            for limit, key, need, kind in which]
        try:
            waits = await store_call(self.mask.state(), counters.take, asks)
        except StateError as exc:  # fail closed: a limit that cannot be counted lets nothing through
            logger.error(f"hoop: rate limits: {exc}")
            refuse(flow, 503, "limit", "limit_store_unavailable",
                   f"the shared rate-limit store cannot be reached; the request was not forwarded: {exc}")
            return True
        for kind in kinds:
            if self._over(flow, [(limit, need, wait) for (limit, _, need, k), wait in zip(which, waits) if k == kind],
                          kind, prompt, declared):
                return True
        return False

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        charges = self._applicable(flow)
        if not charges:
            return
        counted = [(limit, key, 1) for limit, key in charges if limit.requests_per_minute]
        if counted and await self._take(flow, counted, ("requests_per_minute",)):
            return
        self.charges[flow] = charges

    async def request(self, flow: http.HTTPFlow) -> None:
        if (charges := self.charges.get(flow)) is None or flow.response is not None or not allowed(flow):
            return
        counted = [(limit, key) for limit, key in charges if limit.tokens_per_minute or limit.tokens_per_day]
        if not counted:
            return
        request = flow.request
        try:
            body = decode(request.raw_content or b"", request.headers.get("Content-Encoding", ""), self.mask.max_body)
        except MaskError:
            body = request.raw_content or b""  # the masking stage refuses what cannot be decoded
        estimate, declared = estimate_tokens(body), output_bound(body)
        reserve = [(lim, k, estimate + (declared or lim.default_output_tokens)) for lim, k in counted]
        if await self._take(flow, reserve, _TOKEN_KINDS, estimate, declared):
            return
        self.reserved[flow] = (self._counting().clock(), reserve, declared)
        hoop(flow)["usage"] = {"prompt_estimate": estimate, "output_reserved": max(n for *_, n in reserve) - estimate,
                               "prompt": None, "completion": None, "completion_estimated": None}

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if "usage" not in hoop(flow) or flow.response is None:
            return
        self.upstream[flow] = flow.response  # the Mask stage may replace flow.response by a refusal
        if not callable(inner := flow.response.stream):
            return
        scanner = self.streams[flow] = StreamUsage()

        def stream(chunk: bytes) -> list[bytes]:
            scanner.upstream_size += len(chunk)  # spent upstream even if the Mask stage ended the stream
            out = inner(chunk)
            data = out if isinstance(out, bytes) else b"".join(out)
            scanner.feed(data, final=not chunk)
            return [data] if data else []

        flow.response.stream = stream

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._settle(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._settle(flow)  # a stream cut short still used the tokens it carried

    async def _settle(self, flow: http.HTTPFlow) -> None:
        """Charge the completion tokens the provider reported (else the estimate of the
        upstream body), and correct the prompt estimate by its reported count."""
        record = hoop(flow)
        if (usage_record := record.get("usage")) is None or usage_record["completion"] is not None:
            return
        scanner, response = self.streams.pop(flow, None), self.upstream.pop(flow, None)
        usage, size = None, 0
        if scanner is not None:
            usage, size = (scanner.usage if scanner.found else None), max(scanner.size, scanner.upstream_size)
        elif response is not None and response.raw_content:
            try:
                body = decode(response.raw_content, response.headers.get("Content-Encoding", ""), self.mask.max_body)
            except MaskError:
                body = response.raw_content  # not decodable here: charged by its size as sent
            usage, size = usage_in_body(body), len(body)
        usage = usage or Usage()
        at, reserve, declared = self.reserved.pop(flow, (0.0, [], None))
        completion, estimated = usage.completion, False
        # Unreported, or reported before a stream was cut short (Anthropic's message_start
        # says 1): what passed is charged, at most what the provider lets through.
        if completion is None or (flow.error is not None and estimate_tokens(size) > completion):
            completion, estimated = estimate_tokens(size), True
            if declared is not None:
                completion = min(completion, declared)
        used = (usage.prompt if usage.prompt is not None else usage_record["prompt_estimate"]) + completion
        usage_record.update(prompt=usage.prompt, completion=completion, completion_estimated=estimated)
        # the reservation goes, what was used stays
        settlements = [(limit.name, key, kind, at, reserved, used) for limit, key, reserved in reserve
                       for kind in _TOKEN_KINDS if getattr(limit, kind)]
        try:
            await store_call(self.mask.state(), self._counting().settle, settlements)
        except StateError as exc:  # the answer is gone already: the reservation stays charged
            logger.error(f"hoop: rate limits: usage of {flow.request.pretty_url} not settled: {exc}")

    def _over(self, flow: http.HTTPFlow, needs: list[tuple[Limit, int, float]], kind: str,
              prompt: int | None = None, declared: int | None = None) -> bool:
        """Refuse the flow (True) if a need does not fit in its enforced limit's `kind`
        window (`needs`: (limit, amount, seconds until it fits)); note shadow limits it
        does not fit either. `prompt` and `declared` (the token estimate and the
        declared output bound) explain a token need in the message."""
        worst: tuple[float, Limit, int] | None = None
        for limit, need, wait in needs:
            if not wait:
                continue
            labelled(RATE_LIMITED, limit.name).inc()
            if limit.action == "log":
                self._shadow(flow, limit, kind)
            elif worst is None or wait > worst[0]:
                worst = (wait, limit, need)
        if worst is None:
            return False
        wait, limit, need = worst
        what = kind.replace("_", " ")
        if math.isinf(wait):
            message = f"limit '{limit.name}': this request alone exceeds its {what} ({getattr(limit, kind)})"
            if prompt is not None:
                bound = "max_tokens" if declared is not None else "default_output_tokens of the limit"
                message += f": a prompt of ~{prompt} tokens and up to {need - prompt} output tokens ({bound})"
            retry: dict[str, str] = {}
        else:
            seconds = max(1, math.ceil(wait))
            retry, message = {"Retry-After": str(seconds)}, f"limit '{limit.name}' reached ({what}: {getattr(limit, kind)}); retry in {seconds}s"
        logger.info(f"hoop: {message}")
        refuse(flow, 429, "limit", "rate_limited", message, retry)
        hoop(flow)["decision"]["rule"] = limit.name
        return True

    @staticmethod
    def _shadow(flow: http.HTTPFlow, limit: Limit, kind: str) -> None:
        record: Any = hoop(flow)
        item = {"rule": limit.name, "action": "limit", "reason": f"over {kind.replace('_', ' ')}"}
        if item not in (shadow := record.setdefault("shadow", [])):
            shadow.append(item)
        record["decision"]["shadow"] = shadow
