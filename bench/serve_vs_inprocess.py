"""Issue 2's figure: one 128-token chat completion through `infersnap serve` vs llama-cpp-python in-process.

Both sides stream the same prompts with the same settings, interleaved run
by run so that machine noise hits both alike; the script prints the median
decode tokens/s and time to first token of each, and their ratio/difference.

    .venv/bin/python bench/serve_vs_inprocess.py [--runs 7] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from llama_cpp import Llama

from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import start_server  # noqa: E402  (the tests' launcher: isolated data folder, free port)


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Story number {i}: write a long story about a dragon who learns to cook."}]


def served_run(client: httpx.Client, url: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    body = {
        "messages": prompt(i),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first), tokens


def inprocess_run(llm: Llama, i: int, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    tokens = 0
    for chunk in llm.create_chat_completion(messages=prompt(i), max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (tokens - 1) / (end - first), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    threads = len(physical_core_cpus())
    llm = Llama(str(default_model_path()), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    with tempfile.TemporaryDirectory() as data:
        server = start_server(Path(data))
        url = server.url
        try:
            served, inproc = [], []
            with httpx.Client(timeout=120) as client:
                served_run(client, url, -1, 8)  # warm both up
                inprocess_run(llm, -1, 8)
                for i in range(args.runs):
                    inproc.append(inprocess_run(llm, i, args.max_tokens))
                    served.append(served_run(client, url, i, args.max_tokens))
        finally:
            server.stop()

    def summary(runs: list[tuple[float, float, int]]) -> tuple[float, float, float]:
        return (
            statistics.median(r[0] for r in runs) * 1000,
            statistics.median(r[1] for r in runs),
            statistics.median(r[2] for r in runs),
        )

    s_ttft, s_tps, s_n = summary(served)
    i_ttft, i_tps, i_n = summary(inproc)
    print(f"{'':28}{'TTFT ms':>10}{'decode tok/s':>14}{'tokens':>8}")
    print(f"{'llama-cpp-python in-process':28}{i_ttft:>10.1f}{i_tps:>14.1f}{i_n:>8.0f}")
    print(f"{'infersnap serve':28}{s_ttft:>10.1f}{s_tps:>14.1f}{s_n:>8.0f}")
    print(f"served/in-process tok/s ratio: {s_tps / i_tps:.3f} (target >= 0.95)")
    print(f"TTFT added by serving: {s_ttft - i_ttft:+.1f} ms (target <= 5 ms)")


if __name__ == "__main__":
    main()
