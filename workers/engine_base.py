"""What every engine shares: the request queue, aborts, and the check before a request is queued."""

from __future__ import annotations

from collections import deque
from typing import Any

from infersnap import wire


class BatchingEngine:
    """Requests wait in `waiting` until the engine admits them into `running`; the worker loop
    reports both counts in its heartbeats. Subclasses set `context`, tokenize in
    `_prompt_tokens`, build their sequence in `_queue` and free its resources in `_release`."""

    context: int

    def __init__(self) -> None:
        self.waiting: deque[Any] = deque()
        self.running: list[Any] = []

    def add(self, request: wire.Generate) -> wire.Output | None:
        """Queue a request; return a failure Output at once if it cannot be served."""
        try:
            prompt = self._prompt_tokens(request)
        except ValueError as exc:
            return wire.failed(request.id, 400, f"could not format the prompt: {exc}", param="messages")
        max_tokens = completion_budget(request, prompt, self.context)
        if isinstance(max_tokens, wire.Output):
            return max_tokens
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

    def _output(self, seq: Any, text: str, finish: str | None, completion_tokens: int, prompt_evaluated: int,
                now: float) -> wire.Output:
        """One step's Output of a sequence; the last one (finish set) carries the timings and frees the sequence."""
        output = wire.Output(
            id=seq.request.id,
            text=text,
            finish_reason=finish,
            prompt_tokens=len(seq.prompt),
            completion_tokens=completion_tokens,
        )
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
