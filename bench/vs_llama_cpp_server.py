"""Issue 4's reference: infersnap serve vs llama-cpp-python's own server, same requests, one run.

Starts `python -m llama_cpp.server` (it serializes requests behind a lock) on the default model
and an infersnap server (engine from --engine), then runs `infersnap bench --compare` so both get
the same requests level by level, and prints both tables and the ratios (llama_cpp.server / infersnap).

    .venv/bin/pip install 'llama-cpp-python[server]'   # once: the reference server's own dependencies
    .venv/bin/python bench/vs_llama_cpp_server.py [--engine cpu-avx2] [--concurrency 1,8] [--requests 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import INFERSNAP, free_port, start_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests", default="16")
    parser.add_argument("--max-tokens", default="128")
    args = parser.parse_args()

    port = free_port()
    threads = str(len(physical_core_cpus()))
    reference = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()), "--port", str(port),
         "--n_ctx", "2048", "--n_threads", threads, "--n_threads_batch", threads, "--verbose", "false",
         "--interrupt_requests", "false"],  # by default a new request cuts off the one streaming
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    with tempfile.TemporaryDirectory() as data:
        server = start_server(Path(data), engines=args.engine)
        try:
            for _ in range(120):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            subprocess.run(
                [INFERSNAP, "bench", "--url", server.url, "--compare", f"http://127.0.0.1:{port}/v1",
                 "--concurrency", args.concurrency, "--requests", args.requests, "--max-tokens", args.max_tokens],
                env=server.env, check=True,
            )
        finally:
            server.stop()
            reference.terminate()
            reference.wait()


if __name__ == "__main__":
    main()
