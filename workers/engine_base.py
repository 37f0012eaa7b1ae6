"""What every engine shares: the request queue, aborts, and the check before a request is queued."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from infersnap import json_schema, wire


class BatchingEngine:
    """Requests wait in `waiting` until the engine admits them into `running`; the worker loop
    reports both counts in its heartbeats. Subclasses set `context` and `n_vocab`, tokenize in
    `_prompt_tokens`, build their sequence in `_queue` and free its resources in `_release`, and
    give the tokenizer to /tokenize and /detokenize through `tokenize`, `piece` and `detokenize`.
    A sequence's `logprobs` collects its tokens' wire.TokenLogprob (when asked) until its next Output."""

    context: int
    n_vocab: int  # token ids run from 0 to n_vocab - 1
    fim_tokens: tuple[int, int, int] | None = None  # fill in the middle: prefix, suffix, middle; None: none
    bos_token: int | None = None  # the BOS the model starts a prompt with; None: it adds none

    def __init__(self) -> None:
        self.waiting: deque[Any] = deque()
        self.running: list[Any] = []

    def add(self, request: wire.Generate) -> wire.Output | None:
        """Queue a request; return a failure Output at once if it cannot be served."""
        if request.suffix:
            if self.fim_tokens is None:
                return wire.failed(request.id, 400, "this model has no fill-in-the-middle tokens for `suffix`", param="suffix")
            prompt = self._fill_in_middle(request.prompt or "", request.suffix)
        else:
            try:
                prompt = self._prompt_tokens(request)
            except ValueError as exc:
                return wire.failed(request.id, 400, f"could not format the prompt: {exc}", param="messages")
        max_tokens = completion_budget(request, prompt, self.context)
        if isinstance(max_tokens, wire.Output):
            return max_tokens
        if request.params.json_schema is not None:
            try:
                schema = json.loads(request.params.json_schema)
                if json_schema.normalize(schema) != schema:
                    raise ValueError("it is not in the normalized form infersnap.json_schema makes")
            except (ValueError, RecursionError) as exc:
                return schema_refused(request, str(exc) or "nested too deeply")
        return self._queue(request, prompt, max_tokens)

    def abort(self, ids: list[str]) -> None:
        """Drop these requests wherever they are; unknown ids are ignored."""
        wanted = set(ids)
        self.waiting = deque(s for s in self.waiting if s.request.id not in wanted)
        for seq in [s for s in self.running if s.request.id in wanted]:
            self._release(seq)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def answer(self, request: wire.Tokenize | wire.Detokenize) -> wire.TokenizeResult:
        """A tokenizer lookup's answer; an id outside the vocabulary is a 400 (the tokenizers would crash or guess)."""
        if isinstance(request, wire.Tokenize):
            tokens = self.tokenize(request.content, request.add_special)
            pieces = [self.piece(t) for t in tokens] if request.with_pieces else []
            return wire.TokenizeResult(id=request.id, tokens=tokens, pieces=pieces)
        bad = next((t for t in request.tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            message = f"token id {bad} is not in the model's vocabulary (ids 0 to {self.n_vocab - 1})"
            return wire.TokenizeResult(id=request.id, failure=wire.Failure(400, message, param="tokens"))
        return wire.TokenizeResult(id=request.id, content=self.detokenize(request.tokens))

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """`text` as token ids, special tokens written in it included; `add_special`: with the BOS (or EOS)
        the model's tokenizer adds to a prompt, if any."""
        raise NotImplementedError

    def piece(self, token: int) -> bytes:
        """A valid token's bytes (a special token's text); part of a UTF-8 character for some tokens."""
        raise NotImplementedError

    def detokenize(self, tokens: list[int]) -> str:
        """Valid token ids back to text, special tokens written out."""
        raise NotImplementedError

    def _fill_in_middle(self, prefix: str, suffix: str) -> list[int]:
        """The prompt that asks a code model for the text between `prefix` and `suffix`, in the
        prefix-suffix-middle order that llama.cpp's infill uses, after the BOS if the model adds one."""
        pre, suf, mid = self.fim_tokens
        bos = [] if self.bos_token is None else [self.bos_token]
        return bos + [pre, *self.tokenize(prefix, False), suf, *self.tokenize(suffix, False), mid]

    def _output(self, seq: Any, text: str, finish: str | None, completion_tokens: int, prompt_evaluated: int,
                now: float) -> wire.Output:
        """One step's Output of a sequence; the last one (finish set) carries the timings and frees the sequence."""
        output = wire.Output(
            id=seq.request.id,
            text=text,
            finish_reason=finish,
            prompt_tokens=len(seq.prompt),
            completion_tokens=completion_tokens,
            logprobs=seq.logprobs,
        )
        # a token whose text is held back (part of a character or of a stop string) goes out with the next Output
        seq.logprobs = []
        if finish is not None:
            output.timings = wire.Timings(
                prompt_n=prompt_evaluated,
                prompt_ms=(seq.first_token_at - seq.started) * 1000,
                predicted_n=completion_tokens,
                predicted_ms=(now - seq.first_token_at) * 1000,
            )
            self._release(seq)
        return output

    def _prompt_tokens(self, request: wire.Generate) -> list[int]:
        """The prompt as token ids (chat messages through the model's template); ValueError if it can't be made."""
        raise NotImplementedError

    def _queue(self, request: wire.Generate, prompt: list[int], max_tokens: int) -> wire.Output | None:
        """Put a checked request in `waiting`, or refuse it with a failure Output."""
        raise NotImplementedError

    def _release(self, seq: Any) -> None:
        raise NotImplementedError


def schema_refused(request: wire.Generate, reason: str) -> wire.Output:
    """The 400 for a JSON schema (from response_format or tools) that the engine cannot enforce."""
    return wire.failed(request.id, 400, f"the JSON schema cannot be enforced: {reason}", param="response_format")


def completion_budget(request: wire.Generate, prompt: list[int], context: int) -> int | wire.Output:
    """How many tokens the request may generate, or the 400 to answer when it cannot fit the context."""
    if not prompt:
        return wire.failed(request.id, 400, "the prompt is empty", param="prompt")
    asked = request.params.max_tokens
    max_tokens = context - len(prompt) if asked is None else asked
    if len(prompt) + max(max_tokens, 1) <= context:
        return max_tokens
    return wire.failed(
        request.id,
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{len(prompt) + (asked or 0)} tokens ({len(prompt)} in the prompt, {asked or 0} for the completion). "
        "Please reduce the length of the prompt or the completion.",
        param="messages" if request.messages is not None else "prompt",
        code="context_length_exceeded",
    )
