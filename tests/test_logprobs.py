"""logprobs and top_logprobs in OpenAI's shapes (chat and legacy completions), plain and streamed, on both engines.

llama.cpp gives the chosen token's logprob and the most likely tokens'; openvino-genai only the chosen
token's, so there top_logprobs (chat) or logprobs (completions) above 0 is a 400 naming the field.
"""

from __future__ import annotations

import openai
import pytest

from test_chat_api import stream_chunks
from test_errors import assert_error

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="any-placeholder")


@pytest.fixture()
def top(engine: str) -> int:
    """How many of the most likely tokens the engine can give."""
    return 0 if engine == "intel-cpu" else 3


def check_entry(entry, top: int) -> None:
    """One chat logprobs entry of a greedy answer (SDK object)."""
    assert entry.logprob <= 0
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert len(entry.top_logprobs) == top
    values = [c.logprob for c in entry.top_logprobs]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    if top:  # greedy picks the most likely token
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_chat_logprobs(client, model, top):
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, temperature=0, logprobs=True, top_logprobs=top
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(e.token for e in content) == choice.message.content
    for entry in content:
        check_entry(entry, top)


def test_chat_logprobs_streamed(http, top):
    body = {
        "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": top,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    usage = chunks[-1]["usage"]
    entries = []
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        mine = choice["logprobs"]["content"]
        # each chunk carries the tokens of its own text
        assert "".join(e["token"] for e in mine) == choice["delta"].get("content", "")
        entries += mine
    assert len(entries) == usage["completion_tokens"]
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == top for e in entries)
    plain = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert [e["token"] for e in entries] == [e["token"] for e in plain["choices"][0]["logprobs"]["content"]]


def test_chat_logprobs_with_the_sdk_stream(client, model):
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, stream=True
    )
    tokens, text = [], ""
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            tokens += [e.token for e in chunk.choices[0].logprobs.content]
    assert "".join(tokens) == text and len(tokens) == 8


def test_sampled_logprobs_are_of_the_chosen_tokens(client, model):
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7, logprobs=True
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in content)


def test_without_logprobs_the_field_is_null(http):
    chat = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}).json()
    assert chat["choices"][0]["logprobs"] is None
    text = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}).json()
    assert text["choices"][0]["logprobs"] is None
    off = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "logprobs": False}).json()
    assert off["choices"][0]["logprobs"] is None
    chunks = stream_chunks(http, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)


def test_completion_logprobs(client, model, engine):
    k = 0 if engine == "intel-cpu" else 2
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=k)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    n = reply.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert "".join(logprobs.tokens) == choice.text
    assert all(v <= 0 for v in logprobs.token_logprobs)
    assert logprobs.text_offset[0] == 0
    entries = zip(logprobs.tokens, logprobs.text_offset, logprobs.top_logprobs, logprobs.token_logprobs)
    for token, offset, top, value in entries:
        assert choice.text[offset:].startswith(token)
        assert len(top) == k
        if k:
            assert max(top, key=top.get) == token and top[token] == pytest.approx(value, abs=1e-4)


def test_completion_logprobs_streamed(http, engine):
    k = 0 if engine == "intel-cpu" else 1
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": k}
    chunks = stream_chunks(http, "/v1/completions", body)
    text, tokens, offsets = "", [], []
    for chunk in chunks:
        [choice] = chunk["choices"]
        logprobs = choice["logprobs"]
        assert "".join(logprobs["tokens"]) == choice["text"]
        assert all(len(top) == k for top in logprobs["top_logprobs"])
        text += choice["text"]
        tokens += logprobs["tokens"]
        offsets += logprobs["text_offset"]
    assert len(tokens) == 10 and "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_logprobs_under_a_json_schema(http):
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "logprobs": True,
            "response_format": {"type": "json_object"}}  # fmt: skip
    reply = http.post("/v1/chat/completions", json=body).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in content) == reply["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": -1}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
    ],
)
@pytest.mark.one_engine  # the frontend's refusal, whatever the runtime
def test_bad_logprobs_are_400(http, path, body, param):
    base = {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": PROMPT}
    assert_error(http.post(path, json={**base, "max_tokens": 2, **body}), 400, param)


def test_top_logprobs_on_openvino_are_refused(http, engine):
    if engine != "intel-cpu":
        pytest.skip("llama.cpp gives the most likely tokens")
    chat = {"messages": MESSAGES, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    error = assert_error(http.post("/v1/chat/completions", json=chat), 400, "top_logprobs")
    assert "OpenVINO" in error["message"]
    assert_error(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "logprobs": 1}), 400, "logprobs")
