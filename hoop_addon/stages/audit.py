"""Stage 6: one audit line per flow, whatever was decided."""

from __future__ import annotations

import time
from pathlib import Path

from mitmproxy import ctx, http

from hoop_addon.audit import AuditLog
from hoop_addon.stages import Stage, hoop, logger, refuse


class Audit(Stage):
    """Owns option `hoop_audit_log` (a file; empty means `<hoop_recordings>/audit.jsonl`).
    Writes one entry per finished flow (`response`, `error`) and per refused CONNECT."""

    def __init__(self) -> None:
        self.log: AuditLog | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "hoop_audit_log", str, "", "Audit log file (JSON lines); default <hoop_recordings>/audit.jsonl."
        )

    def configure(self, updated: set[str]) -> None:
        if not {"hoop_audit_log", "hoop_recordings"} & updated:
            return
        path = Path(ctx.options.hoop_audit_log or Path(ctx.options.hoop_recordings) / "audit.jsonl")
        try:
            log = AuditLog(path)
        except OSError as exc:
            self.config_error(f"hoop: hoop_audit_log: cannot open {path}: {exc.strerror}")
            return
        if self.log is not None:
            self.log.close()
        self.log = log

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def done(self) -> None:
        if self.log is not None:
            self.log.close()

    def _write(self, flow: http.HTTPFlow) -> None:
        record = hoop(flow)
        request = flow.request
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": "connect" if request.method == "CONNECT" else "request",
            "flow": flow.id,
            "client": f"{flow.client_conn.peername[0]}:{flow.client_conn.peername[1]}" if flow.client_conn.peername else None,
            "identity": record.get("identity"),
            "policy_hash": record.get("policy_hash"),
            "route": record.get("route"),
            "method": request.method,
            "host": request.host,
            "port": request.port,
            "path": request.path.split("?", 1)[0],
            "decision": record.get("decision", {"outcome": "deny", "reason": "not_decided"}),
            "status": flow.response.status_code if flow.response else None,
            "masked": record.get("masked", []),
            "credential": record.get("credential"),
            "session": record.get("session"),
            "recording": record.get("recording"),
            "error": flow.error.msg if flow.error else None,
        }
        try:
            if self.log is None:
                raise OSError("no audit log is open")
            self.log.append(entry)
        except OSError as exc:
            logger.error(f"hoop: audit log write failed, response withheld: {exc}")
            if flow.response is not None and request.method != "CONNECT":
                refuse(flow, 503, "audit", "audit_failed", "the gateway could not audit this exchange")
