"""The frontend's connection to the broker: submit requests, read their outputs.

One DEALER socket per frontend process. A reader task takes every Results
message off the socket and hands each Output to the queue of the request
it belongs to, so a request handler only ever awaits its own queue.
"""

from __future__ import annotations

import asyncio
import uuid

import zmq
import zmq.asyncio

from infersnap import paths, wire


class BrokerUnavailable(Exception):
    pass


class BrokerClient:
    def __init__(self) -> None:
        self.zctx = zmq.asyncio.Context()
        self.socket = self.zctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(paths.socket_address("clients"))
        self.requests: dict[str, asyncio.Queue[wire.Output]] = {}
        self.status_replies: dict[str, asyncio.Future[wire.Status]] = {}
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
            elif isinstance(message, wire.Status):
                future = self.status_replies.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)

    async def submit(self, request: wire.Generate) -> asyncio.Queue[wire.Output]:
        message = wire.encode(request)  # first: a request that cannot be encoded leaves nothing behind
        queue: asyncio.Queue[wire.Output] = asyncio.Queue()
        self.requests[request.id] = queue
        await self.socket.send(message)
        return queue

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request; synchronous so it can run while the handler is being cancelled."""
        self.forget(request_id)
        self.socket.send(wire.encode(wire.Abort(ids=[request_id])), zmq.NOBLOCK)

    async def status(self, timeout: float = 2.0) -> wire.Status:
        query_id = uuid.uuid4().hex
        future: asyncio.Future[wire.Status] = asyncio.get_running_loop().create_future()
        self.status_replies[query_id] = future
        await self.socket.send(wire.encode(wire.StatusQuery(id=query_id)))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailable("the broker did not answer") from None
        finally:
            self.status_replies.pop(query_id, None)
