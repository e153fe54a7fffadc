"""Stage 5: record every forwarded flow, masked and scrubbed, per session."""

from __future__ import annotations

import os
from pathlib import Path

from mitmproxy import connection, ctx, http

from hoop_addon.recording import SessionRecording
from hoop_addon.stages import Stage, hoop, logger, refuse, route_of


class Record(Stage):
    """Owns option `hoop_recordings` (a directory). A session is the flows of one
    identity on one client connection; each session is one flow file, closed when the
    client disconnects. Only flows that were forwarded upstream are recorded (refusals
    are in the audit log); the file name goes to `hoop.recording`.

    If a flow cannot be recorded, its response is withheld (503): nothing leaves the
    gateway unrecorded.
    """

    def __init__(self) -> None:
        self.directory = Path("recordings")
        self.sessions: dict[tuple[str, str], SessionRecording] = {}

    def load(self, loader) -> None:
        loader.add_option("hoop_recordings", str, "recordings", "Directory for session recordings (*.mitm).")

    def configure(self, updated: set[str]) -> None:
        if "hoop_recordings" not in updated:
            return
        directory = Path(ctx.options.hoop_recordings)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.config_error(f"hoop: hoop_recordings: cannot create {directory}: {exc.strerror}")
            return
        if not os.access(directory, os.W_OK):
            self.config_error(f"hoop: hoop_recordings: {directory} is not writable")
            return
        self.directory = directory

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        for key in [k for k in self.sessions if k[0] == client.id]:
            self.sessions.pop(key).close()

    def done(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()

    def _record(self, flow: http.HTTPFlow) -> None:
        record = hoop(flow)
        if not record.get("forwarded") or "recording" in record:
            return
        key = (flow.client_conn.id, record["identity"]["subject"])
        route = route_of(flow)
        scrub = (route.credential.header,) if route and route.credential else ()
        try:
            if (session := self.sessions.get(key)) is None:
                session = self.sessions[key] = SessionRecording(self.directory, key[1])
            record["session"] = session.session_id
            record["recording"] = str(session.path)
            session.add(flow, scrub)
        except OSError as exc:
            logger.error(f"hoop: recording failed, response withheld: {exc}")
            record.pop("recording", None)
            if flow.response is not None:
                refuse(flow, 503, "record", "recording_failed", "the gateway could not record this exchange")
