"""The OpenAI API's request and response bodies, as msgspec Structs.

Request bodies decode straight into these types, so a wrong type or an
out-of-range value fails in the decoder with a message that names the
field (`$.max_tokens`). Unknown fields are ignored, as OpenAI clients send
more than a local server uses.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# --- requests ----------------------------------------------------------------

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
# Bounded so that every accepted number fits the wire (msgpack, int64) and the engines (int32 top_k).
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
TopK = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Stop = str | Annotated[list[str], Meta(max_length=16)]
LogitBias = dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """The fields that chat and text completions share."""

    model: str | None = None  # None: the one model served here
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    n: PositiveInt | None = None  # None: 1; the upper bound is the server's limits.max-n (see convert.check_limits)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]


# --- responses ---------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(msgspec.Struct):
    prompt_n: int
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float


class AssistantMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings | None
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "infersnap"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


def now() -> int:
    return int(time.time())
