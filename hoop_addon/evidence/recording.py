"""Session recordings: mitmproxy flow files, masked and scrubbed, with a signed manifest.

A recording is two files in the recordings directory:

- `<session>-p<part>.mitm`: a plain mitmproxy flow dump (tnetstring records), so stock
  `mitmproxy -r`, `mitmweb -r` and `mitmdump -nr` open it. Each flow is appended as the
  chain left it (bodies already masked) after secrets are scrubbed (see `scrubbed`), and
  flushed to the OS at once, so a crash of the gateway loses no flow already added.
- `<session>-p<part>.manifest.json`: the manifest, canonical JSON (see
  `hoop_addon.evidence.keys.canonical`), rewritten atomically (write + rename) at each signed
  checkpoint and when the recording is sealed:

      {"format": "hoop-recording/1", "session": str, "part": int (1-based),
       "previous": sha256 hex of the previous part's manifest file, or null,
       "recording": file name of the flow file, "identity": {subject, issuer, groups, ...},
       "client_session": X-Hoop-Session value or null, "policy_hash": sha256 hex,
       "started": RFC 3339 UTC, "updated": RFC 3339 UTC, "retention": seconds or null,
       "flows": [{"offset": int, "length": int, "sha256": hex}, ...], "flow_count": int,
       "chain": hex, "sealed": bool, "audit_log": file name of the audit chain its flows
       are logged in (one per gateway worker) or null, "key_id": hex or null,
       "signature": base64 or null}

  `chain` is the running hash: `c0 = 64 zeros`, `c_i = SHA-256(c_{i-1} || sha256_i)`
  over the raw 32-byte digests. `sealed` is true only when the recording was closed
  cleanly. `signature` is Ed25519 over the canonical form of every field but `flows`
  and `signature`: the signed `chain` and `flow_count` bind every flow's hash and
  order, and offsets and lengths must tile the file from 0, so a checkpoint costs one
  small signature however long the session. Flows after the last checkpoint are the
  unsealed tail (see `hoop_addon.evidence.verify`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http, version
from mitmproxy.io import tnetstring

from hoop_addon.evidence.keys import Signer, canonical, sha256
from hoop_addon.masking.literal import SCRUBBED

FORMAT = "hoop-recording/1"
ALWAYS_SCRUBBED = ("Authorization", "Proxy-Authorization")
# Query parameters that commonly carry secrets (OAuth RFC 6749/6750, signed URLs, API keys).
SECRET_QUERY = ("access_token", "id_token", "refresh_token", "token", "api_key", "apikey", "key", "code",
                "password", "secret", "client_secret", "sig", "signature", "x-amz-signature", "x-amz-credential")
_SCRUBBED = SCRUBBED.encode()
GENESIS = "0" * 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def scrubbed(
    flow: http.HTTPFlow, headers: Iterable[str] = (), cookies: Iterable[str] = (), query: Iterable[str] = SECRET_QUERY
) -> dict[str, Any]:
    """The flow's state, as a mitmproxy flow file holds it (`flow.get_state()`), with
    secrets replaced by `[SCRUBBED]`: the request headers named here or in
    `ALWAYS_SCRUBBED`, the cookies named in `cookies` (in `Cookie` and in the response's
    `Set-Cookie`), and the query parameters named in `query` (case-insensitive); the
    same in the flow's backup (its state before an edit in mitmproxy or a replay). The
    live flow is untouched.
    """
    state = flow.get_state()
    _scrub(state, headers, tuple(cookies), query)
    return state


def _scrub(state: dict[str, Any], headers: Iterable[str], cookies: tuple[str, ...], query: Iterable[str]) -> None:
    """Scrub a flow state (or one holding its request and response states) in place,
    as `scrubbed` describes, and the backup it holds (the flow before an edit or a
    replay). Headers are scrubbed in the state itself; the request (or the response)
    is rebuilt only when it has a query string or a cookie header to scrub, as most
    recorded requests have neither."""
    named = {name.lower().encode() for name in (*ALWAYS_SCRUBBED, *headers)}
    fields = state["request"]["headers"]
    if any(name.lower() in named for name, _ in fields):
        state["request"]["headers"] = tuple((k, _SCRUBBED if k.lower() in named else v) for k, v in fields)
    if b"?" in state["request"]["path"] or (cookies and _has(state["request"]["headers"], b"cookie")):
        request = http.Request.from_state(state["request"])
        for name in cookies:
            if name in request.cookies:
                request.cookies[name] = SCRUBBED
        secret = {q.lower() for q in query}
        if any(k.lower() in secret for k in request.query):
            request.query = [(k, SCRUBBED if k.lower() in secret else v) for k, v in request.query.items(multi=True)]
        state["request"] = request.get_state()
    if cookies and state["response"] is not None and _has(state["response"]["headers"], b"set-cookie"):
        response = http.Response.from_state(state["response"])
        for name in cookies:
            if name in response.cookies:
                _, attrs = response.cookies[name]
                response.cookies[name] = (SCRUBBED, attrs)
        state["response"] = response.get_state()
    if isinstance(backup := state.get("backup"), dict) and "request" in backup:
        _scrub(backup, headers, cookies, query)


def _has(fields: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    """Whether header `name` (lower case) is among a message state's `headers`."""
    return any(k.lower() == name for k, _ in fields)


def _dict(value: dict[Any, Any]) -> bytes:
    # mitmproxy's encoder writes a dictionary's items last item first
    payload = b"".join([tnet(k) + tnet(v) for k, v in reversed(value.items())])
    return b"%d:%b}" % (len(payload), payload)


def _list(value: list[Any] | tuple[Any, ...]) -> bytes:
    payload = b"".join([tnet(item) for item in value])
    return b"%d:%b]" % (len(payload), payload)


def _str(value: str) -> bytes:
    data = value.encode()
    return b"%d:%b;" % (len(data), data)


def _int(value: int) -> bytes:
    data = b"%d" % value
    return b"%d:%b#" % (len(data), data)


def _float(value: float) -> bytes:
    data = repr(value).encode()
    return b"%d:%b^" % (len(data), data)


_TNET: dict[type, Callable[[Any], bytes]] = {
    bytes: lambda value: b"%d:%b," % (len(value), value),
    str: _str,
    dict: _dict,
    tuple: _list,
    list: _list,
    int: _int,
    float: _float,
    bool: lambda value: b"4:true!" if value else b"5:false!",
    type(None): lambda value: b"0:~",
}


def tnet(value: Any) -> bytes:
    """`value` as a tnetstring, byte for byte what mitmproxy's `io.tnetstring.dumps`
    writes (a unit test compares them): the same format, dispatched on the value's
    exact type instead of a chain of `isinstance` tests, about twice as fast on a
    flow's state. A value of another type (a subclass) goes to mitmproxy's encoder.
    Raises `ValueError` for a value tnetstrings cannot hold."""
    encode = _TNET.get(type(value))
    return encode(value) if encode is not None else tnetstring.dumps(value)


class FlowEncoder:
    """Encodes the flows of one session as a mitmproxy flow file holds them: the
    tnetstring (mitmproxy's `io.tnetstring`) of `scrubbed(flow, ...)`, byte for byte.

    mitmproxy's generic serialiser spends over half of a flow's encoding on the client
    and server connections (their certificates, cipher lists, ...), which do not change
    between the flows of a session: the last encoded state of each is kept and reused
    while every attribute of the connection is as it was. A flow that holds a backup
    (edited or replayed in mitmproxy: `flow.modified()`) is encoded the generic way.
    The field list is `mitmproxy.flow.Flow.get_state`'s and `HTTPFlow`'s: a unit test
    compares the bytes with mitmproxy's own, so a mitmproxy upgrade cannot skew it.
    """

    def __init__(self) -> None:
        self._connections: dict[str, tuple[str, tuple[Any, ...], bytes]] = {}

    def encode(self, flow: http.HTTPFlow, headers: Iterable[str] = (), cookies: Iterable[str] = (),
               query: Iterable[str] = SECRET_QUERY) -> bytes:
        """The flow file record of `flow`, scrubbed (see `scrubbed` for the arguments)."""
        if flow.modified():
            return tnet(scrubbed(flow, headers, cookies, query))
        state = {
            "version": version.FLOW_FORMAT_VERSION,
            "type": flow.type,
            "id": flow.id,
            "error": flow.error.get_state() if flow.error else None,
            "client_conn": None,  # encoded by `_connection`
            "server_conn": None,
            "intercepted": flow.intercepted,
            "is_replay": flow.is_replay,
            "marked": flow.marked,
            "metadata": flow.metadata,  # encoded at once: no copy needed
            "comment": flow.comment,
            "timestamp_created": flow.timestamp_created,
            "backup": None,  # not modified
            "request": flow.request.get_state(),
            "response": flow.response.get_state() if flow.response else None,
            "websocket": flow.websocket.get_state() if flow.websocket else None,
        }
        _scrub(state, headers, tuple(cookies), query)
        state["client_conn"] = self._connection("client_conn", flow.client_conn)
        state["server_conn"] = self._connection("server_conn", flow.server_conn)
        # A tnetstring dictionary: its items' encodings, concatenated, length-prefixed
        # (mitmproxy writes them last item first).
        payload = b"".join(
            tnet(key) + (value if key in _CONNECTIONS else tnet(value))
            for key, value in reversed(state.items())
        )
        return b"%d:%b}" % (len(payload), payload)

    def _connection(self, role: str, connection: Any) -> bytes:
        """The encoded state of a flow's connection, reused while unchanged."""
        attributes = tuple(tuple(v) if isinstance(v, list) else v for v in vars(connection).values())
        known = self._connections.get(role)
        if known is None or known[0] != connection.id or known[1] != attributes:
            known = self._connections[role] = (connection.id, attributes, tnet(connection.get_state()))
        return known[2]


_CONNECTIONS = ("client_conn", "server_conn")


def chain_next(chain: str, digest: str) -> str:
    """The running hash after a flow whose SHA-256 is `digest` (both hex)."""
    return hashlib.sha256(bytes.fromhex(chain) + bytes.fromhex(digest)).hexdigest()


def manifest_path(recording: Path) -> Path:
    """The manifest beside the flow file `recording`."""
    return recording.with_suffix(".manifest.json")


def utc(ts: float) -> str:
    """RFC 3339 UTC time, second precision."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def new_session_id(subject: str, client_session: str | None = None) -> str:
    """`<UTC start>-<subject>[-<X-Hoop-Session>]-<8 hex>`, each part filename-safe."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    label = _UNSAFE.sub("_", subject)[:40] + (f"-{_UNSAFE.sub('_', client_session)[:32]}" if client_session else "")
    return f"{stamp}-{label}-{uuid.uuid4().hex[:8]}"


@dataclass
class Limits:
    """When to checkpoint (every `checkpoint_flows` flows or `checkpoint_seconds`) and
    when to rotate to a new part (`rotate_bytes` of flow file, `rotate_seconds` of age;
    0 for never)."""

    checkpoint_flows: int = 100
    checkpoint_seconds: int = 1
    rotate_bytes: int = 0
    rotate_seconds: int = 0


@dataclass
class SessionRecording:
    """One open part of a session's recording (see the module docstring for the files).

    `add()` appends a scrubbed flow; `checkpoint()` signs and writes the manifest;
    `seal()` writes the final manifest (sealed) and closes the file, returning the
    manifest file's SHA-256. `signer` None is unsigned development mode. All raise
    `OSError` when a file cannot be written.
    """

    directory: Path
    session_id: str
    identity: dict[str, Any]
    policy_hash: str | None
    signer: Signer | None
    limits: Limits = field(default_factory=Limits)
    client_session: str | None = None
    part: int = 1
    previous: str | None = None
    audit_log: str | None = None

    def __post_init__(self) -> None:
        self.path = self.directory / f"{self.session_id}-p{self.part}.mitm"
        self.started = time.time()
        # Per flow, its length and raw SHA-256 (40 bytes, not a dict per flow: an open
        # session may hold many thousands); the sealed manifest lists them.
        self._lengths = array("Q")
        self._digests = bytearray()
        self.chain = GENESIS
        self.size = 0
        self.retention: int | None = 0  # seconds, the longest of its flows' routes; None: forever
        self._unsigned_flows = 0
        self._checkpointed = self.started
        self._encoder = FlowEncoder()
        self._file = open(self.path, "xb")
        self.checkpoint()

    def add(self, flow: http.HTTPFlow, retention: int | None, **scrub: Iterable[str]) -> None:
        """Append a scrubbed copy of `flow` (keyword arguments go to `scrubbed`);
        `retention` is its route's retention in seconds (None: forever). Checkpoints
        when the limits say so."""
        data = self._encoder.encode(flow, **scrub)
        self._file.write(data)
        self._file.flush()
        digest = hashlib.sha256(data).digest()
        self._lengths.append(len(data))
        self._digests += digest
        self.chain = chain_next(self.chain, digest.hex())
        self.size += len(data)
        if self.retention is not None:
            self.retention = None if retention is None else max(self.retention, retention)
        self._unsigned_flows += 1
        if self._unsigned_flows >= self.limits.checkpoint_flows:
            self.checkpoint()

    @property
    def flow_count(self) -> int:
        """How many flows this part holds."""
        return len(self._lengths)

    def flows(self) -> list[dict[str, Any]]:
        """Every flow's `{"offset", "length", "sha256"}` (bytes, bytes, hex), in order."""
        entries, offset = [], 0
        for i, length in enumerate(self._lengths):
            entries.append({"offset": offset, "length": length, "sha256": self._digests[32 * i : 32 * i + 32].hex()})
            offset += length
        return entries

    def due(self, now: float) -> bool:
        """True when unsigned flows have waited `checkpoint_seconds`."""
        return self._unsigned_flows > 0 and now - self._checkpointed >= self.limits.checkpoint_seconds

    def full(self, now: float) -> bool:
        """True when this part should be sealed and the session continue in a new part."""
        lim = self.limits
        return self.flow_count > 0 and (
            (lim.rotate_bytes > 0 and self.size >= lim.rotate_bytes)
            or (lim.rotate_seconds > 0 and now - self.started >= lim.rotate_seconds)
        )

    def manifest(self, sealed: bool) -> dict[str, Any]:
        """The manifest as it stands, signed (a JSON-safe dict)."""
        signed = {
            "format": FORMAT,
            "session": self.session_id,
            "part": self.part,
            "previous": self.previous,
            "recording": self.path.name,
            "identity": self.identity,
            "client_session": self.client_session,
            "policy_hash": self.policy_hash,
            "started": utc(self.started),
            "updated": utc(time.time()),
            "retention": self.retention,
            "flow_count": self.flow_count,
            "chain": self.chain,
            "sealed": sealed,
            "audit_log": self.audit_log,
            "key_id": self.signer.key_id if self.signer else None,
        }
        # An open part's checkpoint lists no flows: its signed `flow_count` and `chain`
        # bind every flow's bytes and order (verify derives the entries from the file),
        # so a checkpoint costs the same at flow 10 as at flow 10,000. The sealed
        # manifest lists every flow's offset, length and SHA-256.
        flows = self.flows() if sealed else None
        return {**signed, "flows": flows, "signature": self.signer.sign(signed) if self.signer else None}

    def checkpoint(self, sealed: bool = False) -> bytes:
        """Sign and atomically replace the manifest; returns its bytes."""
        data = canonical(self.manifest(sealed))
        target = manifest_path(self.path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        self._unsigned_flows = 0
        self._checkpointed = time.time()
        return data

    def seal(self) -> str:
        """Close cleanly: the final, sealed manifest. Returns its SHA-256 (hex)."""
        self._file.close()
        return sha256(self.checkpoint(sealed=True))

    def abandon(self) -> None:
        """Close the flow file without sealing (the gateway is going down uncleanly)."""
        self._file.close()
