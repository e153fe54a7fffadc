"""Stage 1: who is calling. Verifies the bearer token and strips what carried it."""

from __future__ import annotations

import base64
import binascii
import time
import weakref

from mitmproxy import connection, http

from hoop_addon.identity import Identity, TokenError
from hoop_addon.stages import Stage, hoop, refuse
from hoop_addon.stages.policy import PolicyStage

REALM = "hoop"


class Identify(Stage):
    """Attaches a verified `Identity` to each flow (`hoop.identity`), or refuses it.

    Token sources (the policy's `identity.token_sources`):
    - `proxy_password`: `Proxy-Authorization: Basic base64(user:JWT)`, as clients send
      for `HTTPS_PROXY=http://agent:<JWT>@host:port`. On CONNECT the identity is bound
      to the client connection for every request in the tunnel.
    - `authorization`: `Authorization: Bearer <JWT>` (RFC 6750 §2.1).
    Failure: 407 with `Proxy-Authenticate` for proxy credentials, else 401 with
    `WWW-Authenticate: Bearer` (RFC 6750 §3); the upstream receives nothing.
    """

    def __init__(self, policy: PolicyStage) -> None:
        self.policy = policy
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, Identity] = weakref.WeakKeyDictionary()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if (active := self.policy.active) is None:
            refuse(flow, 503, "identity", "policy_not_loaded", "the gateway has no policy loaded")
            return
        hoop(flow)["policy_hash"] = active.policy.digest
        header = flow.request.headers.get("Proxy-Authorization")
        if header is None:
            return  # requests inside the tunnel must then authenticate themselves
        if "proxy_password" not in active.policy.token_sources:
            self._refuse(flow, True, TokenError("source_not_allowed", "proxy credentials are not accepted here"))
            return
        try:
            identity = await active.verifier.verify(_basic_password(header))
        except TokenError as exc:
            self._refuse(flow, True, exc)
            return
        self.tunnels[flow.client_conn] = identity
        hoop(flow)["identity"] = identity.record()
        del flow.request.headers["Proxy-Authorization"]

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        if (active := self.policy.active) is None:
            refuse(flow, 503, "identity", "policy_not_loaded", "the gateway has no policy loaded")
            return
        hoop(flow)["policy_hash"] = active.policy.digest
        headers = flow.request.headers
        sources = active.policy.token_sources
        # Challenge for proxy credentials when they were sent or are the only ones accepted.
        proxy = "Proxy-Authorization" in headers or "authorization" not in sources
        try:
            if (identity := self.tunnels.get(flow.client_conn)) is not None:
                if identity.expires_at <= time.time():
                    del self.tunnels[flow.client_conn]
                    raise TokenError("expired", "token has expired; reconnect with a fresh one")
                proxy = True
            elif proxy and "proxy_password" in sources:
                identity = await active.verifier.verify(_basic_password(headers["Proxy-Authorization"]))
            elif "authorization" in sources:
                identity = await active.verifier.verify(_bearer(headers.get("Authorization")))
                del headers["Authorization"]
            else:
                raise TokenError("missing", "no accepted credentials: use the proxy password")
        except TokenError as exc:
            self._refuse(flow, proxy, exc)
            return
        headers.pop("Proxy-Authorization", None)
        hoop(flow)["identity"] = identity.record()

    def _refuse(self, flow: http.HTTPFlow, proxy: bool, exc: TokenError) -> None:
        hoop(flow)["auth_failure"] = exc.reason
        if proxy:
            refuse(flow, 407, "identity", exc.reason, str(exc), {"Proxy-Authenticate": f'Basic realm="{REALM}"'})
        else:
            challenge = f'Bearer realm="{REALM}", error="invalid_token", error_description="{exc.reason}"'
            if exc.reason == "missing":
                challenge = f'Bearer realm="{REALM}"'  # RFC 6750 §3.1: no error code without a token
            refuse(flow, 401, "identity", exc.reason, str(exc), {"WWW-Authenticate": challenge})


def _bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer` header; raises `TokenError`."""
    if not header:
        raise TokenError("missing", "a bearer token is required (Authorization: Bearer <JWT>)")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("malformed", "the Authorization header is not a bearer token")
    return token.strip()


def _basic_password(header: str) -> str:
    """The password of a `Proxy-Authorization: Basic` header (RFC 7617); raises `TokenError`."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise TokenError("malformed", "proxy credentials must use Basic with the token as password")
    try:
        _, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise TokenError("malformed", "proxy credentials are not valid Basic credentials") from None
    if not sep or not password:
        raise TokenError("missing", "the proxy password must be a token")
    return password
