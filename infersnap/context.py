"""The context each sequence gets: the model's trained context, lowered only as far as memory needs.

Both engines hold every slot's KV cache at full context: llama.cpp allocates (and clears) `slots`
streams of `context` tokens when it loads; OpenVINO sizes its paged cache (`num_kv_blocks`) for every
slot full and fills it as sequences grow. So what a context costs is known before anything loads:
sequences x context x the model's KV bytes per token, plus a copy of the weights per worker.
"""

from __future__ import annotations

import msgspec

from infersnap.models import ModelShape

FALLBACK_CONTEXT = 2048  # for a model whose file does not say its trained context
MIN_CONTEXT = 2048  # memory never lowers the context below this (or the model's own, if smaller)


class Pool(msgspec.Struct, frozen=True):
    """Memory that some workers share (the machine's RAM, or one GPU's own memory)."""

    name: str  # "memory", or a device with its own ("cuda:0")
    budget_bytes: int  # what those workers may use; 0: unknown, no limit
    sequences: int  # KV cache streams of `context` tokens held there
    copies: int  # copies of the weights held there


class ContextChoice(msgspec.Struct, frozen=True):
    tokens: int
    why: str  # for `infersnap status`


def needed_bytes(shape: ModelShape, pool: Pool, context: int) -> int:
    return pool.copies * shape.weights_bytes + pool.sequences * context * shape.kv_bytes_per_token


def choose(configured: int | None, shape: ModelShape, pools: list[Pool]) -> ContextChoice:
    """`configured` (worker.context as the user set it, capped at the model's), or with None the model's
    trained context, halved while some pool's workers would not fit in its budget (not below MIN_CONTEXT).
    Halving, not the exact fit, so that a little more or less free memory does not change the context
    (and with it the profiles' keys)."""
    trained = shape.trained_context
    if configured is not None:
        if trained and configured > trained:
            return ContextChoice(trained, f"worker.context is {configured}; capped at the model's trained context")
        return ContextChoice(configured, "set by worker.context")
    if not trained:
        return ContextChoice(FALLBACK_CONTEXT, "the model does not say its trained context")
    tokens, floor = trained, min(trained, MIN_CONTEXT)

    def short() -> Pool | None:
        return next((p for p in pools if p.budget_bytes and needed_bytes(shape, p, tokens) > p.budget_bytes), None)

    first = short()
    while tokens > floor and short() is not None:
        tokens = max(floor, tokens // 2)
    if first is None:
        return ContextChoice(tokens, "the model's trained context")
    why = (f"lowered from the model's trained context of {trained}: {first.sequences} sequences of it "
           f"and {first.copies} copies of the weights would need {needed_bytes(shape, first, trained) >> 20} MiB "
           f"of {first.name}, more than the {first.budget_bytes >> 20} MiB the workers may use there")
    return ContextChoice(tokens, why)
