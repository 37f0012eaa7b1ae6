"""A worker process: one engine on one device, talking to the broker.

Socket I/O runs on its own thread, so heartbeats keep flowing while the
engine thread is inside a long llama_decode and the engine never waits on
ZeroMQ. The engine thread takes requests from a queue and hands each step's
outputs, already encoded, to the I/O thread over an inproc socket.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque

import zmq

from infersnap import paths, wire
from infersnap.plan import RESTARTS_VARIABLE, ServePlan, WorkerSpec

HEARTBEAT_SECONDS = 0.25
OUTBOX = "inproc://outbox"

log = logging.getLogger("infersnap.worker")


class WorkerIO(threading.Thread):
    """Owns the DEALER socket: requests in, results and heartbeats out."""

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
                        self.dealer.send(self.outbox.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.dealer in events:
                while True:
                    try:
                        self.inbox.put(wire.decode(self.dealer.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break


def pin_to(cpus: list[int]) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:  # a CPU went offline, or a container forbids it
            log.warning("could not pin to CPUs %s: %s", cpus, exc)


def run(plan: ServePlan, spec: WorkerSpec) -> None:
    pin_to(spec.cpus)
    info = wire.WorkerInfo(
        worker_id=spec.worker_id,
        device=spec.device,
        engine=spec.engine,
        model=plan.model_name,
        slots=plan.slots if spec.task == "generate" else 1,  # an embedding worker runs one Embed at a time
        context=plan.context,
        state="loading",
        pid=os.getpid(),
        restarts=int(os.environ.get(RESTARTS_VARIABLE, "0")),
        task=spec.task,
    )
    zctx = zmq.Context()
    inbox: queue.Queue = queue.Queue()
    io = WorkerIO(zctx, info, inbox)
    io.start()
    outbox = zctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 0)
    outbox.connect(OUTBOX)

    engine = None
    try:
        engine = load_engine(plan, spec)
        info.context = engine.context
        info.state = "ready"
    except Exception as exc:  # the worker stays up to report why
        log.error("worker %s failed to load: %s", spec.worker_id, exc)
        info.state, info.error = "failed", str(exc)

    if spec.task == "embed":
        _serve_embeddings(engine, inbox, outbox, info)
    else:
        _serve_generation(engine, inbox, outbox, info)


def _serve_generation(engine, inbox: queue.Queue, outbox: zmq.Socket, info: wire.WorkerInfo) -> None:
    """Take requests between engine steps; send each step's outputs."""
    while True:
        message = inbox.get() if engine is None or not engine.busy else _next_or_none(inbox)
        outputs: list[wire.Output] = []
        while message is not None:
            if isinstance(message, wire.Generate):
                if engine is None:
                    refused = wire.failed(message.id, 503, not_loaded(info))
                else:
                    refused = _add(engine, message)
                if refused is not None:
                    outputs.append(refused)
            elif isinstance(message, wire.Abort) and engine is not None:
                engine.abort(message.ids)
            elif isinstance(message, (wire.Tokenize, wire.Detokenize)):  # now: a lookup waits for no step
                outbox.send(wire.encode(_answer(engine, message, info)))
            message = _next_or_none(inbox)
        if engine is not None:
            outputs.extend(engine.step())
            info.running, info.waiting = len(engine.running), len(engine.waiting)
        if outputs:
            outbox.send(wire.encode(wire.Results(outputs=outputs)))


def _serve_embeddings(engine, inbox: queue.Queue, outbox: zmq.Socket, info: wire.WorkerInfo) -> None:
    """Answer each Embed with one Output. The broker sends one at a time; between two batches of its
    inputs the engine looks for an Abort of it (timed out, client gone) and stops there."""
    later: deque[wire.Message] = deque()  # what came while looking for an Abort

    def aborted(request_id: str) -> bool:
        while True:
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                return False
            if isinstance(message, wire.Abort) and request_id in message.ids:
                return True
            later.append(message)

    while True:
        message = later.popleft() if later else inbox.get()
        if not isinstance(message, wire.Embed):
            continue
        if engine is None:
            output = wire.failed(message.id, 503, not_loaded(info))
        else:
            try:
                output = engine.embed(message, lambda: aborted(message.id))
            except Exception:
                log.exception("embeddings %s failed", message.id)
                output = wire.failed(message.id, 500, "the engine could not embed this input")
        if output is not None:
            outbox.send(wire.encode(wire.Results(outputs=[output])))


# Which environment variable makes a GPU runtime see only the n-th device (numbered in PCI order).
VISIBLE_DEVICES = {"cuda": ["CUDA_VISIBLE_DEVICES"], "amd": ["HIP_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES"]}


def only_device(device: str) -> None:
    """Pin a llama.cpp worker to its device, before the GPU runtime starts and reads these: a GPU
    worker sees its own GPU, a CPU worker no CUDA or ROCm GPU at all (its context is kept off a GPU too)."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["HIP_VISIBLE_DEVICES"] = ""
    elif kind in VISIBLE_DEVICES and index:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # hwdetect numbers GPUs in PCI slot order too
        for name in VISIBLE_DEVICES[kind]:
            os.environ[name] = index


def load_engine(plan: ServePlan, spec: WorkerSpec):
    """The engine for this worker's task and runtime; imported here so a worker loads only its own."""
    if spec.task == "embed":
        from infersnap.workers.llamacpp_embedder import LlamaCppEmbedder

        only_device(spec.device)
        return LlamaCppEmbedder(plan.model_path, plan.context, spec.threads, plan.verbose)
    if spec.runtime == "llamacpp":
        from infersnap.workers.llamacpp_engine import LlamaCppEngine

        only_device(spec.device)
        return LlamaCppEngine(plan.model_path, plan.slots, plan.context, spec.threads, spec.gpu_layers, plan.verbose)
    if spec.runtime == "openvino":
        from infersnap.workers.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(plan.model_path, spec.device, plan.slots, plan.context, spec.threads, plan.verbose)
    raise ValueError(f"unknown runtime {spec.runtime!r}")


def _add(engine, request: wire.Generate) -> wire.Output | None:
    """engine.add, where an unexpected error fails this one request, not the worker and all it runs."""
    try:
        return engine.add(request)
    except Exception:
        log.exception("request %s could not be added", request.id)
        return wire.failed(request.id, 500, "the engine could not take this request")


def _answer(engine, request: wire.Tokenize | wire.Detokenize, info: wire.WorkerInfo) -> wire.TokenizeResult:
    """engine.answer, where an unexpected error fails this lookup, not the worker."""
    if engine is None:
        failure = wire.Failure(503, not_loaded(info))
        return wire.TokenizeResult(id=request.id, failure=failure)
    try:
        return engine.answer(request)
    except Exception:
        log.exception("tokenizer request %s failed", request.id)
        failure = wire.Failure(500, "the engine's tokenizer failed on this request")
        return wire.TokenizeResult(id=request.id, failure=failure)


def not_loaded(info: wire.WorkerInfo) -> str:
    """What a request to a worker whose engine failed to load is told."""
    return f"worker {info.worker_id} failed to load: {info.error}"


def _next_or_none(inbox: queue.Queue):
    try:
        return inbox.get_nowait()
    except queue.Empty:
        return None
