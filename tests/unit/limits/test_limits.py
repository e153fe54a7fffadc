"""Rate-limit counting: sliding windows against a brute-force model (seeded), the
usage providers report, and the `limits:` policy section."""

from __future__ import annotations

import math
import random
import textwrap
from pathlib import Path

import pytest

from hoop_addon.limits.counter import Window
from hoop_addon.limits.usage import StreamUsage, Usage, output_bound, usage_in_body
from hoop_addon.policy.loader import PolicyError, load_policy


def test_windows_agree_with_a_brute_force_count() -> None:
    """Seeded: random charges over time; `used` equals the sum of the charges still in
    the window at slot resolution, and `retry_after` is exactly when a need fits."""
    rng = random.Random(20261202)
    cases = 0
    for _ in range(200):
        span, slots = rng.choice([(60.0, 60), (60.0, 6), (86_400.0, 96)])
        width = span / slots
        window, events, now = Window(span, slots), [], 1_700_000_000.0
        for _ in range(rng.randint(1, 40)):
            now += rng.random() * width * rng.choice([0.1, 1, 5, slots])
            n = rng.randint(1, 9)
            window.add(now, n)
            events.append((int(now // width), n))
            current = int(now // width)
            expected = sum(c for slot, c in events if slot > current - slots)
            assert window.used(now) == expected
            limit, need = rng.randint(1, 60), rng.randint(0, 10)
            wait = window.retry_after(now, need, limit)
            if need > limit:
                assert math.isinf(wait)
                continue
            later = now + wait
            fits = lambda t: sum(c for slot, c in events if slot > int(t // width) - slots) + need <= limit  # noqa: E731
            assert fits(later + 1e-6), (wait, need, limit)
            assert wait == 0 or not fits(later - width / 2)
            cases += 1
    assert cases > 1000


def test_a_release_takes_back_from_its_own_slot_only() -> None:
    """A reservation settled takes back what it added, where it added it: never below
    zero, never from later charges, and nothing once its slot has left the window."""
    window = Window(60.0, 60)
    window.add(100.0, 5)
    window.add(130.0, 7)
    window.release(131.0, 100.0, 50)
    assert window.used(131.0) == 7  # the 5 of second 100 went, the 7 of second 130 stays
    window.release(131.0, 130.5, 3)
    assert window.used(131.0) == 4
    window.add(140.0, 9)
    window.release(195.0, 140.0, 9)  # second 140 is still in the window at 195
    window.release(200.0, 130.0, 4)  # second 130 has left it: nothing to take back
    assert window.used(200.0) == 0 and window.used(195.0) == 0


@pytest.mark.parametrize(
    ("body", "bound"),
    [
        (b'{"max_tokens": 100}', 100),
        (b'{"max_tokens": 100, "max_completion_tokens": 300}', 300),  # the larger
        (b'{"max_completion_tokens": 50, "n": 4}', 200),  # per answer
        (b'{"max_output_tokens": 70}', 70),  # Responses API
        (b'{"generationConfig": {"maxOutputTokens": 80, "candidateCount": 2}}', 160),  # Gemini
        (b'{"generation_config": {"max_output_tokens": 90}}', 90),
        (b'{"options": {"num_predict": 64}}', 64),  # Ollama
        (b'{"options": {"num_predict": -1}}', None),  # no bound
        (b'{"max_tokens": true}', None), (b'{"max_tokens": "100"}', None), (b'{"max_tokens": 0}', None),
        (b'{"max_tokens": 10.5}', None), (b'{"messages": []}', None), (b"[1]", None), (b"not json", None),
    ],
)
def test_output_bound_is_what_a_request_declares(body: bytes, bound: int | None) -> None:
    assert output_bound(body) == bound


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"usage": {"prompt_tokens": 12, "completion_tokens": 30}}', Usage(12, 30)),  # OpenAI chat
        (b'{"usage": {"input_tokens": 7, "output_tokens": 9}}', Usage(7, 9)),  # Anthropic, Responses
        (b'{"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}', Usage(3, 4)),  # Gemini
        (b'data: {"choices": []}\n\ndata: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 8}}\n\ndata: [DONE]\n\n', Usage(5, 8)),
        (b'event: message_start\ndata: {"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}}\n\n'
         b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 42}}\n\n', Usage(10, 42)),
        (b'data: {"type": "response.completed", "response": {"usage": {"input_tokens": 2, "output_tokens": 6}}}\n\n', Usage(2, 6)),
        (b'{"message": {"content": "a"}}\n{"done": true, "prompt_eval_count": 4, "eval_count": 11}\n', Usage(4, 11)),  # Ollama
        # Gemini streamGenerateContent without alt=sse: one JSON array, cumulative counts
        (b'[{"candidates": []},\r\n{\n  "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}\n},\r\n'
         b'{\n  "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 9}\n}]', Usage(3, 9)),
        (b'[{"candidates": []}, 7, "x", null]', None),
        # Gemini's thinking and tool-use prompt tokens are not in the main counts
        (b'{"usageMetadata": {"promptTokenCount": 3, "toolUsePromptTokenCount": 2, "candidatesTokenCount": 4, "thoughtsTokenCount": 40}}',
         Usage(5, 44)),
        # Anthropic's input_tokens leaves out the cached prompt
        (b'{"usage": {"input_tokens": 5, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 3000, "output_tokens": 9}}',
         Usage(4005, 9)),
        (b'{"choices": []}', None),
        (b"not json", None),
    ],
)
def test_usage_is_read_from_every_provider_shape(body: bytes, expected: Usage | None) -> None:
    assert usage_in_body(body) == expected


def test_streamed_usage_is_found_whatever_the_chunk_boundaries() -> None:
    body = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\ndata: {"usage": {"prompt_tokens": 5, "completion_tokens": 8}}\n\n'
    for cut in range(len(body) + 1):
        scanner = StreamUsage()
        scanner.feed(body[:cut])
        scanner.feed(body[cut:])
        scanner.feed(b"", final=True)
        assert scanner.found and scanner.usage == Usage(5, 8), cut
        assert scanner.size == len(body)  # what passed: the estimate when nothing is reported


POLICY = """\
issuers: [{name: idp, issuer: https://idp.example, audience: gw, jwks: https://idp.example/jwks}]
routes:
  - {name: llm, match: {hosts: [api.example]}, allow: {groups: [agents]}}
limits:
"""


def load(tmp_path: Path, limits: str):
    (tmp_path / "p.yaml").write_text(POLICY + textwrap.indent(textwrap.dedent(limits), "  "))
    return load_policy(tmp_path / "p.yaml")


def test_limits_load_and_key_their_counts(tmp_path: Path) -> None:
    policy = load(tmp_path, """\
        - {name: per-agent, requests_per_minute: 60, tokens_per_day: 100000}
        - {name: per-group, per: [group, route], when: {routes: [llm], groups: [agents, ops]}, tokens_per_minute: 500, action: log,
           default_output_tokens: 100}
        - {name: everybody, per: [], requests_per_minute: 1000}
    """)
    per_agent, per_group, everybody = policy.limits
    identity = {"subject": "a1", "issuer": "https://idp.example", "groups": ["agents", "ops", "other"]}
    assert per_agent.keys("llm", identity) == [(("https://idp.example", "a1"),)]
    # the same subject (or client id) at another issuer is another caller: its own count
    assert per_agent.keys("llm", {**identity, "issuer": "https://other.example"}) == [(("https://other.example", "a1"),)]
    assert per_group.keys("llm", identity) == [(("https://idp.example", "agents"), "llm"), (("https://idp.example", "ops"), "llm")]
    assert everybody.keys("llm", identity) == [()]
    assert per_group.action == "log" and per_group.applies("llm", "https://idp.example", "a1", ["ops"]) and not per_group.applies("llm", "https://idp.example", "a1", ["x"])


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ("- {name: x}\n", "needs at least one of"),
        ("- {name: x, requests_per_minute: 0}\n", "must be 1.."),
        ("- {name: x, per: [team], requests_per_minute: 1}\n", "'team' is not one of"),
        ("- {name: x, when: {routes: [nope]}, requests_per_minute: 1}\n", "unknown route 'nope'"),
        ("- {name: x, request_per_minute: 1}\n", "unknown key"),
        ("- {name: x, tokens_per_day: 500}\n", r"default_output_tokens \(1024\) must be below tokens_per_day \(500\)"),
        ("- {name: x, tokens_per_minute: 500, default_output_tokens: 500}\n", "must be below tokens_per_minute"),
        ("- {name: x, tokens_per_minute: 500, default_output_tokens: 0}\n", "must be 1.."),
    ],
)
def test_limit_errors_name_the_line_and_key(tmp_path: Path, limits: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as caught:
        load(tmp_path, limits)
    assert caught.value.line >= 5
