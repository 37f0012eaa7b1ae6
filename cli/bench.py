"""`infersnap bench`: a load generator for any OpenAI-compatible server.

The measuring is plain functions (`run_sweep`, `run_level`, `summarize`, `percentile`) over
dataclasses, so tests and scripts can call them; the click command in cli/main.py only parses
options and prints. Every request ends: each is bounded by a total timeout, recorded as an error.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import httpx

DEFAULT_TIMEOUT = 300.0
PERCENTILES = (50, 90, 99)

# Words that keep a small model writing (a long story), then filler to reach the asked length.
_INSTRUCTION = "Write a very long story about a dragon who learns to cook, with many chapters."
_FILLER = (
    "the dragon lived in a cold mountain cave and dreamed every night of warm bread soup "
    "spices gardens markets friends songs rivers ovens recipes lanterns festivals"
).split()


class BenchError(Exception):
    """The benchmark cannot run (no server, no model); the message says why."""


@dataclass
class RequestResult:
    """One request. Times are seconds; None where not measured (an error, or no streamed content)."""

    ttft: float | None = None
    itl: float | None = None  # mean time per generated token after the first (servers may send several per chunk)
    e2e: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass
class Percentiles:
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass
class LevelResult:
    """One concurrency level against one URL. Latencies in milliseconds."""

    url: str
    model: str
    concurrency: int
    requests: int  # requests that ended (done or failed)
    done: int
    errors: int
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Target:
    """A server to load: its base URL (…/v1) and the model to ask for."""

    url: str
    model: str


@dataclass
class Settings:
    requests: int | None = 32  # None: as many as `duration` allows
    duration: float | None = None  # seconds after which no new request starts
    prompt_tokens: int = 32
    max_tokens: int = 128
    stream: bool = True
    temperature: float = 0.0
    api_key: str = "none"
    timeout: float = DEFAULT_TIMEOUT


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _percentiles_ms(values: list[float]) -> Percentiles:
    p50, p90, p99 = (percentile([v * 1000 for v in values], p) for p in PERCENTILES)
    return Percentiles(p50, p90, p99)


def summarize(target: Target, concurrency: int, results: list[RequestResult], wall_s: float) -> LevelResult:
    """A level's numbers from its requests; throughput is all output tokens over the level's wall time."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    wall = max(wall_s, 1e-9)
    errors = [r.error for r in results if r.error is not None]
    return LevelResult(
        url=target.url,
        model=target.model,
        concurrency=concurrency,
        requests=len(results),
        done=len(ok),
        errors=len(errors),
        wall_s=round(wall_s, 4),
        requests_per_s=len(ok) / wall,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall,
        ttft_ms=_percentiles_ms([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=_percentiles_ms([r.itl for r in ok if r.itl is not None]),
        e2e_ms=_percentiles_ms([r.e2e for r in ok if r.e2e is not None]),
        error_samples=sorted(set(errors))[:5],
    )


def build_prompt(words: int, index: int) -> str:
    """A prompt of about `words` words; `index` makes each request's prompt differ (no prefix reuse across requests)."""
    head = f"Story {index}. {_INSTRUCTION}".split()
    filler = [_FILLER[(index + i) % len(_FILLER)] for i in range(max(0, words - len(head)))]
    return " ".join((head + filler)[: max(words, 1)])


def request_body(model: str, prompt: str, settings: Settings) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": settings.stream,
    }
    if settings.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def error_text(status: int, body: bytes) -> str:
    """An HTTP error in one line: the OpenAI error body's message, else the start of the body."""
    message = body.decode(errors="replace").strip()[:200]
    try:
        message = json.loads(body)["error"]["message"]
    except Exception:  # noqa: BLE001 - not an OpenAI error body: keep the raw text
        pass
    return f"HTTP {status}: {message}"


async def _stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], start: float) -> RequestResult:
    chunk_times: list[float] = []
    usage_tokens: int | None = None
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            return RequestResult(error=error_text(response.status_code, await response.aread()))
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                error = chunk["error"]
                return RequestResult(error=f"stream error: {error.get('message', error) if isinstance(error, dict) else error}")
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunk_times.append(time.perf_counter())
                    break
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
    end = time.perf_counter()
    tokens = usage_tokens if usage_tokens is not None else len(chunk_times)
    # per token, not per chunk: a server that sends two tokens a chunk is no slower for it
    itl = (chunk_times[-1] - chunk_times[0]) / (tokens - 1) if len(chunk_times) > 1 and tokens > 1 else None
    return RequestResult(
        ttft=chunk_times[0] - start if chunk_times else None,
        itl=itl,
        e2e=end - start,
        output_tokens=tokens,
    )


async def _whole(client: httpx.AsyncClient, url: str, body: dict[str, Any], start: float) -> RequestResult:
    response = await client.post(f"{url}/chat/completions", json=body)
    end = time.perf_counter()
    if response.status_code != 200:
        return RequestResult(error=error_text(response.status_code, response.content))
    document = response.json()
    tokens = (document.get("usage") or {}).get("completion_tokens")
    if tokens is None:
        content = ((document.get("choices") or [{}])[0].get("message") or {}).get("content") or ""
        tokens = len(content.split())
    return RequestResult(ttft=end - start, e2e=end - start, output_tokens=tokens)


async def one_request(client: httpx.AsyncClient, target: Target, index: int, settings: Settings) -> RequestResult:
    """One chat completion, measured; any failure (HTTP error, exception, timeout) is in `.error`."""
    body = request_body(target.model, build_prompt(settings.prompt_tokens, index), settings)
    start = time.perf_counter()
    run = _stream if settings.stream else _whole
    try:
        return await asyncio.wait_for(run(client, target.url, body, start), settings.timeout)
    except asyncio.TimeoutError:
        return RequestResult(error=f"timeout after {settings.timeout:g} s")
    except Exception as exc:  # noqa: BLE001 - every failure is a measured error, never a crash
        return RequestResult(error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


async def measure_level(
    client: httpx.AsyncClient,
    target: Target,
    concurrency: int,
    settings: Settings,
    progress: Callable[[], None] | None = None,
    first_index: int = 0,
) -> LevelResult:
    """`concurrency` workers send requests first_index, first_index + 1, … until `settings.requests`
    or `settings.duration` is reached."""
    results: list[RequestResult] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + settings.duration if settings.duration is not None else math.inf

    async def worker() -> None:
        nonlocal next_index
        while time.perf_counter() < deadline and (settings.requests is None or next_index < settings.requests):
            index, next_index = next_index, next_index + 1
            results.append(await one_request(client, target, first_index + index, settings))
            if progress is not None:
                progress()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(target, concurrency, results, time.perf_counter() - start)


def _client(settings: Settings) -> httpx.AsyncClient:
    # The per-request bound is asyncio.wait_for(settings.timeout); httpx's own timeouts back it up.
    return httpx.AsyncClient(
        headers={"Authorization": f"Bearer {settings.api_key}"},
        timeout=httpx.Timeout(settings.timeout, connect=min(settings.timeout, 10.0)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


async def _sweep(
    targets: list[Target], levels: list[int], settings: Settings, progress: Callable[[], None] | None
) -> list[list[LevelResult]]:
    by_target: list[list[LevelResult]] = [[] for _ in targets]
    async with _client(settings) as client:
        for position, concurrency in enumerate(levels):  # interleaved: every target at this level, then the next
            # Each level gets prompts of its own (the targets the same ones), so no level is served
            # from prompt caches that an earlier level filled.
            first = position * 1_000_000
            for i, target in enumerate(targets):
                by_target[i].append(await measure_level(client, target, concurrency, settings, progress, first))
    return by_target


def run_sweep(
    targets: list[Target], levels: list[int], settings: Settings, progress: Callable[[], None] | None = None
) -> list[list[LevelResult]]:
    """Each level in turn against every target (the same requests); results per target, per level."""
    return asyncio.run(_sweep(targets, levels, settings, progress))


def run_level(url: str, model: str, concurrency: int, requests: int = 32, **settings: Any) -> LevelResult:
    """One level against one URL (a convenience for scripts and tests)."""
    return run_sweep([Target(url, model)], [concurrency], Settings(requests=requests, **settings))[0][0]


def first_model(url: str, api_key: str = "none", timeout: float = 10.0) -> str:
    """The first model id that GET {url}/models lists; BenchError when it cannot be had."""
    try:
        response = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {url}/models: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise BenchError(f"{url}/models: {error_text(response.status_code, response.content)}")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"{url}/models lists no model; give --model") from None


def parse_levels(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; ValueError unless every item is a positive integer."""
    levels = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"{item!r} is not a positive integer (expected e.g. 1,2,4,8)")
        levels.append(int(item))
    if not levels:
        raise ValueError("no concurrency level given")
    return levels


def _ratio(new: float | None, base: float | None) -> float | None:
    if new is None or base is None or base == 0:
        return None
    return new / base


def ratios(base: list[LevelResult], other: list[LevelResult]) -> list[dict[str, Any]]:
    """Per level, other / base for output tokens/s and the p50 latencies (tokens/s > 1 and latency < 1: other is faster)."""
    return [
        {
            "concurrency": b.concurrency,
            "output_tokens_per_s": _ratio(o.output_tokens_per_s, b.output_tokens_per_s),
            "ttft_p50": _ratio(o.ttft_ms.p50, b.ttft_ms.p50),
            "itl_p50": _ratio(o.itl_ms.p50, b.itl_ms.p50),
            "e2e_p50": _ratio(o.e2e_ms.p50, b.e2e_ms.p50),
        }
        for b, o in zip(base, other)
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _triple(p: Percentiles) -> str:
    return "/".join(_ms(v) for v in (p.p50, p.p90, p.p99))


def format_table(levels: list[LevelResult]) -> str:
    """One row per level; latencies as p50/p90/p99 in ms."""
    header = ["conc", "done", "errors", "req/s", "tok/s", "TTFT ms p50/p90/p99", "ITL ms p50/p90/p99", "E2E ms p50/p90/p99"]
    rows = [
        [
            str(r.concurrency),
            str(r.done),
            str(r.errors),
            f"{r.requests_per_s:.2f}",
            f"{r.output_tokens_per_s:.1f}",
            _triple(r.ttft_ms),
            _triple(r.itl_ms),
            _triple(r.e2e_ms),
        ]
        for r in levels
    ]
    return _columns(header, rows)


def format_ratios(rows: list[dict[str, Any]]) -> str:
    header = ["conc", "tok/s", "TTFT p50", "ITL p50", "E2E p50"]
    keys = ["output_tokens_per_s", "ttft_p50", "itl_p50", "e2e_p50"]
    body = [[str(r["concurrency"])] + ["-" if r[k] is None else f"{r[k]:.2f}x" for k in keys] for r in rows]
    return _columns(header, body)


def _columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def plot(runs: list[list[LevelResult]], path: str) -> None:
    """Output tokens/s and p50 latencies against concurrency, one line per URL, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks = sorted({r.concurrency for levels in runs for r in levels})
    for levels in runs:
        if not levels:
            continue
        x = [r.concurrency for r in levels]
        label = levels[0].url
        left.plot(x, [r.output_tokens_per_s for r in levels], marker="o", label=label)
        right.plot(x, [r.ttft_ms.p50 or math.nan for r in levels], marker="o", label=f"TTFT p50 {label}")
        right.plot(x, [r.e2e_ms.p50 or math.nan for r in levels], marker="s", linestyle="--", label=f"E2E p50 {label}")
    left.set(title="throughput", xlabel="concurrency", ylabel="output tokens/s")
    right.set(title="latency", xlabel="concurrency", ylabel="ms")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)


def json_report(targets: list[Target], runs: list[list[LevelResult]], levels: list[int], settings: Settings) -> dict[str, Any]:
    """The whole run as one JSON-ready document (the API key left out)."""
    document: dict[str, Any] = {
        "settings": {"levels": levels, **{k: v for k, v in vars(settings).items() if k != "api_key"}},
        "url": targets[0].url,
        "model": targets[0].model,
        "levels": [r.to_dict() for r in runs[0]],
    }
    if len(runs) > 1:
        document["compare"] = {
            "url": targets[1].url,
            "model": targets[1].model,
            "levels": [r.to_dict() for r in runs[1]],
            "ratios": ratios(runs[0], runs[1]),
        }
    return document


def text_report(targets: list[Target], runs: list[list[LevelResult]], settings: Settings) -> str:
    """A table per server, its error samples, and the ratios when two servers ran."""
    how = f"{settings.requests} requests" if settings.requests else "as many requests as fit"
    how += f" in {settings.duration:g} s" if settings.duration else ""
    lines = []
    for target, results in zip(targets, runs):
        lines.append(
            f"{target.url}  model {target.model}: {how} per level, prompt ~{settings.prompt_tokens} words, "
            f"max_tokens {settings.max_tokens}, {'stream' if settings.stream else 'no stream'}"
        )
        lines.append(format_table(results))
        lines += [f"  concurrency {r.concurrency} error: {e}" for r in results for e in r.error_samples]
        lines.append("")
    if len(runs) > 1:
        lines.append(f"ratios {targets[1].url} / {targets[0].url} (tok/s > 1 and latency < 1: the second is faster)")
        lines.append(format_ratios(ratios(runs[0], runs[1])))
    return "\n".join(lines)
