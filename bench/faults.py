"""Kill the worker mid-generation and measure what clients see.

    .venv/bin/python bench/faults.py [--clients 6] [--slots 2] [--rounds 3]

Starts the real `infersnap serve` in a fresh data folder, streams `--clients`
requests at once (so `--slots` run and the rest wait in the broker), SIGKILLs
the worker once they run, and reports per round: how long until each running
request got its error event, how many waiting ones were then served by the
restarted worker, how many were lost (neither answered nor told: must be 0),
and how long the worker took to be back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

INFERSNAP = str(Path(sys.executable).parent / "infersnap")
BODY = {
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 300,
    "logit_bias": {"2": -100},
    "stream": True,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(env: dict) -> dict:
    out = subprocess.run([INFERSNAP, "status", "--format", "json"], env=env, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def stream(url: str, outcome: dict) -> None:
    """Stream one request; record how it ended and when."""
    try:
        with httpx.stream("POST", f"{url}/chat/completions", json=BODY, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and '"error"' in line:
                    outcome.update(end="error", at=time.monotonic())
                elif line.startswith("data: ") and '"finish_reason":"length"' in line:
                    outcome.update(end="answered", at=time.monotonic())
                elif line.startswith("data: ") and "content" in line:
                    outcome.setdefault("first", time.monotonic())
    except httpx.HTTPError as exc:
        outcome.update(end=f"transport error {exc!r}", at=time.monotonic())


def one_round(env: dict, url: str, clients: int) -> dict:
    outcomes = [{} for _ in range(clients)]
    threads = [threading.Thread(target=stream, args=(url, o)) for o in outcomes]
    for t in threads:
        t.start()
    while status(env).get("workers", [{}])[0].get("running", 0) == 0:
        time.sleep(0.05)
    time.sleep(0.5)
    worker = status(env)["workers"][0]
    running_at_kill = {i for i, o in enumerate(outcomes) if "first" in o}
    killed = time.monotonic()
    os.kill(worker["pid"], signal.SIGKILL)
    while True:
        back = status(env).get("workers", [{}])[0]
        if back.get("state") == "ready" and back.get("pid") != worker["pid"]:
            break
        time.sleep(0.05)
    ready_after = time.monotonic() - killed
    for t in threads:
        t.join(120)
    detect = [outcomes[i]["at"] - killed for i in running_at_kill if outcomes[i].get("end") == "error"]
    waited = [o for i, o in enumerate(outcomes) if i not in running_at_kill]
    return {
        "running_at_kill": len(running_at_kill),
        "errors_to_running": len(detect),
        "detect_s_max": max(detect) if detect else None,
        "waiting_at_kill": len(waited),
        "waiting_answered": sum(o.get("end") == "answered" for o in waited),
        "lost": sum(o.get("end") not in ("answered", "error") for o in outcomes) + sum(t.is_alive() for t in threads),
        "worker_ready_again_s": ready_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="infersnap-faults-"))
    env = {**os.environ, "INFERSNAP_DATA": str(data)}
    port = free_port()
    subprocess.run([INFERSNAP, "set", f"http.port={port}", f"worker.slots={args.slots}"], env=env, check=True)
    server = subprocess.Popen([INFERSNAP, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while not status(env).get("workers") or status(env)["workers"][0]["state"] != "ready":
            time.sleep(0.2)
        for n in range(args.rounds):
            print(json.dumps({"round": n + 1, **one_round(env, url, args.clients)}), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


if __name__ == "__main__":
    main()
