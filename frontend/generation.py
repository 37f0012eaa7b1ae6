"""Following one API request's generations: one engine request per choice (`n` for each prompt), read from one queue.

Each choice is its own Generate with its own id, so the broker spreads the
choices over free slots like any requests; their outputs arrive on one
queue, interleaved, and each is labelled here with its choice index.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec

from infersnap import wire
from infersnap.frontend.broker_client import BrokerClient

INT64 = 2**64


def choice_layout(prompts: int, n: int) -> list[tuple[int, int]]:
    """(prompt, j) of each choice index, as OpenAI numbers them: prompt by prompt, `n` choices of each."""
    return [(p, j) for p in range(prompts) for j in range(n)]


def choice_requests(prompts: list[wire.Generate], n: int) -> list[wire.Generate]:
    """The engine requests for `n` choices of each prompt's Generate (which share the request's id):
    choice i keeps the id for i = 0 and adds `-i` for the others. A seeded request gives a prompt's
    j-th choice the seed seed + j, so that its choices differ but repeat."""
    requests = []
    for index, (p, j) in enumerate(choice_layout(len(prompts), n)):
        generate = prompts[p]
        params = generate.params
        if params.seed is not None and j:  # wrapped into int64, the wire's range
            params = msgspec.structs.replace(params, seed=(params.seed + j + INT64 // 2) % INT64 - INT64 // 2)
        request_id = generate.id if index == 0 else f"{generate.id}-{index}"
        requests.append(msgspec.structs.replace(generate, id=request_id, params=params))
    return requests


class Generation:
    """The outputs of a request's choices, in arrival order, until every choice has finished."""

    def __init__(
        self, broker: BrokerClient, requests: Sequence[wire.Request], deadline: float | None, choices_per_prompt: int = 1
    ) -> None:
        self.broker = broker
        self.requests = list(requests)
        self.choices_per_prompt = choices_per_prompt
        self.index = {r.id: i for i, r in enumerate(requests)}
        self.deadline = deadline
        self.last: list[wire.Output | None] = [None] * len(requests)  # each choice's last output so far
        self.outputs: asyncio.Queue[wire.Output] = asyncio.Queue()

    async def start(self) -> None:
        for request in self.requests:
            await self.broker.submit(request, self.outputs)

    @property
    def unfinished(self) -> list[str]:
        return [r.id for r, last in zip(self.requests, self.last) if last is None or last.finish_reason is None]

    @property
    def done(self) -> bool:
        return not self.unfinished

    async def next(self) -> tuple[int, wire.Output]:
        """The next output and its choice's index; past the request's deadline, the 504 that ends it
        (then its choices are stopped). The broker client ends a request its broker lost."""
        output = await self._next_output()
        i = self.index[output.id]  # the client hands this queue only its outputs
        self.last[i] = output
        return i, output

    async def _next_output(self) -> wire.Output:
        if self.deadline is None or not self.outputs.empty():  # wait_for(..., 0) would time out even with one waiting
            return await self.outputs.get()
        try:
            return await asyncio.wait_for(self.outputs.get(), max(self.deadline - asyncio.get_running_loop().time(), 0))
        except asyncio.TimeoutError:
            unfinished = self.unfinished
            self.close()  # now: once the failure below is filed, its choice no longer counts as unfinished
            return wire.failed(
                unfinished[0], 504, "the request took longer than the server's queue.request-timeout", code="timeout"
            )

    def close(self) -> None:
        """Stop the choices still generating (the client left, or one choice failed)."""
        for request_id in self.unfinished:
            self.broker.abort(request_id)

    @property
    def ended(self) -> list[wire.Output]:
        """The last Output of each choice that ended, with an answer or an error."""
        return [o for o in self.last if o is not None and o.finish_reason is not None]

    @property
    def prompt_tokens(self) -> int:
        """The prompt tokens as usage counts them: once per prompt, not once per choice."""
        layout = choice_layout(len(self.requests) // self.choices_per_prompt, self.choices_per_prompt)
        return sum(o.prompt_tokens for o, (_, j) in zip(self.last, layout) if o is not None and j == 0)

    def summary(self) -> wire.Output | None:
        """All choices as one last Output for usage: each prompt counted once, the completions summed;
        the timings when there is a single choice. None until every choice has finished."""
        if not self.done:
            return None
        outputs: list[wire.Output] = self.last  # type: ignore[assignment]
        if len(outputs) == 1:
            return outputs[0]
        return wire.Output(
            id=outputs[0].id,
            finish_reason=outputs[0].finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=sum(o.completion_tokens for o in outputs),
        )
