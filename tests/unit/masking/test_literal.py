"""Scrubbing the gateway's own secrets out of what an upstream sends back."""

import pytest

from hoop_addon.masking.literal import StreamScrubber, forms, scrub

KEY = "sk-live/0123456789abcdef"


def test_every_occurrence_and_its_json_escaped_form_is_scrubbed() -> None:
    body = b'{"auth": "Bearer sk-live\\/0123456789abcdef", "again": "sk-live/0123456789abcdef"}'
    assert scrub(body, forms((KEY,))) == (b'{"auth": "Bearer [SCRUBBED]", "again": "[SCRUBBED]"}', 2)


def test_text_without_a_secret_is_unchanged() -> None:
    assert scrub(b"sk-live is a prefix only", forms((KEY,))) == (b"sk-live is a prefix only", 0)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_a_secret_split_across_chunks_is_scrubbed(size: int) -> None:
    data = b"data: key " + KEY.encode() + b" end\n\ndata: sk-l\n\n"
    scrubber = StreamScrubber(forms((KEY,)))
    out = b"".join(scrubber.feed(data[i : i + size]) for i in range(0, len(data), size)) + scrubber.feed(b"", final=True)
    assert out == b"data: key [SCRUBBED] end\n\ndata: sk-l\n\n" and scrubber.count == 1


def test_a_chunk_that_cannot_begin_a_secret_is_not_held() -> None:
    scrubber = StreamScrubber(forms((KEY,)))
    assert scrubber.feed(b"data: {}\n\n") == b"data: {}\n\n"
    assert scrubber.feed(b"data: s") == b"data: "  # "s" may begin the key
    assert scrubber.feed(b"ure\n\n") == b"sure\n\n"


def test_a_secret_too_short_to_tell_from_text_is_not_looked_for() -> None:
    assert forms(("k", "short")) == () and scrub(b"a kind word", forms(("k",))) == (b"a kind word", 0)
