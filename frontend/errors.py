"""API errors, in OpenAI's shape ({"error": {"message", "type", "param", "code"}}) or, for Anthropic's
Messages routes, in Anthropic's ({"type": "error", "error": {"type", "message"}})."""

from __future__ import annotations

import msgspec

from infersnap import wire


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorBody(ErrorDetail(self.message, self.type, self.param, self.code)))

    def anthropic_body(self) -> bytes:
        kind = ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "api_error")
        return msgspec.json.encode(AnthropicErrorBody(AnthropicErrorDetail(kind, self.message)))


def failure_error(failure: wire.Failure) -> APIError:
    """The API error a request's Failure is answered with."""
    headers = {"Retry-After": "1"} if failure.status == 503 else None
    return APIError(failure.status, failure.message, param=failure.param, code=failure.code, headers=headers)


class AnthropicErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicErrorBody(msgspec.Struct):
    error: AnthropicErrorDetail
    type: str = "error"


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors)
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


# Sanic's own HTTP errors, as OpenAI clients expect to read them.
STATUS_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    408: "request_timeout",
}
