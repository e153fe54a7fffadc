"""Stage 4: the gateway, not the agent, holds the upstream credential."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from hoop_addon.masking.codec import decode
from hoop_addon.masking.engine import MaskError
from hoop_addon.masking.literal import SCRUBBED, StreamScrubber, forms, scrub
from hoop_addon.providers import CREDENTIAL_HEADERS
from hoop_addon.stages import Stage, allowed, hoop, logger, route_of
from hoop_addon.stages.mask import Mask



class InjectCredential(Stage):
    """Last stage before the upstream: on a route with a credential, removes every
    credential the agent sent (`AGENT_CREDENTIAL_HEADERS`, the route's credential
    header, and the query parameter for the query kind) and sets the route's
    credential, then marks the flow `hoop.forwarded`.

    Once the request has gone (`responseheaders`, or `error`), the credential is
    replaced by `[SCRUBBED]` in the flow itself, so that nothing later (recording,
    audit, mitmdump's own output, addons, metrics) can see it. Only where it was put
    is recorded in metadata (`hoop.credential`: the header name, or `query:NAME`).

    An upstream may echo the credential back (a debug endpoint, an error message): the
    credential's secrets are replaced by `[SCRUBBED]` in the response's headers and
    body, decoded (buffered, or as it streams), before the client, the recording or
    the audit see it; `hoop.credential_echoed` counts them. A compressed body that
    cannot be decoded within `hoop_mask_max_body` passes unchecked (logged): a
    credential route may serve large downloads.
    """

    def __init__(self, mask: Mask) -> None:
        self.mask = mask  # its `max_body` bounds decoding

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow):
            return
        record = hoop(flow)
        if (route := route_of(flow)) is not None and (credential := route.credential) is not None:
            request = flow.request
            for name in (*CREDENTIAL_HEADERS, credential.header):
                request.headers.pop(name, None)
            if credential.param is None:
                request.headers[credential.header] = credential.value
                record["credential"] = credential.header
            else:
                request.query[credential.param] = credential.value
                record["credential"] = f"query:{credential.param}"
        record["forwarded"] = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._withdraw(flow)
        if (secret_forms := self._echo_forms(flow)) is None or flow.response is None:
            return
        response = flow.response
        scrubbed = [(name, scrub(value, secret_forms)) for name, value in response.headers.fields]
        if count := sum(n for _, (_, n) in scrubbed):
            response.headers.fields = tuple((name, value) for name, (value, _) in scrubbed)
            self._echoed(flow, count)
        if callable(inner := response.stream):  # masked as it streams (Mask set it first)
            scrubber = StreamScrubber(secret_forms)

            def stream(chunk: bytes) -> list[bytes]:
                out = inner(chunk)
                data = scrubber.feed(out if isinstance(out, bytes) else b"".join(out), final=not chunk)
                if scrubber.count:
                    self._echoed(flow, scrubber.count)
                    scrubber.count = 0
                return [data] if data else []

            response.stream = stream

    def response(self, flow: http.HTTPFlow) -> None:
        if (secret_forms := self._echo_forms(flow)) is None or (response := flow.response) is None or not response.raw_content:
            return
        # A streamed body was scrubbed as it passed; what is kept of it for the recording
        # is scrubbed here too (Mask may have put back the unrestored stream).
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            body = response.raw_content  # no size limit: nothing to inflate
        else:
            try:
                body = decode(response.raw_content, encoding, self.mask.max_body)
            except MaskError as exc:  # a download too large, or an encoding we do not read: it passes
                logger.warning(f"hoop: the response could not be checked for an echoed credential: {exc}")
                return
        body, count = scrub(body, secret_forms)
        if count:
            response.content = body  # re-encoded with the response's Content-Encoding
            if not response.stream:
                self._echoed(flow, count)

    def error(self, flow: http.HTTPFlow) -> None:
        self._withdraw(flow)

    def _withdraw(self, flow: http.HTTPFlow) -> None:
        if "credential" not in hoop(flow) or (route := route_of(flow)) is None or (credential := route.credential) is None:
            return
        if credential.param is None:
            flow.request.headers[credential.header] = SCRUBBED
        elif credential.param in flow.request.query:
            flow.request.query[credential.param] = SCRUBBED

    def _echo_forms(self, flow: http.HTTPFlow) -> tuple[bytes, ...] | None:
        """The byte forms of the credential this flow was sent with, or None."""
        if "credential" not in hoop(flow) or (route := route_of(flow)) is None or route.credential is None:
            return None
        return forms(route.credential.secrets) or None

    @staticmethod
    def _echoed(flow: http.HTTPFlow, count: int) -> None:
        record: Any = hoop(flow)
        record["credential_echoed"] = record.get("credential_echoed", 0) + count
        logger.warning(f"hoop: the upstream echoed the route's credential ({count}x); replaced by {SCRUBBED}")
