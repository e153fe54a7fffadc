"""Refusals in the error shape of the API a route declares, so that each provider's SDK
shows the gateway's sentence and reason instead of a bare status code.

- `openai`: `{"error": {"message", "type", "param", "code"}}`, OpenAI's error object
  (https://platform.openai.com/docs/guides/error-codes); in a stream, an SSE event whose
  data is that object (the openai SDKs raise `APIError` on a `data` holding `error`).
- `anthropic`: `{"type": "error", "error": {"type", "message"}}`
  (https://docs.anthropic.com/en/api/errors); in a stream, `event: error` with that data
  (the anthropic SDKs raise on it).
- no `api` (None): the gateway's own `{"error": <reason>, "message", "stage"}`.

Every shape also carries `"hoop": {"reason", "stage"}` for programs that read it.
"""

from __future__ import annotations

from typing import Literal

import orjson

Api = Literal["openai", "anthropic"]
APIS: tuple[Api, ...] = ("openai", "anthropic")

# HTTP status -> the provider's error `type` (5xx not listed: the provider's server error)
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 407: "authentication_error", 429: "rate_limit_error"}
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    407: "authentication_error", 413: "request_too_large", 429: "rate_limit_error"}


def _error_type(api: Api, status: int) -> str:
    if api == "openai":
        return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _sentence(reason: str, message: str) -> str:
    return f"{message} (hoop: {reason})"


def error_body(api: Api | None, status: int, reason: str, message: str, stage: str) -> bytes:
    """The JSON body of a refusal with HTTP `status` (e.g. 403), `reason` (a code such as
    `not_admitted`), `message` (the sentence for the client) and `stage` (`route`,
    `mask`, ...), in the shape of `api` (see the module docstring). Returns UTF-8 JSON."""
    tag = {"reason": reason, "stage": stage}
    if api == "openai":
        error = {"message": _sentence(reason, message), "type": _error_type(api, status), "param": None, "code": reason}
        return orjson.dumps({"error": error, "hoop": tag})
    if api == "anthropic":
        error = {"type": _error_type(api, status), "message": _sentence(reason, message)}
        return orjson.dumps({"type": "error", "error": error, "hoop": tag})
    return orjson.dumps({"error": reason, "message": message, "stage": stage})


def stream_error_event(api: Api | None, reason: str, message: str, stage: str) -> bytes:
    """The SSE event (`event: error`, one `data` line, blank line) that ends a stream the
    gateway stopped, in the shape of `api` as for a 502 (`error_body`). Returns bytes."""
    return b"event: error\ndata: " + error_body(api, 502, reason, message, stage) + b"\n\n"
