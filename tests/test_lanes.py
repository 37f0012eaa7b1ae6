"""Two lanes on one CPU (llama.cpp and OpenVINO), routed by their profiles: which lane serves is asserted
from /metrics, never from timing. The profiles are written here, with figures that make each lane win
somewhere whatever this machine measures, so the routing under test is the broker's, not the machine's."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import cli, data_env, second_model, served_by, start_server, wait_until
from infersnap import profiles
from infersnap.models import default_model_path
from infersnap.profiles import Level, Profile, PromptRead, Speed

LLAMA, OPENVINO = "cpu/cpu", "cpu/intel-cpu"
# llama.cpp ends a lone request first; OpenVINO serves many at once faster and reads prompts 4x as fast
SPEEDS = {
    "cpu": Speed(levels=[Level(1, 100.0, 0.1), Level(8, 110.0, 0.8)], prompts=[PromptRead(128, 1.0), PromptRead(1024, 8.0)]),
    "intel-cpu": Speed(levels=[Level(1, 50.0, 0.1), Level(8, 400.0, 0.3)],
                       prompts=[PromptRead(128, 0.25), PromptRead(1024, 2.0)]),
}
SETTINGS = {"engines": "cpu,intel-cpu", "worker.slots": "8", "worker.embeddings": "false"}


def write_profiles(data: Path) -> None:
    """Profiles for both lanes, under the keys `serve` looks them up by in this data folder."""
    from infersnap import planning
    from infersnap.cli.engines import detect
    from infersnap.config import Config

    cli(data_env(data), "set", *(f"{k}={v}" for k, v in SETTINGS.items()))
    old = os.environ.get("INFERSNAP_DATA")
    os.environ["INFERSNAP_DATA"] = str(data)
    try:
        machine = detect("/")
        for subject in planning.candidates(Config(), machine):
            profiles.save(Profile(engine=subject.engine, device=subject.device, key=profiles.key(subject, machine),
                                  measured_at="2026-12-01T00:00:00Z", threads=subject.threads,
                                  context=subject.context, speed=SPEEDS[subject.engine]))
    finally:
        if old is None:
            del os.environ["INFERSNAP_DATA"]
        else:
            os.environ["INFERSNAP_DATA"] = old


@pytest.fixture(scope="module")
def lanes(tmp_path_factory):
    data = tmp_path_factory.mktemp("lanes")
    write_profiles(data)
    server = start_server(data, session_profiles_too=False, **SETTINGS)
    yield server
    assert server.stop() == 0, server.log.read_text()


def ask(server, content: str = "Name a colour.", max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{server.url}/chat/completions", json=body, timeout=120)


def newly_served(server, action) -> dict[str, int]:
    before = served_by(server, "chat/completions")
    action()
    after = served_by(server, "chat/completions")
    return {w: n - before.get(w, 0) for w, n in after.items() if n - before.get(w, 0)}


def test_status_shows_both_lanes_with_their_measured_figures(lanes):
    workers = {w["id"]: w for w in lanes.status()["workers"]}
    assert set(workers) == {LLAMA, OPENVINO}
    assert workers[LLAMA]["tok/s"] == {1: 100.0, 8: 110.0} and workers[OPENVINO]["tok/s"] == {1: 50.0, 8: 400.0}


def test_a_lone_request_goes_to_the_lane_fastest_for_one(lanes):
    assert newly_served(lanes, lambda: [ask(lanes).raise_for_status() for _ in range(3)]) == {LLAMA: 3}


def test_a_lone_long_prompt_goes_to_the_lane_that_reads_prompts_fastest(lanes):
    long = " ".join(f"word{i}" for i in range(500))  # ~900 tokens guessed from its characters
    assert newly_served(lanes, lambda: ask(lanes, f"Summarise: {long}", max_tokens=4).raise_for_status()) == {OPENVINO: 1}


# How a burst and a seeded request are routed is the broker's policy, tested in test_broker.py with the same
# figures (test_a_burst_on_idle_lanes_is_gathered_and_goes_to_the_lane_for_many, test_a_burst_hands_the_cores_over_...,
# test_a_seeded_request_always_goes_to_the_same_lane); here, that a served request is routed by the profiles serve read.


def test_killing_one_lane_leaves_the_other_serving(lanes):
    workers = {w["id"]: w for w in lanes.status()["workers"]}
    os.kill(workers[OPENVINO]["pid"], signal.SIGKILL)
    state = lambda: {w["id"]: w for w in lanes.status()["workers"]}[OPENVINO]["state"]  # noqa: E731
    wait_until(lambda: state() != "ready", 10, "the broker never heard that the lane died")
    long = " ".join(f"word{i}" for i in range(500))
    # the long prompt would go to OpenVINO: while it restarts, llama.cpp serves it
    reply = ask(lanes, f"Summarise: {long}", max_tokens=4)
    assert reply.status_code == 200, reply.text
    wait_until(lambda: state() == "ready", 120, "the killed lane did not come back")


def test_a_lane_that_cannot_load_is_reported_and_the_other_serves(tmp_path):
    # OpenVINO 2026.4 cannot read Gemma 3's Q4_K_M tensors; llama.cpp serves the model
    server = start_server(tmp_path, **{**SETTINGS, "engines-measure": "false", "model.path": str(second_model())})
    try:
        workers = {w["id"]: w for w in server.status()["workers"]}
        assert workers[OPENVINO]["state"] == "failed" and workers[OPENVINO]["error"], workers
        assert workers[LLAMA]["state"] == "ready", workers
        for _ in range(3):  # long prompts, which would go to OpenVINO: they have one lane to go to
            body = {"prompt": "Summarise: " + "word " * 300, "max_tokens": 4, "temperature": 0}
            reply = httpx.post(f"{server.url}/completions", json=body, timeout=120)  # this GGUF has no chat template
            assert reply.status_code == 200, reply.text
        assert served_by(server, "completions") == {LLAMA: 3}
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_a_model_no_lane_can_load_is_failed_on_both_not_retried_and_serve_keeps_serving(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_path().read_bytes()[:200_000])  # a truncated copy of the real model
    # llama.cpp refuses the file; OpenVINO either refuses it or its process dies reading it (SIGSEGV on
    # some machines): either way the lane is failed and not started again. The embedding worker (llama.cpp)
    # cannot load it either: every worker is failed, is reported, and requests get 503.
    server = start_server(tmp_path / "data", **{**SETTINGS, "engines-measure": "false", "model.path": str(broken),
                                                "worker.embeddings": "true"})
    try:
        assert "failed" in server.log.read_text()
        workers = {w["id"]: w for w in server.status()["workers"]}
        assert {w["state"] for w in workers.values()} == {"failed"} and "embed" in workers, workers
        assert all(w["error"] for w in workers.values()) and "broken.gguf" in workers[LLAMA]["error"], workers
        reply = ask(server)
        assert reply.status_code == 503 and "no worker could load this model" in reply.json()["error"]["message"]
        time.sleep(3)  # were it restarted, it would be back by now
        again = {w["id"]: w for w in server.status()["workers"]}[OPENVINO]
        assert again["state"] == "failed" and again.get("restarts", 0) == 0, again
        health = httpx.get(f"{server.base}/health", timeout=10)
        assert health.status_code == 503 and health.headers["retry-after"]
    finally:
        assert server.stop() == 0, server.log.read_text()


def worker_pids(data: Path, worker_id: str) -> list[int]:
    """The processes of `infersnap serve` for this data folder that run the worker `worker_id`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"infersnap.workers" in argv and worker_id.encode() in argv and f"INFERSNAP_DATA={data}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_a_lane_whose_process_dies_while_loading_is_failed_not_restarted_and_the_other_serves(tmp_path):
    # What the OOM killer does to a worker loading a model too big for the machine: the process is gone
    # before it ever said it was ready. It would die the same way again, so it is not restarted.
    data = tmp_path / "data"
    killed: list[int] = []

    def kill_openvino_while_it_loads() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in worker_pids(data, OPENVINO):  # seconds before it can be ready: importing OpenVINO alone
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_openvino_while_it_loads)
        server = start_server(data, **{**SETTINGS, "engines-measure": "false"})
        killer.result()
    try:
        assert killed, "the OpenVINO worker never started"
        workers = {w["id"]: w for w in server.status()["workers"]}
        assert workers[OPENVINO]["state"] == "failed", workers
        assert "killed by SIGKILL while loading the model; it is not restarted" in workers[OPENVINO]["error"], workers
        assert workers[LLAMA]["state"] == "ready", workers
        long = " ".join(f"word{i}" for i in range(500))
        for _ in range(2):  # a long prompt, which would go to OpenVINO, has one lane to go to
            reply = ask(server, f"Summarise: {long}", max_tokens=4)
            assert reply.status_code == 200, reply.text
        assert served_by(server, "chat/completions") == {LLAMA: 2}
        time.sleep(3)  # were it restarted, it would be back by now
        again = {w["id"]: w for w in server.status()["workers"]}[OPENVINO]
        assert again["state"] == "failed" and again.get("restarts", 0) == 0 and not worker_pids(data, OPENVINO), again
    finally:
        assert server.stop() == 0, server.log.read_text()