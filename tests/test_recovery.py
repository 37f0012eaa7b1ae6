"""No accepted request waits forever, even when a process behind the frontend dies."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import httpx
import pytest

from conftest import child_pid, start_server, wait_until
from infersnap.hwdetect import detect

LONG = {
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 1500,
    "logit_bias": {"0": -100, "2": -100},  # never stop early
}


def test_a_request_caught_in_a_broker_crash_ends_with_an_error_and_service_resumes(tmp_path):
    """The restarted broker knows no routes: the worker's heartbeat lists the old request, the broker
    aborts it there, so the one slot is free for the next request at once (not after 1500 tokens)."""
    server = start_server(tmp_path, **{"worker.slots": "1", "worker.embeddings": "false", "engines": "cpu"})
    try:
        replies: list[httpx.Response] = []
        caller = threading.Thread(
            target=lambda: replies.append(httpx.post(f"{server.url}/chat/completions", json=LONG, timeout=60))
        )
        caller.start()
        wait_until(lambda: server.status()["workers"][0]["running"] > 0, 10, "the request never started")
        killed_at = time.monotonic()
        os.kill(child_pid(server, "infersnap.broker"), signal.SIGKILL)
        caller.join(30)
        assert not caller.is_alive(), "the request hangs"
        assert time.monotonic() - killed_at < 12
        [reply] = replies
        assert reply.status_code == 503 and reply.json()["error"]["message"]

        wait_until(
            lambda: httpx.get(f"{server.base}/health", timeout=5).status_code == 200,
            20,
            "service did not resume after the broker restarted",
        )
        restarted_at = time.monotonic()
        again = httpx.post(f"{server.url}/chat/completions", json={**LONG, "max_tokens": 5}, timeout=30)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5
        assert time.monotonic() - restarted_at < 2, "the old request kept the worker's slot"
    finally:
        assert server.stop(signal.SIGTERM) == 0


# A model no worker can load (every worker failed and reported, requests 503): test_lanes.py, on both lanes.


# `infersnap serve` as it is, with one more worker in its plan: OpenVINO on an Intel GPU this machine lacks.
SERVE_WITH_A_MISSING_GPU = """
import sys, msgspec
from infersnap.cli.engines import detect
from infersnap.cli.supervisor import Supervisor
from infersnap.planning import build_plan
from infersnap.config import Config
from infersnap.plan import WorkerSpec
plan = build_plan(Config(), detect("/"))
gpu = WorkerSpec("GPU.0", "GPU.0", "intel-gpu", "openvino", [0], 1, slots=4, model=plan.default_model.name)
sys.exit(Supervisor(msgspec.structs.replace(plan, workers=[*plan.workers, gpu])).run())
"""


def test_a_device_that_fails_to_load_is_reported_and_the_others_go_on_serving(tmp_path):
    if any(a.vendor == "intel" and a.kind == "gpu" for a in detect().accelerators):
        pytest.skip("this machine has an Intel GPU, which would load")
    server = start_server(tmp_path, command=[sys.executable, "-c", SERVE_WITH_A_MISSING_GPU])
    try:
        workers = {w["id"]: w for w in server.status()["workers"]}
        assert workers["GPU.0"]["state"] == "failed" and "GPU.0" in workers["GPU.0"]["error"]
        cpu = [w for w in workers.values() if w["device"] == "cpu"]  # one lane or two, by the profiles
        assert workers["GPU.0"]["engine"] == "intel-gpu" and cpu and all(w["state"] == "ready" for w in cpu)
        assert "worker GPU.0 failed" in server.log.read_text()
        assert httpx.get(f"{server.base}/health").status_code == 200
        for _ in range(3):
            chat = httpx.post(f"{server.url}/chat/completions", json={**LONG, "max_tokens": 3}, timeout=30)
            assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3
    finally:
        assert server.stop() == 0


def stream_events(url: str, body: dict, events: list[str], started: threading.Event) -> None:
    """Stream a chat completion, appending each `data:` line to `events` as it arrives."""
    with httpx.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}, timeout=60) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                started.set()


def test_a_killed_worker_is_noticed_at_once_what_it_ran_ends_with_an_error_what_waited_is_served(tmp_path):
    server = start_server(tmp_path, **{"worker.slots": "1", "engines": "cpu"})  # one worker, named cpu
    try:
        running: list[str] = []
        started = threading.Event()
        streamer = threading.Thread(target=stream_events, args=(server.url, LONG, running, started))
        streamer.start()
        assert started.wait(20), "the first request never started"
        waited: list[httpx.Response] = []  # queued behind it: the worker never saw it
        queued = threading.Thread(
            target=lambda: waited.append(
                httpx.post(f"{server.url}/chat/completions", json={**LONG, "max_tokens": 5}, timeout=60)
            )
        )
        queued.start()
        wait_until(lambda: server.status()["queued"] == 1, 5, "the second request is not waiting in the broker")

        killed_at = time.monotonic()
        os.kill(child_pid(server, "infersnap.workers"), signal.SIGKILL)
        streamer.join(10)
        detected = time.monotonic() - killed_at
        assert not streamer.is_alive(), "the running request hangs"
        assert detected < 2.0, f"the dead worker was noticed after {detected:.2f}s"
        # it had streamed output: it ends with an error naming the crash (not retried, nor "please retry")
        assert '"error"' in running[-2] and "stopped" in running[-2] and running[-1] == "data: [DONE]"
        assert "killed by SIGKILL" in running[-2] and "retry" not in running[-2]

        queued.join(60)  # served once the worker is back
        [reply] = waited
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
        worker = server.status()["workers"][0]
        assert worker["id"] == "cpu" and worker["state"] == "ready" and worker["restarts"] == 1
        assert "of the 1 requests it was running, 0 with no output yet are retried" in server.log.read_text()
    finally:
        assert server.stop() == 0


def test_sigterm_lets_running_requests_finish_refuses_new_ones_and_exits_0(tmp_path):
    server = start_server(tmp_path, **{"worker.slots": "2", "engines": "cpu"})
    events: list[str] = []
    started = threading.Event()
    body = {**LONG, "max_tokens": 150, "stream_options": {"include_usage": True}}
    streamer = threading.Thread(target=stream_events, args=(server.url, body, events, started))
    streamer.start()
    assert started.wait(20), "the request never started"
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: server.status().get("draining"), 5, "the server did not start draining")
    refused = httpx.post(f"{server.url}/chat/completions", json={**LONG, "max_tokens": 3}, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{server.base}/health").status_code == 503
    streamer.join(60)
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in events[-3]
    assert '"completion_tokens":150' in events[-2]
    assert server.process.wait(15) == 0


def test_past_the_drain_timeout_running_requests_end_with_an_error_and_the_server_exits_0(tmp_path):
    server = start_server(tmp_path, **{"worker.slots": "1", "queue.drain-timeout": "1", "engines": "cpu"})
    events: list[str] = []
    started = threading.Event()
    streamer = threading.Thread(target=stream_events, args=(server.url, LONG, events, started))
    streamer.start()
    assert started.wait(20), "the request never started"
    stopped_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    streamer.join(10)
    assert not streamer.is_alive() and '"shutting_down"' in events[-2] and events[-1] == "data: [DONE]"
    assert server.process.wait(15) == 0
    assert time.monotonic() - stopped_at < 6


@pytest.mark.one_engine  # the supervisor restarts the frontend whatever the runtime: the shared server's
def test_a_killed_frontend_is_restarted_and_serves_again(server):
    killed = child_pid(server, "infersnap.frontend")
    os.kill(killed, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return child_pid(server, "infersnap.frontend") != killed
        except AssertionError:  # between the kill and the restart
            return False

    wait_until(restarted, 10, "the frontend was not restarted")

    def answers() -> bool:
        try:
            return httpx.get(f"{server.base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, 20, "the restarted frontend does not answer")
    chat = httpx.post(f"{server.url}/chat/completions", json={**LONG, "max_tokens": 3}, timeout=30)
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3
    assert "the frontend process exited with code -9" in server.log.read_text()
