"""The token usage LLM providers report, from a response body or as a stream passes
(pure: bytes and JSON in, counts out).

Where each provider puts it:
- OpenAI Chat Completions: `usage.prompt_tokens` / `usage.completion_tokens`; streamed,
  in the last chunk when the request asks for it (`stream_options.include_usage`).
- OpenAI Responses: `usage.input_tokens` / `usage.output_tokens`; streamed, in the
  `response.completed` event's `response.usage`.
- Anthropic Messages: `usage.input_tokens` / `usage.output_tokens`; streamed,
  `message_start`'s `message.usage` and `message_delta`'s `usage` (cumulative). Its
  `input_tokens` leaves out the prompt read from or written to the prompt cache
  (`cache_read_input_tokens`, `cache_creation_input_tokens`): they are added.
- Gemini: `usageMetadata.promptTokenCount` (+ `toolUsePromptTokenCount`) /
  `candidatesTokenCount` + `thoughtsTokenCount` (the thinking tokens, billed as output,
  are not in the candidates' count); `streamGenerateContent` without `alt=sse` answers
  one JSON array of responses whose counts are cumulative.
- Ollama (NDJSON): `prompt_eval_count` / `eval_count` in the final line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# (prompt fields, completion fields) of each provider's usage object: a count is the
# sum of the fields present (None when none is).
_FIELDS = (
    (("prompt_tokens",), ("completion_tokens",)),
    (("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"), ("output_tokens",)),
    (("promptTokenCount", "toolUsePromptTokenCount"), ("candidatesTokenCount", "thoughtsTokenCount")),
)
_HINTS = (b"usage", b"TokenCount", b"eval_count")


@dataclass(slots=True)
class Usage:
    """Tokens a provider reported: `prompt` (input) and `completion` (output); None for
    a count it did not report."""

    prompt: int | None = None
    completion: int | None = None

    def merge(self, other: Usage) -> None:
        """Take the larger of each count (streamed counts are cumulative)."""
        for name in ("prompt", "completion"):
            theirs = getattr(other, name)
            if theirs is not None and (getattr(self, name) is None or theirs > getattr(self, name)):
                setattr(self, name, theirs)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _sum(holder: dict[str, Any], fields: tuple[str, ...]) -> int | None:
    counts = [c for f in fields if (c := _count(holder.get(f))) is not None]
    return sum(counts) if counts else None


def usage_of(doc: Any) -> Usage | None:
    """The usage a JSON response document (or one streamed event) reports, or None. A
    JSON array (Gemini's streamed responses in one body) reports the merge of its
    items' counts (they are cumulative)."""
    if isinstance(doc, list):
        found = Usage()
        for item in doc:
            if (usage := _usage_of_object(item)) is not None:
                found.merge(usage)
        return found if found.prompt is not None or found.completion is not None else None
    return _usage_of_object(doc)


def _usage_of_object(doc: Any) -> Usage | None:
    if not isinstance(doc, dict):
        return None
    found = Usage()
    for holder in (doc.get("usage"), doc.get("usageMetadata"), (doc.get("message") or {}).get("usage")
                   if isinstance(doc.get("message"), dict) else None,
                   (doc.get("response") or {}).get("usage") if isinstance(doc.get("response"), dict) else None):
        if not isinstance(holder, dict):
            continue
        for prompt, completion in _FIELDS:
            found.merge(Usage(_sum(holder, prompt), _sum(holder, completion)))
    if "eval_count" in doc or "prompt_eval_count" in doc:
        found.merge(Usage(_count(doc.get("prompt_eval_count")), _count(doc.get("eval_count"))))
    return found if found.prompt is not None or found.completion is not None else None


def usage_in_body(body: bytes) -> Usage | None:
    """The usage a whole response body reports: JSON, an SSE stream or NDJSON (the
    counts of every event merged). None when there is none or the body is not JSON."""
    try:
        return usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        pass
    scanner = StreamUsage()
    scanner.feed(body, final=True)
    return scanner.usage if scanner.found else None


class StreamUsage:
    """Reads the usage out of a response as it streams, SSE (`data:` lines) or NDJSON,
    without holding it back: `feed(chunk)` looks at whole lines only, and parses just
    those that can hold a count. `usage` is the merged result; `found` whether any
    event reported usage; `size` the bytes fed (what passed, for an estimate when
    nothing is reported); `upstream_size` is for the caller to count the bytes the
    upstream sent (still content-encoded; more than `size` when a stage before stopped
    passing them on)."""

    def __init__(self) -> None:
        self.usage = Usage()
        self.found = False
        self.size = self.upstream_size = 0
        self._partial = b""

    def feed(self, chunk: bytes, final: bool = False) -> None:
        self.size += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = b"" if final else lines.pop()
        for line in lines:
            if any(h in line for h in _HINTS):
                self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if line.startswith(b"data:"):
            line = line[5:].strip()
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if (found := usage_of(doc)) is not None:
            self.usage.merge(found)
            self.found = True


def output_bound(body: bytes) -> int | None:
    """The most output tokens a JSON request body lets the model produce, or None
    when it declares no bound (or is not a JSON object): the largest of OpenAI's
    `max_tokens` / `max_completion_tokens`, the Responses API's `max_output_tokens`,
    Anthropic's `max_tokens`, Gemini's `generationConfig.maxOutputTokens` and Ollama's
    `options.num_predict` (positive integers only), times the number of answers asked
    for (OpenAI's `n`, Gemini's `candidateCount`: the bound is per answer)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    bounds = [doc.get("max_tokens"), doc.get("max_completion_tokens"), doc.get("max_output_tokens")]
    answers = [doc.get("n")]
    for name in ("generationConfig", "generation_config"):  # protobuf JSON accepts both spellings
        if isinstance(config := doc.get(name), dict):
            bounds += [config.get("maxOutputTokens"), config.get("max_output_tokens")]
            answers += [config.get("candidateCount"), config.get("candidate_count")]
    if isinstance(options := doc.get("options"), dict):
        bounds.append(options.get("num_predict"))  # -1 (no limit) and -2 (fill the context) are no bound
    declared = [b for value in bounds if (b := _count(value))]
    if not declared:
        return None
    return max(declared) * max([a for value in answers if (a := _count(value))] or [1])
