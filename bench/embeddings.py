"""Embeddings and n > 1 through `infersnap serve`, each against its reference, side by side.

- /v1/embeddings vs llama-cpp-python's own `Llama.embed` in-process (the same model, mean pooling,
  the same threads): texts per second for one text per request and for batches of 32.
- `n` choices in one request vs the same number of requests sent at once: tokens per second.

Runs are interleaved so that machine noise hits both sides alike; medians are printed with ratios.

    .venv/bin/python bench/embeddings.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import llama_cpp

from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import start_server  # noqa: E402  (the tests' launcher: isolated data folder, free port)


def texts(run: int, count: int) -> list[str]:
    return [f"Sentence {run}-{i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(count)]


def served_embeddings(client: httpx.Client, url: str, batch: list[str], per_request: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(batch), per_request):
        reply = client.post(f"{url}/embeddings", json={"input": batch[i : i + per_request]})
        reply.raise_for_status()
    return len(batch) / (time.perf_counter() - start)


def inprocess_embeddings(llm: llama_cpp.Llama, batch: list[str], per_request: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(batch), per_request):
        llm.embed(batch[i : i + per_request], normalize=True)
    return len(batch) / (time.perf_counter() - start)


def choices_tokens_per_second(client: httpx.Client, url: str, n: int, together: bool, run: int) -> float:
    body = {"prompt": f"Story {run}: once upon a time", "max_tokens": 64, "temperature": 0.8, "seed": run}
    start = time.perf_counter()
    if together:
        replies = [client.post(f"{url}/completions", json={**body, "n": n})]
    else:
        with ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(lambda i: client.post(f"{url}/completions", json={**body, "seed": run + i}), range(n)))
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--texts", type=int, default=64, help="texts embedded per run")
    parser.add_argument("--n", type=int, default=4, help="choices per request (and parallel requests)")
    args = parser.parse_args()

    threads = len(physical_core_cpus())
    llm = llama_cpp.Llama(
        str(default_model_path()), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, n_ctx=2048,
        n_batch=2048, n_ubatch=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as data:
        server = start_server(Path(data), **{"engines": "cpu"})
        try:
            with httpx.Client(timeout=300) as client:
                served_embeddings(client, server.url, texts(-1, 8), 8)  # warm-up, both sides
                inprocess_embeddings(llm, texts(-1, 8), 8)
                for run in range(args.runs):
                    batch = texts(run, args.texts)
                    for per_request in (1, 32):
                        results.setdefault(f"served {per_request}", []).append(
                            served_embeddings(client, server.url, batch, per_request))
                        results.setdefault(f"in-process {per_request}", []).append(
                            inprocess_embeddings(llm, batch, per_request))
                    results.setdefault("n together", []).append(
                        choices_tokens_per_second(client, server.url, args.n, True, run))
                    results.setdefault("n requests", []).append(
                        choices_tokens_per_second(client, server.url, args.n, False, run))
        finally:
            server.stop()

    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"embeddings, texts/s (median of {args.runs} runs of {args.texts} texts, {threads} threads):")
    for per_request in (1, 32):
        served, local = median[f"served {per_request}"], median[f"in-process {per_request}"]
        print(f"  {per_request:>2} per request: served {served:7.1f}   in-process {local:7.1f}   ratio {served / local:.2f}")
    together, apart = median["n together"], median["n requests"]
    print(f"n={args.n}, tokens/s: one request with n {together:.1f}   {args.n} requests at once {apart:.1f}   "
          f"ratio {together / apart:.2f}")


if __name__ == "__main__":
    main()
