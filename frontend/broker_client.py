"""The frontend's connection to the broker: submit requests, read their outputs.

One DEALER socket per frontend process. A request goes as a Submit (what the
broker routes it by) and its body. A reader task takes every Results
message off the socket and hands each Output to the queue of the request
it belongs to, so a request handler only ever awaits its own queue; a
status query awaits a future that the reader resolves by id.

A watch task asks the broker, every WATCH_SECONDS while requests are
pending, which requests it still routes: one it has lost (a broker that
restarted knows none) ends with a 503, and a broker that does not answer
ends them all and the socket is made anew, so no request waits forever.
"""

from __future__ import annotations

import asyncio
import uuid

import zmq
import zmq.asyncio

from infersnap import paths, wire

LOOKUP_TIMEOUT = 30.0  # seconds; a worker answers a lookup between two engine steps
WATCH_SECONDS = 1.0
STATUS_TIMEOUT = 2.0


class BrokerUnavailable(Exception):
    pass


class BrokerClient:
    def __init__(self) -> None:
        self.zctx = zmq.asyncio.Context()
        self.socket = self._connect()
        self.requests: dict[str, asyncio.Queue[wire.Output]] = {}  # pending requests' output queues
        self.replies: dict[str, asyncio.Future] = {}  # status replies awaited, by query id
        self._reader: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None

    def _connect(self) -> zmq.asyncio.Socket:
        socket = self.zctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(paths.socket_address("clients"))
        return socket

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._watch = loop.create_task(self._watch_routes())

    async def close(self) -> None:
        for task in (self._reader, self._watch):
            if task:
                task.cancel()
        self.socket.close()
        self.zctx.term()

    async def _read(self) -> None:
        while True:
            message = wire.decode(await self.socket.recv())
            if isinstance(message, wire.Results):
                for output in message.outputs:
                    queue = self.requests.get(output.id)
                    if queue is None:  # aborted, or ended by the watch meanwhile
                        continue
                    if output.finish_reason is not None:
                        del self.requests[output.id]
                    queue.put_nowait(output)
            elif isinstance(message, wire.Status):
                future = self.replies.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)

    async def submit(self, request: wire.Request, outputs: asyncio.Queue[wire.Output]) -> None:
        """Send a request; its outputs go to `outputs` (which several requests may share)."""
        # encoded first: a request that cannot be encoded leaves nothing behind
        frames = [wire.encode(wire.Submit(request.id, request.model, wire.needs_of(request), wire.work_of(request))), wire.encode(request)]
        self.requests[request.id] = outputs
        await self.socket.send_multipart(frames)

    async def answer(self, request: wire.Request, timeout: float = LOOKUP_TIMEOUT) -> wire.Output:
        """The one Output that answers a request (a tokenizer lookup), or the failure that ended it."""
        outputs: asyncio.Queue[wire.Output] = asyncio.Queue()
        await self.submit(request, outputs)
        try:
            return await asyncio.wait_for(outputs.get(), timeout)
        except asyncio.TimeoutError:
            self.abort(request.id)
            return wire.failed(request.id, 503, "no worker answered; retry shortly")

    async def control(self, message: wire.ModelControl) -> wire.Output:
        """Ask the broker to load or unload a model; its answer is one Output, as any request's."""
        outputs: asyncio.Queue[wire.Output] = asyncio.Queue()
        self.requests[message.id] = outputs
        await self.socket.send(wire.encode(message))
        try:
            return await asyncio.wait_for(outputs.get(), STATUS_TIMEOUT)
        except asyncio.TimeoutError:
            self.requests.pop(message.id, None)
            return wire.failed(message.id, 503, "the server's broker does not answer; please retry")

    def abort(self, request_id: str) -> None:
        """Stop a request; synchronous so it can run while the handler is being cancelled."""
        self.requests.pop(request_id, None)
        self.socket.send(wire.encode(wire.Abort(ids=[request_id])), zmq.NOBLOCK)

    async def status(self, timeout: float = STATUS_TIMEOUT) -> wire.Status:
        query = wire.StatusQuery(id=uuid.uuid4().hex)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.replies[query.id] = future
        await self.socket.send(wire.encode(query))
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise BrokerUnavailable("the broker did not answer") from None
        finally:
            self.replies.pop(query.id, None)

    async def _watch_routes(self) -> None:
        """End the pending requests the broker no longer routes. Requests and status queries share
        the socket, so the broker has seen every request sent before the query it answers."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            if not self.requests:
                continue
            pending = list(self.requests)
            try:
                routed = set((await self.status()).routed)
            except BrokerUnavailable:
                self._end(pending, "the server's broker does not answer; please retry")
                self._reconnect()
                continue
            self._end([i for i in pending if i not in routed], "the server lost this request while restarting; please retry")

    def _end(self, ids: list[str], message: str) -> None:
        for request_id in ids:
            queue = self.requests.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(wire.failed(request_id, 503, message))

    def _reconnect(self) -> None:
        """A new socket, so that nothing queued for a lost broker reaches its successor."""
        if self._reader:
            self._reader.cancel()
        self.socket.close()
        self.socket = self._connect()
        self._reader = asyncio.get_running_loop().create_task(self._read())
