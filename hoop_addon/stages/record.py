"""Stage 5: record every forwarded flow, masked and scrubbed, per session, with a signed
manifest; seal, rotate and expire recordings, each step audited."""

from __future__ import annotations

import asyncio
import calendar
import os
import time
import zlib
from pathlib import Path

import orjson
from mitmproxy import connection, ctx, http

from hoop_addon.evidence.keys import sha256
from hoop_addon.control.metrics import RECORDING_BYTES, SEAL_FAILURES
from hoop_addon.evidence.recording import SECRET_QUERY, Limits, SessionRecording, manifest_path, new_session_id
from hoop_addon.stages import Stage, client_session, hoop, logger, refuse, route_of
from hoop_addon.stages.audit import Audit
from hoop_addon.stages.policy import PolicyStage

IDLE_SECONDS = 600  # a session named by X-Hoop-Session is sealed after this long unused
SWEEP_SECONDS = 60  # how often expired recordings are looked for (and at start-up)


class Record(Stage):
    """Owns option `hoop_recordings` (a directory). A session is the flows of one
    identity on one client connection, or of one identity carrying the same
    `X-Hoop-Session` header value across connections. Each session is recorded as one
    or more parts (rotation by size or age, see `RecordingPolicy`), each a flow file and
    a manifest (`hoop_addon.evidence.recording`). A part is sealed when its client disconnects
    (header sessions: after `IDLE_SECONDS` unused), when it rotates, and when the
    gateway stops; sealing writes a `recording_sealed` audit entry with the manifest's
    SHA-256. Expired recordings (route `retention`) are deleted, each with a
    `retention_deleted` entry written first.

    Only flows that were forwarded upstream are recorded (refusals are in the audit
    log); the file goes to `hoop.recording`, the session id to `hoop.session`, the
    `X-Hoop-Session` value (if any) to `hoop.client_session`. If a flow
    cannot be recorded, its response is withheld (503): nothing leaves the gateway
    unrecorded.
    """

    def __init__(self, policy: PolicyStage, audit: Audit) -> None:
        self.policy, self.audit = policy, audit
        self.directory = Path("recordings")
        self.sessions: dict[tuple[str, ...], SessionRecording] = {}
        self.used: dict[tuple[str, ...], float] = {}
        self._ticker: asyncio.Task[None] | None = None

    def load(self, loader) -> None:
        loader.add_option("hoop_recordings", str, "recordings", "Directory for session recordings (*.mitm + manifests).")

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

    def running(self) -> None:
        super().running()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Each second: sign the sessions whose unsigned flows are due, seal header
        sessions left idle, sweep expired recordings. A part past its rotation limit
        is left to the next flow, which rotates it into the linked next part. One
        session's failure is logged and never stops the others or later ticks: these
        checkpoints are what signs an open session's flows."""
        swept = 0.0
        while True:
            now = time.time()
            for key, session in list(self.sessions.items()):
                try:
                    if key[0] == "header" and now - self.used.get(key, now) >= IDLE_SECONDS:
                        self._seal(key)
                    elif session.due(now):
                        session.checkpoint()
                except Exception as exc:
                    logger.error(f"hoop: recording maintenance of {session.path.name} failed: {exc!r}")
            if now - swept >= SWEEP_SECONDS:
                swept = now
                try:
                    self.sweep(now)
                except Exception as exc:
                    logger.error(f"hoop: sweeping expired recordings failed: {exc!r}")
            await asyncio.sleep(1)

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def client_disconnected(self, client: connection.Client) -> None:
        for key in [k for k in self.sessions if k[0] == "client" and k[1] == client.id]:
            self._seal(key)

    def done(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for key in list(self.sessions):
            self._seal(key)

    def _seal(self, key: tuple[str, ...]) -> SessionRecording | None:
        """Seal the session's open part and audit it; returns the sealed part."""
        session = self.sessions.pop(key, None)
        self.used.pop(key, None)
        if session is None:
            return None
        try:
            digest = session.seal()
            self.audit.event(
                "recording_sealed", identity=session.identity, session=session.session_id, part=session.part,
                recording=session.path.name, manifest_sha256=digest, flows=session.flow_count,
            )
        except OSError as exc:
            SEAL_FAILURES.inc()
            logger.error(f"hoop: sealing {session.path} failed: {exc}")
        return session

    def sweep(self, now: float) -> None:
        """Delete the recordings whose retention has passed: the audit entry is written
        first, so a deletion is never unexplained. Raises `OSError` if it cannot audit.
        Workers share the directory: worker I of N takes the recordings whose name's
        CRC-32 is I modulo N, so each is deleted and audited once, with no lock."""
        open_paths = {s.path.name for s in self.sessions.values()}
        worker = self.audit.worker
        for manifest in sorted(self.directory.glob("*.manifest.json")):
            if worker is not None and zlib.crc32(manifest.name.encode()) % worker[1] != worker[0]:
                continue
            try:
                data = manifest.read_bytes()
                doc = orjson.loads(data)
                retention, updated = doc.get("retention"), doc["updated"]
                ended = calendar.timegm(time.strptime(updated, "%Y-%m-%dT%H:%M:%SZ"))
            except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # not ours to judge: `hoop verify` reports it
            if doc.get("recording") in open_paths or not retention or ended + retention > now:
                continue
            self.audit.event(
                "retention_deleted", session=doc.get("session"), recording=doc.get("recording"),
                manifest_sha256=sha256(data), retention=retention,
            )
            (self.directory / str(doc.get("recording"))).unlink(missing_ok=True)
            manifest.unlink()

    def _key(self, flow: http.HTTPFlow, subject: str) -> tuple[str, ...]:
        if named := client_session(flow):  # the Mask stage noted it before removing the header
            return ("header", subject, named)
        return ("client", flow.client_conn.id, subject)

    def _record(self, flow: http.HTTPFlow) -> None:
        record = hoop(flow)
        active = self.policy.active
        if not record.get("forwarded") or "recording" in record or active is None:
            return
        settings = active.policy.recording
        identity = record.get("identity") or {"subject": "anonymous"}
        key = self._key(flow, identity["subject"])
        route = route_of(flow)
        scrub = {
            "headers": (route.credential.header,) if route and route.credential else (),
            "cookies": settings.scrub_cookies,
            "query": SECRET_QUERY + settings.scrub_query + ((route.credential.param,) if route and route.credential and route.credential.param else ()),
        }
        retention = route.retention if route and route.retention is not None else settings.retention
        try:
            session = self.sessions.get(key)
            if session is not None and session.full(time.time()):
                sealed = self._seal(key)
                session = self._open(key, identity, record, sealed)
            elif session is None:
                session = self._open(key, identity, record, None)
            record["session"] = session.session_id
            record["recording"] = str(session.path)
            size = session.size
            session.add(flow, retention, **scrub)
            # The audit entry names the flow's place and the running hash after it, so
            # verify can tell a part rolled back or cut, sealed or not.
            record["recording_flow"] = {"index": session.flow_count, "chain": session.chain}
            RECORDING_BYTES.inc(session.size - size)
            self.used[key] = time.time()
            if key[0] == "client" and flow.client_conn.timestamp_end is not None:
                # Its client disconnected before this flow ended (`client_disconnected`
                # has run): nothing else will seal the session.
                self._seal(key)
        except OSError as exc:
            logger.error(f"hoop: recording failed, response withheld: {exc}")
            record.pop("recording", None)
            record.pop("recording_flow", None)
            if flow.response is not None:
                refuse(flow, 503, "record", "recording_failed", "the gateway could not record this exchange")

    def _open(self, key: tuple[str, ...], identity: dict, record: dict, previous: SessionRecording | None) -> SessionRecording:
        settings = self.policy.active.policy.recording  # type: ignore[union-attr]
        limits = Limits(settings.checkpoint_flows, settings.checkpoint_seconds, settings.rotate_bytes, settings.rotate_seconds)
        session = SessionRecording(
            self.directory,
            previous.session_id if previous else new_session_id(identity["subject"], key[2] if key[0] == "header" else None),
            identity,
            record.get("policy_hash"),
            self.audit.signer,
            limits,
            client_session=key[2] if key[0] == "header" else None,
            part=previous.part + 1 if previous else 1,
            previous=sha256(manifest_path(previous.path).read_bytes()) if previous else None,
            audit_log=self.audit.log.path.name if self.audit.log else None,
        )
        self.sessions[key] = session
        self.used[key] = time.time()
        return session
