"""A fake LLM upstream (OpenAI- and Anthropic-compatible), over HTTPS or plain HTTP,
for the demo, the first run, the tests and benchmarks.

Endpoints:

* ``POST /v1/chat/completions``: echoes the last message back, with planted
  PII (an e-mail address and a card number) so response masking can be
  tested; ``"stream": true`` gives server-sent events over chunked encoding.
  A last message of ``whoami`` is answered with the request's Authorization
  header, in the reply and in an ``X-Echo-Authorization`` header, as a debug
  endpoint or a careless error message would.
* ``POST /v1/responses``: OpenAI's Responses API (``input`` as a string or messages,
  ``instructions``), the same echo as one ``output_text``; ``"stream": true`` gives
  its typed events (``response.created``, ``response.output_text.delta`` ...
  ``response.completed``).
* ``POST /v1/messages``: Anthropic's Messages API (``system``, ``messages`` with
  string or text-block content), the same echo as one text block; ``"stream": true``
  gives its events (``message_start``, ``content_block_delta`` ... ``message_stop``).
* ``POST /v1/echo``: returns the request body with the same Content-Type.
* ``POST /v1/traces``, ``POST /v1/logs``: an OTLP/HTTP collector (a trace store): the
  export request is parsed with ``opentelemetry-proto``, protobuf (``gzip`` too) or
  OTLP/JSON, and answered as OTLP/HTTP answers (an empty export response, in the
  request's encoding); a body that does not parse gets 400.
* ``GET /healthz``: ``ok``.
* anything else: 404 with an OpenAI-style JSON error.

Run standalone with ``hoop dev-upstream`` (plain HTTP on 127.0.0.1:9000) or
``python -m hoop_addon.dev.upstream --cert C --key K`` (HTTPS).
"""

from __future__ import annotations

import argparse
import gzip
import http.server
import signal
import socket
import ssl
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import orjson

from hoop_addon.masking import otlp
from hoop_addon.masking.engine import MaskError

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

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext | None, owner: FakeOpenAI) -> None:
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
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self.connections_lock:
            self.connections.add(sock)
        return sock, address

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
        if isinstance(self.request, ssl.SSLSocket):
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
        elif route == ("POST", "/v1/responses"):
            self._responses(body)
        elif route == ("POST", "/v1/messages"):
            self._messages(body)
        elif route == ("POST", "/v1/echo"):
            self._send(200, body, self.headers.get("Content-Type", "application/octet-stream"))
        elif self.command == "POST" and route[1] in otlp.SIGNALS:
            self._otlp(route[1], body)
        elif route == ("GET", "/healthz"):
            self._send(200, b"ok", "text/plain")
        else:
            self._send(404, _error_body(f"Unknown route: {self.command} {self.path}", "not_found"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle

    def _otlp(self, path: str, body: bytes) -> None:
        """Collect an OTLP/HTTP export (OTLP spec, "OTLP/HTTP"): 200 with the empty
        export response when it parses, else 400 (as a collector refuses it)."""
        request, response = otlp.SIGNALS[path]
        mime = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        try:
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            if mime in otlp.PROTOBUF_TYPES:
                otlp.parse_protobuf(body, request)
                self._send(200, response().SerializeToString(), "application/x-protobuf")
            else:
                otlp.parse_json(orjson.loads(body), request)
                self._send(200, b"{}", "application/json")
        except (MaskError, OSError, EOFError, zlib.error, orjson.JSONDecodeError) as exc:
            self._send(400, _error_body(f"not an OTLP {request.DESCRIPTOR.name}: {exc}"))

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
        reply = _echo(content)
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

    def _request_json(self, body: bytes, messages_key: str) -> dict[str, Any] | None:
        """The JSON request with a non-empty list at ``messages_key`` (``None``: the
        request was answered with a 400)."""
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            self._send(400, _error_body(f"Invalid JSON body: {e}"))
            return None
        items = request.get(messages_key) if isinstance(request, dict) else None
        if not (isinstance(items, list) and items) and not (messages_key == "input" and isinstance(items, str)):
            self._send(400, _error_body(f"'{messages_key}' must be a non-empty array"))
            return None
        return request

    def _responses(self, body: bytes) -> None:
        """Answer an OpenAI Responses API request, streamed or not."""
        if (request := self._request_json(body, "input")) is None:
            return
        items = request["input"]
        reply = _echo(items if isinstance(items, str) else _text(items[-1].get("content") if isinstance(items[-1], dict) else items[-1]))
        prompt_tokens = _rough_tokens(orjson.dumps(items).decode())
        response = {
            "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
            "model": request.get("model", "fake-model"), "status": "completed",
            "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": reply, "annotations": []}]}],
            "usage": {"input_tokens": prompt_tokens, "output_tokens": _rough_tokens(reply),
                      "total_tokens": prompt_tokens + _rough_tokens(reply)},
        }
        if request.get("stream") is not True:
            self._send(200, orjson.dumps(response))
            return
        item = response["output"][0]["id"]
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": {**response, "status": "in_progress", "output": []}}),
        ]
        events += [("response.output_text.delta", {"item_id": item, "output_index": 0, "content_index": 0,
                                                   "delta": reply[i : i + STREAM_PIECE_CHARS]})
                   for i in range(0, len(reply), STREAM_PIECE_CHARS)]
        events += [("response.output_text.done", {"item_id": item, "output_index": 0, "content_index": 0, "text": reply}),
                   ("response.completed", {"response": response})]
        self._send_events(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps({"type": name, "sequence_number": n, **doc}))
                          for n, (name, doc) in enumerate(events))

    def _messages(self, body: bytes) -> None:
        """Answer an Anthropic Messages API request, streamed or not."""
        if (request := self._request_json(body, "messages")) is None:
            return
        last = request["messages"][-1]
        reply = _echo(_text(last.get("content") if isinstance(last, dict) else last))
        prompt_tokens = _rough_tokens(orjson.dumps([request.get("system"), request["messages"]]).decode())
        message = {
            "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "model": request.get("model", "fake-model"), "content": [{"type": "text", "text": reply}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": _rough_tokens(reply)},
        }
        if request.get("stream") is not True:
            self._send(200, orjson.dumps(message))
            return
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"message": {**message, "content": [], "stop_reason": None,
                                           "usage": {"input_tokens": prompt_tokens, "output_tokens": 1}}}),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ]
        events += [("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": reply[i : i + STREAM_PIECE_CHARS]}})
                   for i in range(0, len(reply), STREAM_PIECE_CHARS)]
        events += [("content_block_stop", {"index": 0}),
                   ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                      "usage": {"output_tokens": _rough_tokens(reply)}}),
                   ("message_stop", {})]
        self._send_events(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps({"type": name, **doc}))
                          for name, doc in events)

    def _send_events(self, events: Iterator[bytes]) -> None:
        """Send SSE ``events`` (each a complete event), one HTTP chunk each."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stream(self, meta: dict[str, Any], reply: str, usage: tuple[int, int] | None = None) -> None:
        """Send ``reply`` as SSE ``chat.completion.chunk`` events, one HTTP chunk each;
        with ``usage`` (prompt, completion tokens), a last chunk reports it, as OpenAI
        does for ``stream_options: {"include_usage": true}``."""
        self._send_events(_sse_events(meta, reply, usage))


def _text(content: Any) -> str:
    """The text of a message's content: a string, or the ``text`` of its content blocks
    (OpenAI ``input_text`` parts, Anthropic ``text`` blocks); else its JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return " ".join(p["text"] for p in content)
    return orjson.dumps(content).decode()


def _echo(content: str) -> str:
    """The reply to ``content``: it, echoed, with planted PII for response masking."""
    return f"Echo: {content}. Reach support at help@upstream.example or card 4111 1111 1111 1111."


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
    """A fake OpenAI- and Anthropic-compatible server running in a daemon thread.

    Args:
        cert: PEM server certificate (chain) file; None serves plain HTTP.
        key: PEM private key file for ``cert`` (None with ``cert``).
        host: address to bind.
        port: TCP port to bind; 0 picks a free one at :meth:`start`.

    Raises:
        OSError, ssl.SSLError: the certificate or key cannot be loaded.
    """

    def __init__(self, cert: Path | None, key: Path | None, host: str = "127.0.0.1", port: int = 0) -> None:
        self._context: ssl.SSLContext | None = None
        if cert is not None:
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
        """Base URL, ``https://localhost:<port>`` (plain HTTP: ``http://127.0.0.1:<port>``;
        no trailing slash)."""
        return f"https://localhost:{self.port}" if self._context else f"http://127.0.0.1:{self.port}"

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


def register(sub: Any) -> None:
    """Add `dev-upstream` to the `hoop` subcommands (`sub`: argparse subparsers)."""
    p = sub.add_parser("dev-upstream", help="serve the fake OpenAI/Anthropic upstream (offline first run, demos)",
                       description="A fake LLM upstream: chat completions, Responses and Messages APIs, echoing with planted PII.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000, help="TCP port (default 9000; 0 = any free port)")
    p.add_argument("--cert", type=Path, help="PEM server certificate: serve HTTPS (with --key)")
    p.add_argument("--key", type=Path, help="PEM private key of --cert")
    p.set_defaults(run=serve)


def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; returns the exit status (0; 2 for --cert without
    --key or the reverse). Prints ``fake LLM upstream on URL`` once listening."""
    if (args.cert is None) != (args.key is None):
        print("error: --cert and --key go together", file=sys.stderr)
        return 2
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # Block before starting the server thread so it inherits the mask and the
    # signals are delivered only to sigwait below.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with FakeOpenAI(args.cert, args.key, args.host, args.port) as upstream:
        print(f"fake LLM upstream on {upstream.url}", flush=True)
        signal.sigwait(stop_signals)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hoop_addon.dev.upstream`: as `hoop dev-upstream`."""
    parser = argparse.ArgumentParser(prog="python -m hoop_addon.dev.upstream")
    register(parser.add_subparsers(dest="command", required=True))
    return serve(parser.parse_args(["dev-upstream", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
