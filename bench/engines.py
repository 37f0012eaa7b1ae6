"""Issue 12's figures: infersnap's default install against each CPU engine alone and llama-server, in one run.

Servers, all started first and kept running until the end:
- `default`: an empty data folder, no config but the port (engines=auto). Its first serve may measure the
  engine profiles before it listens (minutes); it starts alone, so nothing else spoils that measurement.
- one infersnap per CPU runtime's best engine alone (e.g. `cpu-avx512`, `intel-cpu`) with the slots the
  default gives that engine's lane (or its lanes' most), so that only the lanes differ; given the
  default's stored profiles so that they do not measure again;
- `llama-server --parallel N -t <physical cores> -c N*<context> -m <default model>` (N = the most clients,
  context = the default server's per-sequence context), when --llama-server or $LLAMA_SERVER names it.

Then:
1. generation: a burst of N streamed greedy chat completions of --max-tokens, distinct prompts, per level:
   aggregate generated tok/s (usage tokens over the burst's wall time) and TTFT p50. Rounds interleave the
   servers (the order rotates each round) so that noise hits all alike; medians of the rounds.
2. a lone prompt of about --long-prompt tokens (new text every time: no prefix cache helps), max_tokens 4:
   its time to first token.
3. a changing load, 1, 8 and 1 clients for --phase-seconds each, against default and each engine alone:
   tok/s per phase, and requests lost (must be 0).
4. memory: each server's process tree RSS (summed over its processes), peak of samples during the run.
5. the default server's lanes (`infersnap status`).

    .venv/bin/python bench/engines.py [--llama-server PATH] [--rounds 3] [--levels 1,8,16] [--max-tokens 128]
        [--long-prompt 4000] [--phase-seconds 20,20,20] [--skip-changing-load] [--noisy]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import httpx

from infersnap.engines import candidates
from infersnap.hwdetect import detect
from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import default_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
import conftest  # noqa: E402  (the tests' launcher: isolated data folder, free port)
from conftest import free_port, process_tree, start_server  # noqa: E402
from serve_vs_inprocess import quietly  # noqa: E402  (waits for other processes to leave the CPUs alone)

# A fresh data folder's first serve measures every engine before it listens: wait for that, not 2 minutes.
conftest.START_TIMEOUT = 1800
PAGE = os.sysconf("SC_PAGE_SIZE")
WORDS = ("river mountain lantern garden silver quiet morning harbor window candle forest meadow journey engine "
         "paper bridge winter summer market castle dragon kitchen violin ocean thunder pebble marble copper "
         "velvet orchard compass ladder saddle island valley shadow feather whisper captain doctor farmer").split()


class Done(NamedTuple):
    """One streamed request; times are time.perf_counter() seconds."""

    start: float
    first: float | None  # first content
    end: float
    prompt_tokens: int
    tokens: int  # completion tokens, from usage
    error: str | None


@dataclass
class Target:
    """A server under test."""

    name: str
    url: str  # the OpenAI base URL, ending in /v1
    pid: int  # the root of its process tree
    stop: Callable[[], object]
    context: int  # tokens per sequence


# --- requests -------------------------------------------------------------------------------------


def story(key: object) -> str:
    return f"Story {key}: write a long story about a dragon who learns to cook."


def long_text(seed: int, tokens: int) -> str:
    """About `tokens` tokens once templated (SmolLM2: ~40 for the template, 1.03 a word), new for each seed."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(WORDS) for _ in range(int((tokens - 40) / 1.03)))
    return f"{seed}. {words}\nSum this up in one line."


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, model: str | None = None,
                 messages: list[dict] | None = None, headers: dict[str, str] | None = None) -> Done:
    """One streamed greedy chat completion (of `model`, or the server's own) of `prompt` as the user's message,
    or of a whole conversation's `messages`; tokens are counted from usage, so the end of turn stays allowed."""
    body = {"messages": messages or [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    start, first, usage = time.perf_counter(), None, None
    try:
        async with client.stream("POST", "/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Done(start, None, time.perf_counter(), 0, 0, f"HTTP {response.status_code}: {text[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Done(start, first, time.perf_counter(), 0, 0, str(chunk["error"])[:300])
                choice = (chunk.get("choices") or [{}])[0]
                # the first token: its text, or the end when it was the end of turn (no text)
                if first is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as e:
        return Done(start, first, time.perf_counter(), 0, 0, repr(e))
    if usage is None:
        return Done(start, first, time.perf_counter(), 0, 0, "the stream ended without usage")
    return Done(start, first, time.perf_counter(), usage["prompt_tokens"], usage["completion_tokens"], None)


def burst(url: str, prompts: list[str], max_tokens: int) -> list[Done]:
    """All prompts sent at once."""
    async def go() -> list[Done]:
        async with httpx.AsyncClient(base_url=url, timeout=900) as client:
            return await asyncio.gather(*(stream(client, p, max_tokens) for p in prompts))

    return asyncio.run(go())


def rates(done: list[Done]) -> tuple[float, float]:
    """(aggregate generated tok/s, TTFT p50 ms) of a burst."""
    wall = max(d.end for d in done) - min(d.start for d in done)
    ttfts = [d.first - d.start for d in done if d.first is not None]
    return sum(d.tokens for d in done) / wall, statistics.median(ttfts) * 1000 if ttfts else float("nan")


def changing_load(url: str, phases: list[tuple[int, float]], max_tokens: int) -> tuple[list[float], list[str]]:
    """Closed-loop clients: during a phase of C clients, clients 0..C-1 each send a request as soon as their
    last one ends; one the phase no longer wants finishes its request first (less load is not an abort).
    Returns tok/s per phase (a request's tokens spread evenly from its first token to its end) and errors."""
    edges = list(itertools.accumulate((s for _, s in phases), initial=0.0))
    done: list[Done] = []
    count = itertools.count()

    def wanted(now: float) -> int:
        return next((c for (c, _), end in zip(phases, edges[1:]) if now < end), 0)

    async def client(http: httpx.AsyncClient, i: int, start: float) -> None:
        while (now := time.perf_counter() - start) < edges[-1]:
            if i < wanted(now):
                done.append(await stream(http, story(f"load {next(count)}"), max_tokens))
            else:
                await asyncio.sleep(0.05)

    async def go() -> float:
        start = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=900) as http:
            await asyncio.gather(*(client(http, i, start) for i in range(max(c for c, _ in phases))))
        return start

    start = asyncio.run(go())
    per_phase = []
    for lo, hi in zip(edges, edges[1:]):
        tokens = 0.0
        for d in done:
            if d.first is not None and d.end > d.first:
                a, b = d.first - start, d.end - start
                tokens += d.tokens * max(0.0, min(b, hi) - max(a, lo)) / (b - a)
        per_phase.append(tokens / (hi - lo))
    return per_phase, [d.error for d in done if d.error]


# --- servers ----------------------------------------------------------------------------------------


def tree_rss(pid: int) -> tuple[int, int]:
    """(RSS bytes summed over the process tree, processes)."""
    total, pids = 0, process_tree(pid)
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError):  # it ended meanwhile
            pass
    return total, len(pids)


class PeakRSS(threading.Thread):
    """Samples every server's tree RSS twice a second, keeping each one's peak."""

    def __init__(self, targets: list[Target]) -> None:
        super().__init__(daemon=True)
        self.targets, self.peak, self.done = targets, {t.name: (0, 0) for t in targets}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for t in self.targets:
                self.peak[t.name] = max(self.peak[t.name], tree_rss(t.pid))


def infersnap(name: str, data: Path, **settings: str) -> tuple[Target, dict]:
    """A started infersnap server, and its `infersnap status`."""
    start = time.monotonic()
    server = start_server(data, **settings)
    status = server.status()
    lanes = [w for w in status["workers"] if w["task"] == "generate"]
    print(f"  {name}: serving after {time.monotonic() - start:.0f} s, "
          + ", ".join(f"{w['engine']} x{w['slots']} slots" for w in lanes), flush=True)
    context = max(w["context"] for w in lanes)
    return Target(name, server.url, server.process.pid, server.stop, context), status


def llama_server(path: str, slots: int, context: int, log: Path) -> Target:
    port = free_port()
    argv = [path, "--parallel", str(slots), "-t", str(len(physical_core_cpus())), "-c", str(slots * context),
            "--port", str(port), "-m", str(default_model_path())]
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:  # /health answers 503 while the model loads
        if process.poll() is not None:
            raise SystemExit(f"llama-server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"llama-server did not get ready in 300 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    print(f"  llama-server: {' '.join(argv[1:])}", flush=True)
    return Target("llama-server", f"{base}/v1", process.pid, lambda: (process.terminate(), process.wait(30)), context)


def single_engines() -> list[str]:
    """The best CPU engine of each runtime: what auto chooses its CPU lanes from."""
    return [a.engine for a in candidates(detect()) if a.device == "cpu"]


# --- figures ----------------------------------------------------------------------------------------


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def median_of(runs: list[float]) -> float:
    runs = [r for r in runs if r == r]  # NaN: no first token
    return statistics.median(runs) if runs else float("nan")


def print_lanes(status: dict) -> None:
    print("\nthe default server's lanes (infersnap status):")
    for w in status["workers"]:
        speed = " ".join(f"{n}:{v}" for n, v in (w.get("tok/s") or {}).items()) or "not measured"
        print(f"  {w['id']:14} {w['engine']:12} {w['task']:9} slots {w['slots']:<3} context {w['context']:<6} "
              f"tok/s by streams {speed}")
    for why in status.get("left-out") or []:
        print(f"  left out: {why}")


def measure(targets: list[Target], levels: list[int], phases: list[tuple[int, float]],
            args: argparse.Namespace) -> dict:
    """Every measurement; returns {"burst": {(name, clients): [(tok/s, ttft ms, tokens/request, errors)]},
    "long": {name: [Done]}, "load": {name: (tok/s per phase, errors)}, "rss": {name: (bytes, processes)}}."""
    pids = [os.getpid()] + [p for t in targets for p in process_tree(t.pid)]

    def timed(measure_: Callable[[], object]):
        return measure_() if args.noisy else quietly(measure_, pids)

    fresh = itertools.count()  # every prompt new, quietly's second tries too: no prefix cache helps

    sampler = PeakRSS(targets)
    sampler.start()
    for t in targets:  # warm-up: one burst as large as the largest level, short
        burst(t.url, [story(f"warm {i}") for i in range(max(levels))], 8)
    results: dict = {"burst": {}, "long": {}, "load": {}}
    for round_ in range(args.rounds):
        order = targets[round_ % len(targets):] + targets[:round_ % len(targets)]
        for clients in levels:
            for t in order:
                done = timed(lambda: burst(t.url, [story(f"{next(fresh)}") for _ in range(clients)], args.max_tokens))
                tps, ttft = rates(done)
                errors = [d.error for d in done if d.error]
                results["burst"].setdefault((t.name, clients), []).append(
                    (tps, ttft, sum(d.tokens for d in done) / clients, errors))
        for t in order:  # one that refused it (its context is too small) would refuse it again
            if t.context > args.long_prompt and not any(d.error for d in results["long"].get(t.name, [])):
                results["long"].setdefault(t.name, []).append(
                    timed(lambda: burst(t.url, [long_text(next(fresh), args.long_prompt)], 4)[0]))
        print(f"  round {round_ + 1}/{args.rounds}: " + "  ".join(
            f"{t.name} " + "/".join(f"{results['burst'][(t.name, c)][-1][0]:.0f}" for c in levels) for t in targets)
            + " tok/s", flush=True)
    if not args.skip_changing_load:
        for t in targets:
            if t.name != "llama-server":
                results["load"][t.name] = changing_load(t.url, phases, args.max_tokens)
                print(f"  changing load, {t.name}: " + " ".join(f"{r:.0f}" for r in results["load"][t.name][0])
                      + " tok/s", flush=True)
    sampler.done.set()
    sampler.join()
    results["rss"] = sampler.peak
    return results


def report(results: dict, targets: list[Target], levels: list[int], phases: list[tuple[int, float]],
           engines: list[str], args: argparse.Namespace) -> None:
    names = [t.name for t in targets]
    burst_ = results["burst"]
    tps = {k: median_of([r[0] for r in v]) for k, v in burst_.items()}
    ttft = {k: median_of([r[1] for r in v]) for k, v in burst_.items()}
    llama = "llama-server" in names

    print(f"\ngeneration: bursts of N streamed chat completions, max_tokens {args.max_tokens}, distinct prompts, "
          f"medians of {args.rounds} rounds; best = the best engine alone at that level")
    print(f"{'clients':>7}  {'server':14}{'tok/s':>8}{'TTFT p50':>11}{'tok/req':>9}"
          f"{'tok/s vs llama':>16}{'TTFT vs llama':>15}{'tok/s vs best':>15}  errors")
    for clients in levels:
        best = max((tps[(e, clients)] for e in engines), default=None)
        for name in names:
            key = (name, clients)
            errors = sum(len(r[3]) for r in burst_[key])
            per_request = median_of([r[2] for r in burst_[key]])
            print(f"{clients:>7}  {name:14}{tps[key]:>8.1f}{ttft[key]:>8.0f} ms{per_request:>9.1f}"
                  f"{ratio(tps[key], tps.get(('llama-server', clients))):>16}"
                  f"{ratio(ttft[key], ttft.get(('llama-server', clients))):>15}{ratio(tps[key], best):>15}  {errors}")

    print(f"\na lone prompt of about {args.long_prompt} tokens (new text every time), time to first token, median:")
    long_ = {name: median_of([d.first - d.start for d in done if d.error is None and d.first is not None])
             for name, done in results["long"].items()}
    for t in targets:
        done = results["long"].get(t.name, [])
        if not done:
            print(f"  {t.name:14}skipped: its context is {t.context} tokens (infersnap: worker.context)")
        elif any(d.error for d in done):
            print(f"  {t.name:14}refused: {next(d.error for d in done if d.error)[:200]}")
        else:
            print(f"  {t.name:14}{long_[t.name]:>8.2f} s  prompt {done[0].prompt_tokens} tokens"
                  f"  TTFT vs llama {ratio(long_[t.name], long_.get('llama-server'))}")
    best_long = min((long_[e] for e in engines if long_.get(e, float("nan")) == long_.get(e)), default=None)
    if "default" in long_:
        print(f"  default's TTFT (lower is better) / the best engine alone's: {ratio(long_['default'], best_long)}"
              + (f", / llama-server's: {ratio(long_['default'], long_.get('llama-server'))}" if llama else ""))

    if results["load"]:
        print("\nchanging load: " + ", then ".join(f"{c} client{'s' * (c > 1)} for {s:g} s" for c, s in phases)
              + "; generated tok/s per phase")
        for name, (per_phase, errors) in results["load"].items():
            print(f"  {name:14}" + "".join(f"{r:>9.1f}" for r in per_phase) + f"   lost {len(errors)}"
                  + (f": {errors[0]}" if errors else ""))
        best = [max(results["load"][e][0][i] for e in engines) for i in range(len(phases))]
        mine = results["load"]["default"][0]
        print(f"  {'default/best':14}" + "".join(f"{ratio(r, b):>9}" for r, b in zip(mine, best)))

    print("\nmemory: peak RSS of each server's process tree, summed over its processes (shared pages count "
          "in each), sampled twice a second during the run")
    rss = results["rss"]
    for name in names:
        print(f"  {name:14}{rss[name][0] / 2**20:>8.0f} MiB  {rss[name][1]} processes"
              + (f"  default/this {ratio(rss['default'][0], rss[name][0])}" if name in engines else ""))

    if llama:
        print("\nissue 12's targets for the default install: tok/s vs llama-server >= 1.0x at 1 client, >= 2.3x at "
              "8, >= 2.9x at 16; TTFT p50 at 8 <= 0.5x; the lone 4,000-token prompt's TTFT <= 0.3x")
    print("on any machine: tok/s vs best >= 0.9x at every level and every phase of the changing load, lost 0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,8,16", help="concurrent clients, comma list")
    parser.add_argument("--long-prompt", type=int, default=4000, help="tokens of the lone long prompt")
    parser.add_argument("--phase-seconds", default="20,20,20", help="the 1, 8, 1 clients phases (one number: each)")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="its binary (or $LLAMA_SERVER)")
    parser.add_argument("--skip-changing-load", action="store_true")
    parser.add_argument("--noisy", action="store_true", help="measure at once, not waiting for a quiet machine")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    seconds = [float(s) for s in args.phase_seconds.split(",")]
    phases = list(zip([1, 8, 1], seconds * 3 if len(seconds) == 1 else seconds))
    engines = single_engines()

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        print("starting the servers (a first serve may measure engine profiles before it listens)", flush=True)
        default, status = infersnap("default", data / "default")
        targets = [default]
        try:
            lanes = {w["engine"]: w["slots"] for w in status["workers"] if w["task"] == "generate"}
            for engine in engines:
                if (data / "default" / "profiles").is_dir():  # keyed without slots: they serve these servers too
                    shutil.copytree(data / "default" / "profiles", data / engine / "profiles")
                slots = lanes.get(engine, max(lanes.values()))  # as auto runs it: only the lanes differ
                targets.append(infersnap(engine, data / engine, engines=engine, **{"worker.slots": str(slots)})[0])
            if args.llama_server and os.access(args.llama_server, os.X_OK):
                targets.append(llama_server(args.llama_server, max(levels), default.context, data / "llama-server.log"))
            else:
                print(f"  llama-server: not found ({args.llama_server or 'no --llama-server or $LLAMA_SERVER'}); "
                      "build it with `bench/build_llama_server.sh` (it prints the binary's path) or run "
                      "`make bench-engines`: its column is skipped", flush=True)
            print_lanes(status)
            results = measure(targets, levels, phases, args)
        finally:
            for t in targets:
                t.stop()
    report(results, targets, levels, phases, engines, args)


if __name__ == "__main__":
    main()
