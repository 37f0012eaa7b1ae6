"""Issue 3's figures: every engine that can run on this machine, side by side, at 1 and 8 concurrent requests.

One `infersnap serve` per engine (each in its own data folder, all started
first), then rounds: in each round every engine gets the same requests in
turn, so machine noise hits them alike. Prints median aggregate generated
tokens/s and time to first token per engine and concurrency, and each
engine's ratio to the first one.

    .venv/bin/python bench/engines.py [--engines cpu,intel-cpu] [--rounds 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from infersnap.engines import verdicts
from infersnap.hwdetect import detect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import start_server  # noqa: E402  (the tests' launcher: isolated data folder, free port)


def one_request(url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed greedy chat completion."""
    body = {
        "messages": [{"role": "user", "content": f"Story number {i}: write a long story about a dragon who learns to cook."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first or 0.0, tokens


def burst(url: str, clients: int, round_: int, max_tokens: int) -> tuple[float, float]:
    """(aggregate generated tokens/s, median TTFT ms) of `clients` requests sent at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, round_ * 100 + i, max_tokens), range(clients)))
    wall = time.perf_counter() - start
    return sum(r[1] for r in results) / wall, statistics.median(r[0] for r in results) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", help="comma-separated; default: every compatible CPU engine of each runtime")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()

    if args.engines:
        engines = args.engines.split(",")
    else:  # the best engine of each runtime: builds of one runtime differ only in name here
        best: dict[str, str] = {}
        from infersnap.engines import manifests

        for verdict in verdicts(detect()):
            if verdict.compatible and not verdict.experimental:
                best.setdefault(manifests()[verdict.engine].runtime, verdict.engine)
        engines = list(best.values())
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as data:
        servers = {e: start_server(Path(data) / e, **{"engines": e, "worker.slots": str(max(levels))}) for e in engines}
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        try:
            for server in servers.values():
                burst(server.url, 2, -1, 16)  # warm-up
            for round_ in range(args.rounds):
                for clients in levels:
                    for engine, server in servers.items():
                        results.setdefault((engine, clients), []).append(
                            burst(server.url, clients, round_, args.max_tokens)
                        )
        finally:
            for server in servers.values():
                server.stop()

    print(f"{'engine':12}{'clients':>8}{'tok/s':>10}{'TTFT ms':>10}{'vs ' + engines[0]:>16}")
    for clients in levels:
        reference = statistics.median(r[0] for r in results[(engines[0], clients)])
        for engine in engines:
            runs = results[(engine, clients)]
            tps = statistics.median(r[0] for r in runs)
            ttft = statistics.median(r[1] for r in runs)
            print(f"{engine:12}{clients:>8}{tps:>10.1f}{ttft:>10.1f}{tps / reference:>16.2f}")


if __name__ == "__main__":
    main()
