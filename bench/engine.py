"""Benchmark of the masking engine alone (no proxy): MB/s of `mask_body` on 8 KB,
64 KB and 1 MB bodies of ordinary English text, with few and with many sensitive
values, as plain text, as an OpenAI chat request (JSONPath rule), as a streamed
completion (`text/event-stream`, fed in 1 KB network chunks through the SSE masker),
and as an OTLP/HTTP trace export (protobuf and OTLP/JSON; a rule without paths: every
string value; spans of 1 KB, conversations as JSON in `gen_ai.input.messages`).

Run: `make bench-engine` (or `python bench/engine.py [--seconds S]`). Prints one
line per case; "typical text" is the plain-text row with few matches.
"""

from __future__ import annotations

import argparse
import random
import time

import jsonpath_rfc9535
import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from hoop_addon.masking.detectors import BUILTIN
from hoop_addon.masking.body import mask_body
from hoop_addon.masking.engine import Evidence, MaskContext
from hoop_addon.masking.otlp import parse_protobuf, to_dict
from hoop_addon.masking.sse import EventStreamMasker
from hoop_addon.policy.model import MaskRule

DETECTORS = ("email", "phone", "payment_card", "us_ssn", "iban", "ipv4", "aws_access_key_id", "openai_api_key", "github_token", "jwt")
SIZES = {"8 KB": 8 * 1024, "64 KB": 64 * 1024, "1 MB": 1024 * 1024}
WORDS = (
    "the of and to in is was for on that with as by at from it his an were are which this be or has had "
    "not but also its after first new have one two their who been they more other all she her time year "
    "gateway request response model agent tool token stream version release build deploy service cluster "
    "2025-11-25T04:30:03Z v1.2.3 3.12.1 da39a3ee5e6b 200 404 8080 12:30:45 #1234 order-5521 https://docs.example.org/a/b"
).split()
SECRETS = ("jane.doe@example.com", "4111 1111 1111 1111", "078-05-1120", "+1 415 555 2671", "AKIAIOSFODNN7EXAMPLE")


def text(size: int, every: int, rng: random.Random) -> str:
    """About `size` bytes of prose with a sensitive value every `every` bytes."""
    out, n, next_secret = [], 0, every
    while n < size:
        word = rng.choice(SECRETS) if n >= next_secret else rng.choice(WORDS)
        if n >= next_secret:
            next_secret += every
        out.append(word)
        n += len(word) + 1
    return " ".join(out)


def rule(*paths: str) -> MaskRule:
    return MaskRule(
        "bench", frozenset({"request", "response"}), tuple((p, jsonpath_rfc9535.compile(p)) for p in paths),
        tuple(BUILTIN[d] for d in DETECTORS),
    )


def sse(body: str) -> bytes:
    pieces = [body[i : i + 16] for i in range(0, len(body), 16)]
    return b"".join(
        b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}) + b"\n\n" for p in pieces
    ) + b"data: [DONE]\n\n"


def otlp_export(body: str, rng: random.Random) -> bytes:
    """An ExportTraceServiceRequest (protobuf) carrying `body` in spans of about 1 KB."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="agent")))
    spans = rs.scope_spans.add().spans
    for i in range(0, len(body), 900):
        span = spans.add(name="chat model", kind=3, start_time_unix_nano=1_700_000_000_000_000_000 + i)
        span.trace_id, span.span_id = rng.randbytes(16), rng.randbytes(8)
        messages = orjson.dumps([{"role": "user", "content": body[i : i + 900]}]).decode()
        for key, value in (("gen_ai.input.messages", messages), ("gen_ai.request.model", "m"), ("user.id", str(i))):
            span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
        span.attributes.append(KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(int_value=i)))
    return req.SerializeToString()


def throughput(fn, size: int, seconds: float) -> float:
    fn()  # warm up: scanners compile on first use
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        runs += 1
    return size * runs / elapsed / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per case")
    args = parser.parse_args(argv)
    rng = random.Random(7)
    plain, chat, delta = rule(), rule("$.messages[*].content"), rule("$.choices[*].delta.content")
    print(f"masking engine, {len(DETECTORS)} detectors; MB/s of input body")
    print(f"{'shape':<14}{'matches':<10}" + "".join(f"{s:>10}" for s in SIZES))
    for density, every in (("few", 4096), ("many", 128)):
        rows: dict[str, list[float]] = {"text": [], "json (chat)": [], "sse stream": [], "otlp protobuf": [], "otlp json": []}
        for size in SIZES.values():
            body = text(size, every, rng)
            raw = body.encode()
            rows["text"].append(throughput(lambda: mask_body(raw, "text/plain", [plain], "request"), len(raw), args.seconds))
            doc = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": body}]})
            rows["json (chat)"].append(throughput(lambda: mask_body(doc, "application/json", [chat], "request"), len(doc), args.seconds))
            stream = sse(body)

            def streamed() -> None:
                masker = EventStreamMasker([delta], MaskContext(), Evidence())
                for i in range(0, len(stream), 1024):
                    masker.feed(stream[i : i + 1024])
                masker.feed(b"", final=True)

            rows["sse stream"].append(throughput(streamed, len(stream), args.seconds))
            export = otlp_export(body, rng)
            rows["otlp protobuf"].append(throughput(
                lambda: mask_body(export, "application/x-protobuf", [plain], "request", path="/v1/traces"), len(export), args.seconds))
            as_json = orjson.dumps(to_dict(parse_protobuf(export, ExportTraceServiceRequest)))
            rows["otlp json"].append(throughput(
                lambda: mask_body(as_json, "application/json", [plain], "request", path="/v1/traces"), len(as_json), args.seconds))
        for shape, figures in rows.items():
            print(f"{shape:<14}{density:<10}" + "".join(f"{f:>10.1f}" for f in figures))
        per_event = len(stream) / stream.count(b"\n\n") / (rows["sse stream"][-1] * 1e6) * 1e6
        print(f"{'':<24}sse: {per_event:.0f} us per event of 16 characters ({density} matches)")


if __name__ == "__main__":
    main()
