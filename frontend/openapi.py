"""GET /openapi.json: an OpenAPI 3.1 document generated from the msgspec Structs the routes use.

Built once when the app is created, from the same types the request bodies
decode into, so the document cannot drift from what the server accepts. The
server's limits (limits.max-tokens, limits.max-n) appear as the maxima of
`max_tokens`, `max_completion_tokens` and `n`. The route sits outside /v1,
so it needs no API key.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sanic import Request, Sanic
from sanic.response import HTTPResponse, raw

from infersnap import __version__
from infersnap.frontend import anthropic, responses, schema
from infersnap.frontend.errors import AnthropicErrorBody, ErrorBody
from infersnap.plan import ServePlan

REF = "#/components/schemas/{name}"
ERRORS = {
    400: "Invalid request: malformed JSON, a wrong type or an out-of-range value (`param` names the field), "
    "or a prompt that does not fit the context (`code: context_length_exceeded`)",
    401: "Missing or wrong API key (only when the server has http.api-keys)",
    404: "Unknown model (`code: model_not_found`)",
    413: "Body larger than http.max-body-bytes",
    501: "No embedding worker runs (worker.embeddings is false, or no llama.cpp engine runs on this CPU)",
    503: "No worker ready yet, or every queue is full (`code: server_overloaded`); comes with Retry-After",
    504: "The request ran past queue.request-timeout (`code: timeout`)",
    507: "The model does not fit in its device's memory budget even with every idle model unloaded "
    "(`code: model_too_large`)",
}


def install(app: Sanic, plan: ServePlan) -> None:
    """Build the document once and serve it at GET /openapi.json."""
    document = msgspec.json.encode(build(plan))

    async def openapi_json(request: Request) -> HTTPResponse:
        return raw(document, content_type="application/json")

    app.add_route(openapi_json, "/openapi.json", methods=["GET"], name="openapi_json")


def build(plan: ServePlan) -> dict[str, Any]:
    types = [
        schema.ChatCompletionRequest,
        schema.CompletionRequest,
        schema.ChatCompletion,
        schema.ChatCompletionChunk,
        schema.Completion,
        schema.ModelList,
        schema.ModelCard,
        schema.ModelControlRequest,
        schema.TokenizeRequest,
        schema.TokenizeResponse,
        schema.DetokenizeRequest,
        schema.DetokenizeResponse,
        schema.EmbeddingRequest,
        schema.EmbeddingList,
        ErrorBody,
        anthropic.MessagesRequest,
        anthropic.Message,
        anthropic.CountTokensRequest,
        anthropic.TokenCount,
        AnthropicErrorBody,
        responses.ResponsesRequest,
        responses.Response,
        responses.InputTokensRequest,
        responses.InputTokens,
        responses.Deleted,
    ]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            if field in properties:
                _set_maximum(properties[field], plan.max_tokens)
        _set_maximum(properties["n"], plan.max_n)
    components["Health"] = {
        "title": "Health",
        "type": "object",
        "properties": {"status": {"const": "ok"}},
        "required": ["status"],
    }
    components["Load"] = {
        "title": "Load",
        "type": "object",
        "properties": {"load": {"type": "integer", "minimum": 0}},
        "required": ["load"],
    }

    secured = {"security": [{"bearer": []}]} if plan.api_keys else {}

    def operation(summary: str, ok: dict[str, Any], errors: list[int], body: str | None = None,
                  error_body: str = "ErrorBody") -> dict[str, Any]:
        answers: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
        for status in errors:
            answers[str(status)] = {"description": ERRORS[status], "content": _json(error_body)}
        op: dict[str, Any] = {"summary": summary, "responses": answers}
        if body is not None:
            op["requestBody"] = {"required": True, "content": _json(body)}
        return op

    def v1(op: dict[str, Any]) -> dict[str, Any]:
        return {**op, **secured}

    completion_errors = [400, 401, 404, 413, 503, 504]
    paths = {
        "/v1/chat/completions": {
            "post": v1(
                operation(
                    "Chat completion, with the model's own chat template",
                    {**_json("ChatCompletion"), **_sse("ChatCompletionChunk")},
                    completion_errors,
                    body="ChatCompletionRequest",
                )
            )
        },
        "/v1/completions": {
            "post": v1(
                operation(
                    "Text completion",
                    {**_json("Completion"), **_sse("Completion")},
                    completion_errors,
                    body="CompletionRequest",
                )
            )
        },
        "/v1/responses": {
            "post": v1(
                operation(
                    "OpenAI Responses: the chat path, as output items; stored for previous_response_id",
                    {**_json("Response"), **_sse("Response", named=True)},
                    completion_errors,
                    body="ResponsesRequest",
                )
            )
        },
        "/v1/responses/input_tokens": {
            "post": v1(operation("The prompt tokens a Responses body makes", _json("InputTokens"),
                                 [400, 401, 404, 503], body="InputTokensRequest"))
        },
        "/v1/responses/{response_id}": {
            "get": v1(operation("A stored response", _json("Response"), [401, 404])),
            "delete": v1(operation("Forget a stored response", _json("Deleted"), [401, 404])),
            "parameters": [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        },
        "/v1/messages": {
            "post": v1(
                operation(
                    "Anthropic Messages: the chat path, as content blocks",
                    {**_json("Message"), **_sse("Message", named=True)},
                    completion_errors,
                    body="MessagesRequest",
                    error_body="AnthropicErrorBody",
                )
            )
        },
        "/v1/messages/count_tokens": {
            "post": v1(operation("The prompt tokens a Messages body makes", _json("TokenCount"),
                                 [400, 401, 404, 503], body="CountTokensRequest", error_body="AnthropicErrorBody"))
        },
        "/v1/models": {"get": v1(operation("The models served here, with their state", _json("ModelList"), [401, 503]))},
        "/v1/models/load": {
            "post": v1(operation("Load a model now (it goes on loading after the answer)", _json("ModelCard"),
                                 [400, 401, 404, 503, 507], body="ModelControlRequest"))
        },
        "/v1/models/unload": {
            "post": v1(operation("Unload a model once no request runs on it", _json("ModelCard"),
                                 [400, 401, 404, 503], body="ModelControlRequest"))
        },
        "/v1/models/{model}": {
            "get": {
                **v1(operation("One model", _json("ModelCard"), [401, 404, 503])),
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            }
        },
        "/tokenize": {
            "post": v1(
                operation("The model's token ids for a text (as llama-server's)", _json("TokenizeResponse"),
                          [400, 401, 404, 503], body="TokenizeRequest")
            )
        },
        "/detokenize": {
            "post": v1(
                operation("The text of token ids (as llama-server's)", _json("DetokenizeResponse"),
                          [400, 401, 404, 503], body="DetokenizeRequest")
            )
        },
        "/v1/embeddings": {
            "post": v1(
                operation("Embeddings of texts or token ids, from the embedding worker", _json("EmbeddingList"),
                          [400, 401, 404, 413, 501, 503, 504], body="EmbeddingRequest")
            )
        },
        "/health": {"get": operation("200 while the default model can be served, now or by loading it; 503 while "
                                     "starting, draining, or when every lane of it failed", _json("Health"), [503])},
        "/get_load": {"get": operation("The default model's running and waiting requests (vllm-router's power_of_two)",
                                       _json("Load"), [503])},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "infersnap",
            "version": __version__,
            "description": 'An OpenAI-compatible API, with Anthropic\'s Messages too. Every error is '
            '{"error": {"message", "type", "param", "code"}}; under /v1/messages, {"type": "error", "error": '
            '{"type", "message"}}.',
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if plan.api_keys:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(name=name)}}}


def _sse(name: str, named: bool = False) -> dict[str, Any]:
    about = (f"With `stream: true`: `event: <type>` and `data: {{...}}` events, as the API defines them, ending with "
             f"the whole {name}" if named else f"With `stream: true`: `data: {{{name}}}` events, then `data: [DONE]`")
    return {"text/event-stream": {"schema": {"type": "string", "description": about}}}


def _set_maximum(prop: dict[str, Any], maximum: int) -> None:
    """Set the maximum on the integer schema of a property (itself, or its integer branch of anyOf)."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum
