"""Two runtimes serving one model on one CPU: a request that needs what only one of them can do always
reaches that one, however busy it is, so it is accepted or refused the same way whatever the load."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import served_by, start_server

MESSAGES = [{"role": "user", "content": "Name a colour."}]
LONG = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 1500,
        "logit_bias": {"0": -100, "2": -100, "1000": -1}, "stream": True}  # never stops early; -1 is no ban: llama.cpp only


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("mixed"),
                          **{"engines": "cpu,intel-cpu", "worker.slots": "1", "worker.embeddings": "false"})
    yield server
    assert server.stop() == 0, server.log.read_text()


def test_each_runtime_is_a_worker_of_its_own_with_what_it_can_do(mixed):
    workers = {w["id"]: w for w in mixed.status()["workers"]}
    assert set(workers) == {"cpu/cpu", "cpu/intel-cpu"}
    assert all(w["state"] == "ready" and w["device"] == "cpu" for w in workers.values())
    assert {"top_logprobs", "logit_bias"} <= set(workers["cpu/cpu"]["can"])
    assert "top_logprobs" not in workers["cpu/intel-cpu"].get("can", [])


def test_what_only_the_busy_runtime_can_do_waits_for_it_and_the_rest_goes_to_the_other(mixed):
    started, release = threading.Event(), threading.Event()

    def occupy() -> None:  # holds llama.cpp's one slot until told to let go
        with httpx.stream("POST", f"{mixed.url}/chat/completions", json=LONG, timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                if release.is_set():
                    return

    holder = threading.Thread(target=occupy)
    holder.start()
    try:
        assert started.wait(60), "the long request never started"
        workers = {w["id"]: w for w in mixed.status()["workers"]}
        assert workers["cpu/cpu"]["running"] == 1 and workers["cpu/intel-cpu"]["running"] == 0
        top = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        plain = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            waiting = [pool.submit(httpx.post, f"{mixed.url}/chat/completions", json=top, timeout=120) for _ in range(2)]
            # while those wait for llama.cpp, a plain request is answered by the idle OpenVINO worker
            answered = httpx.post(f"{mixed.url}/chat/completions", json=plain, timeout=60)
            assert answered.status_code == 200
            assert not any(f.done() for f in waiting), "a top_logprobs request did not wait for llama.cpp"
            release.set()
            replies = [f.result() for f in waiting]
        for reply in replies:
            assert reply.status_code == 200, reply.text
            assert all(len(t["top_logprobs"]) == 2 for t in reply.json()["choices"][0]["logprobs"]["content"])
        counts = served_by(mixed, "chat/completions")
        assert counts.get("cpu/cpu", 0) >= 2 and counts.get("cpu/intel-cpu", 0) >= 1, counts  # the long one: 499
    finally:
        release.set()
        holder.join(120)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "Hello", "max_tokens": 2, "logit_bias": {"1000": 100}}, None),
    ({"prompt": "The capital of France is", "max_tokens": 1, "echo": True, "logprobs": 1}, None),
    ({"prompt": "def add(a, b):", "suffix": "print(add(1, 2))", "max_tokens": 2}, "suffix"),  # no runtime: no FIM tokens
])
def test_a_capability_request_is_answered_the_same_way_every_time(mixed, body, param):
    statuses = set()
    for _ in range(4):
        reply = httpx.post(f"{mixed.url}/completions", json=body, timeout=60)
        statuses.add((reply.status_code, reply.json().get("error", {}).get("param")))
    assert statuses == {(200, None)} if param is None else statuses == {(400, param)}, statuses


def test_the_model_list_shows_one_model(mixed):
    assert len(json.loads(httpx.get(f"{mixed.url}/models").text)["data"]) == 1
