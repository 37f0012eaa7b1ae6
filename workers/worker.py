"""A worker process: one engine on one device, talking to the broker.

Socket I/O runs on its own thread, so heartbeats keep flowing while the
engine thread is inside a long llama_decode and the engine never waits on
ZeroMQ. The engine thread runs one loop for every kind of request
(generate, embed, tokenizer lookups): it adds what came, runs one engine
step, and hands that step's outputs, already encoded, one message per
client, to the I/O thread over an inproc socket.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import threading
import time

import msgspec
import zmq

from infersnap import paths, wire
from infersnap.plan import ServePlan, WorkerSpec, announced
from infersnap.runtimes import RUNTIMES
from infersnap.workers.engine_base import Engine, EngineError, EngineSettings, Unloaded
from infersnap.workers.faults import Fault

HEARTBEAT_SECONDS = 0.25
OUTBOX = "inproc://outbox"
# A running request's tokens go out at most this often: each send wakes the I/O thread, the broker and
# the frontend, whose CPU comes out of the engine's own cores (one stream at 110 tok/s lost 4-8 % to it).
# First and last outputs go at once, so time to first token and freed slots do not wait.
STREAM_INTERVAL = 0.02

log = logging.getLogger("infersnap.worker")


class WorkerIO(threading.Thread):
    """Owns the DEALER socket: requests in, results and heartbeats out. `info` is replaced whole by the
    engine thread (WorkerInfo is frozen), so a heartbeat never sends one half updated."""

    def __init__(self, zctx: zmq.Context, info: wire.WorkerInfo, inbox: queue.Queue) -> None:
        super().__init__(name="worker-io", daemon=True)
        self.info = info
        self.inbox = inbox
        self.dealer = zctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, info.worker_id.encode())
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(paths.socket_address("workers"))
        self.outbox = zctx.socket(zmq.PULL)
        self.outbox.setsockopt(zmq.LINGER, 0)
        self.outbox.bind(OUTBOX)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self.dealer.send(wire.encode(wire.WorkerStatus(info=self.info)))
                next_beat = now + HEARTBEAT_SECONDS
            events = dict(poller.poll(max(1, int((next_beat - time.monotonic()) * 1000))))
            if self.outbox in events:
                while True:
                    try:
                        self.dealer.send_multipart(self.outbox.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.dealer in events:
                while True:
                    try:
                        frames = self.dealer.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.inbox.put(received(frames))
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("dropped an undecodable message")


def received(frames: list[bytes]) -> tuple[wire.Message, bytes]:
    """A message from the broker as (message, client): a Dispatch's request with the client to answer,
    or a control message (Abort) with no client."""
    header = wire.decode(frames[0])
    if isinstance(header, wire.Dispatch):
        return wire.decode(frames[1]), header.client
    return header, b""


def pin_to(cpus: list[int]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:  # a CPU went offline, or a container forbids it
            log.warning("could not pin to CPUs %s: %s", cpus, exc)


def run(plan: ServePlan, spec: WorkerSpec, restarts: int = 0) -> None:
    pin_to(spec.cpus)
    info = announced(plan, spec, pid=os.getpid(), restarts=restarts)
    zctx = zmq.Context()
    inbox: queue.Queue = queue.Queue()
    io = WorkerIO(zctx, info, inbox)
    io.start()
    outbox = zctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 0)
    outbox.connect(OUTBOX)

    model = plan.model(spec.model)
    fault = Fault("worker", spec.engine, spec.options.label, model.path if model else "", spec.task)
    try:
        if spec.crashes:  # planned only to say why its model cannot be served here
            raise EngineError(f"{spec.engine} crashes here: {spec.crashes}")
        fault.loading()
        engine = load_engine(plan, spec)
        io.info = msgspec.structs.replace(info, state="ready", context=engine.context, capabilities=engine.capabilities)
    except Exception as exc:  # the worker stays up to report why
        log.error("worker %s failed to load: %s", spec.worker_id, exc)
        io.info = msgspec.structs.replace(info, state="failed", error=str(exc))
        engine = Unloaded(info.capabilities, f"worker {spec.worker_id} failed to load: {exc}")
    serve(engine, inbox, outbox, io, fault)


def serve(engine: Engine, inbox: queue.Queue, outbox: zmq.Socket, io: WorkerIO, fault: Fault | None = None) -> None:
    """The engine loop: take what came between two steps, step, send each client its outputs. `fault`:
    the test hook that crashes the process at a chosen point (workers/faults.py)."""
    clients: dict[str, bytes] = {}  # request id -> the client its outputs go to
    held = Held()
    kv_due = 0.0  # when the KV use in `io.info` is next read anew
    while True:
        item = inbox.get() if not engine.busy else _next_or_none(inbox)
        outputs: list[wire.Output] = []
        while item is not None:
            message, client = item
            if isinstance(message, wire.Abort):
                engine.abort(message.ids)
                held.forget(message.ids)
                for request_id in message.ids:
                    clients.pop(request_id, None)
            else:
                clients[message.id] = client
                if fault is not None and isinstance(message, (wire.Generate, wire.Embed)):
                    fault.request()
                refused = _add(engine, message)
                if refused is not None:
                    outputs.append(refused)
            item = _next_or_none(inbox)
        if fault is not None and engine.busy:
            fault.step()
        outputs += _step(engine)
        if held.add(outputs) or (held.outputs and not engine.busy):
            first = held.unsent()
            _deliver(held.take(), clients, outbox, io.info.worker_id, first)
        running = [s.request.id for s in engine.running]
        changed = running != io.info.running or len(engine.waiting) != io.info.waiting
        if changed or time.monotonic() >= kv_due:  # KV use grows every token: read at the heartbeats' pace
            kv_due = time.monotonic() + HEARTBEAT_SECONDS
            kv_used = round(engine.kv_tokens() / max(1, io.info.slots * io.info.context), 4)
            if changed or kv_used != io.info.kv_used:
                io.info = msgspec.structs.replace(io.info, running=running, waiting=len(engine.waiting), kv_used=kv_used)


class Held:
    """Outputs not yet sent, one per request: a request's later outputs are merged into the held one
    (wire.Result.then: text chunks add up; an ending takes the text held before it)."""

    def __init__(self) -> None:
        self.outputs: dict[str, wire.Output] = {}
        self.sent: set[str] = set()  # requests that have had an output sent
        self.urgent = False
        self.last_send = 0.0

    def add(self, outputs: list[wire.Output]) -> bool:
        """Hold these; whether it is time to send what is held."""
        for output in outputs:
            earlier = self.outputs.get(output.id)
            if earlier is not None:
                output = earlier.then(output)
            self.outputs[output.id] = output
            self.urgent |= isinstance(output, wire.Ending) or output.id not in self.sent
        return bool(self.outputs) and (self.urgent or time.monotonic() - self.last_send >= STREAM_INTERVAL)

    def unsent(self) -> set[str]:
        """The held requests that have had no output sent yet: what is sent next carries their first."""
        return {request_id for request_id in self.outputs if request_id not in self.sent}

    def take(self) -> list[wire.Output]:
        outputs = list(self.outputs.values())
        for output in outputs:
            (self.sent.discard if isinstance(output, wire.Ending) else self.sent.add)(output.id)
        self.outputs.clear()
        self.urgent, self.last_send = False, time.monotonic()
        return outputs

    def forget(self, ids: list[str]) -> None:
        """Aborted requests: nothing more of theirs is sent."""
        for request_id in ids:
            self.sent.discard(request_id)
            self.outputs.pop(request_id, None)


def _deliver(outputs: list[wire.Output], clients: dict[str, bytes], outbox: zmq.Socket, worker_id: str,
             first: set[str]) -> None:
    """One Deliver + Results per client; the last output of each request carries this worker's id.
    `first`: the requests whose first output this is (it may be their last too)."""
    by_client: dict[bytes, list[wire.Output]] = {}
    ended: dict[bytes, list[str]] = {}
    firsts: dict[bytes, list[str]] = {}
    for output in outputs:
        client = clients.get(output.id)
        if client is None:  # aborted meanwhile
            continue
        by_client.setdefault(client, []).append(output)
        if output.id in first:
            firsts.setdefault(client, []).append(output.id)
        if isinstance(output, wire.Ending):
            output.worker = worker_id
            ended.setdefault(client, []).append(output.id)
            del clients[output.id]
    for client, batch in by_client.items():
        header = wire.Deliver(client=client, ended=ended.get(client, []), first=firsts.get(client, []))
        outbox.send_multipart([wire.encode(header), wire.encode(wire.Results(outputs=batch))])


# Which environment variable makes a GPU runtime see only the n-th device (numbered in PCI order).
VISIBLE_DEVICES = {"cuda": ["CUDA_VISIBLE_DEVICES"], "amd": ["HIP_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES"]}


def only_device(device: str) -> None:
    """Pin a worker to its device, before a GPU runtime starts and reads these: a GPU worker sees its
    own GPU, a CPU worker no CUDA or ROCm GPU at all (its context is kept off a GPU too)."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["HIP_VISIBLE_DEVICES"] = ""
    elif kind in VISIBLE_DEVICES and index:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # hwdetect numbers GPUs in PCI slot order too
        for name in VISIBLE_DEVICES[kind]:
            os.environ[name] = index


def engine_class(runtime: str, task: str) -> type[Engine]:
    """The engine class of a runtime and task (infersnap/runtimes.py), imported now, so that a worker loads
    only its own."""
    where = RUNTIMES[runtime].engines.get(task) if runtime in RUNTIMES else None
    if where is None:
        raise ValueError(f"no {task} engine for the runtime {runtime!r}")
    module, _, name = where.partition(":")
    return getattr(importlib.import_module(module), name)


def load_engine(plan: ServePlan, spec: WorkerSpec) -> Engine:
    only_device(spec.device)  # before the engine's runtime starts
    model = plan.model(spec.model)
    settings = EngineSettings(model.path, spec.device, spec.slots, model.context, spec.threads,
                              spec.gpu_layers, plan.verbose, model.chat_template, spec.options)
    return engine_class(spec.runtime, spec.task)(settings)


def _add(engine: Engine, request: wire.Request) -> wire.Output | None:
    """engine.add, where an unexpected error fails this one request, not the worker and all it runs."""
    try:
        return engine.add(request)
    except Exception:
        log.exception("request %s could not be added", request.id)
        return wire.failed(request.id, 500, "the engine could not take this request")


def _step(engine: Engine) -> list[wire.Output]:
    """engine.step, where an unexpected error fails what the engine runs, not the worker."""
    try:
        return engine.step()
    except Exception as exc:
        log.exception("an engine step failed")
        return engine.fail_running(f"the engine failed: {exc}")


def _next_or_none(inbox: queue.Queue):
    try:
        return inbox.get_nowait()
    except queue.Empty:
        return None
