"""What a request is routed by, read where the request is made (the frontend) and checked where it runs
(the engine): its needs against a worker's capabilities, and its size.

One rule, `unmet`, decides both whether the broker may send a request to a worker and whether the
worker's engine takes it, so a request is accepted or refused the same way whichever worker takes it;
`refusal` words the 400 for a request no worker of its model can ever serve. `work_of` is what the
broker's lane policy guesses a request's cost from, without reading its body.
"""

from __future__ import annotations

import hashlib

from infersnap.runtimes import display
from infersnap.wire import Capabilities, Embed, Failure, Generate, Needs, Request, Work, failed

BAN = -100.0  # a logit_bias at or below this bans the token (OpenAI's convention)

# The features a request may need beyond plain generation, and what a refusal says each one is.
FEATURES = {
    "top_logprobs": "`{param}` above 0 (the most likely tokens at each place)",
    "prompt_logprobs": "`echo` with `logprobs` (logprobs of the prompt's tokens)",
    "logit_bias": "`logit_bias` other than banning (-100) every end-of-text token",
    "fim": "fill-in-the-middle with `suffix` (it needs a model with fill-in-the-middle tokens)",
}


def needs_of(request: Request) -> Needs:
    """What a worker must be able to do to serve this request."""
    if isinstance(request, Embed):
        return Needs("embed")
    if not isinstance(request, Generate):
        return Needs("tokenize")
    params, features = request.params, {}
    if params.prompt_logprobs >= 0:  # first: a refusal names `echo`, the parameter that asks for more
        features["prompt_logprobs"] = "echo"
    if params.logprobs > 0:
        features["top_logprobs"] = "top_logprobs" if request.messages is not None else "logprobs"
    if request.suffix:
        features["fim"] = "suffix"
    bans = None
    if params.logit_bias:
        features["logit_bias"] = "logit_bias"
        if all(bias <= BAN for bias in params.logit_bias.values()):
            bans = sorted(params.logit_bias)
    return Needs("generate", features, bans, params.json_schema is not None)


CHARS_PER_TOKEN = 4  # English text in the BPE vocabularies of small models, near enough to route by


PREFIX_BLOCK = 1024  # characters
PREFIX_BLOCKS = 64  # the longest beginning counted: 64 KiB


def work_of(request: Request) -> Work:
    """What the broker needs to know of a request's size."""
    if isinstance(request, Embed):
        chars = sum(map(len, request.texts)) + CHARS_PER_TOKEN * sum(map(len, request.token_lists))
        return Work(chars // CHARS_PER_TOKEN, keep_alive=request.keep_alive)
    if not isinstance(request, Generate):
        return Work()
    if request.messages is not None:
        text = "".join(f"{m.role}\0{m.content}\0" for m in request.messages)
    else:
        text = request.prompt or ""
    return Work(len(text + (request.suffix or "")) // CHARS_PER_TOKEN + 1, request.params.max_tokens,
                request.params.seed is not None, prefix_hashes(text), request.keep_alive)


def prefix_hashes(text: str) -> list[int]:
    """The hash of text[:PREFIX_BLOCK * (i + 1)] for each whole block i (see Work.prefix)."""
    running, hashes = hashlib.blake2b(digest_size=8), []
    for start in range(0, min(len(text), PREFIX_BLOCK * PREFIX_BLOCKS) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        running.update(text[start:start + PREFIX_BLOCK].encode())
        hashes.append(int.from_bytes(running.copy().digest(), "little"))
    return hashes


def unmet(needs: Needs, can: Capabilities) -> str | None:
    """The first feature these needs ask for that a worker with these capabilities lacks; None if it can serve them."""
    if needs.task not in can.tasks:
        return needs.task
    for feature in needs.features:
        if feature in can.features:
            continue
        if feature == "logit_bias" and _bans_allowed(needs, can):
            continue
        return feature
    return None


def _bans_allowed(needs: Needs, can: Capabilities) -> bool:
    return (
        can.ban_with is not None and needs.bans is not None and not needs.json_schema
        and set(can.ban_with) <= set(needs.bans)
    )


def refusal(request_id: str, needs: Needs, feature: str, runtimes: list[str], model: str) -> Failure:
    """The 400 for a request that no worker serving its model can ever serve, naming the parameter."""
    param = needs.features.get(feature, feature)
    what = FEATURES.get(feature, f"`{feature}`").format(param=param)
    engines = " and ".join(sorted({display(r) for r in runtimes}))
    message = f"{what} is not supported by the {engines} engine{'s' if ' and ' in engines else ''} serving '{model}'"
    return failed(request_id, 400, message, param=param)
