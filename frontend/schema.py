"""The OpenAI API's request and response bodies, as msgspec Structs.

Request bodies decode straight into these types, so a wrong type or an
out-of-range value fails in the decoder with a message that names the
field (`$.max_tokens`). Unknown fields are ignored, as OpenAI clients send
more than a local server uses.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

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
Name = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for function and format names
JSONSchema = dict[str, Any]  # checked by infersnap.json_schema, not by the decoder
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]  # OpenAI's bounds: chat's top_logprobs
TextLogprobs = Annotated[int, Meta(ge=0, le=5)]  # and the legacy completions' logprobs


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text


class ToolCall(msgspec.Struct):
    """A call in an answer, and the same call sent back in the history of a later request."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessageIn(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: Name
    description: str | None = None
    parameters: JSONSchema | None = None  # None: no arguments
    strict: bool | None = None  # calls always follow `parameters` here


class Tool(msgspec.Struct):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class FunctionName(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: FunctionName
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class TextFormat(msgspec.Struct, tag_field="type", tag="text"):
    pass


class JSONObjectFormat(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


class JSONSchemaSpec(msgspec.Struct, kw_only=True):
    name: Name | None = None
    description: str | None = None
    schema: JSONSchema | None = None  # None: any JSON object
    strict: bool | None = None  # the output always follows the schema here


class JSONSchemaFormat(msgspec.Struct, tag_field="type", tag="json_schema"):
    json_schema: JSONSchemaSpec


ResponseFormat = TextFormat | JSONObjectFormat | JSONSchemaFormat


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


# seconds, or a duration ("30s", "5m", "1h"); negative: always; 0: unloaded once the request ends
KeepAlive = int | str


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
    response_format: ResponseFormat | None = None
    keep_alive: KeepAlive | None = None  # how long the model stays loaded once idle, as Ollama's: 300, "5m", -1


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, else "none"
    parallel_tool_calls: bool | None = None  # accepted; an answer holds at most one call here
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None  # needs logprobs: true (see convert.chat_request)
    reasoning_effort: str | None = None  # for models that think: reaches the chat template
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the chat template (enable_thinking)


class CompletionRequest(SamplingFields, kw_only=True):
    # several prompts: a choice per prompt (times n), indexed prompt by prompt; limits.max-n bounds them all
    prompt: str | Annotated[list[str], Meta(min_length=1)]
    logprobs: TextLogprobs | None = None  # None: none; k: each token's logprob and the k most likely tokens'
    echo: bool = False  # the prompt comes back before the completion; with logprobs, its tokens' logprobs too
    suffix: str | None = None  # fill in the middle: the text after the completion (models with FIM tokens)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


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


class TopLogprob(msgspec.Struct):
    token: str  # its text (U+FFFD for part of a UTF-8 character)
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    """Chat's logprobs: one entry per generated token (in a streamed chunk, per token of that chunk)."""

    content: list[TokenLogprob]


class TextChoiceLogprobs(msgspec.Struct):
    """The legacy completions' logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token starts in the generated text, in characters


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None  # None when the answer is a tool call
    refusal: str | None  # required (null) in OpenAI's schema: this server never refuses in words
    tool_calls: list[ToolCall] | None = None
    # a model's thinking, apart from content; both names, since clients read one or the other
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings | None
    system_fingerprint: str


class ToolCallDelta(msgspec.Struct):
    """A whole tool call in one streamed delta (the SDKs join deltas by index)."""

    index: int
    id: str
    function: FunctionCall
    type: str = "function"


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None  # thinking, as in AssistantMessage
    reasoning: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: TextChoiceLogprobs | None = None


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
    # beyond OpenAI's card, as LM Studio's and llama-server's lists say: whether it is loaded, and what it does
    state: str = "unloaded"  # loaded | loading | unloading | unloaded | failed
    error: str | None = None  # why it failed
    capabilities: list[str] = []  # of chat, completions, tools, embeddings
    context_length: int = 0  # tokens per sequence


class ModelControlRequest(msgspec.Struct, kw_only=True):
    """POST /v1/models/load and /v1/models/unload."""

    model: str
    keep_alive: KeepAlive | None = None  # for a load: how long it stays once idle; None: the model's own


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


def now() -> int:
    return int(time.time())


# --- llama-server's /tokenize and /detokenize --------------------------------

TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]  # the engines' token ids are int32; the vocabulary is checked there


class TokenizeRequest(msgspec.Struct, kw_only=True):
    content: str
    add_special: bool = False  # the BOS (or EOS) the model adds to a prompt, if it has one
    with_pieces: bool = False
    model: str | None = None  # None: the one model served here


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[TokenId]
    model: str | None = None


class TokenPiece(msgspec.Struct):
    id: int
    piece: str | list[int]  # its text, or its bytes when they are not UTF-8 on their own (llama-server's way)


class TokenizeResponse(msgspec.Struct):
    tokens: list[int | TokenPiece]  # all ids, or all pieces with with_pieces (one list type, for the JSON schema)


class DetokenizeResponse(msgspec.Struct):
    content: str


class RenderedPrompt(msgspec.Struct):
    """vLLM's render answer: the prompt's token ids as the request would be generated from."""

    token_ids: list[int]


# --- embeddings --------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per request


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    # a string, a list of strings, a list of token ids, or a list of lists of token ids: msgspec takes
    # one list type in a union, so the list's items are checked by convert.embedding_inputs
    input: str | Annotated[list[Any], Meta(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    model: str | None = None
    keep_alive: KeepAlive | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None  # only the model's own size
    user: str | None = None


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"
