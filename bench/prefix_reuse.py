"""Prefix reuse: an agent's second turn shares thousands of tokens with its first (issue 13).

For each engine (llama.cpp `cpu`, OpenVINO `intel-cpu`) a real `infersnap serve` with the default
context (the model's own: 8192 for the default model) is sent a streamed chat request whose prompt
is about --prefix tokens, then a second one with the same prefix and a different short tail. Prints
each one's time to first token and their ratio (target: the second within 0.25x the first). Each
round uses a new prefix, so nothing from an earlier round is cached.

    .venv/bin/python bench/prefix_reuse.py [--engines cpu,intel-cpu] [--prefix 4000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from engines import WORDS, start_server, stream  # noqa: E402  (the tests' launcher, and one streamed request)

TARGET = 0.25


def prefix(seed: int, tokens: int) -> str:
    """About `tokens` tokens of plain words (the default model reads most of them as one token each)."""
    rng = random.Random(seed)
    return f"Document {seed}.\n" + " ".join(rng.choice(WORDS) for _ in range(tokens))


def ttft(url: str, prompt: str) -> tuple[float, int]:
    """Seconds to the first token of a streamed greedy chat completion, and its prompt tokens."""
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=900) as client:
            return await stream(client, prompt, 4)

    done = asyncio.run(go())
    if done.error or done.first is None:
        raise SystemExit(f"the request failed: {done.error}")
    return done.first - done.start, done.prompt_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="cpu,intel-cpu")
    parser.add_argument("--prefix", type=int, default=4000, help="tokens the two requests share (about)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    results = {}
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory(prefix="infersnap-prefix-") as data:
            server = start_server(Path(data), **{"engines": engine, "worker.embeddings": "false",
                                                 "engines-measure": "false"})
            try:
                status = server.status()
                print(f"{engine}: status says context: {status.get('context')}", flush=True)
                context = next(w["context"] for w in status["workers"] if w["task"] == "generate")
                rows = []
                for r in range(args.rounds):
                    shared = prefix(1000 * r + len(engine), args.prefix)
                    first, n1 = ttft(server.url, f"{shared}\n\nQuestion: which word comes first?")
                    second, n2 = ttft(server.url, f"{shared}\n\nQuestion: name a colour, then a number.")
                    rows.append((first, second))
                    print(f"{engine}: context {context}; prompts of {n1} and {n2} tokens: first token after "
                          f"{first:.3f} s, then {second:.3f} s ({second / first:.3f}x)", flush=True)
            finally:
                server.stop()
        first, second = statistics.median(f for f, _ in rows), statistics.median(s for _, s in rows)
        results[engine] = (first, second, second / first)
    print("\nengine       first TTFT  second TTFT  ratio   target <= 0.25x")
    for engine, (first, second, ratio) in results.items():
        print(f"{engine:12} {first:9.3f}s {second:11.3f}s  {ratio:.3f}  {'ok' if ratio <= TARGET else 'MISSED'}")
    return 0 if all(ratio <= TARGET for *_, ratio in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
