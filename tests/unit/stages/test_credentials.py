"""The credential stage scrubs a key the upstream echoes, wherever the response goes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from hoop_addon.masking.detectors import BUILTIN
from hoop_addon.policy.model import Credential, MaskRule, Route, Names
from hoop_addon.stages import hoop, mark_admitted
from hoop_addon.stages.credentials import InjectCredential
from hoop_addon.stages.mask import Mask
from tests.support.hooks import call

KEY = "sk-upstream-real-key-0123456789abcdef"
TOKENIZE = MaskRule("tok", frozenset({"request", "response"}), (), (BUILTIN["email"],), operator="tokenize")
ROUTE = Route("llm", ("*",), ("/*",), frozenset(), Names(frozenset({"agents"})), Names(), (TOKENIZE,),
              Credential("Authorization", f"Bearer {KEY}", secrets=(KEY,)))


@pytest.fixture
def stages() -> Iterator[tuple[Mask, InjectCredential]]:
    mask = Mask()
    inject = InjectCredential(mask)
    with taddons.context(mask, inject) as tctx:
        tctx.options.add_option("store_streamed_bodies", bool, True, "a core proxy option")
        yield mask, inject


def sent(mask: Mask, inject: InjectCredential) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.headers["Content-Type"] = "application/json"
    flow.request.content = b'{"m": "mail a@example.com"}'
    mark_admitted(flow, ROUTE)
    hoop(flow)["identity"] = {"subject": "agent"}
    call(mask.request, flow)
    inject.request(flow)
    return flow


def test_a_streamed_echo_is_scrubbed_for_the_client_and_the_recording(stages: tuple[Mask, InjectCredential]) -> None:
    """Mask keeps the unrestored stream for the recording (tokens restored for the
    client): both copies lose the key."""
    mask, inject = stages
    flow = sent(mask, inject)
    token = flow.request.content.decode().split("mail ")[1].split('"')[0]
    flow.response = http.Response.make(200, b"", {"Content-Type": "text/event-stream"})
    mask.responseheaders(flow)
    inject.responseheaders(flow)
    event = f'data: {{"choices":[{{"delta":{{"content":"hi {token} key {KEY} ok"}}}}]}}\n\n'.encode()
    client = b"".join(flow.response.stream(event)) + b"".join(flow.response.stream(b""))
    call(mask.response, flow)
    inject.response(flow)

    assert KEY.encode() not in client and b"[SCRUBBED]" in client and b"a@example.com" in client
    assert KEY.encode() not in flow.response.content and b"[SCRUBBED]" in flow.response.content


@pytest.mark.parametrize(("encoding", "size"), [("", 20 << 20), ("compress", 100)], ids=["large-download", "unread-encoding"])
def test_a_body_that_cannot_be_decoded_to_check_still_passes(stages: tuple[Mask, InjectCredential], encoding: str, size: int) -> None:
    mask, inject = stages
    flow = sent(mask, inject)
    body = b"x" * size
    flow.response = http.Response.make(200, b"", {"Content-Type": "application/octet-stream", **({"Content-Encoding": encoding} if encoding else {})})
    flow.response.raw_content = body
    inject.responseheaders(flow)
    inject.response(flow)

    assert flow.response.status_code == 200 and flow.response.raw_content == body
