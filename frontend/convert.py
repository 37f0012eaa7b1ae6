"""OpenAI request bodies -> internal Generate requests."""

from __future__ import annotations

import uuid

from infersnap import wire
from infersnap.frontend import schema
from infersnap.frontend.errors import APIError
from infersnap.plan import ServePlan

DEFAULTS = wire.SamplingParams()
MAX_TOKEN_ID = 2**31 - 1  # token ids are int32 in both runtimes


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
    if body.n is not None and body.n > plan.max_n:
        raise APIError(400, f"n is {body.n}, but this server allows at most {plan.max_n} (limits.max-n)", param="n")


def _sampling(body: schema.SamplingFields, max_tokens: int | None) -> wire.SamplingParams:
    def pick(value, default):
        return default if value is None else value

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    logit_bias: dict[int, float] = {}
    for token, bias in (body.logit_bias or {}).items():
        if not (token.isascii() and token.isdigit() and len(token) <= 10 and int(token) <= MAX_TOKEN_ID):
            raise APIError(400, f"logit_bias keys must be token ids, got {token[:100]!r}", param="logit_bias")
        logit_bias[int(token)] = bias
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
    )


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


def chat_request(body: schema.ChatCompletionRequest, model: str) -> wire.Generate:
    messages = [wire.ChatMessage(role=m.role, content=_message_text(i, m)) for i, m in enumerate(body.messages)]
    return wire.Generate(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model=body.model or model,
        params=_sampling(body, body.max_completion_tokens or body.max_tokens),
        messages=messages,
    )


def completion_request(body: schema.CompletionRequest, model: str) -> wire.Generate:
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    return wire.Generate(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=body.model or model,
        params=_sampling(body, body.max_tokens),
        prompt=prompt,
    )
