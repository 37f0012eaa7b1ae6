"""Outputs from the engine -> OpenAI response bodies, for chat and text completions.

One Render per request is fed every output of all its choices, in the order
they arrive, and says what to send: the SSE chunks of a streamed answer as it
goes, then the whole JSON response (or, streaming, the usage chunk). The two
APIs differ only in how a piece of text is wrapped; each Render subclass knows
one wrapping, and the request flow in app.py is shared.
"""

from __future__ import annotations

import base64
import codecs
import math
from array import array
from dataclasses import dataclass, field
from abc import ABC, abstractmethod
from typing import Generic, TypeVar

import msgspec

from infersnap import __version__, wire
from infersnap.frontend import schema, tools
from infersnap.frontend.errors import APIError
from infersnap.frontend.reader import choice_layout

_encode = msgspec.json.encode
SYSTEM_FINGERPRINT = f"infersnap-{__version__}"  # chat completions must carry one (OpenAI's schema)


def sse(data: bytes, event: str | None = None) -> bytes:
    """One server-sent event: OpenAI's chat streams send bare `data:` lines; the agents' APIs name each event."""
    return (b"event: " + event.encode() + b"\n" if event else b"") + b"data: " + data + b"\n\n"


def split(output: wire.Text | wire.Final) -> tuple[wire.Text, wire.Final | None]:
    """A generation's output as what a render is fed: its text chunk, and the Final if it ends the generation."""
    if isinstance(output, wire.Final):
        return output.last or wire.Text(output.id), output
    return output, None


def usage(output: wire.Final) -> schema.Usage:
    return schema.Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )


def timings(t: wire.Timings | None) -> schema.Timings | None:
    if t is None:
        return None
    return schema.Timings(
        prompt_n=t.prompt_n,
        prompt_ms=round(t.prompt_ms, 3),
        prompt_per_second=round(t.prompt_n * 1000 / t.prompt_ms, 3) if t.prompt_ms else 0.0,
        predicted_n=t.predicted_n,
        predicted_ms=round(t.predicted_ms, 3),
        predicted_per_second=round(t.predicted_n * 1000 / t.predicted_ms, 3) if t.predicted_ms else 0.0,
    )


def token_text(piece: bytes) -> str:
    """A token's text; a token holding part of a UTF-8 character shows U+FFFD (its bytes tell the rest)."""
    return piece.decode("utf-8", "replace")


def chat_logprobs(tokens: list[wire.TokenLogprob]) -> schema.ChoiceLogprobs:
    return schema.ChoiceLogprobs(
        content=[
            schema.TokenLogprob(
                token=token_text(t.piece),
                logprob=t.logprob,
                bytes=list(t.piece),
                top_logprobs=[schema.TopLogprob(token_text(c.piece), c.logprob, list(c.piece)) for c in t.top],
            )
            for t in tokens
        ]
    )


def embeddings(output: wire.Embeddings, model: str, encoding_format: str) -> bytes:
    """The embeddings response: each vector as floats, or as base64 of its float32 bytes as it came."""
    data = []
    for i, vector in enumerate(output.vectors):
        if encoding_format == "base64":
            data.append(schema.Embedding(i, base64.b64encode(vector).decode("ascii")))
        else:
            floats = array("f")
            floats.frombytes(vector)  # little-endian, as every machine infersnap runs on
            data.append(schema.Embedding(i, floats.tolist()))
    usage = schema.EmbeddingUsage(output.prompt_tokens, output.prompt_tokens)
    return _encode(schema.EmbeddingList(data=data, model=model, usage=usage))


@dataclass
class ChoiceState:
    """What a render keeps of one choice: the text (and its tokens) not sent yet, and how it ended."""

    parts: list[str] = field(default_factory=list)
    tokens: list[wire.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def take(self) -> tuple[str, list[wire.TokenLogprob]]:
        """The text kept so far and its tokens, which are then no longer kept."""
        text, tokens = "".join(self.parts), self.tokens
        self.parts, self.tokens = [], []
        return text, tokens


State = TypeVar("State", bound=ChoiceState)


class Render(ABC, Generic[State]):
    """One request's answer, over all its choices (index -> that choice's state)."""

    def __init__(self, request_id: str, model: str, body: schema.SamplingFields, choices: list[State]) -> None:
        self.id, self.model, self.created = request_id, model, schema.now()
        self.stream = bool(body.stream)
        self.include_usage = body.stream_options is not None and body.stream_options.include_usage
        self.choices = choices

    def feed(self, index: int, chunk: wire.Text, final: wire.Final | None) -> list[bytes]:
        """Keep an output of choice `index` (render.split: its text, and its Final if it ends the choice);
        the server-sent events to send for it (none unless streaming)."""
        choice = self.choices[index]
        choice.parts.append(chunk.text)
        choice.tokens += chunk.prompt_logprobs + chunk.logprobs
        choice.finish_reason = final.finish_reason if final is not None else None
        if not self.stream or self._held(choice):
            return []
        return [sse(self._chunk(index, choice, final.timings if final is not None else None))]

    def final(self, summary: wire.Final) -> bytes:
        """Once every choice has finished, not streaming: the whole response.
        `summary` holds the usage of all choices (Reader.summary)."""
        return self._response([self._choice(i, choice) for i, choice in enumerate(self.choices)], summary)

    def closing(self, summary: wire.Final) -> list[bytes]:
        """Once every choice has finished, streaming: the last events (the usage chunk if asked, [DONE])."""
        return ([sse(self._usage_chunk(summary))] if self.include_usage else []) + [sse(b"[DONE]")]

    def failed(self, error: APIError) -> list[bytes]:
        """The events that end a stream with an error instead."""
        return [sse(error.body()), sse(b"[DONE]")]

    def _held(self, choice: State) -> bool:
        """Whether a streamed choice's text so far must wait for more before it is sent."""
        return False

    @abstractmethod
    def _chunk(self, index: int, choice: State, output_timings: wire.Timings | None) -> bytes:
        """The SSE chunk that sends what the choice kept."""

    @abstractmethod
    def _choice(self, index: int, choice: State) -> schema.ChatChoice | schema.TextChoice:
        """The choice, whole, in the response."""

    @abstractmethod
    def _usage_chunk(self, summary: wire.Final) -> bytes:
        """The streamed chunk with the usage of all choices (stream_options.include_usage)."""

    @abstractmethod
    def _response(self, choices: list, summary: wire.Final) -> bytes:
        """The whole response, with every choice."""


@dataclass
class ChatChoiceState(ChoiceState):
    may_be_call: bool = False  # the request has tools and nothing of this answer was sent yet
    sent_role: bool = False
    thinking: list[str] = field(default_factory=list)  # the model's thinking (Text.reasoning) not sent yet

    def take_thinking(self) -> str | None:
        """The thinking kept so far (None if none), which is then no longer kept."""
        text, self.thinking = "".join(self.thinking), []
        return text or None


class ChatRender(Render[ChatChoiceState]):
    def __init__(
        self, request_id: str, model: str, body: schema.ChatCompletionRequest, toolset: tools.ToolSet | None
    ) -> None:
        choices = [ChatChoiceState(may_be_call=toolset is not None) for _ in range(body.n or 1)]
        super().__init__(request_id, model, body, choices)
        self.tools = toolset  # the ToolSet that convert.chat_request described to the model
        self.logprobs = bool(body.logprobs)

    def feed(self, index: int, chunk: wire.Text, final: wire.Final | None) -> list[bytes]:
        choice = self.choices[index]
        choice.thinking.append(chunk.reasoning)
        chunks = super().feed(index, chunk, final)
        if self.stream and not chunks and any(choice.thinking):  # the answer is held back, its thinking is not
            thinking = choice.take_thinking()
            delta = schema.Delta(role=self._role(choice), reasoning_content=thinking, reasoning=thinking)
            chunks = [self._chunk_body([schema.ChunkChoice(index=index, delta=delta, finish_reason=None)])]
        return chunks

    @staticmethod
    def _role(choice: ChatChoiceState) -> str | None:
        """The role, in a choice's first streamed delta only."""
        role = None if choice.sent_role else "assistant"
        choice.sent_role = True
        return role

    def _held(self, choice: ChatChoiceState) -> bool:
        # While the answer may still be a tool call it is held back, so that a call reaches the
        # client as tool_calls and never as text; an answer that can't be one streams as usual.
        return (
            choice.may_be_call and choice.finish_reason is None and self.tools.could_be_call("".join(choice.parts))
        )

    def _answer(self, choice: ChatChoiceState) -> tuple[str, schema.ToolCall | None, list[wire.TokenLogprob]]:
        """The text the choice kept, its tool call if that text is the whole finished answer and
        one call, and its tokens. The one place where an answer becomes a tool call."""
        text, tokens = choice.take()
        call = self.tools.parse(text) if choice.may_be_call and choice.finish_reason is not None else None
        choice.may_be_call = False
        return text, call, tokens

    def _logprobs(self, tokens: list[wire.TokenLogprob]) -> schema.ChoiceLogprobs | None:
        return chat_logprobs(tokens) if self.logprobs else None

    def _chunk_body(self, choices: list[schema.ChunkChoice], **extra: object) -> bytes:
        return _encode(
            schema.ChatCompletionChunk(
                id=self.id, object="chat.completion.chunk", created=self.created, model=self.model,
                system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, **extra,
            )
        )

    def _chunk(self, index: int, choice: ChatChoiceState, output_timings: wire.Timings | None) -> bytes:
        text, call, tokens = self._answer(choice)
        thinking = choice.take_thinking()
        calls = [schema.ToolCallDelta(index=0, id=call.id, function=call.function)] if call is not None else None
        content = text if call is None and (text or not thinking) else None
        delta = schema.Delta(role=self._role(choice), content=content, tool_calls=calls,
                             reasoning_content=thinking, reasoning=thinking)
        finish = "tool_calls" if call is not None else choice.finish_reason
        chunk = schema.ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=self._logprobs(tokens))
        return self._chunk_body([chunk], timings=timings(output_timings))

    def _choice(self, index: int, choice: ChatChoiceState) -> schema.ChatChoice:
        text, call, tokens = self._answer(choice)
        thinking = choice.take_thinking()
        message = schema.AssistantMessage(
            role="assistant", content=None if call is not None else text, refusal=None,
            tool_calls=None if call is None else [call], reasoning_content=thinking, reasoning=thinking,
        )
        finish = "tool_calls" if call is not None else choice.finish_reason
        return schema.ChatChoice(index=index, message=message, finish_reason=finish, logprobs=self._logprobs(tokens))

    def _usage_chunk(self, summary: wire.Final) -> bytes:
        return self._chunk_body([], usage=usage(summary))

    def _response(self, choices: list[schema.ChatChoice], summary: wire.Final) -> bytes:
        return _encode(
            schema.ChatCompletion(
                id=self.id,
                object="chat.completion",
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage(summary),
                timings=timings(summary.timings),
                system_fingerprint=SYSTEM_FINGERPRINT,
            )
        )


class PartsRender(ChatRender):
    """A chat answer as the agents' APIs give it: a list of typed parts (thinking, text, a tool call), each
    streamed as it grows. One choice; subclasses write each API's parts and events."""

    def __init__(
        self, request_id: str, model: str, body: schema.ChatCompletionRequest, toolset: tools.ToolSet | None
    ) -> None:
        super().__init__(request_id, model, body, toolset)
        self.started = False

    def feed(self, index: int, chunk: wire.Text, final: wire.Final | None) -> list[bytes]:
        events = [] if self.started else self._opening(chunk)
        self.started = True
        if chunk.reasoning:
            events += self._thinking(chunk.reasoning)
        choice = self.choices[index]
        choice.parts.append(chunk.text)
        choice.finish_reason = final.finish_reason if final is not None else None
        if final is not None:
            self._last(final)
        if not self._held(choice):
            text, call, _ = self._answer(choice)
            if call is not None:
                events += self._call(call)
            elif text:
                events += self._text(text)
        return events if self.stream else []

    def _last(self, final: wire.Final) -> None:
        """Keep what the answer's Final says besides its text (the stop sequence that ended it)."""

    @abstractmethod
    def _opening(self, first: wire.Text) -> list[bytes]:
        """The events that open the stream, at the first output (its text chunk: the first carries the prompt's size)."""

    @abstractmethod
    def _thinking(self, text: str) -> list[bytes]:
        """More of the model's thinking."""

    @abstractmethod
    def _text(self, text: str) -> list[bytes]:
        """More of the answer's text."""

    @abstractmethod
    def _call(self, call: schema.ToolCall) -> list[bytes]:
        """The answer, whole, turned out to be this tool call."""


@dataclass
class TextChoiceState(ChoiceState):
    echo: str = ""  # echo: the prompt, sent before the answer (in the first chunk when streaming)
    # for text_offset: characters of the generated text so far, counting a split character once, where it ends
    offset: int = 0
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


class TextRender(Render[TextChoiceState]):
    def __init__(self, request_id: str, model: str, body: schema.CompletionRequest) -> None:
        prompts = body.prompts
        layout = choice_layout(len(prompts), body.n or 1)  # the order of reader.choice_requests
        choices = [TextChoiceState(echo=prompts[p] if body.echo else "") for p, _ in layout]
        super().__init__(request_id, model, body, choices)
        self.logprobs = body.logprobs is not None

    def _completion(self, choices: list[schema.TextChoice], **extra: object) -> bytes:
        return _encode(
            schema.Completion(
                id=self.id, object="text_completion", created=self.created, model=self.model, choices=choices, **extra
            )
        )

    def _logprobs(self, choice: TextChoiceState, tokens: list[wire.TokenLogprob]) -> schema.TextChoiceLogprobs | None:
        """The legacy shape, for the tokens after those already rendered (earlier chunks); None if not asked."""
        if not self.logprobs:
            return None
        offsets = []
        for t in tokens:
            offsets.append(choice.offset)
            choice.offset += len(choice.decoder.decode(t.piece))
        # an echoed prompt's first token has no logprob (NaN on the wire): null, as OpenAI has it
        known = [not math.isnan(t.logprob) for t in tokens]
        return schema.TextChoiceLogprobs(
            tokens=[token_text(t.piece) for t in tokens],
            token_logprobs=[t.logprob if k else None for t, k in zip(tokens, known)],
            top_logprobs=[{token_text(c.piece): c.logprob for c in t.top} if k else None for t, k in zip(tokens, known)],
            text_offset=offsets,
        )

    def _choice(self, index: int, choice: TextChoiceState) -> schema.TextChoice:
        text, tokens = choice.take()
        text, choice.echo = choice.echo + text, ""
        return schema.TextChoice(index, text, choice.finish_reason, self._logprobs(choice, tokens))

    def _chunk(self, index: int, choice: TextChoiceState, output_timings: wire.Timings | None) -> bytes:
        return self._completion([self._choice(index, choice)], timings=timings(output_timings))

    def _usage_chunk(self, summary: wire.Final) -> bytes:
        return self._completion([], usage=usage(summary))

    def _response(self, choices: list[schema.TextChoice], summary: wire.Final) -> bytes:
        return self._completion(choices, usage=usage(summary), timings=timings(summary.timings))
