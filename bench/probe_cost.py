"""Issue 21's figures: what the probe (infersnap/probes.py) adds to `infersnap serve`'s start, against llama-server.

For each round, three starts of `infersnap serve` with the default model, `engines-measure=false` (so that
no profile is measured and the probe is the only difference), timed from the command to its first
answered chat completion:
- first start: a fresh data folder, so every engine it may run is probed (llama.cpp and OpenVINO on the CPU);
- later start: the same data folder again, the probes stored: it must add nothing;
- first start with llama.cpp's defaults crashing (the fault hook, INFERSNAP_FAULT), as on a Sapphire Rapids
  Xeon: the probe's fallback to no repacking;
and, when --llama-server or $LLAMA_SERVER names one, llama-server on the same model, to its first answer.
Each probe's own seconds come from the stored answers. Medians over --rounds.

    .venv/bin/python bench/probe_cost.py [--rounds 3] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from infersnap.engines import candidates, manifests
from infersnap.hwdetect import detect
from infersnap.models import default_model_path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]
from conftest import free_port, start_server  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


def first_answer(url: str, started: float, deadline: float = 180) -> float:
    """Seconds from `started` to the first chat completion answered with 200."""
    while time.monotonic() - started < deadline:
        try:
            if httpx.post(f"{url}/chat/completions", json=CHAT, timeout=30).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no answer from {url} within {deadline} s")


def infersnap_start(data: Path, fault: str = "") -> tuple[float, dict[str, float]]:
    """Seconds to the first answer, and each probe's own seconds (engine -> s) stored in the data folder."""
    started = time.monotonic()
    server = start_server(data, env={"INFERSNAP_FAULT": fault} if fault else None, **{"engines-measure": "false"})
    try:
        seconds = first_answer(server.url, started)
    finally:
        server.stop()
    probed = {}
    for path in (data / "probes").glob("*.json"):
        probe = json.loads(path.read_text())
        probed[probe["engine"]] = probe["seconds"]
    return seconds, probed


def llama_server_start(binary: str) -> float:
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen([binary, "-m", str(default_model_path()), "--host", "127.0.0.1", "--port", str(port),
                                "-c", "2048", "--parallel", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return first_answer(f"http://127.0.0.1:{port}/v1", started)
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    args = parser.parse_args()
    llama = next(a.engine for a in candidates(detect("/")) if manifests()[a.engine].runtime == "llamacpp")
    runs: dict[str, list[float]] = {"first start (probes run)": [], "later start (probes stored)": [],
                                    "first start, llama.cpp defaults crash": [], "llama-server": []}
    probe_seconds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        data = Path(tempfile.mkdtemp(prefix="infersnap-probe-bench-"))
        try:
            seconds, probed = infersnap_start(data)
            runs["first start (probes run)"].append(seconds)
            for engine, spent in probed.items():
                probe_seconds.setdefault(engine, []).append(spent)
            runs["later start (probes stored)"].append(infersnap_start(data)[0])
        finally:
            shutil.rmtree(data, ignore_errors=True)
        data = Path(tempfile.mkdtemp(prefix="infersnap-probe-bench-"))
        try:
            seconds, probed = infersnap_start(data, fault=f"at=load engine={llama} variant=default")
            runs["first start, llama.cpp defaults crash"].append(seconds)
            probe_seconds.setdefault(f"{llama} (default crashes)", []).append(probed[llama])
        finally:
            shutil.rmtree(data, ignore_errors=True)
        if args.llama_server:
            runs["llama-server"].append(llama_server_start(args.llama_server))
    cpu = detect("/").cpu
    print(f"CPU: {cpu.model_name} ({platform.machine()}, {os.cpu_count()} logical CPUs); medians of {args.rounds} rounds")
    print(f"{'start, to the first answer':45} {'seconds':>8}")
    for name, values in runs.items():
        if values:
            print(f"{name:45} {statistics.median(values):8.2f}")
    print(f"{'probe (in the first start)':45} {'seconds':>8}")
    for engine, values in probe_seconds.items():
        print(f"{engine:45} {statistics.median(values):8.2f}")


if __name__ == "__main__":
    main()
