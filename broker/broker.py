"""Routes requests from frontends (and CLI queries) to workers, and results back.

Two ROUTER sockets: clients (frontends, the CLI, the supervisor) and
workers. Workers announce themselves and heartbeat with WorkerStatus.

A worker gets a request only when it has a free slot, so every request a
worker holds is one it is generating. The rest wait here, in arrival order,
and go to whichever worker serving their model frees a slot first (the
least loaded when several can take one). That keeps the queue in the one
process that outlives a worker: when a worker dies (the supervisor reports
its exit at once; a new pid or a heartbeat missed for WORKER_TIMEOUT tell
too) the requests it was generating end with a 503, and the queued ones,
which it never saw, go to the next worker that can take them. The queue is
bounded: a request that can neither run nor wait within `max_waiting` per
ready worker is refused with 503 at once. An Embed is a request like a
Generate, for the workers whose task is "embed" (each answers one at a
time). Tokenizer lookups (Tokenize, Detokenize) skip the queue: each goes at
once to a ready generating worker serving its model, takes no slot, and is
routed back (or ended with a 503 when that worker is lost) like a request.

On Drain (SIGTERM to `infersnap serve`) new requests get 503; accepted ones
may finish until the grace period ends, then end with a 503 too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from infersnap import paths, wire
from infersnap.plan import ServePlan

# Seconds without a heartbeat (sent every 0.25 s) before a live worker counts as stuck. A worker whose
# process ends is reported at once by the supervisor (WorkerExited); this is for one that hangs.
WORKER_TIMEOUT = 10.0
TICK_MS = 100
RESTARTING = "restarting"  # the state of a worker whose process stopped, until it comes back

log = logging.getLogger("infersnap.broker")


Lookup = wire.Tokenize | wire.Detokenize


def kind_of(request: wire.Request | Lookup) -> tuple[str, str]:
    """The (model, task) whose workers can take it: what the queue's room and dispatch are counted by."""
    return request.model.lower(), wire.task_of(request)


@dataclass
class Route:
    client: bytes
    worker: bytes


@dataclass
class Queued:
    client: bytes
    request: wire.Request


@dataclass
class Worker:
    identity: bytes
    info: wire.WorkerInfo
    last_seen: float
    in_flight: set[str] = field(default_factory=set)  # requests it is running, one per slot
    lookups: set[str] = field(default_factory=set)  # tokenizer lookups it is answering (they take no slot)

    def has_model(self, model: str) -> bool:
        return self.info.model.lower() == model.lower()

    def serves(self, model: str, task: str) -> bool:
        return self.has_model(model) and self.info.task == task

    @property
    def free_slots(self) -> int:
        return self.info.slots - len(self.in_flight) if self.info.state == "ready" else 0


class Broker:
    def __init__(self, plan: ServePlan, zctx: zmq.Context | None = None) -> None:
        self.plan = plan
        self.zctx = zctx or zmq.Context.instance()
        self.clients = self._bind("clients")
        self.workers_socket = self._bind("workers")
        self.workers: dict[bytes, Worker] = {}
        self.routes: dict[str, Route] = {}  # dispatched requests
        self.queue: dict[str, Queued] = {}  # accepted, waiting for a slot; dicts keep arrival order
        self.drain_deadline: float | None = None

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
            self._tick(time.monotonic())

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
            try:
                handle(identity, message)
            except Exception:  # one bad message must not take the broker, and every route, down
                log.exception("could not handle a %s", type(message).__name__)

    # --- clients -----------------------------------------------------------

    def _on_client(self, client: bytes, message: wire.Message) -> None:
        if isinstance(message, wire.Request | Lookup):
            self._accept(client, message)
        elif isinstance(message, wire.Abort):
            self._abort(message.ids)
        elif isinstance(message, wire.StatusQuery):
            self._send(self.clients, client, self.status(message.id))
        elif isinstance(message, wire.WorkerExited):
            worker = self.workers.get(message.worker_id.encode())
            if worker is not None and worker.info.state != RESTARTING:
                self._lost(worker, f"exited with code {message.code}")
        elif isinstance(message, wire.Drain) and self.drain_deadline is None:
            log.info("draining: new requests are refused; %d accepted ones get %.0fs to finish",
                     len(self.routes) + len(self.queue), message.grace)
            self.drain_deadline = time.monotonic() + message.grace

    def _accept(self, client: bytes, request: wire.Request | Lookup) -> None:
        refusal = self._refusal(request)
        if refusal is not None:
            self._send(self.clients, client, wire.Results(outputs=[refusal]))
        elif isinstance(request, wire.Request):
            self.queue[request.id] = Queued(client, request)
            self._dispatch()
        else:  # a lookup goes straight to the least busy ready worker: it needs no slot
            ready = [w for w in self.workers.values() if w.serves(*kind_of(request)) and w.info.state == "ready"]
            worker = min(ready, key=lambda w: len(w.in_flight) + len(w.lookups))
            self.routes[request.id] = Route(client=client, worker=worker.identity)
            worker.lookups.add(request.id)
            self._send(self.workers_socket, worker.identity, request)

    def _refusal(self, request: wire.Request | Lookup) -> wire.Output | None:
        """Why this request cannot be accepted now, as its error Output; None if it can."""
        if self.drain_deadline is not None:
            return wire.failed(request.id, 503, "the server is shutting down", code="shutting_down")
        kind = kind_of(request)
        serving = [w for w in self.workers.values() if w.serves(*kind)]
        ready = [w for w in serving if w.info.state == "ready"]
        if not ready:
            failed = [w.info for w in serving if w.info.state == "failed"]
            if failed and len(failed) == len(serving):
                reasons = "; ".join(f"{w.worker_id}: {w.error}" for w in failed)
                return wire.failed(request.id, 503, f"no worker could load this model ({reasons})")
            # a worker for the model, of another task, says its own is still to come
            if serving or not self.workers or any(w.has_model(request.model) for w in self.workers.values()):
                return wire.failed(request.id, 503, "no worker is ready to serve this model yet; retry shortly")
            known = ", ".join(sorted({w.info.model for w in self.workers.values()}))
            return wire.failed(
                request.id,
                404,
                f"The model '{request.model}' does not exist. Models served here: {known}",
                code="model_not_found",
                param="model",
            )
        if isinstance(request, Lookup):  # a lookup never waits, so there is always room
            return None
        room = sum(w.free_slots for w in ready) + self.plan.max_waiting * len(ready)
        if sum(kind_of(q.request) == kind for q in self.queue.values()) >= room:
            # Refuse at once rather than queue without end; the frontend adds Retry-After.
            return wire.failed(request.id, 503, "the server is at capacity; retry shortly", code="server_overloaded")
        return None

    def _dispatch(self) -> None:
        """Hand queued requests, oldest first, to workers with a free slot; end those no worker can serve."""
        full: set[tuple[str, str]] = set()  # (model, task) whose workers have no free slot left
        for request_id, queued in list(self.queue.items()):
            kind = kind_of(queued.request)
            if kind in full:
                continue
            serving = [w for w in self.workers.values() if w.serves(*kind)]
            if all(w.info.state == "failed" for w in serving):  # none left to wait for
                self._fail({request_id: self.queue.pop(request_id)}, "no worker can serve this model any more")
                continue
            free = [w for w in serving if w.free_slots > 0]
            if not free:
                full.add(kind)
                continue
            worker = max(free, key=lambda w: w.free_slots / w.info.slots)
            del self.queue[request_id]
            self.routes[request_id] = Route(client=queued.client, worker=worker.identity)
            worker.in_flight.add(request_id)
            self._send(self.workers_socket, worker.identity, queued.request)

    def _abort(self, ids: list[str]) -> None:
        by_worker: dict[bytes, list[str]] = {}
        for request_id in ids:
            if self.queue.pop(request_id, None) is not None:
                continue  # no worker has it
            route = self.routes.pop(request_id, None)
            if route is not None:
                by_worker.setdefault(route.worker, []).append(request_id)
                if route.worker in self.workers:
                    self.workers[route.worker].in_flight.discard(request_id)
                    self.workers[route.worker].lookups.discard(request_id)
        for identity, worker_ids in by_worker.items():
            self._send(self.workers_socket, identity, wire.Abort(ids=worker_ids))
        self._dispatch()

    def status(self, query_id: str) -> wire.Status:
        return wire.Status(
            id=query_id,
            endpoints={"openai": self.plan.api_url},
            # the broker's count of what runs is exact; the worker's own is a heartbeat old
            workers=[msgspec.structs.replace(w.info, running=len(w.in_flight)) for w in self._in_plan_order()],
            in_flight=[*self.routes, *self.queue],
            waiting=len(self.queue),
            draining=self.drain_deadline is not None,
        )

    def _in_plan_order(self) -> list[Worker]:
        """The workers as the plan lists them (generating ones first), whichever announced itself first."""
        order = {spec.worker_id: i for i, spec in enumerate(self.plan.workers)}
        return sorted(self.workers.values(), key=lambda w: order.get(w.info.worker_id, len(order)))

    # --- workers -----------------------------------------------------------

    def _on_worker(self, identity: bytes, message: wire.Message) -> None:
        now = time.monotonic()
        worker = self.workers.get(identity)
        if isinstance(message, wire.WorkerStatus):
            if worker is not None and worker.info.pid != message.info.pid and worker.info.state != RESTARTING:
                self._lost(worker, "restarted")  # back faster than its heartbeat could be missed
            if worker is None or worker.info.state != message.info.state:
                log.info("worker %s (%s) is %s%s", message.info.worker_id, message.info.device, message.info.state,
                         f": {message.info.error}" if message.info.error else "")
            if worker is None:
                worker = self.workers[identity] = Worker(identity, message.info, now)
            worker.info, worker.last_seen = message.info, now
            self._dispatch()
        elif isinstance(message, wire.Results) and worker is not None:
            worker.last_seen = now
            self._relay(worker, message.outputs)
        elif isinstance(message, wire.TokenizeResult) and worker is not None:
            worker.last_seen = now
            worker.lookups.discard(message.id)
            route = self.routes.pop(message.id, None)
            if route is not None:  # else aborted meanwhile
                self._send(self.clients, route.client, message)

    def _relay(self, worker: Worker, outputs: list[wire.Output]) -> None:
        by_client: dict[bytes, list[wire.Output]] = {}
        ended = False
        for output in outputs:
            route = self.routes.get(output.id)
            if route is None:  # aborted meanwhile
                continue
            by_client.setdefault(route.client, []).append(output)
            if output.finish_reason is not None:
                output.worker = worker.info.worker_id
                del self.routes[output.id]
                worker.in_flight.discard(output.id)
                ended = True
        for client, batch in by_client.items():
            self._send(self.clients, client, wire.Results(outputs=batch))
        if ended:
            self._dispatch()

    def _lost(self, worker: Worker, why: str) -> None:
        """The worker's process is gone: end what it was generating; what waits here goes elsewhere."""
        log.warning("worker %s %s; %d requests it was generating end with an error",
                    worker.info.worker_id, why, len(worker.in_flight))
        message = f"worker {worker.info.worker_id} stopped while generating this request; please retry"
        routes = {i: self.routes.pop(i) for i in [*worker.in_flight, *worker.lookups] if i in self.routes}
        self._fail(routes, message)
        if worker.in_flight:  # in case it is alive after all (stalled, not dead): stop its work
            self._send(self.workers_socket, worker.identity, wire.Abort(ids=list(worker.in_flight)))
        worker.in_flight.clear()
        worker.lookups.clear()
        worker.info.state, worker.info.error = RESTARTING, f"the worker process {why}; waiting for it to come back"
        worker.info.running = worker.info.waiting = 0
        self._dispatch()  # what waited here goes to another worker, or fails if none is left

    def _tick(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.info.state != RESTARTING and now - worker.last_seen > WORKER_TIMEOUT:
                self._lost(worker, "went silent")
        if self.drain_deadline is not None and now >= self.drain_deadline and (self.routes or self.queue):
            self._end_all("the server shut down before this request finished")

    def _end_all(self, message: str) -> None:
        ending = {**self.routes, **self.queue}
        self._abort(list(ending))
        self._fail(ending, message, code="shutting_down")

    def _fail(self, entries: dict[str, Route | Queued], message: str, code: str | None = None) -> None:
        """End these requests with a 503 each, one message per client."""
        by_client: dict[bytes, list[wire.Output]] = {}
        for request_id, entry in entries.items():
            by_client.setdefault(entry.client, []).append(wire.failed(request_id, 503, message, code=code))
        for client, batch in by_client.items():
            self._send(self.clients, client, wire.Results(outputs=batch))

    def _send(self, socket: zmq.Socket, identity: bytes, message: wire.Message) -> None:
        try:
            socket.send_multipart([identity, wire.encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone or cannot take more
            log.warning("could not send to %r: %s", identity, exc)
