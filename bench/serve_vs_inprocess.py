"""The served path vs the same engine in-process: streamed 128-token chat completions at 1 and 8 clients.

Per engine (llama.cpp `cpu`, OpenVINO `intel-cpu`) it starts `infersnap serve` with that engine alone
(tests/conftest.py's start_server, worker.slots=8, no embedding worker) and builds the same infersnap
engine class in this process with the same slots, context and threads (bench/engine_alone.py's build),
driven directly through add()/step(). Then, run by run and interleaved (served, in-process, ...):

- 1 client: one streamed request; decode tokens/s after the first token, and TTFT;
- 8 clients: 8 concurrent streamed requests with distinct prompts; aggregate generated tokens/s
  (all tokens over the wall time from the first send to the last token), and the median TTFT.

For 1 client on llama.cpp, llama-cpp-python's high-level Llama in-process is measured too, for
reference. Temperature 0, and the end of turn banned (logit_bias), so every request generates
exactly --max-tokens tokens on every side. Prints medians and served/in-process ratios, and the broker
process's CPU time per generated token on the served side (what routing costs, whatever the engine).

    .venv/bin/python bench/serve_vs_inprocess.py [--runs 5] [--max-tokens 128] [--engines cpu,intel-cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from infersnap import wire
from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import default_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
from conftest import process_tree, start_server  # noqa: E402  (the tests' launcher: isolated data folder, free port)
from engine_alone import NO_EOS, build, req  # noqa: E402

RUNTIMES = {"cpu": "llamacpp", "intel-cpu": "openvino"}  # engine name -> engine_alone.build's name
SLOTS, CONTEXT = 8, 2048


def text(i: int) -> str:
    return f"Story number {i}: write a long story about a dragon who learns to cook."


# --- served: streamed chat completions over HTTP ------------------------------------------------


async def served_one(client: httpx.AsyncClient, i: int, max_tokens: int, start: float) -> tuple[float, float, int]:
    """(TTFT s from `start`, end s from `start`, completion tokens) of one streamed request."""
    body = {
        "messages": [{"role": "user", "content": text(i)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(k): v for k, v in NO_EOS.items()},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first, tokens = None, 0
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first - start, time.perf_counter() - start, tokens


def served(url: str, prompts: list[int], max_tokens: int) -> list[tuple[float, float, int]]:
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            start = time.perf_counter()
            return await asyncio.gather(*(served_one(client, i, max_tokens, start) for i in prompts))

    return asyncio.run(go())


# --- in-process: the same engine class through add()/step() -------------------------------------


def inprocess(engine, prompts: list[int], max_tokens: int) -> list[tuple[float, float, int]]:
    """What `served` measures, for requests added at once and stepped to the end in this thread."""
    requests = [
        req(messages=[wire.ChatMessage("user", text(i))], max_tokens=max_tokens, temperature=0, logit_bias=NO_EOS)
        for i in prompts
    ]
    first: dict[str, float] = {}
    ends: dict[str, tuple[float, int]] = {}
    start = time.perf_counter()
    for r in requests:
        assert engine.add(r) is None
    while engine.busy:
        for out in engine.step():
            now = time.perf_counter() - start
            chunk = out.last if isinstance(out, wire.Final) else out
            if chunk is not None and chunk.text and out.id not in first:
                first[out.id] = now
            if isinstance(out, wire.Final):
                ends[out.id] = (now, out.completion_tokens)
    return [(first[r.id], *ends[r.id]) for r in requests]


def llama_reference(llm, i: int, max_tokens: int) -> list[tuple[float, float, int]]:
    """One streamed chat completion through llama-cpp-python's high-level Llama."""
    start = time.perf_counter()
    first, tokens = None, 0
    messages = [{"role": "user", "content": text(i)}]
    for chunk in llm.create_chat_completion(
        messages=messages, max_tokens=max_tokens, temperature=0, logit_bias=NO_EOS, stream=True
    ):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            first = first or time.perf_counter() - start
    return [(first, time.perf_counter() - start, tokens)]


# --- a quiet machine ----------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")
QUIET = 0.05  # the most CPU (fraction of the machine) that other processes may use during a measurement


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs together)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # all but idle and iowait


def own_seconds(pids: list[int]) -> float:
    """CPU seconds used by these processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def quietly(measure, pids: list[int], tries: int = 5):
    """measure(), waiting first until other processes leave the CPUs alone, and again while they
    took more than QUIET of the machine during it (other sessions' test runs share this machine)."""
    cpus = os.cpu_count() or 1
    for _ in range(tries):
        for _ in range(120):  # up to a minute for a quiet half second
            own, busy = own_seconds(pids), busy_seconds()
            time.sleep(0.5)
            if (busy_seconds() - busy) - (own_seconds(pids) - own) <= QUIET * cpus * 0.5:
                break
        own, busy, start = own_seconds(pids), busy_seconds(), time.perf_counter()
        result = measure()
        foreign = (busy_seconds() - busy) - (own_seconds(pids) - own)
        if foreign < QUIET * cpus * (time.perf_counter() - start):
            return result
        print(f"    (other processes took {foreign:.2f} CPU s meanwhile: measuring again)", flush=True)
    return result


# --- figures ------------------------------------------------------------------------------------


def figures(results: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """(tokens/s, median TTFT ms, tokens): one request's decode rate after its first token, or for
    several the aggregate rate (all tokens over the wall time to the last one)."""
    tokens = sum(r[2] for r in results)
    if len(results) == 1:
        ttft, end, n = results[0]
        tps = (n - 1) / (end - ttft)
    else:
        tps = tokens / max(r[1] for r in results)
    return tps, statistics.median(r[0] for r in results) * 1000, tokens


def broker_pid(server) -> int:
    for pid in process_tree(server.process.pid):
        try:
            if b"infersnap.broker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise RuntimeError("no broker process under the server")


def bench_engine(name: str, runs: int, max_tokens: int, threads: int, rows: list, broker_cost: dict) -> None:
    engine, seconds = build(RUNTIMES[name], threads, SLOTS, CONTEXT)
    print(f"{name}: in-process engine loaded in {seconds:.1f} s, {threads} threads", flush=True)
    llm = None
    if name == "cpu":
        from llama_cpp import Llama

        llm = Llama(str(default_model_path()), n_ctx=CONTEXT, n_threads=threads, n_threads_batch=threads, verbose=False)
    runs_of: dict[tuple[str, int], list[tuple[float, float, int]]] = {}  # (side, clients) -> per run
    with tempfile.TemporaryDirectory() as data:
        settings = {"engines": name, "worker.slots": str(SLOTS), "worker.context": str(CONTEXT), "worker.embeddings": "false"}
        server = start_server(Path(data), **settings)
        try:
            served(server.url, [-1], 8)  # warm both up
            inprocess(engine, [-1], 8)
            pids = [os.getpid(), *process_tree(server.process.pid)]
            broker = broker_pid(server)
            for run in range(runs):
                for clients in (1, 8):
                    prompts = [run * 100 + clients * 10 + c for c in range(clients)]  # new to both prefix caches
                    sides = [("served", lambda: served(server.url, prompts, max_tokens)),
                             ("in-process", lambda: inprocess(engine, prompts, max_tokens))]
                    if clients == 1 and llm is not None:
                        sides.append(("Llama", lambda: llama_reference(llm, prompts[0], max_tokens)))
                    for side, measure in sides if run % 2 == 0 else sides[::-1]:
                        broker_before = own_seconds([broker])
                        result = figures(quietly(measure, pids))
                        assert result[2] == clients * max_tokens, f"{side} generated {result[2]} tokens"
                        runs_of.setdefault((side, clients), []).append(result)
                        if side == "served":  # the broker idles at its 100 ms tick while the others run: counted too
                            per_token = (own_seconds([broker]) - broker_before) / result[2] * 1e6
                            broker_cost.setdefault((name, clients), []).append(per_token)
                print(f"  run {run + 1}/{runs}: " + ", ".join(
                    f"{side} x{clients} {results[-1][0]:.1f}" for (side, clients), results in runs_of.items()), flush=True)
        finally:
            server.stop()
    del engine, llm

    for clients in (1, 8):
        for against in ("in-process", "Llama"):
            if (against, clients) not in runs_of:
                continue
            mine, theirs = runs_of[("served", clients)], runs_of[(against, clients)]
            rows.append((
                name, clients, "engine" if against == "in-process" else "Llama",
                statistics.median(r[0] for r in mine), statistics.median(r[0] for r in theirs),
                statistics.median(a[0] / b[0] for a, b in zip(mine, theirs)),  # run by run: noise hits both alike
                statistics.median(r[1] for r in mine), statistics.median(r[1] for r in theirs),
            ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engines", default="cpu,intel-cpu", help="comma list of: " + ", ".join(RUNTIMES))
    args = parser.parse_args()

    threads = len(physical_core_cpus())  # as the supervisor gives the CPU worker (worker.threads=0)
    rows: list = []
    broker_cost: dict[tuple[str, int], list[float]] = {}
    for name in args.engines.split(","):
        bench_engine(name, args.runs, args.max_tokens, threads, rows, broker_cost)

    print(f"\nmedians of {args.runs} runs, {args.max_tokens} tokens per request; 1 client: decode tok/s; "
          "8 clients: aggregate tok/s and TTFT p50; ratio: median of the runs' served/in-process")
    print(f"{'engine':10}{'clients':>8}  {'in-process':11}{'served tok/s':>13}{'in-proc tok/s':>14}"
          f"{'ratio':>7}{'TTFT served':>13}{'TTFT in-proc':>13}")
    for name, clients, against, s_tps, i_tps, ratio, s_ttft, i_ttft in rows:
        print(f"{name:10}{clients:>8}  {against:11}{s_tps:>13.1f}{i_tps:>14.1f}{ratio:>7.3f}"
              f"{s_ttft:>10.1f} ms{i_ttft:>10.1f} ms")
    print("targets: ratio >= 0.97 at 1 client, >= 0.95 at 8")
    print("\nbroker CPU per generated token, served side (median of the runs; its waits at the tick included)")
    for (name, clients), costs in broker_cost.items():
        print(f"{name:10}{clients:>8}  {statistics.median(costs):8.1f} us/token")


if __name__ == "__main__":
    main()
