"""Past the bounded queue a request is refused at once with 503 and Retry-After, never left waiting."""

from __future__ import annotations

import asyncio
import time

import httpx

from conftest import start_server

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
