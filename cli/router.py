"""The vllm-router command line that suits infersnap nodes (docs/cluster.md): `infersnap router`.

vllm-router (the vLLM project's load balancer) does the routing; this only fills in its flags so that
it sees a draining or dead node within a second or two, retries long enough to reach another node, and
polls each node's /get_load often enough for power_of_two to mean something.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

TESTED_VERSION = "0.1.17"  # the vllm-router release docs/cluster.md and tests/test_cluster.py were run with
POLICIES = ("consistent_hash", "cache_aware", "round_robin", "power_of_two")
HEALTH_INTERVAL_SECONDS = 1  # a node's queue.drain-linger (2 s by default) is twice this
# Retries of a failed attempt wait 100, 200, 400, 800, 1000 ms: 2.5 s, long enough for a health check to
# mark a draining or dead node down, after which the next attempt picks another node (a session's too).
RETRY_ATTEMPTS = 6


def command(nodes: list[str], policy: str = "consistent_hash", host: str = "127.0.0.1", port: int = 30000,
            prometheus_port: int = 29000, api_key: str | None = None, request_timeout: int = 1800) -> list[str]:
    """The vllm-router argv for these node URLs (http://host:port, no /v1)."""
    argv = [
        executable(), "--worker-urls", *[url.rstrip("/").removesuffix("/v1") for url in nodes],
        "--policy", policy, "--host", host, "--port", str(port),
        "--health-check-endpoint", "/health",
        "--health-check-interval-secs", str(HEALTH_INTERVAL_SECONDS),
        "--health-failure-threshold", "1", "--health-success-threshold", "1", "--health-check-timeout-secs", "2",
        # also how often power_of_two asks each node's /get_load, and how often a node down at start is tried
        "--worker-startup-check-interval", "1",
        "--retry-max-retries", str(RETRY_ATTEMPTS), "--retry-initial-backoff-ms", "100",
        "--retry-backoff-multiplier", "2", "--retry-max-backoff-ms", "1000",
        # the whole request, streamed answers included: past a node's own queue.request-timeout (600 s)
        "--request-timeout-secs", str(request_timeout),
        "--prometheus-host", host, "--prometheus-port", str(prometheus_port),
        "--log-level", "warning",  # at info it logs a line per request, with its session id
    ]
    if policy == "cache_aware":  # balance by load once nodes differ by 4 requests, not the default 64
        argv += ["--balance-abs-threshold", "4"]
    if api_key:  # what the router sends the nodes on the routes it passes through (messages, responses)
        argv += ["--api-key", api_key]
    return argv


def executable() -> str:
    """vllm-router beside this Python (a venv's bin, the snap's), else on PATH, else its bare name."""
    beside = Path(sys.executable).parent / "vllm-router"
    if beside.exists():
        return str(beside)
    return shutil.which("vllm-router") or "vllm-router"


def run(argv: list[str]) -> None:
    """Become the router (it keeps the terminal, and stops on Ctrl-C)."""
    os.execvp(argv[0], argv)
