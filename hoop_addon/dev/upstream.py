"""A fake OpenAI-compatible HTTPS upstream for the demo, the tests and benchmarks.

Endpoints:

* ``POST /v1/chat/completions``: echoes the last message back, with planted
  PII (an e-mail address and a card number) so response masking can be
  tested; ``"stream": true`` gives server-sent events over chunked encoding.
  A last message of ``whoami`` is answered with the request's Authorization
  header, in the reply and in an ``X-Echo-Authorization`` header, as a debug
  endpoint or a careless error message would.
* ``POST /v1/echo``: returns the request body with the same Content-Type.
* ``GET /healthz``: ``ok``.
* anything else: 404 with an OpenAI-style JSON error.

Run standalone with ``python -m hoop_addon.dev.upstream --cert C --key K``.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import orjson

STREAM_PIECE_CHARS = 8
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Received:
    """One request as the upstream received it.

    Attributes:
        method: the HTTP method, e.g. ``"POST"``.
        path: the request target, including any query string.
        headers: header (name, value) pairs in received order and case.
        body: the request body (de-chunked if it was sent chunked).
    """

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


class _BadRequest(Exception):
    """The request body could not be read; the connection must be closed."""


def _error_body(message: str, type_: str = "invalid_request_error") -> bytes:
    """An OpenAI-style error document as JSON bytes."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": None}})


def _rough_tokens(text: str) -> int:
    """A rough token count: about four characters per token, at least 1."""
    return max(1, len(text) // 4)


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that speaks TLS and tracks open connections."""

    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of new connections (every
    # client at once after a restart) overflowed it, and the kernel dropped SYNs that
    # clients retry only after 1, 3, 7, 15, 31 s. A real API server's backlog is large.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, owner: FakeOpenAI) -> None:
        self.context = context
        self.owner = owner
        self.connections: set[ssl.SSLSocket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[ssl.SSLSocket, Any]:
        """Accept a connection; the TLS handshake is left to the handler thread.

        Doing it here would stall the accept loop behind slow clients.
        """
        sock, address = self.socket.accept()
        tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.connections_lock:
            self.connections.add(tls)
        return tls, address

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut every open (keep-alive) connection, so a stopped server looks down."""
        with self.connections_lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: handshake failures and client resets are expected in tests."""


class _Handler(http.server.BaseHTTPRequestHandler):
    """Request handler; one instance per connection."""

    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; Nagle plus delayed ACK would
    # add ~40 ms to each response.
    disable_nagle_algorithm = True
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 120

    def setup(self) -> None:
        """Complete the TLS handshake in this connection's thread, within ``timeout``."""
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        """Suppress per-request logging to stderr."""

    def _read_body(self) -> bytes:
        """Read the request body (Content-Length or chunked).

        Raises:
            _BadRequest: malformed framing or a body over ``MAX_BODY_BYTES``.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                try:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                except ValueError as e:
                    raise _BadRequest("invalid chunk size") from e
                total += size
                if size < 0 or total > MAX_BODY_BYTES:
                    raise _BadRequest("invalid chunk size")
                if size == 0:
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)
            while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError as e:
            raise _BadRequest("invalid Content-Length") from e
        if not 0 <= length <= MAX_BODY_BYTES:
            raise _BadRequest("invalid Content-Length")
        return self.rfile.read(length)

    def _send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
        """Send a complete response with an exact Content-Length."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        """Dispatch any method: record the request, then route it."""
        try:
            body = self._read_body()
        except _BadRequest as e:
            self.close_connection = True
            self._send(400, _error_body(str(e)))
            return
        self.server.owner._record(
            Received(self.command, self.path, list(self.headers.items()), body)
        )
        route = (self.command, urlsplit(self.path).path)
        if route == ("POST", "/v1/chat/completions"):
            self._chat(body, self.headers.get("Authorization", ""))
        elif route == ("POST", "/v1/echo"):
            self._send(200, body, self.headers.get("Content-Type", "application/octet-stream"))
        elif route == ("GET", "/healthz"):
            self._send(200, b"ok", "text/plain")
        else:
            self._send(404, _error_body(f"Unknown route: {self.command} {self.path}", "not_found"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _chat(self, body: bytes, authorization: str) -> None:
        """Answer a chat completion request, streamed or not."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            self._send(400, _error_body(f"Invalid JSON body: {e}"))
            return
        messages = request.get("messages") if isinstance(request, dict) else None
        if not isinstance(messages, list) or not messages:
            self._send(400, _error_body("'messages' must be a non-empty array"))
            return
        last = messages[-1]
        content = last.get("content") if isinstance(last, dict) else last
        if not isinstance(content, str):
            content = orjson.dumps(content).decode()
        reply = (
            f"Echo: {content}. Reach support at help@upstream.example "
            "or card 4111 1111 1111 1111."
        )
        echo = content == "whoami"
        if echo:
            reply = f"You sent Authorization: {authorization} ."
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": request.get("model", "fake-model"),
        }
        prompt_tokens = _rough_tokens(orjson.dumps(messages).decode())
        if request.get("stream") is True:
            options = request.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            self._stream(meta, reply, (prompt_tokens, _rough_tokens(reply)) if usage else None)
            return
        completion_tokens = _rough_tokens(reply)
        completion = {
            **meta,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        self._send(200, orjson.dumps(completion), headers={"X-Echo-Authorization": authorization} if echo else None)

    def _stream(self, meta: dict[str, Any], reply: str, usage: tuple[int, int] | None = None) -> None:
        """Send ``reply`` as SSE ``chat.completion.chunk`` events, one HTTP chunk each;
        with ``usage`` (prompt, completion tokens), a last chunk reports it, as OpenAI
        does for ``stream_options: {"include_usage": true}``."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in _sse_events(meta, reply, usage):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _sse_events(meta: dict[str, Any], reply: str, usage: tuple[int, int] | None = None) -> Iterator[bytes]:
    """The SSE events of a streamed completion, each ``data: ...\\n\\n``."""

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        doc = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for i in range(0, len(reply), STREAM_PIECE_CHARS):
        yield chunk({"content": reply[i : i + STREAM_PIECE_CHARS]})
    yield chunk({}, "stop")
    if usage is not None:
        doc = {**meta, "object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}
        yield b"data: " + orjson.dumps(doc) + b"\n\n"
    yield b"data: [DONE]\n\n"


class FakeOpenAI:
    """A fake OpenAI-compatible HTTPS server running in a daemon thread.

    Args:
        cert: PEM server certificate (chain) file.
        key: PEM private key file for ``cert``.
        host: address to bind.
        port: TCP port to bind; 0 picks a free one at :meth:`start`.

    Raises:
        OSError, ssl.SSLError: the certificate or key cannot be loaded.
    """

    def __init__(self, cert: Path, key: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._received: list[Received] = []
        self._lock = threading.Lock()

    def start(self) -> Self:
        """Bind and start serving; returns ``self``.

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("FakeOpenAI already started")
        self._server = _Server((self._host, self._requested_port), self._context, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"fake-openai-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket and open connections (idempotent)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: not started.
        """
        if self._server is None:
            raise RuntimeError("FakeOpenAI not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, ``https://localhost:<port>`` (no trailing slash)."""
        return f"https://localhost:{self.port}"

    @property
    def received(self) -> list[Received]:
        """A snapshot (copy) of every request received so far, oldest first."""
        with self._lock:
            return list(self._received)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._received.clear()

    def _record(self, request: Received) -> None:
        with self._lock:
            self._received.append(request)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status (0).

    Prints ``fake OpenAI upstream on https://localhost:PORT`` once listening.
    """
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible HTTPS upstream.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8443, help="TCP port (0 = any free port)")
    parser.add_argument("--cert", type=Path, required=True, help="PEM server certificate")
    parser.add_argument("--key", type=Path, required=True, help="PEM private key")
    args = parser.parse_args(argv)

    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Block before starting the server thread so it inherits the mask and the
    # signals are delivered only to sigwait below.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with FakeOpenAI(args.cert, args.key, args.host, args.port) as upstream:
        print(f"fake OpenAI upstream on {upstream.url}", flush=True)
        signal.sigwait(stop_signals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
