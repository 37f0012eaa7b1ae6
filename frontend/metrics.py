"""`GET /metrics` through prometheus-client, and one log line per request (completions, embeddings).

The frontend sees every request from arrival to its last byte, so it counts
them here: by endpoint, worker and status, their tokens, and histograms of
time to first token and of end-to-end latency. What runs and waits right now
comes from the broker's status at scrape time. Counters start from zero when
the frontend process starts, as Prometheus expects of a restarted target.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infersnap import wire
from infersnap.frontend.errors import APIError

if TYPE_CHECKING:  # only for the type: the request flow imports this module, not the reverse
    from infersnap.frontend.reader import Reader

log = logging.getLogger("infersnap.requests")

# Seconds; from a cached short prompt on a GPU to a long generation on 2 CPU cores.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CLIENT_GONE = 499  # the status nginx logs for a client that left before the answer ended
# The text format that generate_latest writes (newer prometheus-client versions name a later one "latest").
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# No `_created` series beside each counter and histogram: the process start time they would all
# show says nothing a scraper needs. This is process-wide, and the frontend process is ours.
prometheus_client.disable_created_metrics()


class Metrics:
    """What the frontend counts, in a registry of its own (so that several apps in a process don't mix)."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.requests = Counter("infersnap_requests_total", "Requests that ended, by endpoint, worker and HTTP status",
                                ["endpoint", "worker", "status"], registry=registry)
        self.prompt_tokens = Counter("infersnap_prompt_tokens_total", "Prompt tokens, by worker",
                                     ["worker"], registry=registry)
        self.generation_tokens = Counter("infersnap_generation_tokens_total", "Generation tokens, by worker",
                                         ["worker"], registry=registry)
        self.ttft = Histogram("infersnap_time_to_first_token_seconds", "Time from arrival to the first output",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.latency = Histogram("infersnap_request_duration_seconds", "Time from arrival to the end of the answer",
                                 buckets=LATENCY_BUCKETS, registry=registry)

        def per_model(name: str, documentation: str) -> Gauge:  # as a router or an autoscaler reads a node's load
            return Gauge(name, documentation, ["model"], registry=registry)

        self.running = per_model("infersnap_requests_running", "Sequences generating now, one per slot in use")
        self.waiting = per_model("infersnap_requests_waiting",
                                 "Requests accepted and not yet running: queued in the broker or waiting in an engine")
        self.slots_used = per_model("infersnap_slots_used", "Slots in use on the model's ready workers")
        self.slots_total = per_model("infersnap_slots_total", "Slots of the model's ready workers")
        self.kv_usage = per_model("infersnap_kv_cache_usage_ratio",
                                  "Share of the KV cache of the model's ready workers that running sequences hold, 0 to 1")
        self.queued = Gauge("infersnap_requests_queued", "Requests queued in the broker for a free slot",
                            registry=registry)
        self.ready = Gauge("infersnap_worker_ready",
                           "1 if the worker is ready to serve, by worker, device, engine and state",
                           ["worker", "device", "engine", "state"], registry=registry)

    def exposition(self, status: wire.Status) -> bytes:
        """Every metric in the text format, the gauges as the broker's `status` has them now."""
        # Cleared first, so that a worker or model gone from the status (or in another state) leaves no stale series.
        for gauge in (self.running, self.waiting, self.slots_used, self.slots_total, self.kv_usage, self.ready):
            gauge.clear()
        for w in status.workers:
            self.ready.labels(w.worker_id, w.device, w.engine, w.state).set(int(w.state == "ready"))
        for model in status.models:
            load = model_load(status, model.name)
            self.running.labels(model.name).set(load.running)
            self.waiting.labels(model.name).set(load.waiting)
            self.slots_used.labels(model.name).set(load.running)
            self.slots_total.labels(model.name).set(load.slots)
            self.kv_usage.labels(model.name).set(load.kv_usage)
        self.queued.set(status.queued)
        return prometheus_client.generate_latest(self.registry)


@dataclass(frozen=True)
class ModelLoad:
    """What a model's generating workers run and hold, and what waits for them, from one Status."""

    running: int  # sequences in slots
    waiting: int  # queued in the broker, plus waiting inside the engines
    slots: int  # of its ready workers
    kv_usage: float  # 0 to 1, over its ready workers' KV caches


def model_load(status: wire.Status, model: str) -> ModelLoad:
    workers = [w for w in status.workers if w.model.lower() == model.lower() and "generate" in w.capabilities.tasks]
    ready = [w for w in workers if w.state == "ready"]
    queued = next((m.queued for m in status.models if m.name.lower() == model.lower()), 0)
    capacity = sum(w.slots * w.context for w in ready)
    held = sum(w.kv_used * w.slots * w.context for w in ready)
    return ModelLoad(running=sum(len(w.running) for w in workers), waiting=queued + sum(w.waiting for w in workers),
                     slots=sum(w.slots for w in ready), kv_usage=round(held / capacity, 4) if capacity else 0.0)


@dataclass
class RequestRecord:
    """One API request as it goes: when it came, when its first output came, how it ended.

    Used as `with RequestRecord(metrics, endpoint) as record:` around a handler's work. The handler
    fills in what it learns (id, model, its Reader) and the status it answered with; an APIError
    leaving the block sets that error's status; anything else leaving it (the client went away) leaves
    499. On the way out the request is counted and its line logged.
    """

    metrics: Metrics
    endpoint: str
    request_id: str = ""
    model: str = ""
    reader: Reader | None = None  # the choices whose tokens count, once the request reached the broker
    started: float = field(default_factory=time.monotonic)
    first_output: float | None = None
    status: int = CLIENT_GONE  # until the handler says how it ended

    def __enter__(self) -> RequestRecord:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(error, APIError):
            self.status = error.status
        self.finish()

    def output_arrived(self) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic()

    def finish(self) -> None:
        """Count the request and log its line. The tokens of each choice that finished count for the
        worker that ran it; the log line shows the prompt tokens as usage does (once per prompt)."""
        reader = self.reader
        ends = [end for end in reader.ends if end is not None] if reader is not None else []
        answers = [end for end in ends if isinstance(end, (wire.Final, wire.Embeddings))]  # with tokens to count
        prompt_tokens = reader.prompt_tokens if reader is not None else 0
        elapsed = time.monotonic() - self.started
        workers = sorted({end.worker for end in ends if end.worker})  # a worker's error counts for it too
        completions = [a.completion_tokens if isinstance(a, wire.Final) else 0 for a in answers]
        self.metrics.requests.labels(self.endpoint, workers[0] if workers else "", str(self.status)).inc()
        for answer, completion in zip(answers, completions):
            if answer.worker:
                self.metrics.prompt_tokens.labels(answer.worker).inc(answer.prompt_tokens)
                self.metrics.generation_tokens.labels(answer.worker).inc(completion)
        if self.status == 200 and self.first_output is not None:
            self.metrics.ttft.observe(self.first_output - self.started)
        self.metrics.latency.observe(elapsed)
        ttft = f"{(self.first_output - self.started) * 1000:.0f}ms" if self.first_output else "-"
        model = self.model if self.model.isprintable() and len(self.model) <= 100 else repr(self.model[:100])
        log.info("%s %s model=%s worker=%s status=%d prompt=%d completion=%d ttft=%s total=%.0fms",
                 self.request_id or "-", self.endpoint, model or "-", ",".join(workers) or "-", self.status,
                 prompt_tokens, sum(completions), ttft, elapsed * 1000)
