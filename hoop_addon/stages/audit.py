"""Stage 6: the hash-chained audit log: one entry per flow, plus the events other stages
report through `Audit.event`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, flow as mitmflow, http
from mitmproxy.connection import ConnectionState

from hoop_addon.evidence.audit_log import WORKERS, AuditLog, chain_name, parse_worker
from hoop_addon.evidence.keys import KeyFileError, Signer, load_signer
from hoop_addon.stages import Stage, hoop, logger, refuse
from hoop_addon.stages.policy import PolicyStage


class Audit(Stage):
    """Owns options `hoop_audit_log` (a file; empty means `<hoop_recordings>/audit.jsonl`),
    `hoop_signing_key` (an Ed25519 private key from `hoop keygen`; it signs the
    audit checkpoints and the recordings' manifests) and `hoop_worker` (`I/N`: this
    process is worker I of N of `hoop serve --workers N`; empty: a single gateway).
    Without a key the gateway does not start, unless the policy says
    `recording: {signing: unsigned}` (development). A worker writes its own chain,
    `<hoop_recordings>/audit-<I>.jsonl` (`hoop_audit_log` cannot be set then), opened
    by a `workers` entry naming all N chains; workers need a shared `hoop_state`.

    Writes one `request` entry per finished flow (`response`, `error`) and a `connect`
    entry per refused CONNECT; `policy_loaded` when a new policy is first in force,
    `key_rotated` when the signing key differs from the log's last checkpoint's, and
    `approval_abandoned` for each approval a killed predecessor left open. Start-up's
    entries are written only once the gateway runs (a gateway that fails to start
    appends nothing). The log is locked: a second gateway on it refuses to start.

    Other stages report events with `event()`; they hold this stage (pass it to their
    constructor in `hoop_addon/addon.py`).
    """

    def __init__(self, policy: PolicyStage) -> None:
        self.policy = policy
        self.log: AuditLog | None = None
        self.signer: Signer | None = None
        self.worker: tuple[int, int] | None = None  # (I, N) of `hoop_worker`
        self._policy_hash: str | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._startup: list[tuple[str, dict[str, Any]]] = []  # entries held until the gateway runs

    def load(self, loader) -> None:
        loader.add_option(
            "hoop_audit_log", str, "", "Audit log file (JSON lines); default <hoop_recordings>/audit.jsonl."
        )
        loader.add_option("hoop_signing_key", str, "", "Ed25519 private key (PEM) signing recordings and audit checkpoints.")
        loader.add_option("hoop_worker", str, "", "I/N: this process is worker I of N (set by `hoop serve --workers N`).")

    def configure(self, updated: set[str]) -> None:
        if not {"hoop_audit_log", "hoop_recordings", "hoop_signing_key", "hoop_rules", "hoop_worker", "hoop_state"} & updated:
            return
        if "hoop_worker" in updated and self.started:
            self.config_error("hoop: hoop_worker cannot change while the gateway runs")
            return
        try:
            self.worker = parse_worker(ctx.options.hoop_worker)
        except ValueError as exc:
            self.config_error(f"hoop: hoop_worker: {exc}")
            return
        if self.worker is not None and ctx.options.hoop_audit_log:
            self.config_error("hoop: hoop_audit_log: a worker writes its own chain, <hoop_recordings>/audit-<worker>.jsonl: "
                              "leave hoop_audit_log unset with hoop_worker")
            return
        if self.worker is not None and self.worker[1] > 1 and ctx.options.hoop_state == "memory":
            # approvals and tickets must look the same from every worker
            self.config_error("hoop: hoop_state: several workers need a shared store (sqlite:///PATH or postgresql://...), "
                              "not memory")
            return
        signer = None
        if ctx.options.hoop_signing_key:
            try:
                signer = load_signer(Path(ctx.options.hoop_signing_key))
            except KeyFileError as exc:
                self.config_error(f"hoop: hoop_signing_key: {exc}")
                return
        active = self.policy.active
        if signer is None and (active is None or active.policy.recording.signing == "required"):
            self.config_error(
                "hoop: hoop_signing_key: recording needs a signing key (create one with `hoop keygen`), "
                "or `recording: {signing: unsigned}` in the policy for development"
            )
            return
        path = Path(ctx.options.hoop_audit_log or Path(ctx.options.hoop_recordings) / chain_name(self.worker))
        previous = self.signer.key_id if self.signer else None
        if self.log is not None and (self.log.path == path or self.log.is_file(path)):
            if signer != self.signer:  # same chain (and lock), new key: sign what the old key covers first
                try:
                    self.log.checkpoint()
                except OSError as exc:
                    self.config_error(f"hoop: hoop_audit_log: cannot checkpoint {path}: {exc}")
                    return
                self.log.signer, self.signer = signer, signer
        else:  # another file (a path to the same file is the same chain and lock)
            try:
                log = AuditLog(path, signer)
            except OSError as exc:
                self.config_error(f"hoop: hoop_audit_log: cannot open {path}: {exc}")
                return
            if self.log is not None:
                self.log.close()
            self.log, self.signer = log, signer
            previous = log.previous_key_id
            reason = "the gateway stopped (killed or crashed) before a decision"
            self._startup += [("approval_abandoned", {**{k: e.get(k) for k in ("flow", "identity", "route", "policy_hash")},
                                                      "approval": {**(e.get("approval") or {}), "status": "abandoned"},
                                                      "requested_seq": e.get("seq"), "reason": reason})
                              for e in log.open_approvals.values()]
            if self.worker is not None:  # first: the worker set, so that verify notices a chain deleted
                index, count = self.worker
                self._startup.insert(0, (WORKERS, {"worker": index, "count": count,
                                                   "chains": [chain_name((i, count)) for i in range(count)]}))
        if signer is not None and previous is not None and previous != signer.key_id:
            self._startup.append(("key_rotated", {"key_id": signer.key_id, "previous_key_id": previous}))
        if self.started:
            self._write_startup()

    def _write_startup(self) -> None:
        """The entries start-up (or a reload) holds: written once the gateway runs."""
        while self._startup and self.log is not None:
            name, fields = self._startup[0]
            self.log.append(name, **fields)
            self._startup.pop(0)
        self._policy_loaded()

    def running(self) -> None:
        super().running()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            # Also the first write: a start-up that fails after `running` (mitmproxy's
            # error check exits in that turn) has appended nothing to the chain.
            await asyncio.sleep(1)
            try:
                self._write_startup()  # a hot reload is audited within a second, not at the next flow
            except OSError as exc:
                logger.error(f"hoop: audit log write failed: {exc}")
            if self.log is not None and self.log.due(time.time()):
                try:
                    self.log.checkpoint()
                except OSError as exc:
                    logger.error(f"hoop: audit checkpoint failed: {exc}")

    def event(self, name: str, flow: http.HTTPFlow | None = None, **fields: Any) -> dict[str, Any]:
        """Append an audit entry of type `name` (see `hoop_addon.evidence.audit_log` for the names in
        use) with `fields` (JSON values; never secrets or unmasked data). With `flow`,
        the flow's id, identity, route and policy hash are added (fields win).
        Returns the entry as written; raises `OSError` when it cannot be written: the
        caller then refuses the flow (fail closed)."""
        if self.log is None:
            raise OSError("no audit log is open")
        if self.started:
            self._write_startup()  # the policy in force (and start-up's entries) come first
        if flow is not None:
            record = hoop(flow)
            fields = {"flow": flow.id, "identity": record.get("identity"), "route": record.get("route"),
                      "policy_hash": record.get("policy_hash"), **fields}
        return self.log.append(name, **fields)

    def _policy_loaded(self) -> None:
        """Log the policy in force when it is not the one last logged (start-up, reload)."""
        active = self.policy.active
        if self.log is None or active is None or active.policy.digest == self._policy_hash:
            return
        settings = active.policy.recording
        self.log.checkpoint_entries = settings.audit_checkpoint_entries
        self.log.checkpoint_seconds = settings.audit_checkpoint_seconds
        self.log.append("policy_loaded", policy_hash=active.policy.digest, files=[Path(f).name for f in active.policy.files],
                        signing=settings.signing, key_id=self.signer.key_id if self.signer else None)
        self._policy_hash = active.policy.digest

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def done(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self.log is not None:
            self.log.close()

    def _write(self, flow: http.HTTPFlow) -> None:
        record = hoop(flow)
        request = flow.request
        try:
            self.event(
                "connect" if request.method == "CONNECT" else "request",
                flow,
                client=f"{flow.client_conn.peername[0]}:{flow.client_conn.peername[1]}" if flow.client_conn.peername else None,
                method=request.method,
                host=request.host,
                port=request.port,
                # From the raw bytes: a request refused for not being UTF-8 is audited too.
                path=request.data.path.split(b"?", 1)[0].decode("utf-8", "replace"),
                decision=record.get("decision", {"outcome": "deny", "reason": "not_decided"}),
                status=client_status(flow),
                upstream_status=flow.response.status_code if flow.error and flow.response else None,
                masked=record.get("masked", []),
                usage=record.get("usage"),
                credential=record.get("credential"),
                session=record.get("session"),
                recording=record.get("recording"),
                recording_flow=record.get("recording_flow"),
                error=flow.error.msg if flow.error else None,
                **({"mcp": record["mcp"]} if "mcp" in record else {}),  # MCP routes: methods, tools, outcomes
            )
        except OSError as exc:
            logger.error(f"hoop: audit log write failed, response withheld: {exc}")
            if flow.response is not None and request.method != "CONNECT":
                refuse(flow, 503, "audit", "audit_failed", "the gateway could not audit this exchange")


def client_status(flow: http.HTTPFlow) -> int | None:
    """The HTTP status the client got, which is not the upstream's when the exchange
    failed (`flow.error`): a response whose headers were streamed to the client keeps
    its status (its body was cut short); otherwise mitmproxy answers a client still
    connected with 502; a client that went away, or a killed flow, got nothing (None)."""
    response = flow.response
    if flow.error is None:
        return response.status_code if response else None
    if response is not None and response.stream:
        return response.status_code
    if flow.error.msg == mitmflow.Error.KILLED_MESSAGE or not flow.client_conn.state & ConnectionState.CAN_WRITE:
        return None
    return 502
