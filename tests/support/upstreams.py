"""Local upstreams for the end-to-end tests: HTTPS servers on 127.0.0.1 that serve in
daemon threads, started and stopped by the tests."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path


def https_server(
    handler: type[http.server.BaseHTTPRequestHandler], cert: Path, key: Path, host: str = "localhost"
) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A `ThreadingHTTPServer` running `handler` over TLS (`cert`, `key`: PEM files) on
    127.0.0.1, any free port, serving in a daemon thread: (server, base URL
    `https://<host>:<port>`). Stop it with `server.shutdown(); server.server_close()`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://{host}:{server.server_address[1]}"


def serve_connections(listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept connections on `listener` in a daemon thread until it is closed, each one
    given to `handle` (the raw socket) in a daemon thread of its own."""

    def accept() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(raw,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
