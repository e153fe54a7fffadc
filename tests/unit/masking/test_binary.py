"""Binary bodies are never masked as text (issue 16, item 5): the codec is chosen by
Content-Type first; a binary type with no codec is refused naming the type, and a
multipart upload's binary part passes untouched while its text parts are masked."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from hoop_addon.masking.body import UnsupportedMedia, is_binary, mask_body
from tests.support.masking import EMAIL, PII

PROTOBUF = b"\x0a\x14" + EMAIL.encode() + b"\x10\x01"  # valid UTF-8: read as text, its length prefix would break


@pytest.mark.parametrize("ctype", [
    "application/x-protobuf", "application/protobuf", "application/grpc", "application/grpc+proto",
    "application/grpc-web+proto", "application/octet-stream", "image/png", "image/jpeg", "audio/mpeg", "video/mp4",
    "application/pdf", "application/zip", "application/msgpack", "application/cbor", "font/woff2",
    "Application/X-Protobuf; charset=utf-8",
])
def test_a_binary_body_is_refused_naming_its_type(ctype: str) -> None:
    with pytest.raises(UnsupportedMedia, match="binary and cannot be inspected") as raised:
        mask_body(PROTOBUF, ctype, [PII], "request")
    assert raised.value.media_type == ctype.split(";")[0].lower()


@pytest.mark.parametrize("ctype", ["image/svg+xml", "text/plain", "application/json", "application/xml", "text/csv", ""])
def test_text_types_are_not_binary(ctype: str) -> None:
    assert not is_binary(ctype)


def test_a_shadow_rule_alone_never_refuses_a_binary_body() -> None:
    assert mask_body(PROTOBUF, "application/x-protobuf", [dataclasses.replace(PII, action="log")], "request") == (None, [])


def multipart(*parts: tuple[str, bytes]) -> tuple[str, bytes]:
    body = b""
    for head, content in parts:
        body += b"--XyZ\r\n" + head.encode() + b"\r\n\r\n" + content + b"\r\n"
    return "multipart/form-data; boundary=XyZ", b"preamble\r\n" + body + b"--XyZ--\r\nepilogue"


def test_a_multipart_binary_part_passes_untouched_and_text_parts_are_masked() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\xff" + EMAIL.encode()
    ctype, body = multipart(
        ('Content-Disposition: form-data; name="note"', f"to {EMAIL}".encode()),
        ('Content-Disposition: form-data; name="img"; filename="a.png"\r\nContent-Type: image/png', png),
        ('Content-Disposition: form-data; name="m"\r\nContent-Type: application/json', b'{"o":"jane.doe\\u0040example.com"}'),
    )

    new, records = mask_body(body, ctype, [PII], "request")

    assert new is not None
    assert new == body.replace(f"to {EMAIL}".encode(), b"to [REDACTED:EMAIL]").replace(
        b'{"o":"jane.doe\\u0040example.com"}', b'{"o":"[REDACTED:EMAIL]"}')
    assert png in new and records[0]["count"] == 2


def test_a_base64_part_is_decoded_masked_and_encoded_again() -> None:
    encoded = base64.encodebytes(f"from {EMAIL} ".encode() * 6).replace(b"\n", b"\r\n").strip()
    ctype, body = multipart(('Content-Type: text/plain\r\nContent-Transfer-Encoding: base64', encoded))

    new, _ = mask_body(body, ctype, [PII], "request")

    content = new.split(b"\r\n\r\n", 1)[1].split(b"\r\n--XyZ")[0]
    assert base64.b64decode(b"".join(content.split())) == b"from [REDACTED:EMAIL] " * 6


def test_a_filename_is_masked_as_text() -> None:
    ctype, body = multipart((f'Content-Disposition: form-data; name="f"; filename="{EMAIL}.txt"', b"hi"))
    new, _ = mask_body(body, ctype, [PII], "request")
    assert new is not None and EMAIL.encode() not in new and b'filename="[REDACTED:EMAIL]"' in new  # `.txt` reads as a top-level domain


@pytest.mark.parametrize(("ctype", "body", "reason"), [
    ("multipart/form-data", b"--a\r\n\r\nx\r\n--a--", "no valid boundary"),
    ("multipart/form-data; boundary=a", b"--a\r\n\r\nx", "no closing delimiter"),
    ("multipart/form-data; boundary=a", b"no parts at all", "no part"),
    ("multipart/form-data; boundary=a", b"--a\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n--a--", "base64"),
])
def test_a_malformed_multipart_body_is_refused(ctype: str, body: bytes, reason: str) -> None:
    with pytest.raises(Exception, match=reason):
        mask_body(body, ctype, [PII], "request")
