"""Issue 23's figures: infersnap nodes behind vllm-router (docs/cluster.md), in one run.

1. Router overhead: one node (llama.cpp, all cores) direct, the same node behind the router, and
   llama-server (the reference, when --llama-server or $LLAMA_SERVER names it), bursts of 1 and 8
   streamed clients: aggregate tok/s and TTFT p50; rounds interleave the targets, medians reported.
2. Scaling: two nodes each pinned to one core (taskset, every process of the node) behind the router
   (round_robin), against one node on both cores, 16 streamed clients: tok/s, TTFT p50 and p99.
3. Agents: 8 conversations of 4 turns, each with its own system prompt of --system-tokens, all at once,
   through the router with cache_aware, consistent_hash (an X-Session-ID per conversation) and
   round_robin over the two pinned nodes: mean TTFT of turns 2-4 (turn 1 is cold on every policy).

    .venv/bin/python bench/cluster.py [--llama-server PATH] [--rounds 3] [--system-tokens 3000] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
from conftest import process_tree, start_router, start_server  # noqa: E402
from engines import Done, Target, burst, llama_server, long_text, rates, story, stream  # noqa: E402

from infersnap.hwdetect.cpu import physical_core_cpus  # noqa: E402

NODE = {"engines": "cpu", "engines-measure": "false", "worker.embeddings": "false"}


def node(data: Path, **settings: str) -> Target:
    server = start_server(data, **{**NODE, **settings})
    return Target(str(data.name), server.url, server.process.pid, server.stop, 0)


def pin(target: Target, cpu: int) -> None:
    """Every process of the node on one CPU (its workers pin themselves at start, so this comes after)."""
    for pid in process_tree(target.pid):
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], capture_output=True, check=False)


def router(nodes: list[Target], policy: str) -> Target:
    front = start_router([t.url for t in nodes], policy)
    return Target(f"router ({policy})", f"{front.base}/v1", front.process.pid, front.stop, 0)


def p99(done: list[Done]) -> float:
    ttfts = sorted(d.first - d.start for d in done if d.first is not None)
    return ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000 if ttfts else float("nan")


def overhead(targets: list[Target], rounds: int, max_tokens: int) -> dict[tuple[str, int], tuple[float, float]]:
    """(target, clients) -> median (tok/s, TTFT p50 ms) over the rounds."""
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_ in range(rounds):
        for clients in (1, 8):
            for i in range(len(targets)):
                target = targets[(i + round_) % len(targets)]  # the order rotates: noise hits all alike
                # new prompts for each target: the router and "alone" share a node, and its prompt cache
                done = burst(target.url, [story(f"{target.name}-{round_}-{clients}-{n}") for n in range(clients)], max_tokens)
                assert not any(d.error for d in done), [d.error for d in done if d.error]
                runs.setdefault((target.name, clients), []).append(rates(done))
    return {key: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for key, rs in runs.items()}


def agents(url: str, policy: str, system_tokens: int, seed: int, conversations: int = 8, turns: int = 4) -> list[float]:
    """Each conversation's turns in order, all conversations at once; the TTFT (s) of turns 2 onwards. `seed`:
    new system prompts for each policy, so that none finds the last policy's in the nodes' caches."""
    async def conversation(client: httpx.AsyncClient, n: int) -> list[float]:
        messages = [{"role": "system", "content": long_text(seed + n, system_tokens)}]
        headers = {"X-Session-ID": f"agent-{n}"} if policy == "consistent_hash" else None
        later = []
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Step {turn}: what next?"})
            done = await stream(client, "", 16, messages=messages, headers=headers)
            assert done.error is None and done.first is not None, done.error
            if turn:
                later.append(done.first - done.start)
            messages.append({"role": "assistant", "content": "Next, I read the file."})
        return later

    async def go() -> list[float]:
        async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
            per = await asyncio.gather(*(conversation(client, n) for n in range(conversations)))
        return [t for ts in per for t in ts]

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--system-tokens", type=int, default=3000)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="its binary (or $LLAMA_SERVER)")
    parser.add_argument("--skip", default="", help="sections to skip, comma list: overhead,scaling,agents")
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    cores = len(physical_core_cpus())
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        if "overhead" not in skip:
            print("1. router overhead", flush=True)
            alone = node(data / "alone")
            behind = router([alone], "round_robin")
            targets = [alone, behind]
            if args.llama_server and os.access(args.llama_server, os.X_OK):
                targets.append(llama_server(args.llama_server, 8, 8192, data / "llama-server.log"))
            try:
                figures = overhead(targets, args.rounds, args.max_tokens)
            finally:
                for t in reversed(targets):
                    t.stop()
            for clients in (1, 8):
                direct, routed = figures[("alone", clients)], figures[(behind.name, clients)]
                line = (f"  {clients} clients: direct {direct[0]:.1f} tok/s, TTFT {direct[1]:.0f} ms; routed "
                        f"{routed[0]:.1f} tok/s ({routed[0] / direct[0]:.3f}x), TTFT {routed[1]:.0f} ms "
                        f"({routed[1] - direct[1]:+.1f} ms)")
                if ("llama-server", clients) in figures:
                    ref = figures[("llama-server", clients)]
                    line += f"; llama-server {ref[0]:.1f} tok/s, TTFT {ref[1]:.0f} ms"
                print(line, flush=True)
        if "scaling" not in skip or "agents" not in skip:
            pinned = [node(data / f"pinned{i}", **{"worker.threads": "1"}) for i in range(2)]
            for cpu, target in zip(physical_core_cpus(), pinned):
                pin(target, cpu)
            try:
                if "scaling" not in skip:
                    print(f"2. scaling: 16 clients, two one-core nodes behind the router vs one {cores}-core node",
                          flush=True)
                    one = node(data / "one")
                    pair = router(pinned, "round_robin")
                    try:
                        for target in (one, pair, one, pair):
                            done = burst(target.url, [story(f"s{n}") for n in range(16)], args.max_tokens)
                            assert not any(d.error for d in done), [d.error for d in done if d.error]
                            tok_s, p50 = rates(done)
                            print(f"  {target.name}: {tok_s:.1f} tok/s, TTFT p50 {p50:.0f} ms, p99 {p99(done):.0f} ms",
                                  flush=True)
                    finally:
                        pair.stop()
                        one.stop()
                if "agents" not in skip:
                    print(f"3. agents: 8 conversations x 4 turns, {args.system_tokens}-token system prompts, "
                          "two one-core nodes", flush=True)
                    means = {}
                    for i, policy in enumerate(("cache_aware", "consistent_hash", "round_robin")):
                        front = router(pinned, policy)
                        try:
                            later = agents(front.url, policy, args.system_tokens, seed=1000 * (i + 1))
                        finally:
                            front.stop()
                        means[policy] = statistics.mean(later)
                        print(f"  {policy}: mean TTFT of turns 2-4 {means[policy] * 1000:.0f} ms", flush=True)
                    for policy in ("cache_aware", "consistent_hash"):
                        print(f"  {policy} / round_robin: {means[policy] / means['round_robin']:.2f}x", flush=True)
            finally:
                for target in pinned:
                    target.stop()


if __name__ == "__main__":
    main()
