"""`GET /metrics` in Prometheus' text format, and one log line per request (completions, embeddings).

The frontend sees every request from arrival to its last byte, so it counts
them here: by endpoint, worker and status, their tokens, and histograms of
time to first token and of end-to-end latency. What runs and waits right now
comes from the broker's status at scrape time. Counters start from zero when
the frontend process starts, as Prometheus expects of a restarted target.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sanic import Request, Sanic
from sanic.response import HTTPResponse, text

from infersnap import wire

if TYPE_CHECKING:  # only for the type: the request flow imports this module, not the reverse
    from infersnap.frontend.generation import Generation

log = logging.getLogger("infersnap.requests")

# Seconds; from a cached short prompt on a GPU to a long generation on 2 CPU cores.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CLIENT_GONE = 499  # the status nginx logs for a client that left before the answer ended


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum {self.total:.6f}", f"{name}_count {cumulative}"]


@dataclass
class Metrics:
    requests: Counter = field(default_factory=Counter)  # (endpoint, worker, status) -> count
    prompt_tokens: Counter = field(default_factory=Counter)  # worker -> tokens
    completion_tokens: Counter = field(default_factory=Counter)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))

    def render(self, status: wire.Status) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        family("infersnap_requests_total", "counter", "Requests that ended, by endpoint, worker and HTTP status",
               [f'infersnap_requests_total{{endpoint="{e}",worker="{w}",status="{s}"}} {n}'
                for (e, w, s), n in sorted(self.requests.items())])
        for name, counter in (("prompt", self.prompt_tokens), ("generation", self.completion_tokens)):
            family(f"infersnap_{name}_tokens_total", "counter", f"{name.capitalize()} tokens, by worker",
                   [f'infersnap_{name}_tokens_total{{worker="{w}"}} {n}' for w, n in sorted(counter.items())])
        family("infersnap_time_to_first_token_seconds", "histogram", "Time from arrival to the first output",
               self.ttft.lines("infersnap_time_to_first_token_seconds"))
        family("infersnap_request_duration_seconds", "histogram", "Time from arrival to the end of the answer",
               self.latency.lines("infersnap_request_duration_seconds"))
        family("infersnap_requests_running", "gauge", "Requests a worker is running now",
               [f'infersnap_requests_running{{worker="{w.worker_id}"}} {len(w.running)}' for w in status.workers])
        family("infersnap_requests_waiting", "gauge", "Requests waiting for a free slot, by worker and in the broker's queue",
               [f'infersnap_requests_waiting{{worker="{w.worker_id}"}} {w.waiting}' for w in status.workers]
               + [f'infersnap_requests_waiting{{worker=""}} {status.queued}'])
        family("infersnap_worker_ready", "gauge", "1 if the worker is ready to serve, by worker, device, engine and state",
               [f'infersnap_worker_ready{{worker="{w.worker_id}",device="{w.device}",engine="{w.engine}",'
                f'state="{w.state}"}} {int(w.state == "ready")}' for w in status.workers])
        return "\n".join(lines) + "\n"


@dataclass
class RequestRecord:
    """One API request as it goes: when it came, when its first output came, how it ended."""

    metrics: Metrics
    endpoint: str
    request_id: str = ""
    model: str = ""
    started: float = field(default_factory=time.monotonic)
    first_output: float | None = None
    status: int = CLIENT_GONE  # until the handler says how it ended

    def output_arrived(self) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic()

    def finish(self, generation: Generation | None) -> None:
        """Count the request and log its line. The tokens of each choice that finished count for the
        worker that ran it; the log line shows the prompt tokens as usage does (once per prompt)."""
        ended = generation.ended() if generation is not None else []
        choices = generation.finished() if generation is not None else []
        prompt_tokens = generation.prompt_tokens if generation is not None else 0
        elapsed = time.monotonic() - self.started
        workers = sorted({c.worker for c in ended if c.worker})  # a worker's error counts for it too
        completion = sum(c.completion_tokens for c in choices)
        self.metrics.requests[(self.endpoint, workers[0] if workers else "", str(self.status))] += 1
        for choice in choices:
            if choice.worker:
                self.metrics.prompt_tokens[choice.worker] += choice.prompt_tokens
                self.metrics.completion_tokens[choice.worker] += choice.completion_tokens
        if self.status == 200 and self.first_output is not None:
            self.metrics.ttft.observe(self.first_output - self.started)
        self.metrics.latency.observe(elapsed)
        ttft = f"{(self.first_output - self.started) * 1000:.0f}ms" if self.first_output else "-"
        model = self.model if self.model.isprintable() and len(self.model) <= 100 else repr(self.model[:100])
        log.info("%s %s model=%s worker=%s status=%d prompt=%d completion=%d ttft=%s total=%.0fms",
                 self.request_id or "-", self.endpoint, model or "-", ",".join(workers) or "-", self.status,
                 prompt_tokens, completion, ttft, elapsed * 1000)


def install(app: Sanic) -> Metrics:
    """Serve GET /metrics; the returned Metrics is what request handlers record into."""
    metrics = Metrics()

    @app.get("/metrics")
    async def prometheus(request: Request) -> HTTPResponse:
        status = await request.app.ctx.broker.status()
        return text(metrics.render(status), content_type="text/plain; version=0.0.4; charset=utf-8")

    return metrics
