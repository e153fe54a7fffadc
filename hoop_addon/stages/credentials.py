"""Stage 4: the gateway, not the agent, holds the upstream credential."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from hoop_addon.masking.codec import decode, identity_encoded
from hoop_addon.masking.engine import MaskError
from hoop_addon.masking.literal import SCRUBBED, StreamScrubber, forms, scrub
from hoop_addon.providers import CREDENTIAL_HEADERS, aws
from hoop_addon.stages import Stage, allowed, hoop, logger, refuse, route_of
from hoop_addon.stages.mask import Mask


class AwsUnsign(Stage):
    """Right after the route is known, on a route whose credential is `aws_sigv4`:
    the request is made what the gateway will sign. A presigned URL (query
    authentication) is refused (400 `presigned_url`: its signature cannot be replaced);
    an `aws-chunked` body (boto3 over HTTPS) is de-chunked into its payload (400
    `unsignable_request` if malformed); the agent's signature, payload hash and
    checksum headers are removed (`aws.SIGNATURE_HEADERS`, `x-amz-checksum-*`) and the
    checksum algorithms asked for kept in `hoop.aws_checksums`, for `InjectCredential`
    to recompute over the masked body. So block rules and masking read the payload, and
    nothing forwarded vouches for a body it does not match."""

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or not allowed(flow) or (route := route_of(flow)) is None:
            return
        if route.credential is None or route.credential.aws is None:
            return
        request = flow.request
        if aws.presigned(request.query.keys()):
            refuse(flow, 400, "credential", "presigned_url",
                   "presigned URLs (query authentication) are refused on a route whose AWS credential the gateway holds")
            return
        trailers: dict[str, str] = {}
        try:
            if aws.chunked(request.headers):
                payload, trailers = aws.dechunk(request.raw_content or b"")
                if rest := aws.codings_after_dechunk(request.headers):
                    request.headers["content-encoding"] = rest
                else:
                    request.headers.pop("content-encoding", None)
                request.raw_content = payload
                request.headers["content-length"] = str(len(payload))
        except aws.SigningError as exc:
            refuse(flow, 400, "credential", "unsignable_request", f"request cannot be signed: {exc}")
            return
        hoop(flow)["aws_checksums"] = sorted(aws.requested_checksums(request.headers, trailers))
        for name in (*aws.SIGNATURE_HEADERS, *aws.checksum_headers(list(request.headers.keys()))):
            request.headers.pop(name, None)


class InjectCredential(Stage):
    """Last stage before the upstream: on a route with a credential, removes every
    credential the agent sent (`AGENT_CREDENTIAL_HEADERS`, the route's credential
    header, and the query parameter for the query kind) and sets the route's
    credential, then marks the flow `hoop.forwarded`. An `aws_sigv4` credential signs
    the request as it goes, masked (`_sign`), and a masked response's
    `x-amz-checksum-*` are recomputed or dropped (`_aws_checksums`); dropped from a
    response masked as it streams.

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
            if credential.aws is not None:
                self._sign(request, credential.aws, record)
            elif credential.param is None:
                request.headers[credential.header] = credential.value
                record["credential"] = credential.header
            else:
                request.query[credential.param] = credential.value
                record["credential"] = f"query:{credential.param}"
        record["forwarded"] = True

    @staticmethod
    def _sign(request: http.Request, credential: aws.AwsSigV4, record: dict[str, Any]) -> None:
        """Checksums the client asked for (`AwsUnsign`), recomputed over the body as it
        goes (masked, content-encoded), then the SigV4 signature over it all."""
        body = request.raw_content or b""
        for name, value in aws.checksums(record.get("aws_checksums", ()), body).items():
            request.headers[name] = value
        signed = {k: v for k, v in request.headers.items() if k.lower().startswith("x-amz-") or k.lower() in ("content-type", "content-md5")}
        for name, value in aws.sign(request.method, request.url, request.host_header or request.host, signed, body, credential).items():
            request.headers[name] = value
        record["credential"] = "aws_sigv4"

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
            route = route_of(flow)
            if route is not None and route.credential is not None and route.credential.aws is not None and any(
                not r.shadow for r in route.rules_for("response")
            ):  # the masked body is not known before it is sent: no checksum can vouch for it
                for name in aws.checksum_headers(list(response.headers.keys())):
                    response.headers.pop(name, None)
                response.headers.pop("Content-MD5", None)
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
        self._scrub_echo(flow)
        self._aws_checksums(flow)

    @staticmethod
    def _aws_checksums(flow: http.HTTPFlow) -> None:
        """On an `aws_sigv4` route, a response body the gateway changed (masked, or a
        credential scrubbed) gets its `x-amz-checksum-*` headers recomputed or dropped
        (`aws.response_checksums`): the client validates them (boto3 by default)."""
        route, response, record = route_of(flow), flow.response, hoop(flow)
        if route is None or route.credential is None or route.credential.aws is None or response is None or response.stream:
            return
        changed = record.get("credential_echoed") or any(
            m.get("part") == "response" and not m.get("shadow") for m in record.get("masked", ())
        )
        if not changed:
            return
        for name, value in aws.response_checksums(response.headers, response.raw_content or b"").items():
            if value is None:
                response.headers.pop(name, None)
            else:
                response.headers[name] = value

    def _scrub_echo(self, flow: http.HTTPFlow) -> None:
        if (secret_forms := self._echo_forms(flow)) is None or (response := flow.response) is None or not response.raw_content:
            return
        # A streamed body was scrubbed as it passed; what is kept of it for the recording
        # is scrubbed here too (Mask may have put back the unrestored stream).
        encoding = response.headers.get("Content-Encoding", "")
        if identity_encoded(encoding):
            body = response.raw_content  # no size limit: nothing to inflate
        else:
            try:
                body = decode(response.raw_content, encoding, self.mask.max_body)
            except MaskError as exc:  # a bomb, or a coding we do not read: it cannot be searched, so it is not passed on
                refuse(flow, 502, "credential", "uninspectable_response",
                       f"upstream response withheld: it could not be searched for the route's credential: {exc}")
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
            if credential.aws is not None and "X-Amz-Security-Token" in flow.request.headers:
                flow.request.headers["X-Amz-Security-Token"] = SCRUBBED
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
