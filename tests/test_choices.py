"""n choices per request, and the completions API's echo and suffix, on both engines."""

from __future__ import annotations

import openai
import pytest

from test_chat_api import stream_chunks
from test_errors import assert_error

MESSAGES = [{"role": "user", "content": "Write a short sentence about the sea."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="any-placeholder")


def test_n_chat_choices_with_the_sdk(client, model, engine):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, n=3, max_tokens=12, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert all(texts) and len(set(texts)) > 1, texts  # each choice samples with its own seed
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    # the prompt counts once, the completions add up (12 at most each)
    single = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert 3 <= reply.usage.completion_tokens <= 36
    if engine == "cpu":  # llama.cpp reads a seeded prompt afresh; OpenVINO's choices share its prefix cache
        again = client.chat.completions.create(model=model, messages=MESSAGES, n=3, max_tokens=12, seed=7)
        assert [c.message.content for c in again.choices] == texts  # a seed repeats every choice


def test_n_greedy_choices_agree(client, model):
    reply = client.completions.create(model=model, prompt="The sea is", n=2, max_tokens=8, temperature=0)
    single = client.completions.create(model=model, prompt="The sea is", max_tokens=8, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text == single.choices[0].text != ""
    assert reply.usage.completion_tokens == 2 * single.usage.completion_tokens


def test_n_choices_streamed_interleave_by_index(http, engine):
    body = {"messages": MESSAGES, "n": 2, "max_tokens": 10, "seed": 3, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finished[choice["index"]] = choice["finish_reason"]
    assert set(finished) == {0, 1} and all(texts.values())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 2
    if engine == "cpu":
        plain = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
        assert [c["message"]["content"] for c in plain["choices"]] == [texts[0], texts[1]]  # same seeds, same text


def test_echo_puts_the_prompt_first(client, model, http):
    prompt = "Once upon a time"
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    streamed = stream_chunks(http, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in streamed) == echoed.choices[0].text
    assert streamed[0]["choices"][0]["text"].startswith(prompt)


def test_echo_with_logprobs_scores_the_prompt(client, model, http, engine):
    """What evaluation harnesses send to score a text: echo, logprobs and one token."""
    prompt = "The capital of France is Paris"
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 2}
    if engine == "intel-cpu":  # openvino-genai gives no logprobs for the prompt
        assert "OpenVINO" in assert_error(http.post("/v1/completions", json=body), 400, "echo")["message"]
        return
    reply = client.completions.create(model=model, **body)
    choice, usage = reply.choices[0], reply.usage
    lp = choice.logprobs
    assert len(lp.tokens) == usage.prompt_tokens + usage.completion_tokens
    assert "".join(lp.tokens) == choice.text and choice.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    # the prompt's own logprobs do not depend on streaming or on what the prefix cache holds
    streamed = stream_chunks(http, "/v1/completions", {**body, "stream": True})
    streamed_lp = [v for c in streamed if c["choices"] for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed_lp[0] is None
    assert streamed_lp[1 : usage.prompt_tokens] == pytest.approx(lp.token_logprobs[1 : usage.prompt_tokens], abs=1e-3)
    # a likely continuation scores higher than an unlikely one
    unlikely = client.completions.create(model=model, **{**body, "prompt": "The capital of France is Banana"})
    assert sum(lp.token_logprobs[1 : usage.prompt_tokens]) > sum(
        unlikely.choices[0].logprobs.token_logprobs[1 : unlikely.usage.prompt_tokens]
    )


def test_suffix_needs_a_model_with_fill_in_the_middle_tokens(http):
    """SmolLM2 has none; llama-cpp-python's server would ignore `suffix`, which hides that from the client."""
    body = {"prompt": "def add(a, b):\n    return", "suffix": "\n\nprint(add(1, 2))", "max_tokens": 4}
    error = assert_error(http.post("/v1/completions", json=body), 400, "suffix")
    assert "fill-in-the-middle" in error["message"]
    assert http.post("/v1/completions", json={**body, "suffix": ""}).status_code == 200  # empty: none


def test_several_prompts_get_choices_prompt_by_prompt(client, model):
    prompts = ["The sea is", "My favourite food is"]
    reply = client.completions.create(model=model, prompt=prompts, n=2, max_tokens=6, temperature=0, echo=True)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for i, choice in enumerate(reply.choices):
        alone = client.completions.create(model=model, prompt=prompts[i // 2], max_tokens=6, temperature=0)
        assert choice.text == prompts[i // 2] + alone.choices[0].text  # echo: each choice its own prompt
    singles = [client.completions.create(model=model, prompt=p, max_tokens=1) for p in prompts]
    assert reply.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)  # each prompt once
