"""Metrics, health, and one structured log line per decision."""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import http, log

from hoop_addon.control.server import HealthHandler, MetricsHandler
from hoop_addon.control.metrics import (
    BLOCKS, ENFORCING, JWT_FAILURES, MASKED_VALUES, REFUSALS, REQUESTS, SHADOW_MATCHES, exposition, labelled,
)
from hoop_addon.stages import Stage, hoop
from hoop_addon.stages.approve import Approve
from hoop_addon.stages.audit import Audit
from hoop_addon.stages.control import Control
from hoop_addon.stages.policy import PolicyStage
from hoop_addon.stages.sentinel import complete


DECISIONS = logging.getLogger("hoop.decision")


def _not_a_decision(record: logging.LogRecord) -> bool:
    return record.name != DECISIONS.name


def would_log(logger: logging.Logger, level: int = logging.INFO) -> bool:
    """Whether a record of `logger` at `level` would reach a handler that keeps it.
    mitmproxy sets the root logger to DEBUG and filters by level in its handlers (the
    terminal's by `termlog_verbosity`), so `isEnabledFor` is always true, and building
    a record nobody reads costs ~13 us a flow. The deprecated `add_log` handler does
    not count: it drops decision lines (see `Telemetry.running`)."""
    if not logger.isEnabledFor(level):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(h.level <= level and not isinstance(h, log.LegacyLogEvents) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


class Telemetry(Stage):
    """Counts each finished flow from its hoop record (`hoop_requests`,
    `hoop_jwt_failures`, `hoop_refusals`, `hoop_masked_values`, `hoop_blocks`,
    `hoop_shadow_matches`)
    and logs it as one `key=value` line: flow id, subject, route, outcome, stage,
    reason, status and the number of masked values. Never a token, a credential or a body value. The line goes
    to the `hoop.decision` logger, i.e. to mitmproxy's log like any other, but not to
    mitmproxy's deprecated `add_log` event: that re-dispatch of every log record to
    every addon cost more than the rest of this stage. It is built only when a handler
    would keep it (`termlog_verbosity` info or debug, or a handler of the user's).

    Serves `/metrics` and `/healthz` on the control API; health fails (503), and the
    gauge `hoop_enforcing` is 0, while enforcement cannot work: the chain not whole
    (see `hoop_addon.stages.sentinel`), no policy loaded, an
    issuer whose JWKS was never fetched, no signing key where the policy requires one,
    no audit log open, a shared state store that does not answer (`Approve.problems`).
    """

    def __init__(self, policy: PolicyStage, audit: Audit, control: Control, approve: Approve) -> None:
        self.policy, self.audit, self.approve = policy, audit, approve
        self.master: Any = None  # known once loaded
        control.server.add(r"/metrics", MetricsHandler, {"exposition": exposition})
        control.server.add(r"/healthz", HealthHandler, {"problems": self.problems})
        ENFORCING.set_function(lambda: 0.0 if self.problems() else 1.0)

    def problems(self) -> list[str]:
        """Why enforcement cannot work now; empty when it can."""
        if self.master is not None and not complete(self.master):
            return ["the enforcement chain is not loaded"]
        if (active := self.policy.active) is None:
            return ["no policy loaded"]
        found = [
            f"issuer {issuer}: JWKS never fetched" for issuer, keyset in active.verifier.keysets.items() if not keyset.keys
        ]
        if self.audit.signer is None and active.policy.recording.signing == "required":
            found.append("no signing key")
        if self.audit.log is None:
            found.append("no audit log open")
        return found + self.approve.problems() + self.approve.problems()

    def load(self, loader: Any) -> None:
        self.master = loader.master

    def running(self) -> None:
        super().running()
        for handler in logging.getLogger().handlers:
            # once: a reloaded script's function is a new object, but the old one does the same
            if isinstance(handler, log.LegacyLogEvents) and not any(
                getattr(f, "__qualname__", None) == _not_a_decision.__qualname__ for f in handler.filters
            ):
                handler.addFilter(_not_a_decision)

    def response(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def _observe(self, flow: http.HTTPFlow) -> None:
        record = hoop(flow)
        decision = record.get("decision", {})
        outcome = decision.get("outcome", "deny")
        labelled(REQUESTS, record.get("route") or "-", outcome).inc()
        if reason := record.get("auth_failure"):
            labelled(JWT_FAILURES, reason).inc()
        masked = 0
        for evidence in record.get("masked", []):
            if evidence.get("shadow"):
                labelled(SHADOW_MATCHES, evidence["rule"], "masking").inc(evidence["count"])
                continue
            labelled(MASKED_VALUES, evidence["rule"], evidence["part"]).inc(evidence["count"])
            masked += evidence["count"]
        for shadow in record.get("shadow", []):
            labelled(SHADOW_MATCHES, shadow["rule"], shadow["action"]).inc()
        if outcome != "allow" and (reason := decision.get("reason")):
            labelled(REFUSALS, decision.get("stage") or "-", reason).inc()
            if decision.get("stage") == "guard" and decision.get("rule"):
                labelled(BLOCKS, decision["rule"]).inc()
        if not would_log(DECISIONS):
            return
        identity = record.get("identity") or {}
        DECISIONS.info(
            f"hoop decision flow={flow.id} subject={identity.get('subject', '-')} route={record.get('route') or '-'} "
            f"outcome={outcome} stage={decision.get('stage', '-')} reason={decision.get('reason', '-')} "
            f"status={flow.response.status_code if flow.response else '-'} masked={masked}"
        )
