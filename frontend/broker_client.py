"""The frontend's connection to the broker: post requests, read their outputs, follow the broker's status.

One DEALER socket per frontend process. A request goes as a Submit (what the
broker routes it by) and its body; a ModelControl alone (the broker answers
it itself). A reader task takes every message off the socket: it hands each
output to the queue of the request it belongs to (a Reader, frontend/reader.py,
reads that queue), and keeps the latest Status.

The frontend follows the broker's status: it asks once with
StatusQuery(follow=True), and the broker then pushes a Status whenever it
changes, and at least every second. /health, /metrics and /v1/models answer
from the latest one. A broker that has said nothing for SILENT_SECONDS is
asked again: one that restarted (a new boot) knows no follower and none of
the requests sent before it started, which end with a 503; one that does
not answer ends every pending request, and the socket is made anew, so no
request waits forever.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import zmq
import zmq.asyncio

from infersnap import paths, routing, wire

WATCH_SECONDS = 1.0
SILENT_SECONDS = 2.5  # the broker pushes a Status at least every second: this long without a word, it is asked
STATUS_TIMEOUT = 2.0


class BrokerUnavailable(Exception):
    pass


class BrokerClient:
    def __init__(self, on_replan: Callable[[], None] | None = None) -> None:
        """`on_replan`: called when the broker read the plan file anew (or is a new broker), to read it too."""
        self.zctx = zmq.asyncio.Context()
        self.socket = self._connect()
        self.requests: dict[str, asyncio.Queue[wire.Output]] = {}  # pending requests' output queues
        self.replies: dict[str, asyncio.Future[wire.Status]] = {}  # status replies awaited, by query id
        self.latest: wire.Status | None = None  # the broker's Status as it last sent it
        self.heard_at = 0.0  # when the broker last sent a Status, on the event loop's clock
        self.on_replan = on_replan
        self._reader: asyncio.Task | None = None
        self._follower: asyncio.Task | None = None

    def _connect(self) -> zmq.asyncio.Socket:
        socket = self.zctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(paths.socket_address("clients"))
        return socket

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._follower = loop.create_task(self._follow())

    async def close(self) -> None:
        for task in (self._reader, self._follower):
            if task:
                task.cancel()
        self.socket.close()
        self.zctx.term()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = wire.decode(await self.socket.recv())
            if isinstance(message, wire.Results):
                for output in message.outputs:
                    queue = self.requests.get(output.id)
                    if queue is None:  # aborted, or ended by the follower meanwhile
                        continue
                    if isinstance(output, wire.Ending):
                        del self.requests[output.id]
                    queue.put_nowait(output)
            elif isinstance(message, wire.Status):
                # only a Status counts as hearing from it: a broker started anew answers requests sent to it
                # but pushes nothing to a client it does not know follows it
                self.heard_at = loop.time()
                self._keep(message)
                future = self.replies.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)

    def _keep(self, status: wire.Status) -> None:
        previous, self.latest = self.latest, status
        if self.on_replan is not None and (previous is None or (previous.boot, previous.replans) != (status.boot, status.replans)):
            self.on_replan()

    async def post(self, request: wire.Request | wire.ModelControl, outputs: asyncio.Queue[wire.Output]) -> None:
        """Send a request; its outputs go to `outputs` (which several requests may share)."""
        # encoded first: a request that cannot be encoded leaves nothing behind
        if isinstance(request, wire.ModelControl):
            frames = [wire.encode(request)]
        else:
            submit = wire.Submit(request.id, request.model, routing.needs_of(request), routing.work_of(request))
            frames = [wire.encode(submit), wire.encode(request)]
        self.requests[request.id] = outputs
        await self.socket.send_multipart(frames)

    def abort(self, request_id: str) -> None:
        """Stop a request; synchronous so it can run while the handler is being cancelled."""
        self.requests.pop(request_id, None)
        self.socket.send(wire.encode(wire.Abort(ids=[request_id])), zmq.NOBLOCK)

    async def status(self, fresh: bool = False) -> wire.Status:
        """The broker's Status as it last sent it; asked for now when `fresh` (what a request just changed)
        or when the broker has been silent. BrokerUnavailable if it does not answer."""
        if not fresh and self.latest is not None and asyncio.get_running_loop().time() - self.heard_at < SILENT_SECONDS:
            return self.latest
        return await self._ask()

    async def _ask(self) -> wire.Status:
        # following again is harmless, and a broker that restarted learns of this client
        query = wire.StatusQuery(id=uuid.uuid4().hex, follow=True)
        future: asyncio.Future[wire.Status] = asyncio.get_running_loop().create_future()
        self.replies[query.id] = future
        await self.socket.send(wire.encode(query))
        try:
            return await asyncio.wait_for(future, STATUS_TIMEOUT)
        except asyncio.TimeoutError:
            raise BrokerUnavailable("the broker did not answer") from None
        finally:
            self.replies.pop(query.id, None)

    async def _follow(self) -> None:
        """Follow the broker from the start, and ask again when it has been silent: end the pending requests
        it no longer routes. Requests and status queries share the socket, so the broker has seen every
        request sent before the query it answers."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() - self.heard_at >= SILENT_SECONDS:
                pending = list(self.requests)
                try:
                    routed = set((await self._ask()).routed)
                except BrokerUnavailable:
                    self._end(pending, "the server's broker does not answer; please retry")
                    self._reconnect()
                    continue
                self._end([i for i in pending if i not in routed], "the server lost this request while restarting; please retry")
            await asyncio.sleep(WATCH_SECONDS)

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
