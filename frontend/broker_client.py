"""The frontend's connection to the broker: submit requests, read their outputs.

One DEALER socket per frontend process. A reader task takes every Results
message off the socket and hands each Output to the queue of the request
it belongs to, so a request handler only ever awaits its own queue. A
message with a single reply (a status query, a tokenizer lookup) awaits a
future that the reader resolves by id.
"""

from __future__ import annotations

import asyncio
import uuid

import zmq
import zmq.asyncio

from infersnap import paths, wire

LOOKUP_TIMEOUT = 30.0  # seconds; a worker answers a lookup between two engine steps


class BrokerUnavailable(Exception):
    pass


class BrokerClient:
    def __init__(self) -> None:
        self.zctx = zmq.asyncio.Context()
        self.socket = self.zctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(paths.socket_address("clients"))
        self.requests: dict[str, asyncio.Queue[wire.Output]] = {}
        self.replies: dict[str, asyncio.Future] = {}  # single replies awaited, by message id
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        self.socket.close()
        self.zctx.term()

    async def _read(self) -> None:
        while True:
            message = wire.decode(await self.socket.recv())
            if isinstance(message, wire.Results):
                for output in message.outputs:
                    queue = self.requests.get(output.id)
                    if queue is not None:
                        queue.put_nowait(output)
                    else:  # a lookup the broker ended early (no worker, worker lost) gets a failed Output
                        self._resolve(output.id, output)
            elif isinstance(message, (wire.Status, wire.TokenizeResult)):
                self._resolve(message.id, message)

    def _resolve(self, reply_id: str, reply: wire.Message | wire.Output) -> None:
        future = self.replies.pop(reply_id, None)
        if future is not None and not future.done():
            future.set_result(reply)

    async def _ask(self, message: wire.Message, reply_id: str, timeout: float) -> wire.Message | wire.Output:
        """Send `message` and await the one reply with id `reply_id`."""
        data = wire.encode(message)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.replies[reply_id] = future
        await self.socket.send(data)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailable("the broker did not answer") from None
        finally:
            self.replies.pop(reply_id, None)

    async def submit(self, request: wire.Request, outputs: asyncio.Queue[wire.Output]) -> None:
        """Send a request; its outputs go to `outputs` (which several requests may share)."""
        message = wire.encode(request)  # first: a request that cannot be encoded leaves nothing behind
        self.requests[request.id] = outputs
        await self.socket.send(message)

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request; synchronous so it can run while the handler is being cancelled."""
        self.forget(request_id)
        self.socket.send(wire.encode(wire.Abort(ids=[request_id])), zmq.NOBLOCK)

    async def status(self, timeout: float = 2.0) -> wire.Status:
        query = wire.StatusQuery(id=uuid.uuid4().hex)
        return await self._ask(query, query.id, timeout)

    async def lookup(
        self, request: wire.Tokenize | wire.Detokenize, timeout: float = LOOKUP_TIMEOUT
    ) -> wire.TokenizeResult:
        """A worker's answer to a tokenizer lookup, or the failure that ended it."""
        try:
            reply = await self._ask(request, request.id, timeout)
        except BrokerUnavailable:
            self.abort(request.id)  # the broker, if it is there, forgets it
            return wire.TokenizeResult(request.id, failure=wire.Failure(503, "no worker answered; retry shortly"))
        if isinstance(reply, wire.Output):
            return wire.TokenizeResult(request.id, failure=reply.failure)
        return reply
