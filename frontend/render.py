"""Outputs from the engine -> OpenAI response bodies, for chat and text completions.

The two APIs differ only in how a piece of text is wrapped; each Render
class knows one wrapping, and the request flow in app.py is shared.
"""

from __future__ import annotations

import base64
import codecs
import math
from array import array

import msgspec

from infersnap import wire
from infersnap.frontend import schema, tools

_encode = msgspec.json.encode


def usage(output: wire.Output) -> schema.Usage:
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


def embeddings(output: wire.Output, model: str, encoding_format: str) -> bytes:
    """The embeddings response: each vector as floats, or as base64 of its float32 bytes as it came."""
    data = []
    for i, vector in enumerate(output.embeddings):
        if encoding_format == "base64":
            data.append(schema.Embedding(i, base64.b64encode(vector).decode("ascii")))
        else:
            floats = array("f")
            floats.frombytes(vector)  # little-endian, as every machine infersnap runs on
            data.append(schema.Embedding(i, floats.tolist()))
    usage = schema.EmbeddingUsage(output.prompt_tokens, output.prompt_tokens)
    return _encode(schema.EmbeddingList(data=data, model=model, usage=usage))


class ChatRender:
    def __init__(
        self, request_id: str, model: str, body: schema.ChatCompletionRequest, index: int, toolset: tools.ToolSet | None
    ) -> None:
        self.id, self.model, self.created, self.index = request_id, model, schema.now(), index
        self.tools = toolset
        self.logprobs = bool(body.logprobs)
        self._sent_role = False
        # While the answer may still be a tool call it is held back, so that a call reaches the
        # client as tool_calls and never as text; an answer that can't be one streams as usual.
        self._held: str | None = "" if self.tools is not None else None
        self._held_logprobs: list[wire.TokenLogprob] = []  # the held text's tokens

    @classmethod
    def for_choices(cls, request_id: str, model: str, body: schema.ChatCompletionRequest, count: int) -> list[ChatRender]:
        """One render per choice; the request's tools are read once for all of them."""
        toolset = tools.from_request(body)
        return [cls(request_id, model, body, i, toolset) for i in range(count)]

    def _chunk(self, choices: list[schema.ChunkChoice], **extra: object) -> bytes:
        return _encode(
            schema.ChatCompletionChunk(
                id=self.id, object="chat.completion.chunk", created=self.created, model=self.model, choices=choices, **extra
            )
        )

    def chunks(self, output: wire.Output) -> list[bytes]:
        """The SSE events for one output: none while it is held back."""
        text, finish, calls, tokens = output.text, output.finish_reason, None, output.logprobs
        if self._held is not None:
            text, tokens = self._held + text, self._held_logprobs + tokens
            if finish is None and self.tools.could_be_call(text):
                self._held, self._held_logprobs = text, tokens
                return []
            self._held, self._held_logprobs = None, []
            call = self.tools.parse(text) if finish is not None else None
            if call is not None:
                calls = [schema.ToolCallDelta(index=0, id=call.id, function=call.function)]
                text, finish = None, "tool_calls"
        delta = schema.Delta(role=None if self._sent_role else "assistant", content=text, tool_calls=calls)
        self._sent_role = True
        logprobs = chat_logprobs(tokens) if self.logprobs else None
        choice = schema.ChunkChoice(index=self.index, delta=delta, finish_reason=finish, logprobs=logprobs)
        return [self._chunk([choice], timings=timings(output.timings))]

    def usage_chunk(self, last: wire.Output) -> bytes:
        return self._chunk([], usage=usage(last))

    def choice(self, text: str, tokens: list[wire.TokenLogprob], last: wire.Output) -> schema.ChatChoice:
        """This choice in a whole response: its text (or tool call), tokens and last output."""
        call = self.tools.parse(text) if self.tools is not None else None
        if call is not None:
            message = schema.AssistantMessage(role="assistant", content=None, tool_calls=[call])
        else:
            message = schema.AssistantMessage(role="assistant", content=text)
        return schema.ChatChoice(
            index=self.index,
            message=message,
            finish_reason="tool_calls" if call is not None else last.finish_reason,
            logprobs=chat_logprobs(tokens) if self.logprobs else None,
        )

    def response(self, choices: list[schema.ChatChoice], last: wire.Output) -> bytes:
        """The whole response, with every choice; `last` holds the usage of all of them."""
        return _encode(
            schema.ChatCompletion(
                id=self.id,
                object="chat.completion",
                created=self.created,
                model=self.model,
                choices=choices,
                usage=usage(last),
                timings=timings(last.timings),
            )
        )


class TextRender:
    def __init__(self, request_id: str, model: str, body: schema.CompletionRequest, index: int) -> None:
        self.id, self.model, self.created, self.index = request_id, model, schema.now(), index
        self.logprobs = body.logprobs is not None
        # echo: the prompt goes before the answer, in the first chunk when streaming
        self._echo = body.prompts[index // (body.n or 1)] if body.echo else ""
        # for text_offset: characters of the generated text so far, counting a split character once, where it ends
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @classmethod
    def for_choices(cls, request_id: str, model: str, body: schema.CompletionRequest, count: int) -> list[TextRender]:
        """One render per choice."""
        return [cls(request_id, model, body, i) for i in range(count)]

    def _completion(self, choices: list[schema.TextChoice], **extra: object) -> bytes:
        return _encode(
            schema.Completion(
                id=self.id, object="text_completion", created=self.created, model=self.model, choices=choices, **extra
            )
        )

    def _logprobs(self, tokens: list[wire.TokenLogprob]) -> schema.TextChoiceLogprobs | None:
        """The legacy shape, for the tokens after those already rendered (earlier chunks); None if not asked."""
        if not self.logprobs:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(t.piece))
        # an echoed prompt's first token has no logprob (NaN on the wire): null, as OpenAI has it
        known = [not math.isnan(t.logprob) for t in tokens]
        return schema.TextChoiceLogprobs(
            tokens=[token_text(t.piece) for t in tokens],
            token_logprobs=[t.logprob if k else None for t, k in zip(tokens, known)],
            top_logprobs=[{token_text(c.piece): c.logprob for c in t.top} if k else None for t, k in zip(tokens, known)],
            text_offset=offsets,
        )

    def chunks(self, output: wire.Output) -> list[bytes]:
        logprobs = self._logprobs(output.prompt_logprobs + output.logprobs)
        text, self._echo = self._echo + output.text, ""
        choice = schema.TextChoice(index=self.index, text=text, finish_reason=output.finish_reason, logprobs=logprobs)
        return [self._completion([choice], timings=timings(output.timings))]

    def usage_chunk(self, last: wire.Output) -> bytes:
        return self._completion([], usage=usage(last))

    def choice(self, text: str, tokens: list[wire.TokenLogprob], last: wire.Output) -> schema.TextChoice:
        logprobs = self._logprobs(tokens)
        return schema.TextChoice(index=self.index, text=self._echo + text, finish_reason=last.finish_reason, logprobs=logprobs)

    def response(self, choices: list[schema.TextChoice], last: wire.Output) -> bytes:
        return self._completion(choices, usage=usage(last), timings=timings(last.timings))
