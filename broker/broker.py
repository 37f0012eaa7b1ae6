"""Routes requests from frontends (and CLI queries) to workers, and results back.

Two ROUTER sockets: clients (frontends and the CLI) and workers. Workers
announce themselves and heartbeat with WorkerStatus; a worker silent for
longer than WORKER_TIMEOUT is dropped and its requests end with an error,
so no request waits forever on a dead process. A request goes to the
ready worker serving its model with the lowest load, counting a waiting
request as four running ones, as vLLM does; when even that worker has
`max_waiting` requests queued beyond its slots, the request is refused with
503 at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import zmq

from infersnap import paths, wire
from infersnap.plan import ServePlan

WORKER_TIMEOUT = 1.5  # seconds without a heartbeat before a worker counts as dead
TICK_MS = 250

log = logging.getLogger("infersnap.broker")


@dataclass
class Route:
    client: bytes
    worker: bytes


@dataclass
class Worker:
    identity: bytes
    info: wire.WorkerInfo
    last_seen: float
    in_flight: set[str] = field(default_factory=set)

    @property
    def load(self) -> int:
        # The broker's own count is current; the heartbeat's split tells how many wait.
        waiting = min(self.info.waiting, len(self.in_flight))
        return 4 * waiting + (len(self.in_flight) - waiting)


class Broker:
    def __init__(self, plan: ServePlan, zctx: zmq.Context | None = None) -> None:
        self.plan = plan
        self.zctx = zctx or zmq.Context.instance()
        self.clients = self._bind("clients")
        self.workers_socket = self._bind("workers")
        self.workers: dict[bytes, Worker] = {}
        self.routes: dict[str, Route] = {}

    def _bind(self, name: str) -> zmq.Socket:
        socket = self.zctx.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over its old identity
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises instead of vanishing
        socket.bind(paths.socket_address(name))
        return socket

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.clients, zmq.POLLIN)
        poller.register(self.workers_socket, zmq.POLLIN)
        while True:
            events = dict(poller.poll(TICK_MS))
            if self.workers_socket in events:
                self._drain(self.workers_socket, self._on_worker)
            if self.clients in events:
                self._drain(self.clients, self._on_client)
            self._reap(time.monotonic())

    @staticmethod
    def _drain(socket: zmq.Socket, handle) -> None:
        while True:
            try:
                identity, payload = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not the two frames a peer sends: ignore it
                continue
            try:
                message = wire.decode(payload)
            except Exception:
                log.warning("dropped an undecodable message")
                continue
            handle(identity, message)

    # --- clients -----------------------------------------------------------

    def _on_client(self, client: bytes, message: wire.Message) -> None:
        if isinstance(message, wire.Generate):
            self._route(client, message)
        elif isinstance(message, wire.Abort):
            self._abort(message.ids)
        elif isinstance(message, wire.StatusQuery):
            self._send(self.clients, client, self.status(message.id))

    def _route(self, client: bytes, request: wire.Generate) -> None:
        serving = [w for w in self.workers.values() if w.info.model.lower() == request.model.lower()]
        ready = [w for w in serving if w.info.state == "ready"]
        if not ready:
            failed = [w.info for w in serving if w.info.state == "failed"]
            if failed and len(failed) == len(serving):
                reasons = "; ".join(f"{w.worker_id}: {w.error}" for w in failed)
                refusal = wire.failed(request.id, 503, f"no worker could load this model ({reasons})")
            elif serving or not self.workers:
                refusal = wire.failed(request.id, 503, "no worker is ready to serve this model yet; retry shortly")
            else:
                known = ", ".join(sorted({w.info.model for w in self.workers.values()}))
                refusal = wire.failed(
                    request.id,
                    404,
                    f"The model '{request.model}' does not exist. Models served here: {known}",
                    code="model_not_found",
                    param="model",
                )
            self._send(self.clients, client, wire.Results(outputs=[refusal]))
            return
        worker = min(ready, key=lambda w: w.load)
        if len(worker.in_flight) >= worker.info.slots + self.plan.max_waiting:
            # Refuse at once rather than queue without end; the frontend adds Retry-After.
            refusal = wire.failed(request.id, 503, "the server is at capacity; retry shortly", code="server_overloaded")
            self._send(self.clients, client, wire.Results(outputs=[refusal]))
            return
        self.routes[request.id] = Route(client=client, worker=worker.identity)
        worker.in_flight.add(request.id)
        self._send(self.workers_socket, worker.identity, request)

    def _abort(self, ids: list[str]) -> None:
        by_worker: dict[bytes, list[str]] = {}
        for request_id in ids:
            route = self.routes.pop(request_id, None)
            if route is not None:
                by_worker.setdefault(route.worker, []).append(request_id)
                if route.worker in self.workers:
                    self.workers[route.worker].in_flight.discard(request_id)
        for identity, worker_ids in by_worker.items():
            self._send(self.workers_socket, identity, wire.Abort(ids=worker_ids))

    def status(self, query_id: str) -> wire.Status:
        return wire.Status(
            id=query_id,
            endpoints={"openai": self.plan.api_url},
            workers=[w.info for w in self.workers.values()],
            in_flight=list(self.routes),
        )

    # --- workers -----------------------------------------------------------

    def _on_worker(self, identity: bytes, message: wire.Message) -> None:
        now = time.monotonic()
        worker = self.workers.get(identity)
        if isinstance(message, wire.WorkerStatus):
            if worker is None:
                log.info("worker %s (%s) joined: %s", message.info.worker_id, message.info.device, message.info.state)
                worker = self.workers[identity] = Worker(identity, message.info, now)
            elif worker.info.state != message.info.state:
                log.info("worker %s is %s%s", message.info.worker_id, message.info.state,
                         f": {message.info.error}" if message.info.error else "")
            worker.info, worker.last_seen = message.info, now
        elif isinstance(message, wire.Results) and worker is not None:
            worker.last_seen = now
            self._relay(worker, message.outputs)

    def _relay(self, worker: Worker, outputs: list[wire.Output]) -> None:
        by_client: dict[bytes, list[wire.Output]] = {}
        for output in outputs:
            route = self.routes.get(output.id)
            if route is None:  # aborted meanwhile
                continue
            by_client.setdefault(route.client, []).append(output)
            if output.finish_reason is not None:
                del self.routes[output.id]
                worker.in_flight.discard(output.id)
        for client, batch in by_client.items():
            self._send(self.clients, client, wire.Results(outputs=batch))

    def _reap(self, now: float) -> None:
        for identity, worker in list(self.workers.items()):
            if now - worker.last_seen <= WORKER_TIMEOUT:
                continue
            log.warning("worker %s went silent; dropping it", worker.info.worker_id)
            del self.workers[identity]
            message = f"worker {worker.info.worker_id} stopped while serving this request"
            by_client: dict[bytes, list[wire.Output]] = {}
            for request_id in worker.in_flight:
                route = self.routes.pop(request_id, None)
                if route is not None:
                    by_client.setdefault(route.client, []).append(wire.failed(request_id, 503, message))
            for client, batch in by_client.items():
                self._send(self.clients, client, wire.Results(outputs=batch))

    def _send(self, socket: zmq.Socket, identity: bytes, message: wire.Message) -> None:
        try:
            socket.send_multipart([identity, wire.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone or cannot take more
            log.warning("could not send to %r: %s", identity, exc)
