"""What approvers see is inert in every channel (CLI listing, webhook text, mitmproxy
command output), and approval ids never read as command-line options."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from hoop_addon.approvals.inert import inert
from hoop_addon.approvals.queue import new_id
from hoop_addon.approvals.webhook import payload
from hoop_addon.cli.approvals import id_operands
from hoop_addon.cli.main import main, parser

# Every character that controls rather than shows: C0, DEL, C1 (NEL, CSI), the line and
# paragraph separators, the bidi formatting characters (UAX #9).
CONTROLS = [chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028, 0x2029,
                              *range(0x202A, 0x202F), *range(0x2066, 0x206A)]]
HOSTILE = ["\x1b[2J\x1b[1;1HApproved by alice", "ok\u202etxt.exe", "line\x85NEL", "\x9b31mred", "a\rb\nc\td"]


def hostile_texts(seed: int = 17, count: int = 500) -> Iterator[str]:
    """Seeded: printable text with controls, escapes and bidi characters spliced in."""
    rng = random.Random(seed)
    for _ in range(count):
        parts = [rng.choice(["abc", "é", "日本", " ", "`", "<@U1>", "\\", *HOSTILE, *CONTROLS]) for _ in range(rng.randint(1, 12))]
        yield "".join(parts)


def shows_only(text: str) -> bool:
    return not any(ch in text for ch in CONTROLS)


def test_inert_replaces_every_control_by_a_visible_escape() -> None:
    assert inert("\x1b[31m\u202e") == "\\x1b[31m\\u202e"
    assert all(shows_only(inert(ch)) and inert(ch).startswith("\\") for ch in CONTROLS)
    assert inert("plain é 日本 \\ `") == "plain é 日本 \\ `"
    texts = list(hostile_texts())
    assert all(shows_only(inert(t)) for t in texts) and len(texts) == 500


def record(subject: str, preview: str, url: str = "https://api.test/v1/chat") -> dict[str, Any]:
    return {"id": new_id(), "rule": "risky", "mode": "hold", "status": "pending", "requester": {"subject": subject},
            "request": {"route": "llm", "method": "POST", "url": url, "preview": preview},
            "created": "2026-01-01T00:00:00Z", "deadline": "2026-01-01T00:05:00Z", "decisions": [], "min_approvals": 1}


@pytest.mark.parametrize("seed", range(3))
def test_webhook_text_is_inert(seed: int) -> None:
    for text in hostile_texts(seed, 200):
        body = payload(record(text, text, f"https://api.test/{text}"), None)
        assert shows_only(body["text"].replace("\n", "")) and body["text"].count("\n") == 4


class Control(ThreadingHTTPServer):
    """A control API answering `GET /approvals` with the given records."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = orjson.dumps({"approvals": records})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_cli_listing_is_inert(capsys: pytest.CaptureFixture[str]) -> None:
    records = [record(text, text) for text in hostile_texts(5, 50)]
    server = Control(records)
    try:
        code = main(["approvals", "list", "--url", f"http://127.0.0.1:{server.server_address[1]}", "--token", "t"])
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert code == 0
    assert shows_only(out.replace("\n", "")) and out.count("\n") == 2 * len(records)


def test_ids_never_start_with_a_dash() -> None:
    ids = [new_id() for _ in range(20000)]  # about 300 would, at 1 in 64
    assert not any(i.startswith("-") for i in ids) and all(len(i) == 16 for i in ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("argv", [
    ["approvals", "approve", "-abcDEF0123456789"],
    ["approvals", "deny", "-abcDEF0123456789", "--reason", "-x"],
    ["approvals", "approve", "--reason", "why", "-abcDEF0123456789"],
    ["approvals", "approve", "--url", "http://x", "-abcDEF0123456789", "--token=t"],
])
def test_an_id_starting_with_a_dash_is_read_as_the_id(argv: list[str]) -> None:
    args = parser().parse_args(id_operands(argv))
    assert args.id == "-abcDEF0123456789"
    assert args.reason in ("", "why", "-x")
