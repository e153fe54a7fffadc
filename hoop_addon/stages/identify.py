"""Stage 1: who is calling. Verifies the bearer token and strips what carried it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
import weakref

from collections.abc import Callable

from mitmproxy import connection, http

from hoop_addon.identity.smuggling import Fingerprint, holds_token
from hoop_addon.identity.verifier import Identity, TokenError, Verifier
from hoop_addon.masking.codec import decode, identity_encoded
from hoop_addon.masking.engine import MaskError
from hoop_addon.mcp.metadata import challenge as with_metadata
from hoop_addon.policy.model import Route
from hoop_addon.providers import CREDENTIAL_HEADERS, aws
from hoop_addon.stages import Stage, hoop, note_api, refuse
from hoop_addon.stages.mask import OFFLOAD_BYTES, Mask
from hoop_addon.stages.metadata import resource_uri
from hoop_addon.stages.policy import Enforcement, PolicyStage

REALM = "hoop"
# A query parameter that carries a token: RFC 6750 §2.3's name, or any JWS-shaped value.
QUERY_TOKEN_NAMES = frozenset({"access_token", "id_token"})
_JWS_SHAPED = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_PROXY_SCHEMES = {"basic": "proxy_password", "bearer": "proxy_bearer"}
# The token sources of a request itself (not of the proxy), and the header each names.
_REQUEST_SOURCES = {"authorization": "Authorization: Bearer <JWT>", "x_api_key": "X-Api-Key: <JWT>"}
# Headers that may carry a gateway token: each must appear at most once.
_TOKEN_HEADERS = ("Proxy-Authorization", *CREDENTIAL_HEADERS)


class Identify(Stage):
    """Attaches a verified `Identity` to each flow (`hoop.identity`), or refuses it.

    Token sources (the policy's `identity.token_sources`):
    - `proxy_password`: `Proxy-Authorization: Basic base64(user:JWT)`, as clients send
      for `HTTPS_PROXY=http://agent:<JWT>@host:port`.
    - `proxy_bearer`: `Proxy-Authorization: Bearer <JWT>`.
    - `authorization`: `Authorization: Bearer <JWT>` (RFC 6750 §2.1).
    - `x_api_key`: `X-Api-Key: <JWT>`, where Anthropic's SDKs put their API key.
    Proxy credentials on CONNECT bind the identity to the client connection for every
    request in the tunnel. The header that carried the token is removed before
    forwarding. A token in the query string (RFC 6750 §2.3) is always refused (401,
    `token_in_query`) and removed from the flow, so it is neither logged nor audited.
    Failure: 407 with `Proxy-Authenticate` for proxy credentials, else 401 with
    `WWW-Authenticate: Bearer` (RFC 6750 §3), on an MCP route with the
    `resource_metadata` of its protected-resource metadata (RFC 9728 §5.1); the
    upstream receives nothing, and the refused flow keeps no token. On an MCP route
    naming its `resource`, a token whose `aud` does not hold that URI is refused too
    (401 `wrong_resource`, RFC 8707). A tunnel's token is verified again when the policy in
    force changes or its signing key leaves the issuer's JWKS (an issuer removed by a
    reload, a key removed at the IdP end the tunnel's access). When
    the identity is verified, every other header holding a JWT of a trusted issuer,
    whatever its form (Bearer, Basic's password, a bare value, inside a cookie), is
    removed too: a gateway token never travels upstream. A request whose
    target or headers are not valid UTF-8, or that has more than one
    `Proxy-Authorization` or credential header, is refused
    (400) before anything reads them, so every later stage, the recording and the audit
    log can represent it. A refusal of a request that a route declaring an `api` would
    serve takes that provider's error shape.
    `hoop.identity.jwks_stale` is true when the issuer's JWKS could not be refreshed
    and the last good keys were used.
    """

    def __init__(self, policy: PolicyStage, mask: Mask) -> None:
        self.policy = policy
        self.mask = mask  # the Mask stage owns the decoded-size limit
        # identified flow -> its token's fingerprint, until its body is checked
        self.fingerprints: weakref.WeakKeyDictionary[http.HTTPFlow, Fingerprint] = weakref.WeakKeyDictionary()
        # client connection -> the token its CONNECT authenticated with
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if (active := self.policy.active) is None:
            refuse(flow, 503, "identity", "policy_not_loaded", "the gateway has no policy loaded")
            return
        hoop(flow)["policy_hash"] = active.policy.digest
        sources = active.policy.token_sources
        header = flow.request.headers.get("Proxy-Authorization")
        try:
            if header is None:
                if "authorization" in sources:
                    return  # requests inside the tunnel must then authenticate themselves
                raise TokenError("missing", "proxy credentials are required")
            token = _proxy_token(header, sources)
            identity = await active.verifier.verify(token)
        except TokenError as exc:
            self._refuse(flow, True, exc, active)
            return
        self.tunnels[flow.client_conn] = token
        hoop(flow)["identity"] = _record(identity, active.verifier)
        del flow.request.headers["Proxy-Authorization"]

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        if not _utf8(flow.request):
            _drop_tokens(flow.request)
            refuse(flow, 400, "identity", "malformed_request", "the request target or a header is not valid UTF-8")
            return
        if any(len(flow.request.headers.get_all(name)) > 1 for name in _TOKEN_HEADERS):
            # Only one would be checked (and removed), and another forwarded: a gateway
            # token could travel upstream behind an innocuous first header.
            _drop_tokens(flow.request)
            refuse(flow, 400, "identity", "malformed_request", "more than one Proxy-Authorization header, or more than one of a credential header (Authorization, X-Api-Key, Api-Key, X-Goog-Api-Key)")
            return
        if (active := self.policy.active) is None:
            refuse(flow, 503, "identity", "policy_not_loaded", "the gateway has no policy loaded")
            return
        hoop(flow)["policy_hash"] = active.policy.digest
        headers = flow.request.headers
        sources = active.policy.token_sources
        if _scrub_query_tokens(flow.request, active.verifier):
            self._refuse(flow, False, TokenError("token_in_query", "tokens in the URL are refused: send them in a header"), active)
            return
        # Challenge for proxy credentials when they were sent or are the only ones accepted.
        own = sorted(sources & _REQUEST_SOURCES.keys())  # the request's own token sources accepted
        proxy = "Proxy-Authorization" in headers or not own
        try:
            if (tunnel := self.tunnels.get(flow.client_conn)) is not None:
                proxy, token = True, tunnel
                identity = await self._tunnel_identity(flow.client_conn, tunnel, active)
            elif "Proxy-Authorization" in headers:
                token = _proxy_token(headers["Proxy-Authorization"], sources)
                identity = await active.verifier.verify(token)
            elif "authorization" in sources and "Authorization" in headers:
                token = _bearer(headers["Authorization"])
                identity = await active.verifier.verify(token)
                del headers["Authorization"]
            elif "x_api_key" in sources and "X-Api-Key" in headers:
                token = _api_key(headers["X-Api-Key"])
                identity = await active.verifier.verify(token)
                del headers["X-Api-Key"]
            elif own:
                raise TokenError("missing", f"a token is required ({' or '.join(_REQUEST_SOURCES[s] for s in own)})")
            else:
                raise TokenError("missing", "proxy credentials are required")
        except TokenError as exc:
            self._refuse(flow, proxy, exc, active)
            return
        route = _route(flow, active) if active.policy.binds_resources else None
        if route is not None and route.mcp is not None and route.mcp.resource and route.mcp.resource not in identity.audiences:
            self._refuse(flow, proxy, TokenError(
                "wrong_resource", f"the token's audience (aud) does not name this MCP server, {route.mcp.resource} (RFC 8707)"), active)
            return
        headers.pop("Proxy-Authorization", None)
        # a gateway token never travels upstream, in any header or form, whole or in pieces
        fingerprint = _fingerprint(token)
        trusted = active.verifier.trusts_issuer
        cut = _strip_token_headers(headers, trusted, fingerprint)
        if cut or holds_token(b"".join(name + value for name, value in headers.fields), trusted, fingerprint):
            # a part of the caller's token in one header, or a token only the headers together spell
            _drop_tokens(flow.request, trusted, fingerprint)
            self._refuse(flow, proxy, TokenError(
                "token_in_header", "the request's headers hold a gateway token cut across them: it is never sent upstream"), active)
            return
        if holds_token(flow.request.data.path, trusted, fingerprint):
            flow.request.data.path = b"/"  # refused: the token is not kept in the flow either
            self._refuse(flow, proxy, TokenError("token_in_query", "tokens in the URL are refused: send them in a header"), active)
            return
        self.fingerprints[flow] = fingerprint
        hoop(flow)["identity"] = _record(identity, active.verifier)

    async def request(self, flow: http.HTTPFlow) -> None:
        """The body of an identified request must not hold a gateway token either (an
        `api_key` field, a prompt quoting it, a piece of it): refused, 400
        `token_in_body`. The body is read decoded from its content-encoding (gzip,
        br, ...: bounded by `hoop_mask_max_body`); an encoded body that cannot be
        decoded cannot be searched and is refused (422 `uninspectable_body`). Bodies of
        `OFFLOAD_BYTES` or more are searched on the masking stage's worker threads. A flow
        answered before its body arrived (refused at its headers) keeps no body: it
        may hold a token, or values a later stage would have masked."""
        fingerprint = self.fingerprints.pop(flow, None)
        if flow.response is not None:
            if not hoop(flow).get("forwarded"):
                flow.request.raw_content = b""  # mitmproxy's UIs show the flow, and may save it
            return
        if fingerprint is None or not (raw := flow.request.raw_content):
            return
        encoding = flow.request.headers.get("Content-Encoding", "")
        trailers: dict[str, str] = {}
        try:
            if aws.chunked(flow.request.headers):  # S3 uploads: the payload read without its framing
                raw, trailers = aws.dechunk(raw)
                encoding = aws.codings_after_dechunk(flow.request.headers)
            body = decode(raw, encoding, self.mask.max_body)
        except (MaskError, aws.SigningError) as exc:
            if not identity_encoded(encoding):
                refuse(flow, 422, "identity", "uninspectable_body",
                       f"the request body could not be decoded to search it for gateway tokens: {exc}")
                return
            body = raw  # too large to mask, but as sent it is the whole body: searched as is
        active = self.policy.active
        if trailers:
            body += b"\n" + "\n".join(trailers.values()).encode()
        search = functools.partial(holds_token, body, active.verifier.trusts_issuer, fingerprint) if active else None
        # a large body (a base64 image: about 40 ms per MB) is searched off the event loop
        if search is None or (search() if len(body) < OFFLOAD_BYTES else await asyncio.wrap_future(self.mask.pool.submit(search))):
            refuse(flow, 400, "identity", "token_in_body",
                   "the request body holds a gateway token: it is never sent upstream; send it only where the gateway reads it")

    async def _tunnel_identity(self, client: connection.Client, token: str, active: Enforcement) -> Identity:
        """The tunnel's identity, verified again for each request: a hit of the
        verifier's cache while the token is valid under the policy in force, its
        issuer's leeway included, and its signing key still published; else a full
        verification (a new policy, a key removed from the JWKS: `unknown_key`)."""
        try:
            return await active.verifier.verify(token)
        except TokenError:
            del self.tunnels[client]
            raise

    def _refuse(self, flow: http.HTTPFlow, proxy: bool, exc: TokenError, active: Enforcement) -> None:
        sources = active.policy.token_sources
        route = _route(flow, active)
        note_api(flow, route)  # the refusal in the error shape of the route's API
        _drop_tokens(flow.request, active.verifier.trusts_issuer)
        hoop(flow)["auth_failure"] = exc.reason
        if proxy:
            schemes = [s for s, source in _PROXY_SCHEMES.items() if source in sources] or ["basic"]
            # the reason travels in the challenge too (RFC 6750 §3's parameters): a client
            # that shows only a CONNECT's status line and headers still says why
            detail = "" if exc.reason == "missing" else f', error="invalid_token", error_description="{exc.reason}"'
            challenge = ", ".join(f'{s.capitalize()} realm="{REALM}"{detail}' for s in schemes)
            refuse(flow, 407, "identity", exc.reason, str(exc), {"Proxy-Authenticate": challenge})
        else:
            challenge = f'Bearer realm="{REALM}", error="invalid_token", error_description="{exc.reason}"'
            if exc.reason == "missing":
                challenge = f'Bearer realm="{REALM}"'  # RFC 6750 §3.1: no error code without a token
            if route is not None and route.mcp is not None:  # an MCP client finds its authorization server there
                challenge = with_metadata(challenge, resource_uri(flow, route, flow.request.path.split("?", 1)[0]))
            refuse(flow, 401, "identity", exc.reason, str(exc), {"WWW-Authenticate": challenge})


def _route(flow: http.HTTPFlow, active: Enforcement) -> Route | None:
    """The route the request would be admitted under (None for a CONNECT or no route)."""
    request = flow.request
    if request.method == "CONNECT":
        return None
    return active.policy.route_for(request.host, request.port, request.path.split("?", 1)[0], request.method)


def _record(identity: Identity, verifier: Verifier) -> dict[str, object]:
    record = identity.record()
    if verifier.keys_stale(identity.issuer):
        record["jwks_stale"] = True  # the IdP did not answer: verified with the last good keys
    return record


def _proxy_token(header: str, sources: frozenset[str]) -> str:
    """The token in a `Proxy-Authorization` header (Basic with the token as password,
    or Bearer), if the policy accepts that scheme. Raises `TokenError`."""
    scheme, _, value = header.strip().partition(" ")
    source = _PROXY_SCHEMES.get(scheme.lower())
    if source is None:
        raise TokenError("malformed", "proxy credentials must be Basic (token as password) or Bearer")
    if source not in sources:
        raise TokenError("source_not_allowed", f"proxy credentials of scheme {scheme.capitalize()} are not accepted here")
    token = _basic_password(value) if source == "proxy_password" else value.strip()
    if not token:
        raise TokenError("missing", "the proxy credentials hold no token")
    return token


@functools.lru_cache(maxsize=1024)
def _fingerprint(token: str) -> Fingerprint:
    """The `Fingerprint` of `token`, built once per token (about 1 ms: one RE2 program)."""
    return Fingerprint(token)


def _strip_token_headers(headers: http.Headers, trusted: Callable[[str], bool], fingerprint: Fingerprint | None = None) -> bool:
    """Remove every header whose name or value holds a JWT of an issuer `trusted`
    accepts, or a piece of the caller's token (`fingerprint`), in any form
    (`hoop_addon.identity.smuggling`: with anything around it, percent-, JSON-, hex- or
    base64-encoded, in a Basic password, inside a cookie). Returns True when one held
    only a piece of the caller's token, no whole token: the token was cut, and its other
    part may be in a header that looks clean."""
    found = {n for n, v in headers.fields if holds_token(n + b":" + v, trusted, fingerprint)}
    cut = any(not holds_token(n + b":" + v, trusted) for n, v in headers.fields if n in found)
    for name in found:
        del headers[name.decode("utf-8", "surrogateescape")]
    return cut


def _drop_tokens(request: http.Request, trusted: Callable[[str], bool] | None = None, fingerprint: Fingerprint | None = None) -> None:
    """Remove what may carry a token from a flow that is not forwarded: it is still
    shown in mitmproxy's UIs and output, and may be saved by them. The token headers
    always; with `trusted` (the policy's issuers), every header holding a token (or a
    piece of the caller's, `fingerprint`)."""
    for name in _TOKEN_HEADERS:
        request.headers.pop(name, None)
    if trusted is not None:
        _strip_token_headers(request.headers, trusted, fingerprint)


def _utf8(request: http.Request) -> bool:
    """True when the request target and every header name and value are UTF-8."""
    try:
        request.data.path.decode("utf-8")
        request.data.host.encode("utf-8")
        for name, value in request.headers.fields:
            name.decode("utf-8")
            value.decode("utf-8")
    except UnicodeError:
        return False
    return True


def _scrub_query_tokens(request: http.Request, verifier: Verifier) -> bool:
    """Remove query parameters that carry a token (by name, by shape, or a gateway
    token in any form, `holds_token`); True if there were any, or if the path holds a
    gateway token (then the request is refused whole: nothing of it is forwarded)."""
    path, _, query_text = request.data.path.partition(b"?")
    if holds_token(path, verifier.trusts_issuer):
        request.data.path = b"/"  # refused: the token is not kept in the flow either
        return True
    if not query_text:
        return False  # most requests: no query to parse
    query = request.query
    found = {k for k, v in query.items(multi=True)
             if k.lower() in QUERY_TOKEN_NAMES or _JWS_SHAPED.match(v) or holds_token(f"{k}={v}".encode(), verifier.trusts_issuer)}
    for name in found:
        del query[name]
    return bool(found)


def _bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer` header; raises `TokenError`."""
    if not header:
        raise TokenError("missing", "a bearer token is required (Authorization: Bearer <JWT>)")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("malformed", "the Authorization header is not a bearer token")
    return token.strip()


def _api_key(header: str) -> str:
    """The token of an `X-Api-Key` header; raises `TokenError`."""
    if not (token := header.strip()):
        raise TokenError("missing", "the X-Api-Key header holds no token")
    return token


def _basic_password(encoded: str) -> str:
    """The password of Basic credentials `base64(user:password)` (RFC 7617); raises `TokenError`."""
    try:
        _, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise TokenError("malformed", "proxy credentials are not valid Basic credentials") from None
    if not sep or not password:
        raise TokenError("missing", "the proxy password must be a token")
    return password
