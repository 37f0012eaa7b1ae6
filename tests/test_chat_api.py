"""The served path end to end: the real server, the real model, the openai SDK and raw httpx; on both runtimes,
but for what the frontend answers alone (`one_engine`)."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import openai
import pytest

from conftest import wait_until

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="any-placeholder")


def stream_chunks(http, path: str, body: dict) -> list[dict]:
    """POST with stream=true; return the decoded events, checking the SSE framing and [DONE]."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


@pytest.mark.one_engine  # the frontend's listing
def test_models_lists_the_default_model(http, model):
    listing = http.get("/v1/models").json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert card["object"] == "model" and card["id"] == model and "SmolLM2" in model
    assert isinstance(card["created"], int) and card["owned_by"]
    assert http.get(f"/v1/models/{model}").json()["id"] == model


@pytest.mark.one_engine
def test_health_is_ok_when_a_worker_is_ready(http):
    reply = http.get("/health")
    assert reply.status_code == 200


def test_chat_completion_with_the_sdk(client, model):
    reply = client.chat.completions.create(model=model, messages=STORY, max_tokens=24)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert isinstance(reply.created, int) and reply.model == model
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 5 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_timings_like_llama_server(http):
    body = http.post("/v1/chat/completions", json={"messages": STORY, "max_tokens": 8}).json()
    timings = body["timings"]
    assert set(timings) == {
        "prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"
    }
    assert timings["predicted_n"] == body["usage"]["completion_tokens"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_is_honoured_exactly(http, field):
    body = http.post("/v1/chat/completions", json={"messages": STORY, field: 7, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"


def test_text_completion(client, model):
    reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6


def test_streamed_chat_matches_the_plain_answer(http):
    body = {"messages": STORY, "max_tokens": 20, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=body).json()
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]


def test_stream_usage_comes_last_when_asked(http):
    body = {"messages": STORY, "max_tokens": 9, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 9
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 9
    assert all("usage" not in c or c["usage"] is None for c in chunks[:-1])


def test_streamed_text_completion(http):
    chunks = stream_chunks(http, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5})
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks)


def test_sdk_streaming_sync_and_async(client, server, model):
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=model, messages=STORY, max_tokens=10, stream=True)
        if c.choices
    ]
    assert "".join(pieces)

    async def many() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="sk-whatever") as aclient:
            replies = await asyncio.gather(
                *(aclient.chat.completions.create(model=model, messages=STORY, max_tokens=12) for _ in range(4))
            )
        return [r.choices[0].message.content for r in replies]

    assert all(asyncio.run(many()))


def test_same_seed_same_text(http):
    body = {"messages": STORY, "max_tokens": 24, "temperature": 1.0, "seed": 1234}
    first = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    second = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert first == second


def test_stop_text_never_reaches_the_client(http):
    body = {"messages": STORY, "max_tokens": 40, "temperature": 0}
    full = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    words = full.split()
    stop = " ".join(words[4:6])  # two words from the middle of the answer
    assert stop and stop in full
    expected = full[: full.index(stop)]
    stopped = http.post("/v1/chat/completions", json={**body, "stop": [stop, "zzzz"]}).json()
    assert stopped["choices"][0]["message"]["content"] == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"
    chunks = stream_chunks(http, "/v1/chat/completions", {**body, "stop": stop})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_logit_bias_forces_a_token(http, engine):
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logit_bias": {"1000": 100}}
    response = http.post("/v1/completions", json=body)
    if engine == "intel-cpu":  # openvino-genai has no per-token bias, only bans: refused, in words
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "logit_bias", error
        assert "not supported by the OpenVINO engine" in error["message"]
        return
    text = response.json()["choices"][0]["text"]
    piece = text[: len(text) // 4]
    assert piece and text == piece * 4


def test_frequency_penalty_changes_a_repetitive_answer(http):
    body = {"prompt": "one one one one one one", "max_tokens": 12, "temperature": 0}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    penalised = http.post("/v1/completions", json={**body, "frequency_penalty": 2.0, "presence_penalty": 2.0}).json()
    assert penalised["choices"][0]["text"] != plain


def test_every_turn_counts_in_the_prompt(http):
    def prompt_tokens(messages: list[dict]) -> int:
        reply = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
        return reply["usage"]["prompt_tokens"]

    system = {"role": "system", "content": "Be brief."}
    base = prompt_tokens([system, *STORY])
    history = [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]
    assert prompt_tokens([*history, *STORY]) > base + 5
    assert prompt_tokens([{"role": "system", "content": "Be brief. " * 10}, *STORY]) > base + 20


@pytest.mark.one_engine  # the frontend joins the parts
def test_content_parts_are_accepted(http):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]
    assert http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3}).status_code == 200


@pytest.mark.one_engine
def test_curl_as_in_the_guide(server, model):
    listing = subprocess.run(["curl", "-s", f"{server.url}/models"], capture_output=True, text=True, check=True)
    assert json.loads(listing.stdout)["data"][0]["id"] == model
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
    chat = subprocess.run(
        ["curl", "-s", f"{server.url}/chat/completions", "-d", body], capture_output=True, text=True, check=True
    )
    assert json.loads(chat.stdout)["choices"][0]["message"]["content"]


def test_a_client_that_goes_away_stops_its_generation(server):
    body = {"messages": STORY, "max_tokens": 1500, "stream": True, "temperature": 1.0, "logit_bias": {"0": -100, "2": -100}}
    with httpx.Client(base_url=server.base, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            # the broker learns a worker's load from its heartbeats (every 0.25 s)
            wait_until(lambda: server.status()["workers"][0]["running"] == 1, 3, "the generation never showed as running")
        # leaving the block closes the connection mid-stream

    def idle() -> bool:
        worker = server.status()["workers"][0]
        return worker["running"] == 0 and worker["waiting"] == 0

    wait_until(idle, 5, "the abandoned generation is still running")
