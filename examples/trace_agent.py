"""A minimal instrumented agent: two spans with the OpenTelemetry GenAI conventions,
exported with the official OTLP/HTTP exporter (protobuf).

It knows nothing about the gateway: the standard OpenTelemetry environment points it there.
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:8090          the gateway's base URL (+ /v1/traces)
    OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20<JWT>    the gateway token (percent-encoded space)
    OTEL_EXPORTER_OTLP_COMPRESSION=gzip                        optional
Prints one JSON object: {"exported": "SUCCESS" | "FAILURE", "spans": <count>}.
"""

import argparse
import json

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="I am jane.doe@example.com, card 4242 4242 4242 4242")
    args = parser.parse_args()

    finished = InMemorySpanExporter()  # kept, to export them once and print the outcome
    provider = TracerProvider(resource=Resource.create({"service.name": "trace-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(finished))
    tracer = provider.get_tracer("examples.trace_agent")
    with tracer.start_as_current_span("invoke_agent") as agent:
        agent.set_attribute("user.email", "jane.doe@example.com")
        with tracer.start_as_current_span("chat gpt-4o-mini") as chat:
            chat.set_attribute("gen_ai.request.model", "gpt-4o-mini")
            chat.set_attribute("gen_ai.input.messages", json.dumps([{"role": "user", "content": args.prompt}]))
            chat.set_attribute("gen_ai.usage.input_tokens", 17)
    provider.shutdown()
    spans = finished.get_finished_spans()
    exporter = OTLPSpanExporter()  # endpoint, headers, compression: from OTEL_EXPORTER_OTLP_*
    result = exporter.export(spans)
    exporter.shutdown()
    print(json.dumps({"exported": result.name, "spans": len(spans)}))


if __name__ == "__main__":
    main()
