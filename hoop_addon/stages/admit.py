"""Stage 2: which route a request is on, and whether its identity is admitted there."""

from __future__ import annotations

import ipaddress
import re

from mitmproxy import http
from mitmproxy.net.http.url import parse_authority

from hoop_addon.stages import Stage, hoop, mark_admitted, note_api, refuse
from hoop_addon.stages.policy import PolicyStage


# `%` + an unreserved character (RFC 3986 §2.3), `/` or `\\`: upstreams decode these,
# so `/v1/%63hat` or `/v1%2Fchat` would be served as a path no route glob was matched against.
_NEEDLESS_ESCAPE = re.compile(r"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DdEeFf]|5[CcFf]|7[Ee])")


_NUMERIC_LABEL = re.compile(r"0[xX][0-9A-Fa-f]*|[0-9]+")


def canonical_path(path: str) -> bool:
    """True for a path an upstream cannot normalise into another one: it starts with
    `/` (or is `*`), has no empty, `.` or `..` segments (RFC 3986 §5.2.4), also before
    a `;parameter` (Tomcat and Jetty read `/..;/` as `/../`), no backslash (read as `/`
    by some servers) and no percent-encoded unreserved characters, slashes or
    backslashes."""
    if path == "*":
        return True
    segments = [s.split(";", 1)[0] for s in path.split("/")]
    return (
        path.startswith("/")
        and not any(s in ("", ".", "..") for s in segments[1:-1])
        and segments[-1] not in (".", "..")
        and "\\" not in path
        and not _NEEDLESS_ESCAPE.search(path)
    )


def canonical_host(host: str) -> bool:
    """True for a host name spelled one way only: no trailing dot, and an IP address in
    its canonical form (`127.0.0.1`, `::1`). A name whose last label is numeric is an
    IPv4 address to resolvers and browsers (WHATWG URL), so `127.1`, `2130706433` or
    `0x7f.0.0.1` reach 127.0.0.1 while matching no route written for it: refused."""
    if host.endswith("."):
        return False
    if ":" in host or _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        try:
            return ipaddress.ip_address(host).compressed == host.lower()
        except ValueError:
            return False
    return True


def misdirected(request: http.Request, sni: str | None) -> str | None:
    """Why `request` names a server other than the one the gateway will send it to
    (`request.host`, `request.port`), or None. The `Host` header, the request's
    authority (RFC 9110 §7.2) and the TLS server name the client sent (`sni`,
    RFC 6066 §3), which mitmproxy passes on upstream, must name that host: a shared
    front end (a CDN) routes by them, so a request admitted for one host could
    otherwise be served, with the route's credential, by another."""
    host = _ascii_host(request.host)
    names = request.headers.get_all("Host")
    if len(names) > 1:
        return "more than one Host header"
    # `authority`: HTTP/2's `:authority`, or the target of an HTTP/1 absolute-form
    # request, which a server uses instead of Host (RFC 9112 §3.2.2), even in a tunnel.
    for name in (request.authority, *names):
        if not name:
            continue
        try:
            named, port = parse_authority(name, check=True)
        except ValueError:
            return "the Host header is malformed"
        if _ascii_host(named) != host or (port is not None and port != request.port):
            return "the Host header or request target names another server than the one it is sent to"
    if sni and request.scheme == "https" and _ascii_host(sni) != host:
        return "the TLS server name (SNI) names another server than the tunnel's target"
    return None


def _ascii_host(host: str) -> str:
    """`host` as it goes on the wire (IDNA, RFC 5891: mitmproxy decodes `request.host`,
    not the Host header or SNI), lower case."""
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return host.lower()


class Admit(Stage):
    """Matches the request to the first route of the policy (host, path glob, method)
    and checks the identity (subject, groups, client id, scopes) against the route's
    `allow`: deny by default. Refusals are 403 with a JSON reason naming the route and
    nothing else of the policy, decided on the request headers, before any body is read
    into the chain. Admitted requests are never streamed. The host matched is the one
    the gateway connects to, and the route a request is judged under is the one the
    upstream will serve it as: the host must be spelled canonically
    (`canonical_host`), the `Host` header and TLS server name must name it
    (`misdirected`: 421), and the path must be canonical (`canonical_path`); otherwise
    400. A route holding a credential sends it over HTTPS only, or in clear to a
    loopback address (a local model server): otherwise 403 `cleartext_credential`."""

    def __init__(self, policy: PolicyStage) -> None:
        self.policy = policy

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or (active := self.policy.active) is None:
            return
        record = hoop(flow)
        request = flow.request
        path = request.path.split("?", 1)[0]
        if not canonical_host(request.host):
            refuse(flow, 400, "route", "non_canonical_host",
                   "the request's host is not in canonical form (a trailing dot, or an IP address spelled another way)")
            return
        if (why := misdirected(request, flow.client_conn.sni)) is not None:
            refuse(flow, 421, "route", "misdirected_request", why)
            return
        if not canonical_path(path):
            refuse(flow, 400, "route", "non_canonical_path",
                   "the request path is not in canonical form (dot or empty segments, or needless percent-encoding)")
            return
        route = active.policy.route_for(request.host, request.port, path, request.method)
        if route is None:
            if active.policy.unmatched == "allow":
                mark_admitted(flow, None)
            else:
                refuse(flow, 403, "route", "no_route", "no route of the policy matches this request")
            return
        note_api(flow, route)
        identity = record["identity"]
        if not route.admits(identity["issuer"], identity["subject"], identity["groups"], identity["client_id"], identity["scopes"]):
            record["route"] = route.name
            refuse(flow, 403, "route", "not_admitted", f"this identity is not admitted to route '{route.name}'")
            return
        if route.credential is not None and request.scheme != "https" and not _loopback(request.host):
            record["route"] = route.name
            refuse(flow, 403, "route", "cleartext_credential",
                   f"route '{route.name}' holds a credential: it is sent over HTTPS only; use https://")
            return
        mark_admitted(flow, route)
        # A streamed request body would be sent upstream before the `request` hook runs,
        # i.e. before masking and credential injection: the chain inspects whole requests
        # (mitmproxy's body_size_limit bounds them).
        request.stream = False


def _loopback(host: str) -> bool:
    """True for `localhost` or a loopback IP address: cleartext to it stays on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
