"""OpenAI's Responses API (POST /v1/responses and its stored responses), as Codex CLI and the openai SDK speak it.

A Responses body is translated into the chat completion body the rest of the frontend
serves (templates, tools, JSON schema, sampling, queueing, metrics), and the answer is
rendered back as a response: output items (reasoning, message, function_call), usage,
and the typed, numbered events of its stream. Stored responses are kept in memory,
bounded in count and bytes, so that `previous_response_id` continues a conversation.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from infersnap import wire
from infersnap.frontend import render, schema, tools
from infersnap.frontend.errors import APIError

_encode = msgspec.json.encode
MAX_STORED = 1000  # responses kept for previous_response_id and GET, the oldest forgotten first
MAX_STORED_BYTES = 64 * 2**20

# --- requests ----------------------------------------------------------------


class InputContentPart(msgspec.Struct, kw_only=True):
    type: str  # input_text | output_text (input_image and input_file are refused)
    text: str | None = None


class InputItem(msgspec.Struct, kw_only=True):
    """An item of `input`: a message (whose `type` may be left out), a function call or its output, or reasoning."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputContentPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call: JSON text
    output: str | list[InputContentPart] | None = None  # function_call_output


class FunctionTool(msgspec.Struct, kw_only=True):
    type: str  # "function"; other kinds (web_search, custom, local_shell, ...) do not run here and are left out
    name: schema.Name | None = None
    description: str | None = None
    parameters: schema.JSONSchema | None = None
    strict: bool | None = None


class FunctionChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: str


class ResponseTextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: schema.Name | None = None
    description: str | None = None
    schema: schema.JSONSchema | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: ResponseTextFormat | None = None
    verbosity: str | None = None


class Reasoning(msgspec.Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class InputTokensRequest(msgspec.Struct, kw_only=True):
    """What makes a prompt: POST /v1/responses/input_tokens, and the start of a Responses body."""

    model: str | None = None
    input: str | Annotated[list[InputItem], Meta(min_length=1)]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    previous_response_id: str | None = None


class ResponsesRequest(InputTokensRequest, kw_only=True):
    parallel_tool_calls: bool | None = None  # accepted; an answer holds at most one call here
    text: TextConfig | None = None
    max_output_tokens: schema.PositiveInt | None = None
    temperature: schema.Temperature | None = None
    top_p: schema.Probability | None = None
    reasoning: Reasoning | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    stream: bool | None = None
    user: str | None = None


# --- responses ---------------------------------------------------------------


class Response(msgspec.Struct, kw_only=True):
    id: str
    created_at: int
    status: str  # in_progress | completed | incomplete | failed
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any]
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float
    metadata: dict[str, str]
    user: str | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    truncation: str = "disabled"
    object: str = "response"


class Deleted(msgspec.Struct):
    id: str
    object: str = "response"
    deleted: bool = True


class InputTokens(msgspec.Struct):
    input_tokens: int
    object: str = "response.input_tokens"


# --- stored responses ---------------------------------------------------------


class Stored(msgspec.Struct):
    response: bytes  # the Response as JSON, as GET returns it
    conversation: list[schema.ChatMessageIn]  # its input and its output: where a next turn goes on from


class Store:
    """Stored responses, in memory, the oldest forgotten first past a count or a size."""

    def __init__(self, max_count: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self.items: OrderedDict[str, tuple[Stored, int]] = OrderedDict()
        self.bytes = 0

    def put(self, response_id: str, stored: Stored) -> None:
        size = len(stored.response) + sum(len(m.content or "") if isinstance(m.content, str) else 0
                                          for m in stored.conversation)
        self.items[response_id] = (stored, size)
        self.bytes += size
        while self.items and (len(self.items) > self.max_count or self.bytes > self.max_bytes):
            _, (_, dropped) = self.items.popitem(last=False)
            self.bytes -= dropped

    def get(self, response_id: str) -> Stored:
        found = self.items.get(response_id)
        if found is None:
            raise APIError(404, f"Response with id '{response_id}' not found (never stored, deleted, or "
                           f"forgotten: this server keeps the last {self.max_count})", param="response_id",
                           code="response_not_found")
        return found[0]

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        _, size = self.items.pop(response_id)
        self.bytes -= size


# --- Responses -> chat ---------------------------------------------------------


def _text(content: str | list[InputContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        if part.type not in ("input_text", "output_text", "text") or part.text is None:
            raise APIError(400, f"{where}[{i}] is of type {part.type!r}; only text is supported here",
                           param=f"{where}[{i}]")
        texts.append(part.text)
    return "".join(texts)


def conversation(body: InputTokensRequest, store: Store) -> list[schema.ChatMessageIn]:
    """The chat messages this body continues or starts: the stored turns of previous_response_id, then its input.
    The instructions come first and are not carried to the next turn, as OpenAI has it."""
    earlier = store.get(body.previous_response_id).conversation if body.previous_response_id else []
    messages = [schema.ChatMessageIn(role="system", content=body.instructions)] if body.instructions else []
    messages += earlier
    items = [InputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if item.type == "message":
            if item.role is None:
                raise APIError(400, f"{where} is a message without a role", param=f"{where}.role")
            role = "system" if item.role == "developer" else item.role
            messages.append(schema.ChatMessageIn(role=role, content=_text(item.content, f"{where}.content")))
        elif item.type == "function_call":
            if not (item.call_id and item.name and item.arguments is not None):
                raise APIError(400, f"{where} (function_call) needs call_id, name and arguments", param=where)
            call = schema.ToolCall(id=item.call_id, function=schema.FunctionCall(item.name, item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls:  # one turn's calls: one message
                last.tool_calls.append(call)
            else:
                messages.append(schema.ChatMessageIn(role="assistant", content="", tool_calls=[call]))
        elif item.type == "function_call_output":
            if not item.call_id:
                raise APIError(400, f"{where} (function_call_output) needs call_id", param=f"{where}.call_id")
            output = _text(item.output, f"{where}.output")
            messages.append(schema.ChatMessageIn(role="tool", content=output, tool_call_id=item.call_id))
        elif item.type == "reasoning":
            continue  # earlier thinking is not sent back to the model
        else:
            raise APIError(400, f"{where} is an item of type {item.type!r}, which this server does not take",
                           param=f"{where}.type")
    return messages


def _tool_choice(choice: Literal["none", "auto", "required"] | FunctionChoice | None) -> schema.ToolChoice | None:
    if isinstance(choice, FunctionChoice):
        return schema.NamedToolChoice(function=schema.FunctionName(choice.name))
    return choice


def _functions(given: list[FunctionTool] | None) -> list[schema.Tool] | None:
    functions = []
    for i, tool in enumerate(given or []):
        if tool.type != "function":
            continue  # a built-in tool of OpenAI's: nothing here runs it, so the model is not told of it
        if tool.name is None:
            raise APIError(400, f"tools[{i}] (function) needs a name", param=f"tools[{i}].name")
        functions.append(schema.Tool(function=schema.FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters)))
    return functions or None


def _response_format(text: TextConfig | None) -> schema.ResponseFormat | None:
    form = text.format if text is not None else None
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return schema.JSONObjectFormat()
    return schema.JSONSchemaFormat(json_schema=schema.JSONSchemaSpec(
        name=form.name, description=form.description, schema=form.schema, strict=form.strict))


def to_chat(body: ResponsesRequest | InputTokensRequest, store: Store) -> schema.ChatCompletionRequest:
    """The chat completion body that asks what this Responses body asks (an input_tokens body: its prompt)."""
    if not isinstance(body, ResponsesRequest):
        body = ResponsesRequest(**msgspec.structs.asdict(body))
    return schema.ChatCompletionRequest(
        model=body.model,
        messages=conversation(body, store),
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stream=body.stream,
        tools=_functions(body.tools),
        tool_choice=_tool_choice(body.tool_choice) if body.tools else None,
        response_format=_response_format(body.text),
        reasoning_effort=body.reasoning.effort if body.reasoning is not None else None,
        user=body.user,
    )


# --- chat outputs -> a response ------------------------------------------------


def usage(output: wire.Final) -> dict[str, Any]:
    cached = output.prompt_tokens - output.timings.prompt_n if output.timings is not None else 0
    return {
        "input_tokens": output.prompt_tokens,
        "input_tokens_details": {"cached_tokens": max(cached, 0)},
        "output_tokens": output.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": output.reasoning_tokens},
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }


class ResponsesRender(render.PartsRender):
    """A chat answer as a response: reasoning, message and function_call items; the typed events when streaming."""

    def __init__(self, body: ResponsesRequest, chat: schema.ChatCompletionRequest, model: str,
                 toolset: tools.ToolSet | None, store: Store) -> None:
        super().__init__(f"resp_{uuid.uuid4().hex}", model, chat, toolset)
        self.body, self.chat, self.store = body, chat, store
        self.created_at = int(time.time())
        self.items: list[dict[str, Any]] = []  # the output so far; the last may still be open
        self.open = False  # whether the last item still takes text
        self.sequence = 0

    # the events

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = render.sse(_encode({"type": kind, "sequence_number": self.sequence, **fields}), kind)
        self.sequence += 1
        return event

    def _opening(self, first: wire.Text) -> list[bytes]:
        snapshot = self._response("in_progress", None)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _thinking(self, text: str) -> list[bytes]:
        return self._add("reasoning", text)

    def _text(self, text: str) -> list[bytes]:
        return self._add("message", text)

    def _add(self, kind: str, text: str) -> list[bytes]:
        """Text of a reasoning or message item: a new item when the last one is of another kind."""
        events = []
        index = len(self.items)
        if not (self.open and self.items[-1]["type"] == kind):
            events += self._close_open()
            index = len(self.items)
            if kind == "message":
                item = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress",
                        "role": "assistant", "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [], "content": []}
                part = {"type": "reasoning_text", "text": ""}
            self.items.append(item)
            self.open = True
            events.append(self._event("response.output_item.added", output_index=index, item=_copy(item)))
            item["content"].append(part)
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                      content_index=0, part=dict(part)))
        else:
            index -= 1
        item = self.items[index]
        item["content"][0]["text"] += text
        delta = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self._event(delta, item_id=item["id"], output_index=index, content_index=0, delta=text, **extra))
        return events

    def _close_open(self) -> list[bytes]:
        if not self.open:
            return []
        self.open = False
        index = len(self.items) - 1
        item = self.items[index]
        part = item["content"][0]
        done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
        extra = {"logprobs": []} if item["type"] == "message" else {}
        if item["type"] == "message":
            item["status"] = "completed"
        return [
            self._event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"], **extra),
            self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=dict(part)),
            self._event("response.output_item.done", output_index=index, item=_copy(item)),
        ]

    def _call(self, call: schema.ToolCall) -> list[bytes]:
        events = self._close_open()
        index = len(self.items)
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
                "name": call.function.name, "arguments": call.function.arguments, "status": "completed"}
        self.items.append(item)
        arguments = call.function.arguments
        return events + [
            self._event("response.output_item.added", output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"}),
            self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=arguments),
            self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=arguments),
            self._event("response.output_item.done", output_index=index, item=dict(item)),
        ]

    # the response

    def _status(self) -> str:
        return "incomplete" if self.choices[0].finish_reason == "length" else "completed"

    def _response(self, status: str, summary: wire.Final | None, error: APIError | None = None) -> Response:
        body = self.body
        form = body.text.format if body.text is not None and body.text.format is not None else None
        return Response(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=self.model,
            output=[_copy(item) for item in self.items],
            usage=usage(summary) if summary is not None else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            parallel_tool_calls=body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            previous_response_id=body.previous_response_id,
            reasoning={"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            store=body.store,
            temperature=body.temperature if body.temperature is not None else 1.0,
            text={"format": msgspec.to_builtins(form) if form is not None else {"type": "text"}},
            tool_choice=msgspec.to_builtins(body.tool_choice) if body.tool_choice is not None else "auto",
            tools=[msgspec.to_builtins(t) for t in body.tools or []],
            top_p=body.top_p if body.top_p is not None else 1.0,
            metadata=body.metadata or {},
            user=body.user,
            error={"code": error.code or "server_error", "message": error.message} if error is not None else None,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
        )

    def _finished(self, summary: wire.Final) -> Response:
        """The whole response, stored if the body asks (as OpenAI does by default)."""
        for item in self.items:
            if item["type"] == "message":
                item["status"] = "completed"
        response = self._response(self._status(), summary)
        if self.body.store:  # its instructions stay with it: the next turn brings its own
            conversation = self.chat.messages[1:] if self.body.instructions else self.chat.messages
            self.store.put(self.id, Stored(_encode(response), conversation + self._turn()))
        return response

    def _turn(self) -> list[schema.ChatMessageIn]:
        """This response's output as the assistant's turn in the conversation that a next request continues."""
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [schema.ToolCall(id=i["call_id"], function=schema.FunctionCall(i["name"], i["arguments"]))
                 for i in self.items if i["type"] == "function_call"]
        return [schema.ChatMessageIn(role="assistant", content=text, tool_calls=calls or None)]

    def final(self, summary: wire.Final) -> bytes:
        return _encode(self._finished(summary))

    def closing(self, summary: wire.Final) -> list[bytes]:
        events = self._close_open()
        response = self._finished(summary)
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        return events + [self._event(kind, response=response)]

    def failed(self, error: APIError) -> list[bytes]:
        return [self._event("response.failed", response=self._response("failed", None, error))]


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """An item as it is now (its content parts too): events carry snapshots, not the item that grows."""
    return {**item, **({"content": [dict(p) for p in item["content"]]} if "content" in item else {})}
