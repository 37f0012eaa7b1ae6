"""The checks every engine makes before it queues a request."""

from __future__ import annotations

from infersnap import wire


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
