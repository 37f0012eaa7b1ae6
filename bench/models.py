"""Issue 14's figures: many models on one server, infersnap per CPU engine against llama-server's router mode.

Two model files in one folder, both served by every server: `smol-a` (the default model) and `smol-b` (a
copy of it: both engines read it, and a copy has its own pages, so loading it is a real load).
- infersnap, once per CPU runtime's best engine (llama.cpp, OpenVINO): `engines=<engine>`, the files added
  to its models folder, `model.default=smol-a`, `worker.slots` and `worker.context` as given;
- `llama-server --models-dir DIR --models-max 2 --parallel N -c N*context` (router mode: one child
  llama-server process per model), when --llama-server or $LLAMA_SERVER names it.

For each server:
1. cold start: smol-b unloaded (and its processes gone), then one streamed chat completion of it: seconds to
   its first token, load included. --rounds times; the median.
2. busy: --clients closed-loop clients for --seconds, each sending a streamed chat completion as soon as its
   last one ends: all on smol-a with smol-b unloaded, then half on each with both loaded. Requests/s and
   generated tok/s.
3. memory: the process tree's RSS with smol-a alone loaded, and with both.

    .venv/bin/python bench/models.py [--llama-server PATH] [--rounds 3] [--clients 8] [--seconds 20]
        [--max-tokens 64] [--slots 8] [--context 4096] [--engines cpu-avx512,intel-cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import default_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
from conftest import cli, data_env, free_port, start_server  # noqa: E402
from engines import Done, single_engines, story, stream, tree_rss  # noqa: E402

A, B = "smol-a", "smol-b"


class Router:
    """What the bench asks of a server: its URL, the id it gives each model, and unloading one."""

    def __init__(self, name: str, base: str, pid: int, stop, ids: dict[str, str], unload_path: str) -> None:
        self.name, self.base, self.pid, self.stop, self.ids, self.unload_path = name, base, pid, stop, ids, unload_path

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def states(self) -> dict[str, str]:
        listed = httpx.get(f"{self.url}/models", timeout=30).json()["data"]
        # infersnap: "state"; llama-server's router: "status": {"value": ...}
        return {m["id"]: m.get("state") or (m.get("status") or {}).get("value", "") for m in listed}

    def unload(self, model: str) -> None:
        httpx.post(f"{self.base}{self.unload_path}", json={"model": self.ids[model]}, timeout=60)
        deadline = time.monotonic() + 60
        while self.states().get(self.ids[model]) not in ("unloaded", ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: {model} did not unload: {self.states()}")
            time.sleep(0.2)
        time.sleep(1)  # its processes end, and their memory with them


def infersnap(engine: str, folder: Path, slots: int, context: int) -> Router:
    data = Path(tempfile.mkdtemp(prefix=f"bench-models-{engine}-"))
    env = data_env(data)
    for model in (A, B):
        cli(env, "models", "add", str(folder / f"{model}.gguf"), "--name", model)
    server = start_server(data, session_profiles_too=False, **{
        "engines": engine, "engines-measure": "false", "model.default": A, "worker.slots": str(slots),
        "worker.context": str(context), "worker.embeddings": "false"})
    return Router(f"infersnap {engine}", server.base, server.process.pid, server.stop, {A: A, B: B},
                  "/v1/models/unload")


def llama_router(path: str, folder: Path, slots: int, context: int, log: Path) -> Router:
    port = free_port()
    argv = [path, "--models-dir", str(folder), "--models-max", "2", "--parallel", str(slots),
            "-c", str(slots * context), "-t", str(len(physical_core_cpus())), "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise SystemExit(f"llama-server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            listed = httpx.get(f"{base}/v1/models", timeout=2).json()["data"]
            break
        except (httpx.HTTPError, ValueError, KeyError):
            time.sleep(0.3)
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"llama-server did not answer in 120 s:\n{log.read_text()[-3000:]}")
    ids = {name: next(m["id"] for m in listed if name in m["id"]) for name in (A, B)}
    print(f"  llama-server: {' '.join(argv[1:])}; models {ids}", flush=True)
    return Router("llama-server router", base, process.pid, lambda: (process.terminate(), process.wait(30)), ids,
                  "/models/unload")


def first_token(router: Router, model: str) -> float:
    async def go() -> Done:
        async with httpx.AsyncClient(base_url=router.url, timeout=600) as client:
            return await stream(client, "Say hello.", 8, router.ids[model])

    done = asyncio.run(go())
    if done.error or done.first is None:
        raise SystemExit(f"{router.name}: {model}: {done.error}")
    return done.first - done.start


def busy(router: Router, models: list[str], seconds: float, max_tokens: int) -> tuple[float, float, int]:
    """(requests/s, generated tok/s, errors) of closed-loop clients, client i on models[i]."""
    done: list[Done] = []
    count = itertools.count()

    async def client(http: httpx.AsyncClient, model: str, end: float) -> None:
        while time.perf_counter() < end:
            done.append(await stream(http, story(next(count)), max_tokens, router.ids[model]))

    async def go() -> float:
        start = time.perf_counter()
        async with httpx.AsyncClient(base_url=router.url, timeout=600) as http:
            await asyncio.gather(*(client(http, m, start + seconds) for m in models))
        return time.perf_counter() - start

    wall = asyncio.run(go())
    ok = [d for d in done if not d.error]
    return len(ok) / wall, sum(d.tokens for d in ok) / wall, len(done) - len(ok)


def measure(router: Router, rounds: int, clients: int, seconds: float, max_tokens: int) -> dict:
    first_token(router, A)  # warm: smol-a loaded
    colds = []
    for _ in range(rounds):
        router.unload(B)
        colds.append(first_token(router, B))
    warm = statistics.median(first_token(router, B) for _ in range(3))
    router.unload(B)
    one_rss = tree_rss(router.pid)[0]
    alone = busy(router, [A] * clients, seconds, max_tokens)
    first_token(router, B)
    two_rss = tree_rss(router.pid)[0]
    both = busy(router, [A, B] * (clients // 2), seconds, max_tokens)
    result = {"cold": statistics.median(colds), "colds": colds, "warm": warm, "alone": alone, "both": both,
              "one_rss": one_rss, "two_rss": two_rss}
    print(f"  {router.name}: cold first token {result['cold']:.2f} s (rounds {', '.join(f'{c:.2f}' for c in colds)}), "
          f"warm {warm:.3f} s; one model busy {alone[0]:.2f} req/s {alone[1]:.0f} tok/s; two busy {both[0]:.2f} "
          f"req/s {both[1]:.0f} tok/s; RSS {one_rss >> 20} / {two_rss >> 20} MiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--engines", help="comma-separated infersnap engines  [default: the best CPU engine of each runtime]")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-models-files-"))
    for model in (A, B):  # copies: each its own file, loaded from its own pages
        shutil.copyfile(default_model_path(), folder / f"{model}.gguf")
    cpu = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")), "?")
    flags = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f" {f}" in cpu]
    print(f"CPU: {name}, {os.cpu_count()} logical CPUs, {' '.join(flags)}", flush=True)
    results = {}
    starters = [(engine, lambda e=engine: infersnap(e, folder, args.slots, args.context)) for engine in (args.engines.split(",") if args.engines else single_engines())]
    if args.llama_server:
        starters.append(("llama-server", lambda: llama_router(args.llama_server, folder, args.slots, args.context,
                                                              folder / "llama-server.log")))
    for label, start in starters:  # one server at a time: each has the cores to itself
        router = start()
        try:
            results[label] = measure(router, args.rounds, args.clients, args.seconds, args.max_tokens)
        finally:
            router.stop()
    reference = results.get("llama-server")
    print("\n| server | cold first token s | one model req/s | two models req/s | two/one | RSS one / two MiB |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['cold']:.2f} | {r['alone'][0]:.2f} | {r['both'][0]:.2f} | "
              f"{r['both'][0] / r['alone'][0]:.2f} | {r['one_rss'] >> 20} / {r['two_rss'] >> 20} |")
    if reference:
        for label, r in results.items():
            if label != "llama-server":
                print(f"{label} vs llama-server: cold first token {r['cold'] / reference['cold']:.2f}x, "
                      f"two models busy {r['both'][0] / reference['both'][0]:.2f}x req/s, "
                      f"RSS with two {r['two_rss'] / reference['two_rss']:.2f}x")


if __name__ == "__main__":
    main()
