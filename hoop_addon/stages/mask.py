"""Stage 3: mask what the route's rules select, in requests and in responses; and the
last stage, `Restore`, which puts `tokenize` tokens back in the client's response."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any
from pathlib import Path
from urllib.parse import quote, unquote

from mitmproxy import connection, ctx, http
from mitmproxy.utils import human

from hoop_addon.masking.body import NDJSON_TYPES, UnsupportedMedia, mask_body
from hoop_addon.masking.engine import Evidence, MaskBudgetExceeded, MaskContext, MaskError, mask_text
from hoop_addon.masking.sse import EventStreamMasker
from hoop_addon.masking.vault import TokenSession, Vault
from hoop_addon.masking.codec import Decoder, decode, identity_encoded
from hoop_addon.policy.model import Direction, MaskRule
from hoop_addon.providers.errors import error_body, stream_error_event
from hoop_addon.stages import (STORE_TIMEOUT_S, SESSION_HEADER, Stage, allowed, client_session, hoop, logger, refuse,
                               route_of, store_call)
from hoop_addon.state.approvals import ApprovalStore, MemoryStore, StateError
from hoop_addon.state.vault import SharedSession, SharedVault

OFFLOAD_BYTES = 64 * 1024
"""Bodies of at least this many bytes (as sent) are masked on the stage's worker thread."""
SECRET_DEFAULT = "env:HOOP_MASK_SECRET"
MCP_SESSION_HEADER = "Mcp-Session-Id"  # MCP streamable HTTP, revision 2025-11-25
_TEXT_TYPES = ("application/json", "application/x-ndjson", "application/x-www-form-urlencoded")


class Mask(Stage):
    """Applies the route's masking rules to requests before they go upstream and to
    responses before they reach the client (or the recording).

    Owns options `hoop_mask_secret` (where the `hash` operator's HMAC key is:
    `env:NAME` or a file path; default `env:HOOP_MASK_SECRET`) and
    `hoop_mask_max_body` (most bytes a body may decode to, e.g. `16m`: a larger one,
    a decompression bomb, is refused) and `hoop_mask_budget` (seconds masking one
    body, one WebSocket message or one piece of a stream may take: past it the flow is
    refused as `mask_budget_exceeded`, so one costly pattern cannot stall the event
    loop for every other flow).

    Bodies are decoded from their content-encoding, masked, and re-encoded; the
    `query`, `headers` and `cookies` a rule names are masked too. OTLP/HTTP exports
    (protobuf or JSON, on a `/v1/traces` or `/v1/logs` path) are masked in their
    OTLP/JSON shape and re-encoded (`hoop_addon.masking.otlp`). `text/event-stream`
    and NDJSON responses are masked as they stream (`flow.response.stream` is a masking
    callable; content-encoding is decoded and dropped); other responses are buffered.
    Anything that cannot be inspected, and any error of the masker, is never passed
    on: the request is refused (422, nothing reaches the upstream), the response
    withheld (502), or the stream ended with an `event: error`. Evidence (rule,
    operator, detector counts, JSONPath; never values) goes to `hoop.masked`.

    A `tokenize` session is the identity on one client connection, or the identity
    plus the `X-Hoop-Session` request header (removed before forwarding), or on an
    MCP route the identity plus the `Mcp-Session-Id` the MCP server gave the client
    (revision 2025-11-25; its DELETE ends the session and forgets the tokens).

    With a shared state store (`hoop_state`, which `state` gives), header and MCP
    sessions live in the store (`hoop_addon.state.vault`), sealed with keys derived
    from `hoop_mask_secret`: a token minted by one process restores on every other.
    Such a flow loads its session from the store and is masked off the event loop
    (minting is a store call); a store that fails or hangs refuses the request (503
    `vault_unavailable`), never forwards it unmasked. A connection's session stays in
    this process's memory, as with the default `memory` store.
    """

    def __init__(self, state: Callable[[], ApprovalStore] | None = None) -> None:
        memory = MemoryStore()
        self.state = state or (lambda: memory)  # None: tokens live in this process only
        self.shared: SharedVault | None = None
        self.secret: bytes | None = None
        self.max_body = 16 * 1024 * 1024
        self.budget = 2.0
        # large bodies are masked here, off the event loop (see `_off_loop`), one per core
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="hoop-mask")
        self.vault = Vault()
        self.sessions: weakref.WeakKeyDictionary[http.HTTPFlow, TokenSession] = weakref.WeakKeyDictionary()
        self.streams: weakref.WeakKeyDictionary[http.HTTPFlow, EventStreamMasker] = weakref.WeakKeyDictionary()

    def load(self, loader) -> None:
        loader.add_option(
            "hoop_mask_secret", str, SECRET_DEFAULT,
            "HMAC key of the `hash` masking operator: env:NAME or a file path.",
        )
        # `hoop serve` adds the chain before the command line is read, and mitmproxy then
        # configures only the options given: the default's secret is read here
        self._read_secret(SECRET_DEFAULT)
        loader.add_option("hoop_mask_max_body", str, "16m", "Most bytes a body may decode to before it is refused.")
        loader.add_option(
            "hoop_mask_budget", str, "2",
            "Seconds masking one body, message or stream piece may take before the flow is refused.",
        )

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # mitmproxy would stream a large body past the masker unread (fail closed)
            self.config_error("hoop: stream_large_bodies is not supported: bodies must be masked; use body_size_limit")
            return
        if "hoop_mask_max_body" in updated:
            try:
                size = human.parse_size(ctx.options.hoop_mask_max_body)
            except ValueError:
                size = None
            if not size:
                self.config_error(f"hoop: hoop_mask_max_body: not a size: {ctx.options.hoop_mask_max_body!r}")
                return
            self.max_body = size
        if "hoop_mask_budget" in updated:
            try:
                budget = float(ctx.options.hoop_mask_budget)
            except ValueError:
                budget = 0.0
            if not 0 < budget <= 60:  # also refuses nan and inf
                self.config_error(f"hoop: hoop_mask_budget: not a number of seconds in (0, 60]: {ctx.options.hoop_mask_budget!r}")
                return
            self.budget = budget
        if "hoop_mask_secret" in updated:
            self.shared = None  # a shared vault's keys derive from the secret: derived again at next use
            if problem := self._read_secret(ctx.options.hoop_mask_secret):
                self.config_error(f"hoop: hoop_mask_secret: {problem}")

    def _read_secret(self, where: str) -> str | None:
        """Set `secret` from `where` (`env:NAME`: None when unset; else a file path);
        returns what is wrong with a file (unreadable, empty), else None."""
        if where.startswith("env:"):
            self.secret = os.environ.get(where[4:], "").encode() or None
            return None
        try:
            self.secret = Path(where).read_bytes().strip() or None
        except OSError as exc:
            return f"cannot read {where}: {exc.strerror}"
        return f"{where} is empty" if self.secret is None else None

    def client_disconnected(self, client: connection.Client) -> None:
        self.vault.drop((client.id,))

    def done(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow) or (route := route_of(flow)) is None:
            return
        label = client_session(flow)
        flow.request.headers.pop(SESSION_HEADER, None)
        rules = route.rules_for("request")
        if not rules and not route.tokenizes:
            return
        if route.tokenizes:
            identity = hoop(flow).get("identity") or {}
            subject = identity.get("subject", "")
            mcp_session = flow.request.headers.get(MCP_SESSION_HEADER) if route.mcp is not None else None
            key: Hashable
            if label:
                key = ("header", subject, label)
            elif mcp_session:
                # an MCP client's calls of one session may come on several connections
                key = ("mcp", identity.get("issuer"), subject, mcp_session)
                if flow.request.method == "DELETE":  # the client ends the session (streamable HTTP)
                    self.vault.drop(key)
            else:
                key = (flow.client_conn.id, subject)
            if key[0] in ("header", "mcp") and self.state().blocking:
                try:
                    self.sessions[flow] = await self._shared_session(flow, key)
                except StateError as exc:  # fail closed: a value the vault cannot keep is not sent on
                    logger.error(f"hoop: mask: request of {_where(flow)} refused: {exc}")
                    refuse(flow, 503, "mask", "vault_unavailable",
                           f"the shared token vault cannot be used; the request was not forwarded: {exc}")
                    return
            else:
                self.sessions[flow] = self.vault.session(key)  # type: ignore[assignment]
        try:
            if flow.request.stream and any(not r.shadow for r in rules):
                raise MaskError("request body was streamed and cannot be inspected")
            await self._mask(flow, flow.request, rules, "request")
        except Exception as exc:  # fail closed: whatever went wrong, nothing goes upstream
            self._fail(flow, "request", exc, rules)

    async def _shared_session(self, flow: http.HTTPFlow, key: Hashable) -> SharedSession:
        """Session `key` from the shared store (dropped first on an MCP DELETE).
        Raises `StateError` (the store fails, hangs, or no secret seals it)."""
        store = self.state()
        if self.shared is None:
            if self.secret is None:
                raise StateError(f"state store {store.name}: a shared vault is sealed with hoop_mask_secret, "
                                 "which is not set")
            self.shared = SharedVault(store, self.secret)  # type: ignore[arg-type]
        if flow.request.method == "DELETE" and key[0] == "mcp":  # type: ignore[index]
            await store_call(store, self.shared.drop, key)
        return await store_call(store, self.shared.session, key)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or (route := route_of(flow)) is None or not hoop(flow).get("forwarded"):
            return
        rules = route.rules_for("response")
        session = self.sessions.get(flow)
        response = flow.response
        mime = _mime(response)
        if (hoop(flow).get("mcp") or {}).get("buffer"):
            response.stream = False  # a tools/list or initialize answer: buffered, so that the MCP stage reads it first
            return
        if not rules and not session:
            if (mime == "text/event-stream" or mime in NDJSON_TYPES) and not _encoded(response):
                response.stream = self._passthrough(flow, mime)
            return
        if mime != "text/event-stream" and mime not in NDJSON_TYPES:
            response.stream = False  # buffered, so that `response` masks the whole body
            return
        try:
            decoder = Decoder(response.headers.get("Content-Encoding", ""), self.max_body)
        except MaskError:
            response.stream = False  # `response` refuses it
            return
        context = MaskContext(self.secret, session)
        masker = EventStreamMasker(
            rules, context, Evidence(), restore=session, record=getattr(ctx.options, "store_streamed_bodies", False),
            framing="sse" if mime == "text/event-stream" else "ndjson",
        )
        # A streamed response's headers go now, before `response` would see them (if this
        # raises, the stage guard kills the flow: nothing reaches the client).
        _mask_named(response.headers, "headers", rules, context, masker.evidence)
        if session is None and all(r.shadow for r in rules):
            response.stream = self._passthrough(flow, mime, self._observer(flow, decoder, masker))
            self.streams[flow] = masker
            return
        response.headers.pop("Content-Encoding", None)
        if response.headers.pop("Content-Length", None) is not None and flow.request.http_version == "HTTP/1.1":
            response.headers["Transfer-Encoding"] = "chunked"  # the masked length is not known yet
        self.streams[flow] = masker
        failed = False

        def stream(chunk: bytes) -> list[bytes]:
            # A list, never b"": an empty HTTP/1.1 chunk would end the response.
            nonlocal failed
            if failed:
                return []
            try:
                context.deadline = time.monotonic() + self.budget
                if chunk:  # b"" is mitmproxy's end of stream
                    out = masker.feed(decoder.feed(chunk))
                else:
                    out = masker.feed(decoder.feed(b""), final=True)
                return [out] if out else []
            except Exception as exc:  # fail closed: end the stream, audit why
                failed = True
                message = _message(exc)
                logger.error(f"hoop: mask: stream of {_where(flow)} ended: {message}")
                reason = "mask_budget_exceeded" if isinstance(exc, MaskBudgetExceeded) else "unmaskable_response"
                hoop(flow)["decision"] = {
                    "outcome": "deny", "stage": "mask", "reason": reason,
                    "message": f"upstream stream ended: it could not be inspected: {message}",
                }
                said = "the upstream's stream could not be inspected; the gateway ended it"
                if masker.framing == "sse":
                    return [stream_error_event(hoop(flow).get("api"), reason, said, "mask")]
                return [error_body(hoop(flow).get("api"), 502, reason, said, "mask") + b"\n"]

        response.stream = stream

    def _passthrough(self, flow: http.HTTPFlow, mime: str, observe: Callable[[bytes], None] | None = None):
        """The stream callable of an event stream that goes on as the upstream sends it,
        chunk by chunk as it arrives (LLM tokens, MCP progress), not at the stream's end:
        one no response rule reads (identity-encoded only: the credential echo scrubber,
        which wraps this callable, reads the bytes as sent), or one only shadow rules
        read, each chunk then given to `observe` too. Where streamed bodies are
        recorded, a stream longer than `hoop_mask_max_body` ends with an error
        (`response_too_large`): the recording cannot keep it (mitmproxy would hold it
        all in memory)."""
        limit = self.max_body if getattr(ctx.options, "store_streamed_bodies", False) else None
        size, ended = 0, False

        def stream(chunk: bytes) -> list[bytes]:
            nonlocal size, ended
            if ended:
                return []
            if observe is not None:
                observe(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                ended = True
                logger.error(f"hoop: mask: stream of {_where(flow)} ended: longer than hoop_mask_max_body ({limit} bytes)")
                hoop(flow)["decision"] = {
                    "outcome": "deny", "stage": "mask", "reason": "response_too_large",
                    "message": f"upstream stream ended: longer than the {limit} bytes the recording keeps",
                }
                said = "the upstream's stream is longer than the gateway records; the gateway ended it"
                api = hoop(flow).get("api")
                if mime == "text/event-stream":  # after a blank line, so a cut event does not swallow it
                    return [b"\n\n" + stream_error_event(api, "response_too_large", said, "mask")]
                return [b"\n" + error_body(api, 502, "response_too_large", said, "mask") + b"\n"]
            return [chunk] if chunk else []  # never b"" before the end: an empty HTTP/1.1 chunk ends it

        return stream

    @staticmethod
    def _observer(flow: http.HTTPFlow, decoder: Decoder, masker: EventStreamMasker) -> Callable[[bytes], None]:
        """What watches a shadow-only stream (`action: log` rules, nothing to restore):
        a decoded copy of each chunk goes through the masker for the evidence. What it
        cannot read ends the watching, never the stream: shadow rules do not decide
        what passes."""
        watching = True

        def observe(chunk: bytes) -> None:
            nonlocal watching
            if watching:
                try:
                    masker.feed(decoder.feed(chunk), final=not chunk)
                except Exception as exc:
                    watching = False
                    logger.warning(f"hoop: mask: stream of {_where(flow)} not inspected by shadow rules: {_message(exc)}")

        return observe

    async def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is None or not hoop(flow).get("forwarded") or (route := route_of(flow)) is None:
            return
        if (masker := self.streams.pop(flow, None)) is not None:
            hoop(flow).setdefault("masked", []).extend(masker.evidence.records("response"))
            if masker.recorded is not None and masker.restored:
                flow.response.content = bytes(masker.recorded)  # the recording keeps the tokens
            return
        rules = route.rules_for("response")
        if not rules:
            return
        try:
            await self._mask(flow, flow.response, rules, "response")
        except Exception as exc:
            self._fail(flow, "response", exc, rules)

    def error(self, flow: http.HTTPFlow) -> None:
        """A stream that ends in an error (most often the client closing it once it had
        what it needed): what was sent is the evidence, so the response masking and the
        masked bytes sent so far go to the record, as a stream that ends cleanly does
        (mitmproxy keeps a streamed body only when the stream ends)."""
        if (masker := self.streams.pop(flow, None)) is None or flow.response is None:
            return
        hoop(flow).setdefault("masked", []).extend(masker.evidence.records("response"))
        if masker.recorded is not None:
            flow.response.content = bytes(masker.recorded)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Mask a WebSocket message (RFC 6455 §5.6) like a body: JSON if it looks like
        JSON, else text; client messages under request rules, server messages under
        response rules (tokens are not restored: the flow keeps its messages, and a
        recording must not get values back). A binary message is masked the same way
        when it is UTF-8. A message that cannot be masked (a binary one that is not
        UTF-8 included) is dropped and the connection closed, unless only shadow rules
        apply: they do not decide what passes."""
        if flow.websocket is None or (route := route_of(flow)) is None or not allowed(flow):
            return
        message = flow.websocket.messages[-1]
        part: Direction = "request" if message.from_client else "response"
        if not (rules := route.rules_for(part)):
            return
        try:
            content = message.content
            if not message.is_text and not _utf8(content):
                # Binary frames often carry JSON too; what is not UTF-8 cannot be inspected.
                if all(r.shadow for r in rules):
                    return
                raise MaskError("a binary message that is not UTF-8 cannot be inspected")
            kind = "application/json" if content.lstrip()[:1] in (b"{", b"[") else "text/plain"
            context = MaskContext(self.secret, self.sessions.get(flow), time.monotonic() + self.budget)
            new, records = mask_body(content, kind, rules, part, context)
            hoop(flow).setdefault("masked", []).extend(records)
            if new is not None:
                message.content = new
        except Exception as exc:
            logger.error(f"hoop: mask: WebSocket message on {_where(flow)} dropped, connection closed: {_message(exc)}")
            message.drop()
            flow.kill()

    async def _mask(self, flow: http.HTTPFlow, message: http.Message, rules: tuple[MaskRule, ...], part: Direction) -> None:
        context = MaskContext(self.secret, self.sessions.get(flow), time.monotonic() + self.budget)
        if isinstance(context.tokens, SharedSession):
            # minting reaches the store: the whole message is masked on a thread (the
            # flow waits for it; nothing else touches the flow or its session meanwhile)
            def whole() -> None:
                records, work = self._mask_parts(flow, message, rules, part, context)
                self._masked(flow, message, records, work() if work else None)

            try:
                await asyncio.wait_for(asyncio.to_thread(whole), self.budget + STORE_TIMEOUT_S)
            except TimeoutError:
                raise StateError(f"state store {self.state().name}: masking with the shared vault took longer "
                                 f"than {self.budget + STORE_TIMEOUT_S:g} s") from None
            return
        records, work = self._mask_parts(flow, message, rules, part, context)
        if work is None:
            masked = None
        elif len(message.raw_content or b"") < OFFLOAD_BYTES or context.tokens is not None:
            masked = work()  # a memory vault session is used by the event loop only
        else:
            masked = await self._off_loop(work, context)
        self._masked(flow, message, records, masked)

    def _mask_parts(self, flow: http.HTTPFlow, message: http.Message, rules: tuple[MaskRule, ...], part: Direction,
                    context: MaskContext) -> tuple[list[dict[str, Any]], Callable[[], Any] | None]:
        """Mask what `message` carries outside its body, now; returns the evidence
        records and the work that masks the body (`_mask_raw`; None: no body rule
        reads one)."""
        evidence = Evidence()
        if isinstance(message, http.Request):
            _mask_target(message, rules, context, evidence)
            _mask_named(message.cookies, "cookies", rules, context, evidence)
        _mask_named(message.headers, "headers", rules, context, evidence)
        _mask_trailers(message, rules, context, evidence)
        raw = message.raw_content
        if not raw or not any(r.body for r in rules):
            return evidence.records(part), None
        return evidence.records(part), functools.partial(
            self._mask_raw, raw, message.headers.get("Content-Encoding", ""), message.headers.get("Content-Type", ""),
            rules, part, context, flow.request.path,
        )

    @staticmethod
    def _masked(flow: http.HTTPFlow, message: http.Message, records: list[dict[str, Any]],
                masked: tuple[bytes | None, list[dict[str, Any]]] | None) -> None:
        """Put a masked body (`_mask_raw`'s result, None: no body masked) and the
        evidence `records` in place."""
        if masked is not None:
            new, body_records = masked
            if new is not None:
                message.content = new  # re-encoded with the message's Content-Encoding
            records = _merge(records, body_records)
        hoop(flow).setdefault("masked", []).extend(records)

    def _mask_raw(
        self, raw: bytes, encoding: str, content_type: str, rules: tuple[MaskRule, ...], part: Direction,
        context: MaskContext, path: str,
    ) -> tuple[bytes | None, list[dict[str, Any]]] | None:
        """A body as sent (`raw`, content-encoded), decoded and masked (pure: it may run
        on a worker thread): `mask_body`'s result, or None when only shadow rules read it
        and it cannot be decoded (what they cannot read goes on)."""
        try:
            body = decode(raw, encoding, self.max_body)
        except MaskError:
            if any(r.body and not r.shadow for r in rules):
                raise
            return None
        return mask_body(body, content_type, rules, part, context, path)

    async def _off_loop(self, work: Callable[[], Any], context: MaskContext) -> Any:
        """Run `work` (masking a large body) on one of the stage's worker threads, so
        that a costly scan holds up that flow only, not the event loop and every other
        flow (RE2 releases the GIL while it scans). The flow's masking budget runs from
        when a worker starts on it, not from when it was queued: bodies queued behind a
        slow one wait for it, they are not refused for it. Past the budget the flow is
        refused (`MaskBudgetExceeded`) at once; the worker stops at its next check."""
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def run() -> Any:
            context.deadline = time.monotonic() + self.budget
            loop.call_soon_threadsafe(lambda: started.done() or started.set_result(None))
            return work()

        future = asyncio.wrap_future(self.pool.submit(run))
        await asyncio.wait((started, future), return_when=asyncio.FIRST_COMPLETED)
        try:
            return await asyncio.wait_for(future, self.budget)
        except TimeoutError:
            raise MaskBudgetExceeded("masking took longer than its time budget (hoop_mask_budget)") from None

    def _fail(self, flow: http.HTTPFlow, part: Direction, exc: Exception, rules: tuple[MaskRule, ...]) -> None:
        message = _message(exc)
        if all(r.shadow for r in rules):  # shadow mode (`action: log`) never refuses
            logger.warning(f"hoop: mask: {part} of {_where(flow)} not inspected by shadow rules: {message}")
            return
        logger.error(f"hoop: mask: {part} of {_where(flow)} refused: {message}")
        if isinstance(exc, MaskBudgetExceeded):
            status, where = (422, "request could not be inspected") if part == "request" else (502, "upstream response withheld")
            refuse(flow, status, "mask", "mask_budget_exceeded", f"{where}: {message}")
        elif isinstance(exc, StateError) and part == "request":
            refuse(flow, 503, "mask", "vault_unavailable", f"the shared token vault cannot be used; the request was not "
                   f"forwarded: {message}")
        elif isinstance(exc, UnsupportedMedia) and part == "request":
            refuse(flow, 415, "mask", "unsupported_media_type", f"request could not be inspected: {message}")
        elif part == "request":
            refuse(flow, 422, "mask", "unmaskable_request", f"request could not be inspected: {message}")
        else:
            refuse(flow, 502, "mask", "unmaskable_response", f"upstream response withheld: it could not be inspected: {message}")


class Restore(Stage):
    """After the recording and the audit line: puts the session's `tokenize` tokens
    back into a buffered response for the client (streams are restored as they pass),
    so that the recording keeps the tokens and the client gets its own values. A
    shared session (`hoop_state`) whose response holds tokens the flow did not load
    reads the store again first (another process may have minted them since); if
    the store fails, the tokens it cannot restore stay tokens."""

    def __init__(self, mask: Mask) -> None:
        self.mask = mask

    async def response(self, flow: http.HTTPFlow) -> None:
        session = self.mask.sessions.get(flow)
        response = flow.response
        if not session or response is None or not hoop(flow).get("forwarded") or not allowed(flow):
            return
        if not response.raw_content or flow.response.stream or not _textual(_mime(response)):
            return
        try:
            text = decode(response.raw_content, response.headers.get("Content-Encoding", ""), self.mask.max_body).decode()
        except (MaskError, UnicodeDecodeError):
            return  # nothing restorable; the masked body stands
        if isinstance(session, SharedSession) and session.unknown(text):
            try:
                await store_call(self.mask.state(), session.refresh)
            except StateError as exc:
                logger.warning(f"hoop: restore: {_where(flow)}: tokens minted elsewhere stay tokens: {exc}")
        restored, count = session.restore(text, escape="json" in _mime(response))
        if count:
            response.content = restored.encode()


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _mime(message: http.Message) -> str:
    return message.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _encoded(message: http.Message) -> bool:
    """Whether the message has a content-coding other than identity."""
    return not identity_encoded(message.headers.get("Content-Encoding", ""))


def _textual(mime: str) -> bool:
    """Whether a body of this media type is text that may carry tokens."""
    return mime.startswith("text/") or mime.endswith("+json") or mime in _TEXT_TYPES


def _message(exc: Exception) -> str:
    """What to tell the client: a `MaskError`'s message (never body content), or only
    the kind of an unexpected error."""
    return str(exc) if isinstance(exc, (MaskError, StateError)) else f"masking failed ({type(exc).__name__})"


def _merge(a: list[dict], b: list[dict]) -> list[dict]:
    """Evidence records of the same rule merged (headers and body of one message)."""
    merged = {r["rule"]: r for r in a}
    for r in b:
        if (m := merged.get(r["rule"])) is None:
            merged[r["rule"]] = r
            continue
        m["count"] += r["count"]
        for name, n in r["detectors"].items():
            m["detectors"][name] = m["detectors"].get(name, 0) + n
        m["where"] += [w for w in r["where"] if w not in m["where"]]
        m.update((k, v) for k, v in r.items() if k not in m)  # what a codec counted (`otlp`)
    return list(merged.values())


def _mask_named(fields: Any, names: str, rules: tuple[MaskRule, ...], context: MaskContext, evidence: Evidence) -> None:
    """Mask the values of the headers or cookies (`names`: the rule attribute) a rule
    names, in `fields` (mitmproxy `Headers` or a cookies view: `get_all`/`set_all`):
    each value once, by all the rules naming it, read percent-decoded (`_mask_field`).
    Header names match case-insensitively (RFC 9110 §5.1; the policy lower-cases them),
    cookie names exactly (RFC 6265 §5.3: `UID` is another cookie than `uid`). Raises
    `MaskError` for a value that is not UTF-8 once percent-decoded, when an enforcing
    rule names it."""
    named: dict[str, list[MaskRule]] = {}
    for rule in rules:
        for name in getattr(rule, names):
            named.setdefault(name, []).append(rule)
    for name, covering in named.items():
        if values := fields.get_all(name):
            where = f"{names[:-1]}:{name}"
            fields.set_all(name, [_mask_field(v, covering, context, evidence, where, names) for v in values])


# What a percent-encoded value written back keeps literal, beside letters, digits and
# `_.-~`: a cookie's cookie-octets (RFC 6265 §4.1.1), a header's visible characters and
# space (RFC 9110 §5.5); never `%`, so the recipient's decoding gives the masked text.
_LITERAL = {"cookies": "!#$&'()*+-./:<=>?@[]^_`{|}~", "headers": " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"}


MAX_PERCENT_LEVELS = 4
"""Most percent-decodings a named header or cookie value is read through (`%2540` is two)."""


def _mask_field(
    value: str, covering: list[MaskRule], context: MaskContext, evidence: Evidence, where: str, names: str
) -> str:
    """`value` of a header or cookie masked by `covering`, read as its recipient may:
    percent-decoded (`jane.doe%40example.com`, as a query value is) until it no longer
    changes, up to `MAX_PERCENT_LEVELS` times (`jane.doe%2540example.com` is encoded
    twice), then, if masking changed it, written back encoded as many times
    (`_LITERAL[names]` kept literal). Raises `MaskError`, when an enforcing rule is
    among `covering` (shadow rules never refuse), if the decoded octets are not UTF-8
    or the value is still encoded after `MAX_PERCENT_LEVELS` decodings: it cannot be
    inspected."""
    text, levels = value, 0
    while "%" in text:
        try:
            decoded = unquote(text, errors="strict")
        except UnicodeDecodeError:
            problem = "is not UTF-8 once percent-decoded"
            break
        if decoded == text:
            problem = ""
            break
        if levels == MAX_PERCENT_LEVELS:
            problem = f"is percent-encoded more than {MAX_PERCENT_LEVELS} times"
            break
        text, levels = decoded, levels + 1
    else:
        problem = ""
    if problem and not all(r.shadow for r in covering):
        raise MaskError(f"{where} {problem} and cannot be inspected")
    masked = mask_text(text, covering, context, evidence, where)
    if masked is text:
        return value
    for _ in range(levels):
        masked = quote(masked, safe=_LITERAL[names])
    return masked


def _mask_target(request: http.Request, rules: tuple[MaskRule, ...], context: MaskContext, evidence: Evidence) -> None:
    """Mask the request target (RFC 9110 §7.1) by the rules with `query: true`: each
    path segment, percent-decoded (`/v1/users/jane@example.com`), and the query's
    parameter names and values. A masked segment is percent-encoded again (RFC 3986
    pchar); the others keep their bytes. The audit log's `path`, mitmdump's flow line
    and the recording then show the masked target. Raises `MaskError` for a path
    segment that does not decode as UTF-8 (it cannot be inspected)."""
    chosen = [r for r in rules if r.query]
    if not chosen:
        return
    path, sep, query = request.path.partition("?")
    segments = path.split("/")
    changed = False
    for i, segment in enumerate(segments):
        if not segment:
            continue
        try:
            decoded = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            raise MaskError("a URL path segment is not UTF-8 once percent-decoded and cannot be inspected") from None
        masked = mask_text(decoded, chosen, context, evidence, "path")
        if masked is not decoded:
            segments[i] = quote(masked, safe="!$&'()*+,;=:@-._~")
            changed = True
    if changed:
        request.path = "/".join(segments) + sep + query
    if not request.query:
        return
    items = list(request.query.items(multi=True))
    masked_items = [
        (mask_text(k, chosen, context, evidence, "query name"), mask_text(v, chosen, context, evidence, "query"))
        for k, v in items
    ]
    if masked_items != items:
        request.query = masked_items


def _mask_trailers(message: http.Message, rules: tuple[MaskRule, ...], context: MaskContext, evidence: Evidence) -> None:
    """Mask HTTP trailer fields (RFC 9110 §6.5), sent after the content: those a rule
    names in `headers`, as headers are, and every trailer value by the rules that read
    the whole body (no paths), since trailers travel with it (gRPC's `grpc-message`)."""
    if not message.trailers:
        return
    _mask_named(message.trailers, "headers", rules, context, evidence)
    whole = [r for r in rules if r.body and not r.paths]
    if whole:
        for name in list(message.trailers):
            values = message.trailers.get_all(name)
            masked = [mask_text(v, whole, context, evidence, f"trailer:{name.lower()}") for v in values]
            if masked != values:
                message.trailers.set_all(name, masked)


def _where(flow: http.HTTPFlow) -> str:
    """The flow's target for a log line: scheme, host, port and path, never the query
    (it may hold values a `query` rule masks, and this is logged before masking)."""
    request = flow.request
    return f"{request.scheme}://{request.host}:{request.port}{request.path.split('?', 1)[0]}"
