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
rest wait here, in arrival order. A request that no worker serving its model
can ever serve is refused at once with the 400 naming its parameter,
whatever the load. That keeps the queue in the one process that outlives a
worker: when a worker dies (the supervisor reports its exit at once; a new
pid or a heartbeat missed for WORKER_TIMEOUT tell too) a request it had sent
no output for yet (Deliver.first says when one has; its route keeps the
body until then) goes back to its place in the queue, once, for another
worker if one may serve it (a seeded one: the next lane in plan order); one
that had output ends with a 503 naming the crash. The queued ones, which it
never saw, go to the next worker that can take them. The queue is bounded
per device: a request that can neither run nor wait within `max_waiting`
per slot set of a device is refused with 503 at once. Tokenizer lookups are
requests that take no slot: each goes at once to the least busy worker that
can.

Lanes: the generating workers of one device (llama.cpp and OpenVINO on the
CPU) compute on the same cores, so they take turns. A request goes to the
worker whose measured profile (WorkerInfo.speed) says it would end the
request soonest if it served its device's whole load (what runs there, what
waits for it, and this request), prompt read included; with no profile, to
the least loaded. The turn: a lane starts only while no other lane computes
on its device, and a computing lane takes no new work while a request waits
for another lane of its device, so it drains and hands over. A lane other
than the computing one must win by SWITCH_MARGIN to be chosen, so that
near-equal guesses do not hand over on every request. A request that waits
for its lane (the only one with what it needs, or full) for HANDOVER_SECONDS
(HANDOVER_BESIDE_LLAMACPP while a llama.cpp lane of another model computes) starts anyway, computing alongside, so none starves. A request for idle lanes
waits GATHER_SECONDS (50 ms) first: a burst's requests arrive one by one,
and the first alone would pick the lane best for one. The embedding worker
takes no turn: its batches are short, so computing alongside costs less
than waiting would. A seeded request always goes to the first worker in
plan order that can serve it, so the same seed gives the same text (one
retried after its worker died: the next lane in plan order).

Reconciliation: a worker's heartbeat lists the requests it runs; any the
broker has no route for (after a broker restart, or a client that is gone)
is aborted there. A client whose socket is gone loses its routes.

Models: the broker knows every model of the plan and keeps an entry for each
of their workers, running or not. A model is loaded on demand: a request for
one that is not loaded waits in the queue while the broker wants it (the
supervisor starts the workers of every wanted model, and stops the others),
once it fits in each device's memory budget and `max_loaded`: the least
recently used idle models on that device are unloaded first. A model that
could not fit even then is refused with 507 at once. A model idle for its
keep-alive (the last request's, or its own) is unloaded; -1 keeps it. A model
none of whose workers could load is failed with why, and not tried again
until a ModelControl loads it.

On Drain (SIGTERM to `infersnap serve`) new requests get 503; accepted ones
may finish until the grace period ends, then end with a 503 too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import zmq

from infersnap import paths, wire
from infersnap.plan import ModelSpec, PlanFile, ServePlan, announced

# Seconds without a heartbeat (sent every 0.25 s) before a live worker counts as stuck. A worker whose
# process ends is reported at once by the supervisor (WorkerExited); this is for one that hangs.
WORKER_TIMEOUT = 10.0
TICK_MS = 100
GATHER_SECONDS = 0.05  # a request for idle lanes waits this long for others, so that a burst picks the burst's lane
HANDOVER_SECONDS = 2.0  # the longest a request waits for its lane while another lane computes on its cores
# ... while a llama.cpp lane of another model computes there (a request of another model cannot go to that
# lane: it has only its own model's to wait for). llama.cpp's threads spin at each step's barrier, so sharing the cores
# with it costs both far more than waiting for it to drain: two busy models on one CPU served 0.27x the
# requests of one alone when they overlapped after 2 s, 0.81x after 8 s. OpenVINO's threads yield, and
# its long turns are slow to drain: overlapping after 2 s served 0.5x, after 8 s 0.2x (bench/models.py).
HANDOVER_BESIDE_LLAMACPP = 8.0
SWITCH_MARGIN = 0.8  # another lane is chosen over the computing one only if it ends the request in this share of the time
REMEMBERED_PREFIXES = 4096  # prompt blocks remembered per worker (4 MiB of text): more than its cache holds
EXPECTED_TOKENS = 256  # what a request is guessed to generate, at most (many stop well before max_tokens)
RESTARTING = "restarting"  # the state of a worker whose process stopped, until it comes back
UNLOADED = "unloaded"  # a worker of a model not loaded: no process
UNLOADING = "unloading"  # a worker whose model was unloaded, until its process has ended
WAITING_STATES = ("loading", RESTARTING, UNLOADED, UNLOADING)  # not ready, and may be: requests wait for them

log = logging.getLogger("infersnap.broker")


def takes_slot(needs: wire.Needs) -> bool:
    """Tokenizer lookups are answered between two engine steps and hold no slot."""
    return needs.task != "tokenize"


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


@dataclass
class Worker:
    identity: bytes
    info: wire.WorkerInfo
    last_seen: float
    running: set[str] = field(default_factory=set)  # requests dispatched to it that hold a slot
    lookups: set[str] = field(default_factory=set)  # tokenizer lookups dispatched to it
    # the prompt beginnings (wire.Work.prefix) last sent to it, oldest first: what its prompt cache may hold
    prefixes: OrderedDict[int, None] = field(default_factory=OrderedDict)
    last_ran: str = ""  # what it was running when its process last died ("2 generate requests"), for a failure's reason

    def remember(self, prefix: list[int]) -> None:
        for block in prefix:
            self.prefixes[block] = None
            self.prefixes.move_to_end(block)
        while len(self.prefixes) > REMEMBERED_PREFIXES:
            self.prefixes.popitem(last=False)

    def cached_tokens(self, prefix: list[int]) -> int:
        """A guess of the tokens of this prompt its cache holds: the blocks it was sent before."""
        held = next((i for i, block in enumerate(prefix) if block not in self.prefixes), len(prefix))
        return held * wire.PREFIX_BLOCK // wire.CHARS_PER_TOKEN

    def serves(self, model: str, task: str) -> bool:
        return self.info.model.lower() == model.lower() and task in self.info.capabilities.tasks

    def may_serve(self, needs: wire.Needs) -> bool:
        """Whether it can serve these needs now or once (re)loaded: a loading worker may still gain features."""
        if self.info.state == "failed":
            return False
        return self.info.state in WAITING_STATES or wire.unmet(needs, self.info.capabilities) is None

    def able(self, needs: wire.Needs) -> bool:
        """Whether it is ready and can do what these needs ask, free slot or not."""
        return self.info.state == "ready" and wire.unmet(needs, self.info.capabilities) is None

    def can_take(self, needs: wire.Needs) -> bool:
        """Whether it can start a request with these needs now, cores aside."""
        return self.able(needs) and (not takes_slot(needs) or self.free_slots > 0)

    @property
    def free_slots(self) -> int:
        return self.info.slots - len(self.running) if self.info.state == "ready" else 0

    @property
    def load(self) -> float:
        return (len(self.running) + len(self.lookups)) / self.info.slots


@dataclass
class Model:
    """A model of the plan as the broker schedules it: loaded on demand, unloaded once idle."""

    spec: ModelSpec
    keep_alive: int  # seconds it stays loaded once idle: its last request's, or its own
    wanted: bool = False  # its workers should run (the supervisor starts them)
    requested: bool = False  # a ModelControl asked to load it: it loads once it fits, as a waiting request would
    last_used: float = 0.0  # when a request of it last started or ended, or it was loaded
    failed: str = ""  # why none of its workers could load; it is not loaded again until asked to
    removed: bool = False  # gone from the catalog: no new request; forgotten once unloaded


class Followers:
    """The clients that follow the broker's status (StatusQuery.follow: the frontends). They get a Status
    at once when a worker's or a model's state changes (or the plan file was read anew, or a drain began),
    and after KEEPALIVE_SECONDS of none, so that a follower that hears nothing knows the broker is gone (a
    restarted broker knows no followers: they ask again). What runs and waits changes with every request:
    that is not pushed (/metrics asks at its scrape)."""

    KEEPALIVE_SECONDS = 1.0

    def __init__(self) -> None:
        self.clients: set[bytes] = set()
        self.sent: tuple = ()  # the states last pushed
        self.sent_at = 0.0

    def push(self, broker: Broker, now: float) -> None:
        """Send the followers the broker's Status if a state changed or none went for KEEPALIVE_SECONDS;
        run after each pass of the broker's loop."""
        if not self.clients:
            return
        states = (broker.replans, broker.drain_deadline is not None,
                  [(w.identity, w.info.state, w.info.error) for w in broker.workers.values()],
                  [(name, m.wanted, m.failed, m.removed, m.keep_alive) for name, m in broker.models.items()])
        if states == self.sent and now - self.sent_at < self.KEEPALIVE_SECONDS:
            return
        self.sent, self.sent_at = states, now
        status = wire.encode(broker.status(""))
        for client in list(self.clients):
            try:
                broker.clients.send_multipart([client, status], zmq.NOBLOCK)
            except zmq.ZMQError:  # gone, or not reading: one that comes back follows again
                self.clients.discard(client)


class Broker:
    def __init__(
        self, plan: ServePlan, zctx: zmq.Context | None = None, address: Callable[[str], str] = paths.socket_address,
        plan_file: PlanFile | None = None,
    ) -> None:
        self.plan = plan
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
        self.queue: dict[str, Queued] = {}  # accepted, waiting for a worker; dicts keep arrival order
        self.drain_deadline: float | None = None
        self.next_pass = 0.0  # when _tick runs a dispatch pass, if nothing else has
        self.replans = 0  # times the plan file was read anew (Status.replans)
        self.followers = Followers()
        self.models = {m.name.lower(): Model(m, m.keep_alive) for m in plan.models}
        now = time.monotonic()
        for spec in plan.workers:  # an entry for each, running or not, so that status and routing know them all
            identity = spec.worker_id.encode()
            self.workers[identity] = Worker(identity, announced(plan, spec, state=UNLOADED), now)
        if plan.models:
            self._want(self.models[plan.default_model.name.lower()], now)

    def _bind(self, address: str) -> zmq.Socket:
        socket = self.zctx.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over its old identity
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises instead of vanishing
        socket.bind(address)
        return socket

    def serve_forever(self) -> None:
        while True:
            # sooner than a tick when a request's wait ends sooner (GATHER_SECONDS)
            due = int((self.next_pass - time.monotonic()) * 1000) + 1 if self.queue else TICK_MS
            self.poll_once(max(1, min(TICK_MS, due)))

    def poll_once(self, timeout_ms: int) -> None:
        """Handle what arrives within `timeout_ms`, then check the workers' heartbeats and the drain."""
        events = dict(self.poller.poll(timeout_ms))
        if self.workers_socket in events:
            self._read_all(self.workers_socket, self._on_worker)
        if self.clients in events:
            self._read_all(self.clients, self._on_client)
        self._tick(time.monotonic())

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

    # --- clients -----------------------------------------------------------

    def _on_client(self, client: bytes, message: wire.Message, body: bytes) -> None:
        replanned = self.plan_file.changed(at_once=True) if self.plan_file else None
        if replanned is not None:  # the frontend read the file as the request arrived: no older view here
            self._replan(replanned)
        if isinstance(message, wire.Submit):
            refusal = self._refusal(message)
            if refusal is not None:
                self._send_results(client, [refusal])
            else:
                self.queue[message.id] = Queued(client, message, body)
                model = self.models.get(message.model.lower())
                if model is not None:
                    keep_alive = message.work.keep_alive
                    model.keep_alive = model.spec.keep_alive if keep_alive is None else keep_alive
                self._dispatch()
        elif isinstance(message, wire.Abort):
            self._abort(message.ids)
        elif isinstance(message, wire.StatusQuery):
            if message.follow:
                self.followers.clients.add(client)
            self._send(self.clients, client, self.status(message.id))
        elif isinstance(message, wire.ModelControl):
            self._send_results(client, [self._control(message)])
        elif isinstance(message, wire.WorkerExited):
            worker = self.workers.get(message.worker_id.encode())
            if worker is not None and (worker.info.state == UNLOADING or not self._wanted(worker)):
                self._gone(worker)
            elif worker is not None and worker.info.state not in (RESTARTING, "failed"):
                self._lost(worker, wire.exit_words(message.code))
            if message.why:
                self._failed(message.worker_id, message.why)
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
            if not self._workers_of(model):
                return self._not_found(submit.id, submit.model)
            return wire.failed(submit.id, 400, f"the model '{submit.model}' does not do this ({needs.task})",
                               code="not_supported", param="model")
        failure = self._load_failure(submit.model)
        if failure:
            return wire.failed(submit.id, 503, failure)
        if not any(w.may_serve(needs) for w in serving):
            ready = [w for w in serving if w.info.state == "ready"]
            if not ready:  # every worker of this task failed (the embedding worker, say) while others serve
                return wire.failed(submit.id, 503, self._task_failure(serving, needs.task))
            feature = next(f for f in (wire.unmet(needs, w.info.capabilities) for w in ready) if f)
            runtimes = [w.info.runtime for w in serving if w.info.state != "failed"]
            return wire.refusal(submit.id, needs, feature, runtimes, ready[0].info.model)
        if not model.wanted:
            too_big = self._never_fits(model)
            if too_big:
                return wire.failed(submit.id, 507, too_big, code="model_too_large", param="model")
        if not takes_slot(needs):  # a lookup never waits for a slot, so there is always room
            return None
        # per device: a second lane on the same cores does not double what may wait
        lanes: dict[str, list[Worker]] = {}
        for worker in serving:
            if worker.info.state != "failed":
                lanes.setdefault(worker.info.device, []).append(worker)
        room = sum(max(wire.capacity(w.info.slots, self.plan.max_waiting) for w in group)
                   - sum(len(w.running) for w in group) for group in lanes.values())
        waiting = sum(q.submit.model.lower() == submit.model.lower() and q.submit.needs.task == needs.task
                      for q in self.queue.values())
        if waiting >= room:
            # Refuse at once rather than queue without end; the frontend adds Retry-After.
            return wire.failed(submit.id, 503, "the server is at capacity; retry shortly", code="server_overloaded")
        return None

    def _not_found(self, request_id: str, name: str) -> wire.Failure:
        known = ", ".join(m.spec.name for m in self.models.values() if not m.removed) or "none"
        return wire.failed(request_id, 404, f"The model '{name}' does not exist. Models served here: {known}",
                           code="model_not_found", param="model")

    def _load_failure(self, name: str) -> str | None:
        """Why the model cannot serve at all (every worker of it failed to load), or None."""
        failed = [w.info for w in self.workers.values() if w.info.model.lower() == name.lower()]
        if failed and all(w.state == "failed" for w in failed):
            reasons = "; ".join(f"{w.worker_id}: {w.error}" for w in failed)
            return f"no worker could load this model ({reasons})"
        return None

    @staticmethod
    def _task_failure(serving: list[Worker], task: str) -> str:
        """Why no worker of a model can do this task any more: each one's reason."""
        reasons = "; ".join(f"{w.info.worker_id}: {w.info.error}" for w in serving if w.info.error)
        return f"no worker can do this ({task}) for this model any more" + (f" ({reasons})" if reasons else "")

    def _dispatch(self) -> None:
        """Hand queued requests, oldest first, to the lanes that end them soonest; end those no worker can serve."""
        now = time.monotonic()
        self.next_pass = now + TICK_MS / 1000
        self._schedule(now)
        blocked: set[bytes] = set()  # kinds of request no worker can take now
        awaited: dict[str, list[bytes]] = {}  # device -> the lane each request waiting for it waits for
        demand = Counter(q.submit.model.lower() for q in self.queue.values() if takes_slot(q.submit.needs))
        for request_id, queued in list(self.queue.items()):
            kind = queued.kind
            if kind in blocked:
                continue
            submit = queued.submit
            serving = [w for w in self.workers.values() if w.serves(submit.model, submit.needs.task)]
            if not any(w.may_serve(submit.needs) for w in serving):  # none left to wait for
                why = self._load_failure(submit.model) or self._task_failure(serving, submit.needs.task)
                self._fail({request_id: self.queue.pop(request_id)}, why)
                continue
            if queued.avoid and not submit.work.seeded:  # a retry: not where it died, unless no other may serve it
                others = [w for w in serving if w.identity not in queued.avoid and w.may_serve(submit.needs)]
                serving = others or serving
            if not takes_slot(submit.needs):  # a lookup is answered between two steps, by the least busy
                free = [w for w in serving if w.can_take(submit.needs)]
                if free:
                    self._send_to(min(free, key=lambda w: w.load), request_id)
                else:
                    blocked.add(kind)
                continue
            if submit.work.seeded:
                serving = [self._seeded_lane(serving, queued)]
            able = [w for w in serving if w.able(submit.needs)]
            if not able:
                blocked.add(kind)
                continue
            lane = self._soonest(able, submit.work, demand)
            if self._gathering(able, lane, queued, now):
                continue
            if lane.free_slots > 0 and self._may_start(lane, queued, now, awaited):
                self._send_to(lane, request_id)
                demand[submit.model.lower()] -= 1
                continue
            awaited.setdefault(lane.info.device, []).append(lane.identity)
            if all(w.free_slots <= 0 for w in able):
                blocked.add(kind)

    def _seeded_lane(self, serving: list[Worker], queued: Queued) -> Worker:
        """A seeded request's one lane, so that the same seed gives the same text: the first in plan order
        that may serve it; for a retry, the next after the one that died running it (that one last)."""
        ordered = self._in_plan_order(serving)
        died = [i for i, w in enumerate(ordered) if w.identity in queued.avoid]
        if died:
            ordered = ordered[died[-1] + 1:] + ordered[:died[-1] + 1]
        return next(w for w in ordered if w.may_serve(queued.submit.needs))

    def _soonest(self, lanes: list[Worker], work: wire.Work, demand: Counter[str]) -> Worker:
        """The lane that would end this request first, by the lanes' profiles at their device's load
        (what runs there and what waits here for its models, this request among them); by load if one
        has no profile."""
        if len(lanes) == 1 or any(w.info.speed is None for w in lanes):
            return min(lanes, key=lambda w: (w.free_slots <= 0, w.load))
        tokens = min(work.max_tokens or EXPECTED_TOKENS, EXPECTED_TOKENS)

        def guess(lane: Worker) -> float:
            beside = self._lanes_of(lane.info.device)
            others = sum(len(w.running) for w in beside) + sum(demand[m] for m in {w.info.model.lower() for w in beside})
            unread = max(work.prompt_tokens - lane.cached_tokens(work.prefix), 1)
            seconds = lane.info.speed.finish_seconds(others - 1, unread, tokens)
            # the lane computing now keeps its turn unless another one wins by the margin
            return seconds / SWITCH_MARGIN if self._computing_beside(lane) else seconds

        return min(lanes, key=guess)

    def _lanes_of(self, device: str) -> list[Worker]:
        """The generating workers on a device: they take turns on its cores. The embedding worker takes
        none: its batches are short (BATCH_TOKENS), so computing alongside costs less than a wait."""
        return [w for w in self.workers.values() if w.info.device == device and "embed" not in w.info.capabilities.tasks]

    def _computing_beside(self, lane: Worker) -> list[Worker]:
        """The other lanes computing on this lane's device now."""
        if "embed" in lane.info.capabilities.tasks:
            return []
        return [w for w in self._lanes_of(lane.info.device) if w is not lane and w.running]

    def _gathering(self, able: list[Worker], lane: Worker, queued: Queued, now: float) -> bool:
        """Whether the request waits a moment before its lane is chosen: lanes to choose from by their
        profiles, on an idle device, where a burst's requests arrive one by one and the first alone
        would pick the lane best for one."""
        if len(able) < 2 or any(w.info.speed is None for w in able) or now - queued.since >= GATHER_SECONDS:
            return False
        if any(w.running for w in self._lanes_of(lane.info.device)):
            return False
        self.next_pass = min(self.next_pass, queued.since + GATHER_SECONDS)
        return True

    def _may_start(self, lane: Worker, queued: Queued, now: float, awaited: dict[str, list[bytes]]) -> bool:
        """Whether the lane may start this request now, by the turns the lanes of one device take."""
        computing = self._computing_beside(lane)
        if computing:  # computing alongside beats starving
            spins = any(w.info.runtime == "llamacpp" and w.info.model != lane.info.model for w in computing)
            return now - queued.since >= (HANDOVER_BESIDE_LLAMACPP if spins else HANDOVER_SECONDS)
        others_awaited = set(awaited.get(lane.info.device, [])) - {lane.identity}
        return not (lane.running and others_awaited)  # it drains, so the other lane gets its turn

    def _send_to(self, worker: Worker, request_id: str) -> None:
        queued = self.queue.pop(request_id)
        submit = queued.submit
        self.routes[request_id] = Route(client=queued.client, worker=worker.identity, pending=queued,
                                        task=submit.needs.task)
        worker.remember(submit.work.prefix)
        (worker.running if takes_slot(submit.needs) else worker.lookups).add(request_id)
        self._used(worker.info.model)
        self._send(self.workers_socket, worker.identity, wire.Dispatch(queued.client, request_id), queued.body)

    def _abort(self, ids: list[str]) -> None:
        by_worker: dict[bytes, list[str]] = {}
        for request_id in ids:
            if self.queue.pop(request_id, None) is not None:
                continue  # no worker has it
            route = self.routes.pop(request_id, None)
            if route is not None:
                by_worker.setdefault(route.worker, []).append(request_id)
                self._unassign(route.worker, request_id)
        for identity, worker_ids in by_worker.items():
            self._send(self.workers_socket, identity, wire.Abort(ids=worker_ids))
        self._dispatch()

    def _unassign(self, identity: bytes, request_id: str) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.running.discard(request_id)
            worker.lookups.discard(request_id)

    def _client_gone(self, client: bytes) -> None:
        """A client we could not send to (its process ended): what it asked for is stopped."""
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
            models=[self._model_state(m, time.monotonic()) for m in self.models.values() if not m.removed],
            replans=self.replans,
        )

    def _model_state(self, model: Model, now: float) -> wire.ModelState:
        workers = self._workers_of(model)
        if model.failed:
            state = "failed"
        elif any(w.info.state == "ready" for w in workers):
            state = "loaded"
        elif model.wanted:
            state = "loading"
        elif any(w.info.state == UNLOADING for w in workers):
            state = UNLOADING
        else:
            state = UNLOADED
        idle = now - model.last_used if state == "loaded" and not self._busy(model) else None
        spec = model.spec
        return wire.ModelState(spec.name, state, model.failed, model.wanted, model.keep_alive, idle,
                               spec.context, spec.context_note, spec.left_out)

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
            elif model is not None and not model.wanted and not model.failed and info.state != "failed":
                self._want(model, now)  # running anyway (a broker restarted beside it): it counts as loaded
            if worker is None or worker.info.state != info.state:
                log.info("worker %s (%s) is %s%s", info.worker_id, info.device, info.state,
                         f": {info.error}" if info.error else "")
                if info.state == "ready":
                    self._used(info.model)  # keep-alive counts from when it could serve, not from the load's start
                    if worker is not None:
                        worker.last_ran = ""
            if worker is None:
                worker = self.workers[identity] = Worker(identity, info, now)
            worker.info, worker.last_seen = info, now
            self._reconcile(worker)
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
                self._used(worker.info.model)
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
        for request_id, pending in retry.items():  # its wait counts from its arrival, as before
            self.queue[request_id] = Queued(pending.client, pending.submit, pending.body, pending.since,
                                            avoid=frozenset([worker.identity]))
        if retry:  # each at its place by arrival, ahead of later requests
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
        """The worker could not load and is not restarted: it counts as failed, even if it never announced itself
        (a crash while loading), so that status says why and requests stop waiting for it."""
        spec = next((s for s in self.plan.workers if s.worker_id == worker_id), None)
        if spec is None:
            return
        identity = worker_id.encode()
        worker = self.workers.setdefault(identity, Worker(identity, announced(self.plan, spec), time.monotonic()))
        if worker.last_ran:  # it died serving: what it ran is part of why
            why = f"{why} (it was running {worker.last_ran})"
        worker.info = msgspec.structs.replace(worker.info, state="failed", error=why)
        log.error("worker %s failed: %s", worker_id, why)
        self._dispatch()

    # --- models ------------------------------------------------------------

    def _workers_of(self, model: Model) -> list[Worker]:
        name = model.spec.name.lower()
        return [w for w in self.workers.values() if w.info.model.lower() == name]

    def _wanted(self, worker: Worker) -> bool:
        model = self.models.get(worker.info.model.lower())
        return model is None or model.wanted

    def _busy(self, model: Model) -> bool:
        name = model.spec.name.lower()
        return (any(q.submit.model.lower() == name for q in self.queue.values())
                or any(w.running or w.lookups for w in self._workers_of(model)))

    def _settled(self, model: Model) -> bool:
        """Whether every worker of the model has loaded or failed: one still loading is not idle."""
        return all(w.info.state in ("ready", "failed") for w in self._workers_of(model))

    def _used(self, name: str) -> None:
        model = self.models.get(name.lower())
        if model is not None:
            model.last_used = time.monotonic()

    def _want(self, model: Model, now: float) -> None:
        """Load the model: the supervisor starts its workers, which count as loading until they say more."""
        log.info("loading model %s", model.spec.name)
        model.wanted, model.requested, model.last_used = True, False, now
        for worker in self._workers_of(model):
            if worker.info.state == UNLOADED:
                worker.info = msgspec.structs.replace(worker.info, state="loading", error="")

    def _unload(self, model: Model, why: str) -> None:
        """Stop the model's workers (the supervisor ends their processes); a failed one keeps its reason."""
        log.info("unloading model %s: %s", model.spec.name, why)
        model.wanted = False
        for worker in self._workers_of(model):
            if worker.info.state == "failed":
                continue
            worker.info = msgspec.structs.replace(worker.info, state=UNLOADING if worker.info.pid else UNLOADED)

    def _gone(self, worker: Worker) -> None:
        """A worker's process ended because its model was unloaded (or it was failed): it holds nothing now."""
        if worker.running or worker.lookups:
            self._lost(worker, "was stopped")
        worker.prefixes.clear()
        if worker.info.state != "failed":
            state = "loading" if self._wanted(worker) else UNLOADED  # wanted again meanwhile: it starts anew
            worker.info = msgspec.structs.replace(worker.info, state=state, pid=0, running=[], waiting=0, error="")
        self._dispatch()

    def _leaving(self, model: Model) -> bool:
        """Whether processes of the model's are still ending after an unload."""
        return any(w.info.state == UNLOADING for w in self._workers_of(model))

    def _holds(self, model: Model, device: str) -> bool:
        """Whether the model holds memory on the device: loaded or loading, or its processes not ended yet."""
        return device in model.spec.memory and (model.wanted or self._leaving(model))

    def _evictable(self, model: Model) -> bool:
        return model.wanted and model.keep_alive != -1 and self._settled(model) and not self._busy(model)

    def _fits(self, need: int, device: str, beside: list[Model]) -> bool:
        budget = self.plan.budgets.get(device, 0)
        used = sum(m.spec.memory.get(device, 0) for m in beside)
        return (not budget or used + need <= budget) and len(beside) < self.plan.max_loaded

    def _never_fits(self, model: Model) -> str | None:
        """Why the model cannot load even with every model that may be unloaded gone; None if it can."""
        for device, need in model.spec.memory.items():
            kept = [m for m in self.models.values() if m is not model and m.wanted and m.keep_alive == -1
                    and device in m.spec.memory]
            if self._fits(need, device, kept):
                continue
            budget = self.plan.budgets.get(device, 0)
            if len(kept) >= self.plan.max_loaded:
                return (f"the model '{model.spec.name}' cannot be loaded on {device}: models.max-loaded is "
                        f"{self.plan.max_loaded} and the models kept loaded there ({', '.join(m.spec.name for m in kept)}) "
                        "have a keep-alive of -1")
            free = budget - sum(m.spec.memory.get(device, 0) for m in kept)
            return (f"the model '{model.spec.name}' needs about {need >> 20} MiB on {device} (weights and KV cache "
                    f"at context {model.spec.context}), more than the {max(free, 0) >> 20} MiB of its memory budget "
                    f"of {budget >> 20} MiB that can be freed for it (models.memory-budget; a smaller context or "
                    "fewer slots make it smaller)")
        return None

    def _make_room(self, model: Model) -> bool:
        """Whether the model may load now beside what is loaded on each of its devices. If not, the least
        recently used idle models that make it fit there are unloaded; it loads once their processes end."""
        now_fits = True
        for device, need in model.spec.memory.items():
            held = [m for m in self.models.values() if m is not model and self._holds(m, device)]
            staying = [m for m in held if m.wanted]
            leaving = len(staying) < len(held)
            victims = sorted((m for m in staying if self._evictable(m)), key=lambda m: m.last_used)
            while not self._fits(need, device, staying) and victims:
                victim = victims.pop(0)
                self._unload(victim, f"to make room for {model.spec.name} on {device}")
                staying.remove(victim)
                leaving = True
            # busy models in the way: it waits for them to go idle (its requests' timeout bounds the wait)
            now_fits = now_fits and self._fits(need, device, staying) and not leaving
        return now_fits

    def _schedule(self, now: float) -> None:
        """Load the models requests wait for (as memory allows), fail those none of whose workers loaded,
        and unload those idle past their keep-alive."""
        asked = {q.submit.model.lower() for q in self.queue.values()}
        for name, model in self.models.items():
            # not while its own processes are ending: the supervisor must see it unwanted to end them
            if ((name in asked or model.requested) and not model.wanted and not model.failed
                    and not self._leaving(model) and self._make_room(model)):
                self._want(model, now)
        for model in self.models.values():
            if not model.wanted:
                continue
            failure = self._load_failure(model.spec.name)
            if failure:
                model.failed = failure
                log.error("model %s failed to load: %s", model.spec.name, model.failed)
                self._unload(model, "no worker of it could load")
            elif (model.keep_alive >= 0 and self._settled(model) and not self._busy(model)
                  and now - model.last_used >= model.keep_alive):
                why = "removed from the catalog" if model.removed else f"idle for {model.keep_alive} s (its keep-alive)"
                self._unload(model, why)
        for name, model in list(self.models.items()):
            if model.removed and not model.wanted and not self._leaving(model) and not self._busy(model):
                log.info("model %s is forgotten: removed from the catalog, and unloaded", model.spec.name)
                for worker in self._workers_of(model):
                    del self.workers[worker.identity]
                del self.models[name]

    def _replan(self, plan: ServePlan) -> None:
        """The catalog changed while serving: each model added gets its entries, unloaded; a model removed
        takes no new request, and is unloaded and forgotten once those it accepted have ended."""
        self.plan, now = plan, time.monotonic()
        self.replans += 1
        for spec in plan.models:
            model = self.models.get(spec.name.lower())
            if model is None:
                log.info("model %s was added to the catalog", spec.name)
                self.models[spec.name.lower()] = Model(spec, spec.keep_alive)
            else:  # the same spec; or its file moved (a new path); or it is back before it was forgotten
                if model.removed:
                    model.keep_alive = spec.keep_alive
                model.spec, model.removed = spec, False
        for spec in plan.workers:
            identity = spec.worker_id.encode()
            if identity not in self.workers:
                self.workers[identity] = Worker(identity, announced(plan, spec, state=UNLOADED), now)
        names = {spec.name.lower() for spec in plan.models}
        for name, model in self.models.items():
            if name not in names and not model.removed:
                log.info("model %s was removed from the catalog; it is unloaded once its requests end", model.spec.name)
                model.removed, model.requested, model.keep_alive = True, False, 0
        self._dispatch()

    def _control(self, control: wire.ModelControl) -> wire.Final | wire.Failure:
        """Load a model now, or unload it once idle: answered at once (the load goes on)."""
        model = self.models.get(control.model.lower())
        if model is None or model.removed:
            return self._not_found(control.id, control.model)
        if not control.load:
            model.keep_alive, model.requested = 0, False  # as a request with keep_alive 0: gone once idle
            self._schedule(time.monotonic())
            return wire.Final(control.id, "stop")
        model.keep_alive = model.spec.keep_alive if control.keep_alive is None else control.keep_alive
        if not model.wanted:
            too_big = self._never_fits(model)
            if too_big:
                return wire.failed(control.id, 507, too_big, code="model_too_large", param="model")
            if model.failed:  # asked by name: it is tried again
                model.failed = ""
                for worker in self._workers_of(model):
                    worker.info = msgspec.structs.replace(worker.info, state=UNLOADED, error="", pid=0)
            model.requested = True
        else:  # loaded: a lane failed or quarantined beside the others is tried again (the supervisor starts it)
            for worker in self._workers_of(model):
                if worker.info.state == "failed":
                    worker.info = msgspec.structs.replace(worker.info, state="loading", error="", pid=0)
        model.last_used = time.monotonic()
        self._dispatch()
        return wire.Final(control.id, "stop")

    def _tick(self, now: float) -> None:
        replanned = self.plan_file.changed() if self.plan_file else None
        if replanned is not None:
            self._replan(replanned)
        for worker in self.workers.values():
            if worker.info.state in (RESTARTING, "failed", UNLOADED) or not worker.info.pid:
                continue  # no process to hear from (yet)
            if now - worker.last_seen > WORKER_TIMEOUT:
                if worker.info.state == UNLOADING:
                    self._gone(worker)
                else:
                    self._lost(worker, f"went silent (no heartbeat for {WORKER_TIMEOUT:g} s)")
        self._schedule(now)  # an idle model's keep-alive may have run out; a model may fit now
        if self.drain_deadline is not None and now >= self.drain_deadline and (self.routes or self.queue):
            self._end_all("the server shut down before this request finished")
        if self.queue and now >= self.next_pass:  # a wait for a lane may have run past HANDOVER_SECONDS
            self._dispatch()
        self.followers.push(self, now)

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
