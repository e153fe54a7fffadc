"""Bounded, incremental decoding of content-encoded bodies (RFC 9110 §8.4.1): gzip,
deflate (zlib-wrapped or raw), br (RFC 7932), zstd (RFC 8878).

A body is inspected decoded, and a small compressed body can decode to gigabytes (a
decompression bomb), so output is produced at most `limit` bytes at a time and refused
past `limit` in total, before it is ever held in memory.
"""

from __future__ import annotations

import zlib

import brotli

try:
    from compression import zstd  # Python 3.14
except ImportError:  # pragma: no cover - the backport mitmproxy depends on
    from backports import zstd  # type: ignore[no-redef]

from hoop_addon.masking.engine import MaskError

_STEP = 64 * 1024


class BodyTooLarge(MaskError):
    """The body decodes to more than the limit (a decompression bomb, or just too big)."""


def identity_encoded(encoding: str) -> bool:
    """True when a Content-Encoding value (RFC 9110 §8.4) names no coding: empty or
    `identity`, in any case and white space."""
    return encoding.strip().lower() in ("", "identity")


class Decoder:
    """Decodes one body fed in chunks. `encoding` is the Content-Encoding value
    (`identity` or empty for none; gzip, x-gzip, deflate, br or zstd, else `MaskError`); `limit`
    is the most decoded bytes accepted (`MaskError` past it: a decompression bomb).
    `feed(chunk)` returns the decoded bytes so far; `feed(b"")` ends the body and
    raises `MaskError` if it was truncated or corrupt. Data after the end of the
    compressed stream (a second gzip member, zstd frame or brotli stream) raises
    `MaskError`: only a body decoded whole is inspected."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding.strip().lower()
        self.limit, self.total = limit, 0
        if identity_encoded(self.encoding):
            self._feed = self._identity
        elif self.encoding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(31)
            self._feed = self._zlib
        elif self.encoding == "deflate":
            self._z = None  # zlib-wrapped or raw: decided on the first byte
            self._feed = self._zlib
        elif self.encoding == "br":
            self._br = brotli.Decompressor()
            self._feed = self._brotli
        elif self.encoding == "zstd":
            self._zs = zstd.ZstdDecompressor()
            self._feed = self._zstd
        else:
            raise MaskError(f"content-encoding '{encoding}' cannot be inspected")

    def feed(self, chunk: bytes) -> bytes:
        try:
            out = self._feed(chunk)
        except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as exc:
            raise MaskError(f"{self.encoding} body is corrupt ({type(exc).__name__})") from None
        return out

    def _grow(self, out: bytes) -> bytes:
        self.total += len(out)
        if self.total > self.limit:
            raise BodyTooLarge(f"decoded body exceeds {self.limit} bytes")
        return out

    def _identity(self, chunk: bytes) -> bytes:
        return self._grow(chunk)

    def _zlib(self, chunk: bytes) -> bytes:
        if self._z is None:
            if not chunk:
                return b""
            self._z = zlib.decompressobj(15 if chunk[0] & 0x0F == 8 else -15)
        parts = []
        data = chunk
        while True:
            parts.append(self._grow(self._z.decompress(data, _STEP)))
            if self._z.unused_data:
                raise _trailing(self.encoding)
            data = self._z.unconsumed_tail
            if not data:
                break
        if not chunk:
            parts.append(self._grow(self._z.flush()))
            if not self._z.eof:
                raise MaskError(f"{self.encoding} body is truncated")
        return b"".join(parts)

    def _brotli(self, chunk: bytes) -> bytes:
        parts = [self._grow(self._br.process(chunk, output_buffer_limit=_STEP))]
        while not self._br.can_accept_more_data():
            parts.append(self._grow(self._br.process(b"", output_buffer_limit=_STEP)))
        if not chunk and not self._br.is_finished():
            raise MaskError("br body is truncated")
        return b"".join(parts)

    def _zstd(self, chunk: bytes) -> bytes:
        if chunk and self._zs.eof:
            raise _trailing("zstd")
        parts = []
        data = chunk
        while not self._zs.eof:
            parts.append(self._grow(self._zs.decompress(data, _STEP)))
            data = b""
            if self._zs.needs_input:
                break
        if self._zs.unused_data:
            raise _trailing("zstd")
        if not chunk and not self._zs.eof:
            raise MaskError("zstd body is truncated")
        return b"".join(parts)


def _trailing(encoding: str) -> MaskError:
    # A second gzip member or zstd frame: recipients differ on whether they read it
    # (Python's gzip and mitmproxy do), so what was inspected might not be what is read.
    return MaskError(f"{encoding} body has data after its end (a second member or frame) and cannot be inspected")


def decode(body: bytes, encoding: str, limit: int) -> bytes:
    """The whole `body` decoded from `encoding`; `MaskError` past `limit` bytes or on
    a corrupt body."""
    decoder = Decoder(encoding, limit)
    return decoder.feed(body) + decoder.feed(b"")
