"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens), as Claude Code and the anthropic SDK speak it.

A Messages body is translated into the chat completion body that the rest of the
frontend already serves (the same templates, tools, schema, sampling, queueing and
metrics), and the answer is rendered back as a message: content blocks, stop_reason,
and the named events of Anthropic's stream.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from infersnap import wire
from infersnap.frontend import render, schema, tools
from infersnap.frontend.errors import APIError

_encode = msgspec.json.encode
# Claude Code starts its system text with a line that changes on every request (a hash of the request);
# dropped, the system text (and so the prompt's long shared beginning) stays the same from turn to turn.
BILLING_LINE = "x-anthropic-billing-header:"

# --- requests ----------------------------------------------------------------


class CacheControl(msgspec.Struct):
    type: str = "ephemeral"


class TextBlock(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    text: str
    cache_control: CacheControl | None = None  # accepted: every prompt's beginning is cached here anyway


class ImageBlock(msgspec.Struct, tag_field="type", tag="image", kw_only=True):
    source: dict[str, Any]


class DocumentBlock(msgspec.Struct, tag_field="type", tag="document", kw_only=True):
    source: dict[str, Any]


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock | DocumentBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking", kw_only=True):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(msgspec.Struct, tag_field="type", tag="redacted_thinking", kw_only=True):
    data: str


Block = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class MessageParam(msgspec.Struct):
    role: Literal["user", "assistant", "system"]  # Claude Code sends system reminders as "system" turns too
    content: str | list[Block]


class ToolParam(msgspec.Struct, kw_only=True):
    name: schema.Name
    input_schema: schema.JSONSchema
    description: str | None = None
    type: Literal["custom"] | None = None  # Anthropic's own server tools (web search, ...) do not run here


class ToolChoiceParam(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # with "tool"
    disable_parallel_tool_use: bool | None = None  # accepted; an answer holds at most one call here


class ThinkingParam(msgspec.Struct, kw_only=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class OutputFormat(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: schema.JSONSchema


class OutputConfig(msgspec.Struct, kw_only=True):
    format: OutputFormat | None = None  # structured output: enforced as chat's response_format is
    effort: str | None = None  # reaches the chat template as reasoning_effort


class Metadata(msgspec.Struct):
    user_id: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """What makes a prompt: POST /v1/messages/count_tokens, and the start of a Messages body."""

    model: str | None = None  # None: the one model served here
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[ToolParam], Meta(max_length=128)] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: schema.PositiveInt  # required, as Anthropic has it
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: schema.Probability | None = None
    top_k: schema.TopK | None = None
    output_config: OutputConfig | None = None
    metadata: Metadata | None = None
    stream: bool | None = None


# --- responses ---------------------------------------------------------------


class MessageUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class Message(msgspec.Struct):
    id: str
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    usage: MessageUsage
    stop_sequence: str | None = None
    type: str = "message"
    role: str = "assistant"


class TokenCount(msgspec.Struct):
    input_tokens: int


# --- Messages -> chat --------------------------------------------------------


def _text_of(blocks: str | list, where: str) -> str:
    """The text of a string or of text blocks; a 400 naming the block that is not text."""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, TextBlock):
            raise APIError(400, f"{where}[{i}] is a {_type(block)} block; only text is supported here",
                           param=f"{where}[{i}]")
        texts.append(block.text)
    return "\n".join(texts)


def _type(block: msgspec.Struct) -> str:
    return block.__struct_config__.tag


def system_text(system: str | list[TextBlock] | None) -> str:
    """The system prompt, without Claude Code's per-request billing line."""
    text = _text_of(system or "", "system")
    return "\n".join(line for line in text.split("\n") if not line.startswith(BILLING_LINE)).strip("\n")


def _chat_messages(body: MessagesRequest) -> list[schema.ChatMessageIn]:
    out: list[schema.ChatMessageIn] = []
    system = system_text(body.system)
    if system:
        out.append(schema.ChatMessageIn(role="system", content=system))
    for m, message in enumerate(body.messages):
        where = f"messages[{m}].content"
        if isinstance(message.content, str):
            out.append(schema.ChatMessageIn(role=message.role, content=message.content))
            continue
        texts: list[str] = []
        calls: list[schema.ToolCall] = []
        for b, block in enumerate(message.content):
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, (ThinkingBlock, RedactedThinkingBlock)):
                continue  # earlier thinking is not sent back to the model
            elif isinstance(block, ToolUseBlock) and message.role == "assistant":
                arguments = json.dumps(block.input, ensure_ascii=False)
                calls.append(schema.ToolCall(id=block.id, function=schema.FunctionCall(block.name, arguments)))
            elif isinstance(block, ToolResultBlock) and message.role == "user":
                result = _text_of(block.content or "", f"{where}[{b}].content")
                if block.is_error:
                    result = f"Error: {result}"
                out.append(schema.ChatMessageIn(role="tool", content=result, tool_call_id=block.tool_use_id))
            else:
                raise APIError(400, f"{where}[{b}] is a {_type(block)} block, which a {message.role} message "
                               "cannot hold here", param=f"{where}[{b}]")
        if texts or calls or not message.content:
            out.append(schema.ChatMessageIn(role=message.role, content="\n".join(texts), tool_calls=calls or None))
    return out


def _tool_choice(choice: ToolChoiceParam | None) -> schema.ToolChoice | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, 'tool_choice of type "tool" needs a name', param="tool_choice.name")
        return schema.NamedToolChoice(function=schema.FunctionName(choice.name))
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def _template_args(thinking: ThinkingParam | None) -> dict[str, Any] | None:
    if thinking is None or thinking.type == "adaptive":
        return None  # the template's own default
    return {"enable_thinking": thinking.type == "enabled"}


def to_chat(body: MessagesRequest | CountTokensRequest) -> schema.ChatCompletionRequest:
    """The chat completion body that asks what this Messages body asks (a count_tokens body: its prompt)."""
    if not isinstance(body, MessagesRequest):
        body = MessagesRequest(**msgspec.structs.asdict(body), max_tokens=1)
    for i, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise APIError(400, f"tools[{i}] is a {tool.type} tool, which this server cannot run", param=f"tools[{i}]")
    return schema.ChatCompletionRequest(
        model=body.model,
        messages=_chat_messages(body),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_sequences,
        stream=body.stream,
        tools=[schema.Tool(function=schema.FunctionDefinition(name=t.name, description=t.description,
                                                              parameters=t.input_schema))
               for t in body.tools] if body.tools else None,
        tool_choice=_tool_choice(body.tool_choice),
        chat_template_kwargs=_template_args(body.thinking),
        reasoning_effort=body.output_config.effort if body.output_config else None,
        response_format=_response_format(body.output_config),
        user=body.metadata.user_id if body.metadata else None,
    )


def _response_format(config: OutputConfig | None) -> schema.ResponseFormat | None:
    if config is None or config.format is None:
        return None
    return schema.JSONSchemaFormat(json_schema=schema.JSONSchemaSpec(name="output", schema=config.format.schema))


# --- chat outputs -> a message -----------------------------------------------

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def usage(output: wire.Final) -> MessageUsage:
    cached = output.prompt_tokens - output.timings.prompt_n if output.timings is not None else 0
    return MessageUsage(input_tokens=output.prompt_tokens, output_tokens=output.completion_tokens,
                 cache_read_input_tokens=max(cached, 0))


class MessagesRender(render.PartsRender):
    """A chat answer as an Anthropic message: thinking, text and tool_use blocks, in Anthropic's events when streaming."""

    def __init__(self, model: str, body: schema.ChatCompletionRequest, toolset: tools.ToolSet | None) -> None:
        super().__init__(f"msg_{uuid.uuid4().hex[:24]}", model, body, toolset)
        self.blocks: list[dict[str, Any]] = []  # the content so far
        self.open: str | None = None  # the type of the streamed block not yet stopped
        self.stop_sequence: str | None = None  # the stop sequence that ended the answer

    def _opening(self, first: wire.Text) -> list[bytes]:
        start = Message(self.id, self.model, [], None, MessageUsage(first.prompt_tokens, 0))
        return [_event("message_start", message=start), _event("ping")]

    def _last(self, final: wire.Final) -> None:
        self.stop_sequence = final.stop or None

    def _thinking(self, text: str) -> list[bytes]:
        return self._add("thinking", text)

    def _text(self, text: str) -> list[bytes]:
        return self._add("text", text)

    def _add(self, kind: str, text: str) -> list[bytes]:
        """Text of a thinking or text block: a new block when the last one is of another kind."""
        events = []
        if not self.blocks or self.blocks[-1]["type"] != kind:
            events += self._stop_open()
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
            self.blocks.append(block)
            events.append(_event("content_block_start", index=len(self.blocks) - 1, content_block=block.copy()))
            self.open = kind
        field = "text" if kind == "text" else "thinking"
        self.blocks[-1][field] += text
        events.append(_event("content_block_delta", index=len(self.blocks) - 1,
                             delta={"type": f"{field}_delta", field: text}))
        return events

    def _call(self, call: schema.ToolCall) -> list[bytes]:
        events = self._stop_open()
        block = {"type": "tool_use", "id": f"toolu_{call.id.removeprefix('call_')}", "name": call.function.name,
                 "input": json.loads(call.function.arguments)}
        self.blocks.append(block)
        index = len(self.blocks) - 1
        events.append(_event("content_block_start", index=index, content_block={**block, "input": {}}))
        events.append(_event("content_block_delta", index=index,
                             delta={"type": "input_json_delta", "partial_json": call.function.arguments}))
        self.open = "tool_use"
        return events + self._stop_open()

    def _stop_open(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", index=len(self.blocks) - 1)]

    def _stop_reason(self) -> str | None:
        if self.blocks and self.blocks[-1]["type"] == "tool_use":
            return "tool_use"
        if self.stop_sequence is not None:
            return "stop_sequence"
        return STOP_REASONS.get(self.choices[0].finish_reason or "")

    def final(self, summary: wire.Final) -> bytes:
        content = self.blocks or [{"type": "text", "text": ""}]
        message = Message(self.id, self.model, content, self._stop_reason(), usage(summary), self.stop_sequence)
        return _encode(message)

    def closing(self, summary: wire.Final) -> list[bytes]:
        delta = {"stop_reason": self._stop_reason(), "stop_sequence": self.stop_sequence}
        return [*self._stop_open(), _event("message_delta", delta=delta, usage=usage(summary)), _event("message_stop")]

    def failed(self, error: APIError) -> list[bytes]:
        return [render.sse(error.anthropic_body(), "error")]


def _event(kind: str, **fields: Any) -> bytes:
    return render.sse(_encode({"type": kind, **fields}), kind)
