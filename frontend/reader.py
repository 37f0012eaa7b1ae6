"""Reading what one API request asked of the broker: one Reader per API request, as llama.cpp's
server_response_reader is.

A Reader posts the request's engine requests (a Generate per choice: `n` of each prompt; or an Embed, a
tokenizer lookup, a ModelControl), hands their outputs over in arrival order with their request's index
(`next`), or waits until every one has ended (`wait`), and, leaving its `async with` block however it
leaves (the client went away, a send failed, one choice failed), cancels those not ended. Each choice is
its own Generate with its own id, so the broker spreads the choices over free slots like any requests;
their outputs arrive on one queue, interleaved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

import msgspec

from infersnap import wire
from infersnap.frontend.broker_client import BrokerClient
from infersnap.frontend.errors import failure_error

INT64 = 2**64
TIMED_OUT = wire.Failure("", 504, "the request took longer than the server's queue.request-timeout", code="timeout")


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


class Reader:
    """The outputs of one API request's engine requests, until every one has ended."""

    def __init__(
        self, broker: BrokerClient, requests: Sequence[wire.Request | wire.ModelControl], timeout: float | None,
        late: wire.Failure = TIMED_OUT, choices_per_prompt: int = 1,
    ) -> None:
        """`timeout`: seconds from now until the request ends with `late` (its first request not ended then
        gets it, and the others are cancelled); None: no limit."""
        self.broker = broker
        self.requests = list(requests)
        self.choices_per_prompt = choices_per_prompt
        self.index = {r.id: i for i, r in enumerate(requests)}
        self.deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        self.late = late
        self.ends: list[wire.Ending | None] = [None] * len(requests)  # the output that ended each request
        self.outputs: asyncio.Queue[wire.Output] = asyncio.Queue()

    async def __aenter__(self) -> Reader:
        """Post the requests (any posted before one that fails to go are cancelled)."""
        try:
            for request in self.requests:
                await self.broker.post(request, self.outputs)
        except BaseException:
            self.cancel()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cancel()

    @property
    def ended(self) -> bool:
        """Whether every request has ended, with an answer or a Failure."""
        return all(end is not None for end in self.ends)

    async def next(self) -> tuple[int, wire.Output]:
        """The next output and its request's index; past the deadline, the `late` Failure that ends the
        first request not ended (then the others are cancelled). The broker client ends a request its
        broker lost."""
        output = await self._next_output()
        i = self.index[output.id]  # the client hands this queue only its outputs
        if isinstance(output, wire.Ending):
            self.ends[i] = output
        return i, output

    async def wait(self) -> list[wire.Ending]:
        """Every request's ending, once all have ended (text chunks on the way are dropped: a generation is
        read with `next`); a Failure raises as its API error."""
        while not self.ended:
            _, output = await self.next()
            if isinstance(output, wire.Failure):
                raise failure_error(output)
        return self.ends  # type: ignore[return-value]

    def cancel(self) -> None:
        """Stop the requests not ended (the client left, or one choice failed)."""
        for request_id in self._not_ended():
            self.broker.abort(request_id)

    def _not_ended(self) -> list[str]:
        return [r.id for r, end in zip(self.requests, self.ends) if end is None]

    async def _next_output(self) -> wire.Output:
        if self.deadline is None or not self.outputs.empty():  # wait_for(..., 0) would time out even with one waiting
            return await self.outputs.get()
        try:
            return await asyncio.wait_for(self.outputs.get(), max(self.deadline - asyncio.get_running_loop().time(), 0))
        except asyncio.TimeoutError:
            not_ended = self._not_ended()
            self.cancel()  # now: once the failure below is filed, its request counts as ended
            return msgspec.structs.replace(self.late, id=not_ended[0])

    @property
    def prompt_tokens(self) -> int:
        """The prompt tokens as usage counts them: once per prompt, not once per choice."""
        layout = choice_layout(len(self.requests) // self.choices_per_prompt, self.choices_per_prompt)
        return sum(end.prompt_tokens for end, (_, j) in zip(self.ends, layout)
                   if isinstance(end, (wire.Final, wire.Embeddings)) and j == 0)

    def summary(self) -> wire.Final | None:
        """All choices as one Final for usage: each prompt counted once, the completions summed; the timings
        when there is a single choice. None until every choice has ended with an answer."""
        finals = [end for end in self.ends if isinstance(end, wire.Final)]
        if len(finals) < len(self.ends):
            return None
        if len(finals) == 1:
            return finals[0]
        return wire.Final(finals[0].id, finals[0].finish_reason, prompt_tokens=self.prompt_tokens,
                          completion_tokens=sum(f.completion_tokens for f in finals))
