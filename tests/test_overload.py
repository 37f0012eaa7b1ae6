"""Past the bounded queue a request is refused at once with 503 and Retry-After, never left waiting."""

from __future__ import annotations

import asyncio
import time

import httpx

from conftest import start_server, wait_until

LONG = {
    "messages": [{"role": "user", "content": "Write a long story."}],
    "max_tokens": 100,
    "logit_bias": {"2": -100},  # never stop early
}


def test_requests_past_the_queue_get_503_promptly(tmp_path):
    server = start_server(tmp_path, **{"worker.slots": "1", "queue.max-waiting": "1"})

    async def call(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        start = time.monotonic()
        reply = await client.post("/v1/chat/completions", json=LONG)
        return reply, time.monotonic() - start

    async def burst() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
            return await asyncio.gather(*(call(client) for _ in range(5)))

    try:
        replies = asyncio.run(burst())
        served = [r for r, _ in replies if r.status_code == 200]
        refused = [(r, t) for r, t in replies if r.status_code != 200]
        assert len(served) == 2  # one running, one waiting
        assert all(r.json()["usage"]["completion_tokens"] == 100 for r in served)
        assert len(refused) == 3
        for reply, seconds in refused:
            assert reply.status_code == 503 and reply.headers["retry-after"]
            assert reply.json()["error"]["code"] == "server_overloaded"
            assert seconds < 2.0  # refused at once, not after the 100-token generations (~2.5 s)
    finally:
        assert server.stop() == 0


def test_a_request_past_the_timeout_is_stopped_with_504(tmp_path):
    server = start_server(tmp_path, **{"worker.slots": "1", "queue.request-timeout": "1"})
    endless = {**LONG, "max_tokens": 1500}
    try:
        start = time.monotonic()
        reply = httpx.post(f"{server.url}/chat/completions", json=endless, timeout=30)
        assert reply.status_code == 504 and reply.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 3

        with httpx.stream("POST", f"{server.url}/chat/completions", json={**endless, "stream": True}, timeout=30) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and '"code":"timeout"' in events[-2] and events[-1] == "data: [DONE]"

        # the generation was stopped in the worker: its one slot serves the next request at once
        wait_until(lambda: server.status()["workers"][0]["running"] == 0, 3, "the timed-out generation still runs")
        quick = httpx.post(f"{server.url}/chat/completions", json={**LONG, "max_tokens": 5}, timeout=30)
        assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 5
    finally:
        assert server.stop() == 0
