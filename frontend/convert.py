"""OpenAI request bodies -> internal Generate requests."""

from __future__ import annotations

import re
import uuid
from typing import Any

import msgspec

from infersnap import wire
from infersnap.frontend import schema, tools
from infersnap.frontend.errors import APIError
from infersnap.plan import ServePlan

DEFAULTS = wire.SamplingParams()
MAX_TOKEN_ID = 2**31 - 1  # token ids are int32 in both runtimes


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def keep_alive_seconds(value: int | str | None) -> int | None:
    """A request's keep_alive in whole seconds (-1: always), as Ollama reads it; None when not given."""
    if value is None:
        return None
    if isinstance(value, str):
        found = _DURATION.fullmatch(value.strip())
        if found is None:
            raise APIError(400, f"keep_alive must be seconds or a duration such as \"5m\", got {value!r}",
                           param="keep_alive")
        value = float(found[1]) * _UNIT_SECONDS[found[2]]
    return -1 if value < 0 else min(int(value), 1 << 31)


def check_limits(body: schema.SamplingFields, plan: ServePlan) -> None:
    """The server's request limits (limits.max-tokens, limits.max-n): 400 naming the field over its limit."""
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value > plan.max_tokens:
            raise APIError(
                400,
                f"{field} is {value}, but this server allows at most {plan.max_tokens} (limits.max-tokens)",
                param=field,
            )
    prompts = len(body.prompts) if isinstance(body, schema.CompletionRequest) else 1
    choices = (body.n or 1) * prompts
    # past what the workers can run and queue at once, the broker would refuse it every time
    capacity = plan.capacity(body.model or plan.default_model.name) or plan.max_n  # an unknown model: the broker says 404
    limit, why = min((plan.max_n, "limits.max-n"), (capacity, "worker.slots + queue.max-waiting per worker"))
    if choices > limit:
        asked = f"n is {body.n}" if prompts == 1 else f"{prompts} prompts × n={body.n or 1} make {choices} choices"
        raise APIError(
            400, f"{asked}, but this server allows at most {limit} choices per request ({why})",
            param="n" if prompts == 1 else "prompt",
        )


def _sampling(
    body: schema.SamplingFields, max_tokens: int | None, logprobs: int, constraint: dict[str, Any] | None = None
) -> wire.SamplingParams:
    """The sampling settings; the output is held to `constraint` (a forced tool call), else to response_format.
    `logprobs` as in wire.SamplingParams: -1 none, else how many of the most likely tokens to add."""
    def pick(value, default):
        return default if value is None else value

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    logit_bias: dict[int, float] = {}
    for token, bias in (body.logit_bias or {}).items():
        if not (token.isascii() and token.isdigit() and len(token) <= 10 and int(token) <= MAX_TOKEN_ID):
            raise APIError(400, f"logit_bias keys must be token ids, got {token[:100]!r}", param="logit_bias")
        logit_bias[int(token)] = bias
    if constraint is None:
        constraint = _response_schema(body.response_format)
    return wire.SamplingParams(
        max_tokens=max_tokens,
        temperature=pick(body.temperature, DEFAULTS.temperature),
        top_p=pick(body.top_p, DEFAULTS.top_p),
        top_k=pick(body.top_k, DEFAULTS.top_k),
        min_p=pick(body.min_p, DEFAULTS.min_p),
        seed=body.seed,
        stop=stop,
        presence_penalty=pick(body.presence_penalty, DEFAULTS.presence_penalty),
        frequency_penalty=pick(body.frequency_penalty, DEFAULTS.frequency_penalty),
        logit_bias=logit_bias,
        json_schema=None if constraint is None else msgspec.json.encode(constraint).decode(),
        logprobs=logprobs,
    )


def _response_schema(response_format: schema.ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON schema response_format asks for: json_object is any object; text (or none) is unconstrained."""
    if isinstance(response_format, schema.JSONSchemaFormat) and response_format.json_schema.schema is not None:
        return tools.normalized(response_format.json_schema.schema, "response_format")
    if isinstance(response_format, (schema.JSONObjectFormat, schema.JSONSchemaFormat)):
        return {"type": "object"}
    return None


def _message_text(index: int, message: schema.ChatMessageIn) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise APIError(400, f"messages[{index}] ({message.role}) has no content", param=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"messages[{index}] has a content part of type {part.type!r}; only text parts are supported",
                param=f"messages[{index}].content",
            )
        texts.append(part.text)
    return "".join(texts)


def _history(messages: list[schema.ChatMessageIn]) -> list[wire.ChatMessage]:
    """The messages for the chat template. Tool calls and results become text turns the template knows:
    an assistant's calls are the JSON it wrote, and results (consecutive ones joined) a user turn."""
    history: list[wire.ChatMessage] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, to label results
    for i, message in enumerate(messages):
        text = _message_text(i, message)
        if message.role == "assistant" and message.tool_calls:
            call_names.update((c.id, c.function.name) for c in message.tool_calls)
            text = "\n".join(([text] if text else []) + [tools.call_text(c) for c in message.tool_calls])
        if message.role != "tool":
            history.append(wire.ChatMessage(role=message.role, content=text))
            continue
        text = tools.result_text(call_names.get(message.tool_call_id or "") or message.name or "tool", text)
        if i > 0 and messages[i - 1].role == "tool":  # the results of one turn's calls: one user turn
            history[-1] = wire.ChatMessage(role="user", content=history[-1].content + "\n" + text)
        else:
            history.append(wire.ChatMessage(role="user", content=text))
    return history


def chat_request(
    body: schema.ChatCompletionRequest, model: str, toolset: tools.ToolSet | None, fit_context: bool = False
) -> list[wire.Generate]:
    """The Generate for a chat body; `toolset` is its tools (tools.from_request), read once per request
    because the render parses tool calls with the same ToolSet. `fit_context`: see wire.SamplingParams."""
    messages = _history(body.messages)
    constraint = None
    if toolset is not None:
        # the tools' description joins the system message (templates take one, first)
        if messages[0].role in ("system", "developer"):
            messages[0] = wire.ChatMessage(messages[0].role, messages[0].content + "\n\n" + toolset.instructions())
        else:
            messages.insert(0, wire.ChatMessage("system", toolset.instructions()))
        constraint = toolset.constraint()
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else -1
    return [
        wire.Generate(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=body.model or model,
            params=msgspec.structs.replace(
                _sampling(body, body.max_completion_tokens or body.max_tokens, logprobs, constraint),
                fit_context=fit_context,
            ),
            messages=messages,
            template_args=_template_args(body),
            keep_alive=keep_alive_seconds(body.keep_alive),
        )
    ]


def _template_args(body: schema.ChatCompletionRequest) -> dict[str, Any]:
    """The chat template's variables beside the messages: chat_template_kwargs, and reasoning_effort
    ("none" also sets enable_thinking false, which turns thinking off in Qwen3-style templates)."""
    variables = dict(body.chat_template_kwargs or {})
    try:  # what the wire cannot carry (integers past 64 bits)
        msgspec.msgpack.encode(variables)
    except OverflowError as exc:
        raise APIError(400, f"chat_template_kwargs: {exc}", param="chat_template_kwargs") from None
    if body.reasoning_effort is not None:
        variables.setdefault("reasoning_effort", body.reasoning_effort)
        if body.reasoning_effort == "none":
            variables.setdefault("enable_thinking", False)
    return variables


def completion_request(body: schema.CompletionRequest, model: str) -> list[wire.Generate]:
    """One Generate per prompt, all with the request's id (reader.choice_requests numbers them)."""
    request_id = f"cmpl-{uuid.uuid4().hex}"
    logprobs = -1 if body.logprobs is None else body.logprobs
    params = _sampling(body, body.max_tokens, logprobs)
    if body.echo:  # the echoed prompt's tokens get logprobs too
        params = msgspec.structs.replace(params, prompt_logprobs=logprobs)
    return [
        wire.Generate(id=request_id, model=body.model or model, params=params, prompt=prompt, suffix=body.suffix or None,
                      keep_alive=keep_alive_seconds(body.keep_alive))
        for prompt in body.prompts
    ]


def embedding_request(body: schema.EmbeddingRequest, model: str) -> wire.Embed:
    """The Embed for a body: its input as texts or as token id lists (a 400 naming the input otherwise)."""
    embed_id = f"embd-{uuid.uuid4().hex}"
    model = body.model or model
    keep_alive = keep_alive_seconds(body.keep_alive)
    items = [body.input] if isinstance(body.input, str) else body.input
    if all(_is_token_id(t) for t in items):  # one input given as token ids
        return wire.Embed(embed_id, model, token_lists=[items], dimensions=body.dimensions, keep_alive=keep_alive)
    if all(isinstance(t, str) for t in items):
        if "" in items:
            raise APIError(400, f"input[{items.index('')}] is an empty string", param="input")
        return wire.Embed(embed_id, model, texts=items, dimensions=body.dimensions, keep_alive=keep_alive)
    if all(isinstance(t, list) and t and all(_is_token_id(x) for x in t) for t in items):
        return wire.Embed(embed_id, model, token_lists=items, dimensions=body.dimensions, keep_alive=keep_alive)
    raise APIError(
        400,
        "input must be a string, a list of strings, a list of token ids, or a list of non-empty lists of token ids",
        param="input",
    )


def _is_token_id(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKEN_ID
