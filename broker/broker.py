"""Routes requests from frontends (and CLI queries) to workers, and results back, without opening them.

Two ROUTER sockets: clients (frontends, the CLI, the supervisor) and
workers. Workers announce themselves, what they can do (their
capabilities) and what they run, and heartbeat with WorkerStatus.

A request comes as a Submit (its id, model and needs) followed by its body,
which the broker passes on unread, as Majordomo does: the worker gets a
Dispatch (the client to answer) and the body, and answers with a Deliver
(the client, the requests that ended) followed by a Results for that client,
also passed on unread. So the broker decodes only small headers, never a
prompt or a step's outputs.

A worker gets a request only when it has a free slot and can do what the
request needs, so every request a worker holds is one it is generating. The
rest wait here, one queue per kind of request (model, needs, seeded, workers
avoided: requests of one kind can go to the same workers), and a dispatch
pass takes them oldest first across the kinds, leaving a kind as soon as no
worker can take its next one: it looks only at what can move. A request that
no worker serving its model can ever serve is refused at once with the 400
naming its parameter, whatever the load. That keeps the queue in the one
process that outlives a worker: when a worker dies (the supervisor reports
its exit at once; a new pid or a heartbeat missed for WORKER_TIMEOUT tell
too) a request it had sent no output for yet (Deliver.first says when one
has; its route keeps the body until then) goes back to its place in the
queue, once, for another worker if one may serve it (a seeded one: the next
lane in plan order); one that had output ends with a 503 naming the crash.
The queued ones, which it never saw, go to the next worker that can take
them. The queue room is per device: a request that can neither run nor be
queued within `max_waiting` per slot set of a device is refused with 503 at
once. Tokenizer lookups are requests that take no slot: each goes at once to
the least busy worker that can.

Which lane of a device takes a request, and when, is the lane policy's
(broker/lanes.py); which models are loaded, the model scheduler's
(broker/models.py). A seeded request always goes to the first worker in plan
order that can serve it, so the same seed gives the same text (one retried
after its worker died: the next lane in plan order).

Reconciliation: a worker's heartbeat lists the requests it runs; any the
broker has no route for (after a broker restart, or a client that is gone)
is aborted there. A client whose socket is gone loses its routes.

On Drain (SIGTERM to `infersnap serve`) new requests get 503; accepted ones
may finish until the grace period ends, then end with a 503 too.
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import zmq

from infersnap import paths, routing, wire
from infersnap.broker.lanes import LanePolicy
from infersnap.broker.models import Model, ModelScheduler
from infersnap.broker.workers import RESTARTING, UNLOADED, UNLOADING, Worker, takes_slot
from infersnap.plan import PlanFile, ServePlan, room

# Seconds without a heartbeat (sent every 0.25 s) before a live worker counts as stuck. A worker whose
# process ends is reported at once by the supervisor (WorkerExited); this is for one that hangs.
WORKER_TIMEOUT = 10.0
TICK_MS = 100
SCHEDULE_SECONDS = 1.0  # how often the model scheduler runs with nothing changed: for keep-alives running out
KEEPALIVE_SECONDS = 1.0  # followers get a Status at least this often: one that hears nothing for longer knows the broker is gone

log = logging.getLogger("infersnap.broker")


@dataclass
class Queued:
    client: bytes
    submit: wire.Submit
    body: bytes
    since: float = field(default_factory=time.monotonic)
    kind: bytes = b""  # requests of one kind (model, needs, seeded, workers avoided) can go to the same workers
    avoid: frozenset[bytes] = frozenset()  # a retry: the worker that died running it (each is retried once)

    def __post_init__(self) -> None:  # once, not on every dispatch pass
        submit = self.submit
        self.kind = b"\0".join([submit.model.lower().encode(), msgspec.msgpack.encode(submit.needs),
                                 b"s" if submit.work.seeded else b"", *sorted(self.avoid)])


@dataclass
class Route:
    client: bytes
    worker: bytes
    # until its first output passes: the request as queued, to retry it if its worker dies before any output
    pending: Queued | None = None
    task: str = "generate"  # what it asks (wire.Needs.task): said when its worker is quarantined


class Broker:
    def __init__(
        self, plan: ServePlan, zctx: zmq.Context | None = None, address: Callable[[str], str] = paths.socket_address,
        plan_file: PlanFile | None = None,
    ) -> None:
        self.plan_file = plan_file  # read again when the supervisor writes it anew (the catalog changed)
        self.boot = uuid.uuid4().hex
        self.zctx = zctx or zmq.Context.instance()
        self.clients = self._bind(address("clients"))
        self.workers_socket = self._bind(address("workers"))
        self.poller = zmq.Poller()
        self.poller.register(self.clients, zmq.POLLIN)
        self.poller.register(self.workers_socket, zmq.POLLIN)
        self.workers: dict[bytes, Worker] = {}
        self.routes: dict[str, Route] = {}  # dispatched requests
        self.queue: dict[str, Queued] = {}  # accepted, waiting for a worker, in arrival order
        self.kinds: dict[bytes, dict[str, Queued]] = {}  # the same requests by kind, each in arrival order
        self.queued_models: Counter[str] = Counter()  # queued requests by model (lowercase)
        self.queued_tasks: Counter[tuple[str, str]] = Counter()  # ... by (model, task): what a queue room holds
        self.latest_arrival: dict[str, float] = {}  # by model: when its latest request was queued
        self.drain_deadline: float | None = None
        self.next_pass = 0.0  # when _tick runs a dispatch pass, if nothing else has
        self.schedule_due, self.scheduled_at = True, 0.0
        self.dispatching = self.dispatch_again = False
        self.lanes = LanePolicy(self.workers)
        self.scheduler = ModelScheduler(plan, self.workers, self.queued_models)
        self.supervisor: bytes | None = None  # the client that carries out the Orders (Supervise)
        self.orders: wire.Orders | None = None  # as last sent
        self.followers: set[bytes] = set()  # clients a Status is pushed to (StatusQuery.follow)
        self.pushed: tuple = ()  # what the last push said, in short
        self.pushed_at = 0.0
        self.replans = 0  # times the plan file was read anew (Status.replans): followers read it when it moves

    @property
    def plan(self) -> ServePlan:
        return self.scheduler.plan

    @property
    def models(self) -> dict[str, Model]:
        return self.scheduler.models

    def _bind(self, address: str) -> zmq.Socket:
        socket = self.zctx.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over its old identity
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises instead of vanishing
        socket.bind(address)
        return socket

    def serve_forever(self) -> None:
        while True:
            # sooner than a tick when a request's wait ends sooner (a gathering burst)
            due = int((self.next_pass - time.monotonic()) * 1000) + 1 if self.queue else TICK_MS
            self.poll_once(max(1, min(TICK_MS, due)))

    def poll_once(self, timeout_ms: int) -> None:
        """Handle what arrives within `timeout_ms`, then check the workers' heartbeats and the drain."""
        events = dict(self.poller.poll(timeout_ms))
        if self.workers_socket in events:
            self._read_all(self.workers_socket, self._on_worker)
        if self.clients in events:
            self._read_all(self.clients, self._on_client)
        now = time.monotonic()
        self._tick(now)
        self._order(now)
        self._push(now)

    @staticmethod
    def _read_all(socket: zmq.Socket, handle) -> None:
        """Handle every message waiting on the socket: [identity, header] or [identity, header, body]."""
        while True:
            try:
                identity, header, *body = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # fewer frames than any peer sends: ignore it
                continue
            try:
                message = wire.decode(header)
            except Exception:
                log.warning("dropped an undecodable message")
                continue
            try:
                handle(identity, message, body[0] if body else b"")
            except Exception:  # one bad message must not take the broker, and every route, down
                log.exception("could not handle a %s", type(message).__name__)

    # --- the queue ---------------------------------------------------------

    def _enqueue(self, queued: Queued) -> None:
        request_id = queued.submit.id
        self.queue[request_id] = queued
        self.kinds.setdefault(queued.kind, {})[request_id] = queued
        self.queued_models[queued.submit.model.lower()] += 1
        self.queued_tasks[queued.submit.model.lower(), queued.submit.needs.task] += 1

    def _dequeue(self, request_id: str) -> Queued | None:
        queued = self.queue.pop(request_id, None)
        if queued is None:
            return None
        members = self.kinds[queued.kind]
        del members[request_id]
        if not members:
            del self.kinds[queued.kind]
        model = queued.submit.model.lower()
        self.queued_models[model] -= 1
        if not self.queued_models[model]:
            del self.queued_models[model]
        self.queued_tasks[model, queued.submit.needs.task] -= 1
        return queued

    # --- clients -----------------------------------------------------------

    def _on_client(self, client: bytes, message: wire.Message, body: bytes) -> None:
        if isinstance(message, wire.Submit):
            refusal = self._refusal(message)
            if refusal is not None:
                self._send_results(client, [refusal])
            else:
                queued = Queued(client, message, body)
                self._enqueue(queued)
                name = message.model.lower()
                self.latest_arrival[name] = queued.since
                model = self.models.get(name)
                if model is not None:
                    keep_alive = message.work.keep_alive
                    model.keep_alive = model.spec.keep_alive if keep_alive is None else keep_alive
                    self.schedule_due = self.schedule_due or not model.wanted
                self._dispatch()
        elif isinstance(message, wire.Abort):
            self._abort(message.ids)
        elif isinstance(message, wire.StatusQuery):
            if message.follow:
                self.followers.add(client)
            self._send(self.clients, client, self.status(message.id))
        elif isinstance(message, wire.ModelControl):
            self._send_results(client, [self._control(message)])
        elif isinstance(message, wire.WorkerExited):
            self._exited(message.worker_id, message.code)
        elif isinstance(message, wire.Supervise):
            self._supervised_by(client, message)
        elif isinstance(message, wire.PlanChanged) and self.plan_file is not None:
            replanned = self.plan_file.changed()
            if replanned is not None:
                self._replan(replanned)
        elif isinstance(message, wire.Drain) and self.drain_deadline is None:
            log.info("draining: new requests are refused; %d accepted ones get %.0fs to finish",
                     len(self.routes) + len(self.queue), message.grace)
            self.drain_deadline = time.monotonic() + message.grace

    def _refusal(self, submit: wire.Submit) -> wire.Failure | None:
        """Why this request cannot be accepted now, as its Failure; None if it can."""
        if self.drain_deadline is not None:
            return wire.failed(submit.id, 503, "the server is shutting down", code="shutting_down")
        needs = submit.needs
        model = self.models.get(submit.model.lower())
        if model is None or model.removed:
            return self._not_found(submit.id, submit.model)
        serving = [w for w in self.workers.values() if w.serves(submit.model, needs.task)]
        if not serving:
            if not self.scheduler.workers_of(model):
                return self._not_found(submit.id, submit.model)
            return wire.failed(submit.id, 400, f"the model '{submit.model}' does not do this ({needs.task})",
                               code="not_supported", param="model")
        failure = self.scheduler.load_failure(submit.model)
        if failure:
            return wire.failed(submit.id, 503, failure)
        if not any(w.may_serve(needs) for w in serving):
            ready = [w for w in serving if w.info.state == "ready"]
            if not ready:  # every worker of this task failed (the embedding worker, say) while others serve
                return wire.failed(submit.id, 503, self._task_failure(serving, needs.task))
            feature = next(f for f in (routing.unmet(needs, w.info.capabilities) for w in ready) if f)
            runtimes = [w.info.runtime for w in serving if w.info.state != "failed"]
            return routing.refusal(submit.id, needs, feature, runtimes, ready[0].info.model)
        if not model.wanted:
            too_big = self.scheduler.never_fits(model)
            if too_big:
                return wire.failed(submit.id, 507, too_big, code="model_too_large", param="model")
        if not takes_slot(needs):  # a lookup never waits for a slot, so there is always room
            return None
        # per device: a second lane on the same cores does not double what may wait
        lanes: dict[str, list[Worker]] = {}
        for worker in serving:
            if worker.info.state != "failed":
                lanes.setdefault(worker.info.device, []).append(worker)
        free = sum(max(room(w.info.slots, self.plan.max_waiting) for w in group)
                   - sum(len(w.running) for w in group) for group in lanes.values())
        if self.queued_tasks[submit.model.lower(), needs.task] >= free:
            # Refuse at once rather than queue without end; the frontend adds Retry-After.
            return wire.failed(submit.id, 503, "the server is at capacity; retry shortly", code="server_overloaded")
        return None

    def _not_found(self, request_id: str, name: str) -> wire.Failure:
        known = ", ".join(m.spec.name for m in self.models.values() if not m.removed) or "none"
        return wire.failed(request_id, 404, f"The model '{name}' does not exist. Models served here: {known}",
                           code="model_not_found", param="model")

    @staticmethod
    def _task_failure(serving: list[Worker], task: str) -> str:
        """Why no worker of a model can do this task any more: each one's reason."""
        reasons = "; ".join(f"{w.info.worker_id}: {w.info.error}" for w in serving if w.info.error)
        return f"no worker can do this ({task}) for this model any more" + (f" ({reasons})" if reasons else "")

    def _dispatch(self) -> None:
        """Hand queued requests, oldest first across the kinds, to the lanes that end them soonest; end
        those no worker can serve. A kind is left as soon as no worker can take its next request. Not
        reentrant: what a pass sets off (a failure sent to a client that is gone, which aborts its other
        requests) asks for one more pass after it."""
        if self.dispatching:
            self.dispatch_again = True
            return
        self.dispatching = True
        try:
            self._dispatch_pass()
            while self.dispatch_again:
                self.dispatch_again = False
                self._dispatch_pass()
        finally:
            self.dispatching = self.dispatch_again = False

    def _dispatch_pass(self) -> None:
        now = time.monotonic()
        self.next_pass = now + TICK_MS / 1000
        demand: Counter[str] = Counter()  # slot-taking requests queued, by model
        members: dict[bytes, list[Queued]] = {}
        for kind, queued in self.kinds.items():
            members[kind] = list(queued.values())
            if takes_slot(members[kind][0].submit.needs):
                demand[members[kind][0].submit.model.lower()] += len(queued)
        heads = [(m[0].since, 0, kind) for kind, m in members.items()]
        heapq.heapify(heads)
        awaited: dict[str, list[bytes]] = {}  # device -> the lane each request waiting for it waits for
        while heads:
            _, index, kind = heapq.heappop(heads)
            if self._place(members[kind][index], demand, awaited, now) and index + 1 < len(members[kind]):
                heapq.heappush(heads, (members[kind][index + 1].since, index + 1, kind))

    def _place(self, queued: Queued, demand: Counter[str], awaited: dict[str, list[bytes]], now: float) -> bool:
        """Send this request to its lane, end it if no worker may ever serve it, or leave it queued;
        whether the next request of its kind may yet move in this pass."""
        submit, request_id = queued.submit, queued.submit.id
        if self.queue.get(request_id) is not queued:
            return True  # ended or aborted in this pass (its client is gone)
        serving = [w for w in self.workers.values() if w.serves(submit.model, submit.needs.task)]
        if not any(w.may_serve(submit.needs) for w in serving):  # none left to wait for
            why = self.scheduler.load_failure(submit.model) or self._task_failure(serving, submit.needs.task)
            self._fail({request_id: self._dequeue(request_id)}, why)
            return True
        if queued.avoid and not submit.work.seeded:  # a retry: not where it died, unless no other may serve it
            others = [w for w in serving if w.identity not in queued.avoid and w.may_serve(submit.needs)]
            serving = others or serving
        if not takes_slot(submit.needs):  # a lookup is answered between two steps, by the least busy
            free = [w for w in serving if w.can_take(submit.needs)]
            if not free:
                return False
            self._send_to(min(free, key=lambda w: w.load), request_id)
            return True
        if submit.work.seeded:
            serving = [self._seeded_lane(serving, queued)]
        able = [w for w in serving if w.able(submit.needs)]
        if not able:
            return False
        lane = self.lanes.soonest(able, submit.work, demand)
        model = submit.model.lower()
        until = self.lanes.gather_until(able, lane, queued.since, self.latest_arrival.get(model, queued.since), now)
        if until is not None:
            self.next_pass = min(self.next_pass, until)
            return False  # the rest of its kind gather too
        if lane.free_slots > 0 and self.lanes.may_start(lane, queued.since, now, awaited.get(lane.info.device, [])):
            self._send_to(lane, request_id)
            demand[model] -= 1
            return True
        awaited.setdefault(lane.info.device, []).append(lane.identity)
        return any(w.free_slots > 0 for w in able)

    def _seeded_lane(self, serving: list[Worker], queued: Queued) -> Worker:
        """A seeded request's one lane, so that the same seed gives the same text: the first in plan order
        that may serve it; for a retry, the next after the one that died running it (that one last)."""
        ordered = self._in_plan_order(serving)
        died = [i for i, w in enumerate(ordered) if w.identity in queued.avoid]
        if died:
            ordered = ordered[died[-1] + 1:] + ordered[:died[-1] + 1]
        return next(w for w in ordered if w.may_serve(queued.submit.needs))

    def _send_to(self, worker: Worker, request_id: str) -> None:
        queued = self._dequeue(request_id)
        submit = queued.submit
        self.routes[request_id] = Route(client=queued.client, worker=worker.identity, pending=queued,
                                        task=submit.needs.task)
        worker.remember(submit.work.prefix)
        (worker.running if takes_slot(submit.needs) else worker.lookups).add(request_id)
        self.scheduler.used(worker.info.model)
        self._send(self.workers_socket, worker.identity, wire.Dispatch(queued.client, request_id), queued.body)

    def _abort(self, ids: list[str]) -> None:
        by_worker: dict[bytes, list[str]] = {}
        for request_id in ids:
            if self._dequeue(request_id) is not None:
                continue  # no worker has it
            route = self.routes.pop(request_id, None)
            if route is not None:
                by_worker.setdefault(route.worker, []).append(request_id)
                self._unassign(route.worker, request_id)
        for identity, worker_ids in by_worker.items():
            self._send(self.workers_socket, identity, wire.Abort(ids=worker_ids))
        self.schedule_due = True  # a model may be idle now
        self._dispatch()

    def _unassign(self, identity: bytes, request_id: str) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.running.discard(request_id)
            worker.lookups.discard(request_id)

    def _client_gone(self, client: bytes) -> None:
        """A client we could not send to (its process ended): what it asked for is stopped."""
        self.followers.discard(client)
        ids = [i for i, q in self.queue.items() if q.client == client]
        ids += [i for i, r in self.routes.items() if r.client == client]
        if ids:
            log.info("a client is gone; stopping its %d requests", len(ids))
            self._abort(ids)

    def status(self, query_id: str) -> wire.Status:
        return wire.Status(
            id=query_id,
            boot=self.boot,
            endpoints={"openai": self.plan.api_url, **({"webui": self.plan.webui_url} if self.plan.webui else {})},
            # the broker's list of what runs is exact; the worker's own is a heartbeat old
            workers=[msgspec.structs.replace(w.info, running=sorted(w.running))
                     for w in self._in_plan_order(self.workers.values()) if w.info.state != UNLOADED],
            routed=[*self.routes, *self.queue],
            queued=len(self.queue),
            draining=self.drain_deadline is not None,
            # a removed model is not served (404) even while its processes end: not listed
            models=[self.scheduler.state_of(m, time.monotonic()) for m in self.models.values() if not m.removed],
            replans=self.replans,
        )

    def _in_plan_order(self, workers) -> list[Worker]:
        """These workers as the plan lists them (generating ones first), whichever announced itself first."""
        order = {spec.worker_id: i for i, spec in enumerate(self.plan.workers)}
        return sorted(workers, key=lambda w: order.get(w.info.worker_id, len(order)))

    # --- workers -----------------------------------------------------------

    def _on_worker(self, identity: bytes, message: wire.Message, body: bytes) -> None:
        now = time.monotonic()
        worker = self.workers.get(identity)
        if isinstance(message, wire.WorkerStatus):
            info = message.info
            if worker is not None and worker.info.pid not in (0, info.pid) and worker.info.state != RESTARTING:
                self._lost(worker, "restarted (it announced a new pid)")  # back faster than a heartbeat is missed
            model = self.models.get(info.model.lower())
            if worker is None and model is None:
                return  # the last heartbeat of a worker whose model was removed from the catalog and forgotten
            if worker is not None and worker.info.state == UNLOADING:
                info = msgspec.structs.replace(info, state=UNLOADING)  # it is on its way out: nothing more for it
            elif model is not None and info.state != "failed":
                self.scheduler.running_anyway(model)
            changed = worker is None or (worker.info.state, worker.info.capabilities, worker.info.slots) != (
                info.state, info.capabilities, info.slots)
            if worker is None or worker.info.state != info.state:
                log.info("worker %s (%s) is %s%s", info.worker_id, info.device, info.state,
                         f": {info.error}" if info.error else "")
                if info.state == "ready":
                    self.scheduler.used(info.model)  # keep-alive counts from when it could serve, not from the load's start
                    self.scheduler.lives.ready(info.worker_id, now)
                    if worker is not None:
                        worker.last_ran = ""
            if worker is None:
                worker = self.workers[identity] = Worker(identity, info, now)
            worker.info, worker.last_seen = info, now
            self._reconcile(worker)
            if changed:  # a heartbeat that changes nothing moves nothing
                self.schedule_due = True
                self._dispatch()
        elif isinstance(message, wire.Deliver) and worker is not None:
            worker.last_seen = now
            stale = []
            for request_id in message.first:
                route = self.routes.get(request_id)
                if route is not None and route.worker == identity:
                    route.pending = None  # it has output now, so it is not retried: its body is not needed
                elif route is not None or request_id in self.queue:
                    stale.append(request_id)  # retried since this worker was counted lost: that output is late
            for request_id in message.ended:
                route = self.routes.get(request_id)
                if route is not None and route.worker == identity:
                    del self.routes[request_id]
                self._unassign(identity, request_id)
            body = self._without(body, stale) if stale else body
            if body:
                self._send(self.clients, message.client, body)
            if message.ended:
                self.scheduler.used(worker.info.model)
                self.schedule_due = True  # its model may be idle now, and another waiting for it
                self._dispatch()

    @staticmethod
    def _without(body: bytes, ids: list[str]) -> bytes:
        """A Results less these requests' outputs (opened only for this); empty if none is left."""
        results = wire.decode(body)
        kept = [o for o in results.outputs if o.id not in ids]
        return wire.encode(wire.Results(outputs=kept)) if kept else b""

    def _reconcile(self, worker: Worker) -> None:
        """Abort what the worker runs that nobody here waits for (a broker restart, a client gone)."""
        strays = [i for i in worker.info.running if i not in self.routes or self.routes[i].worker != worker.identity]
        if strays:
            log.info("worker %s runs %d requests nobody waits for; aborting them", worker.info.worker_id, len(strays))
            self._send(self.workers_socket, worker.identity, wire.Abort(ids=strays))

    # --- worker lives: the supervisor carries out the Orders --------------

    def _supervised_by(self, client: bytes, supervise: wire.Supervise) -> None:
        """The supervisor's channel; a broker started anew goes on from what it hands back."""
        self.supervisor, self.orders = client, None
        self.scheduler.lives.resume(supervise, time.monotonic())
        for worker_id in supervise.alive:  # its model counts as loaded, even before its heartbeat comes
            worker = self.workers.get(worker_id.encode())
            model = self.models.get(worker.info.model.lower()) if worker is not None else None
            if model is not None:
                self.scheduler.running_anyway(model)
        for worker_id, why in supervise.failed.items():
            worker = self.workers.get(worker_id.encode())
            if worker is not None:
                worker.info = msgspec.structs.replace(worker.info, state="failed", error=why)
        self.schedule_due = True

    def _order(self, now: float) -> None:
        """Send the supervisor the Orders when they change (a start, a stop, a restart due, a quarantine)."""
        orders = self.scheduler.orders(now)
        if self.supervisor is not None and orders != self.orders:
            self.orders = orders
            self._send(self.clients, self.supervisor, orders)

    def _exited(self, worker_id: str, code: int) -> None:
        """A worker's process ended: stopped as ordered, or on its own (restart, fall back, or quarantine)."""
        lives = self.scheduler.lives
        worker = self.workers.get(worker_id.encode())
        if worker is None or worker.info.state == UNLOADING or not self.scheduler.wanted(worker):
            lives.stopped(worker_id)
            if worker is not None:
                self._gone(worker)
            return
        if worker.info.state not in (RESTARTING, "failed"):
            self._lost(worker, wire.exit_words(code))
        spec = next((s for s in self.plan.workers if s.worker_id == worker_id), None)
        if spec is None:  # not of the plan: nothing to decide; a removed model's is not started again
            lives.stopped(worker_id)
            model = self.models.get(worker.info.model.lower())
            if model is not None and model.removed:  # failed, so that its model may be unloaded and forgotten
                self._failed(worker_id, f"its process {wire.exit_words(code)} after its model was removed")
            return
        if not lives.expected(worker_id):  # a start no Orders of this broker's ran (told of it late): started anew
            lives.stopped(worker_id)
            self.schedule_due = True
            return
        lanes = [s.worker_id.encode() for s in self.plan.workers_of(spec.model)
                 if (s.device, s.task) == (spec.device, spec.task) and s is not spec]
        others_serve = any(self.workers[i].info.state != "failed" for i in lanes if i in self.workers)
        next_step, words = lives.died(spec, code, others_serve, time.monotonic())
        if next_step == "fallback":
            log.warning("worker %s: %s", worker_id, words)
        elif next_step == "quarantine":
            self._failed(worker_id, words)

    def _push(self, now: float) -> None:
        """A Status to each follower when a worker's or a model's state changed (or the plan was read anew,
        or a drain began), and after KEEPALIVE_SECONDS of none, so that a follower that hears nothing knows
        the broker is gone (a broker started anew knows no followers: they ask again). What runs and what
        is queued change with every request: those ride on the next push (/metrics asks at its scrape)."""
        if not self.followers:
            return
        states = (tuple((w.info.worker_id, w.info.state, w.info.error, w.info.pid, w.info.settings)
                        for w in self.workers.values()),
                  tuple((m.spec.name, m.wanted, m.failed, m.removed, m.keep_alive) for m in self.models.values()),
                  self.drain_deadline is not None, self.replans)
        if states == self.pushed and now - self.pushed_at < KEEPALIVE_SECONDS:
            return
        self.pushed, self.pushed_at = states, now
        status = wire.encode(self.status(""))
        for follower in list(self.followers):
            self._send(self.clients, follower, status)

    def _lost(self, worker: Worker, why: str) -> None:
        """The worker's process is gone (`why`: how). A request it had sent no output for goes back to its
        place in the queue, once, for another worker; one that had output ends with an error naming the
        crash. What waits here goes elsewhere."""
        ids = [*worker.running, *worker.lookups]
        routes = {i: self.routes.pop(i) for i in ids if i in self.routes}
        tasks = Counter(r.task for r in routes.values())
        worker.last_ran = ", ".join(f"{n} {task} request{'s' if n > 1 else ''}" for task, n in tasks.items())
        retry = {i: r.pending for i, r in routes.items() if r.pending is not None and not r.pending.avoid}
        log.warning("worker %s %s; of the %d requests it was running, %d with no output yet are retried, "
                    "the rest end with an error", worker.info.worker_id, why, len(routes), len(retry))
        message = f"worker {worker.info.worker_id} stopped while generating this request: its process {why}"
        self._fail({i: r for i, r in routes.items() if i not in retry}, message)
        for pending in sorted(retry.values(), key=lambda q: q.since):  # its wait counts from its arrival, as before
            self._enqueue(Queued(pending.client, pending.submit, pending.body, pending.since,
                                 avoid=frozenset([worker.identity])))
        if retry:  # listed at their places by arrival, ahead of later requests
            ordered = sorted(self.queue.items(), key=lambda item: item[1].since)
            self.queue.clear()
            self.queue.update(ordered)
        if ids:  # in case it is alive after all (stalled, not dead): stop its work
            self._send(self.workers_socket, worker.identity, wire.Abort(ids=ids))
        worker.running.clear()
        worker.lookups.clear()
        worker.prefixes.clear()  # a new process starts with an empty prompt cache
        worker.info = msgspec.structs.replace(
            worker.info, state=RESTARTING, error=f"the worker process {why}; waiting for it to come back",
            running=[], waiting=0,
        )
        for request_id in retry:
            self._log_retry(request_id, worker)
        self.schedule_due = True
        self._dispatch()  # what waited here goes to another worker, or fails if none is left

    def _log_retry(self, request_id: str, dead: Worker) -> None:
        """One line per retried request: where it may go now."""
        queued = self.queue[request_id]
        needs = queued.submit.needs
        serving = [w for w in self.workers.values() if w.serves(queued.submit.model, needs.task) and w.may_serve(needs)]
        if not serving:
            where = "nowhere (no worker may serve it now)"
        elif queued.submit.work.seeded:
            where = f"{self._seeded_lane(serving, queued).info.worker_id} (seeded: next lane in plan order)"
        else:
            others = [w.info.worker_id for w in serving if w is not dead]
            where = " or ".join(others) if others else f"{dead.info.worker_id} once restarted (no other may serve it)"
        log.info("request %s had no output when worker %s stopped: retried once, on %s",
                 request_id, dead.info.worker_id, where)

    def _failed(self, worker_id: str, why: str) -> None:
        """The worker is not started again: it counts as failed, even if it never announced itself (a crash
        while loading), so that status says why and requests stop waiting for it."""
        worker = self.workers.get(worker_id.encode())
        if worker is None:
            return
        if worker.last_ran:  # it died serving: what it ran is part of why
            why = f"{why} (it was running {worker.last_ran})"
        worker.info = msgspec.structs.replace(worker.info, state="failed", error=why)
        log.error("worker %s failed: %s", worker_id, why)
        self.schedule_due = True
        self._dispatch()

    def _gone(self, worker: Worker) -> None:
        """A worker's process ended because its model was unloaded (or it was failed): it holds nothing now."""
        if worker.running or worker.lookups:
            self._lost(worker, "was stopped")
        worker.prefixes.clear()
        if worker.info.state != "failed":
            state = "loading" if self.scheduler.wanted(worker) else UNLOADED  # wanted again meanwhile: it starts anew
            worker.info = msgspec.structs.replace(worker.info, state=state, pid=0, running=[], waiting=0, error="")
        self.schedule_due = True
        self._dispatch()

    def _replan(self, plan: ServePlan) -> None:
        self.scheduler.replan(plan)
        self.replans += 1
        self.schedule_due = True
        self._dispatch()

    def _control(self, control: wire.ModelControl) -> wire.Final | wire.Failure:
        """Load a model now, or unload it once idle: answered at once (the load goes on)."""
        model = self.models.get(control.model.lower())
        if model is None or model.removed:
            return self._not_found(control.id, control.model)
        refused = self.scheduler.control(control)
        if refused is not None:
            return refused
        self._schedule(time.monotonic())
        self._dispatch()
        return wire.Final(control.id, "stop")

    def _schedule(self, now: float) -> None:
        self.schedule_due, self.scheduled_at = False, now
        self.scheduler.schedule(now)

    def _tick(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.info.state in (RESTARTING, "failed", UNLOADED) or not worker.info.pid:
                continue  # no process to hear from (yet)
            if now - worker.last_seen > WORKER_TIMEOUT:
                if worker.info.state == UNLOADING:
                    self._gone(worker)
                else:
                    self._lost(worker, f"went silent (no heartbeat for {WORKER_TIMEOUT:g} s)")
                    self.scheduler.lives.silent(worker.info.worker_id)  # stopped, then started again
        if self.schedule_due or now - self.scheduled_at >= SCHEDULE_SECONDS:  # or a keep-alive ran out
            self._schedule(now)
            if self.queue:
                self._dispatch()  # a model wanted now: its requests wait for it, or for a worker that failed
        if self.drain_deadline is not None and now >= self.drain_deadline and (self.routes or self.queue):
            self._end_all("the server shut down before this request finished")
        if self.queue and now >= self.next_pass:  # a wait for a lane may have run past the hand-over time
            self._dispatch()

    def _end_all(self, message: str) -> None:
        ending = {**self.routes, **self.queue}
        self._abort(list(ending))
        self._fail(ending, message, code="shutting_down")

    def _fail(self, entries: dict[str, Route | Queued], message: str, code: str | None = None) -> None:
        """End these requests with a 503 each, one message per client."""
        by_client: dict[bytes, list[wire.Failure]] = {}
        for request_id, entry in entries.items():
            by_client.setdefault(entry.client, []).append(wire.failed(request_id, 503, message, code=code))
        for client, outputs in by_client.items():
            self._send_results(client, outputs)

    def _send_results(self, client: bytes, outputs: list[wire.Output]) -> None:
        self._send(self.clients, client, wire.encode(wire.Results(outputs=outputs)))

    def _send(self, socket: zmq.Socket, identity: bytes, message: wire.Message | bytes, *body: bytes) -> None:
        frames = [identity, message if isinstance(message, bytes) else wire.encode(message), *body]
        try:
            socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone or cannot take more
            log.warning("could not send to %r: %s", identity, exc)
            if socket is self.clients and exc.errno == zmq.EHOSTUNREACH:
                self._client_gone(identity)
