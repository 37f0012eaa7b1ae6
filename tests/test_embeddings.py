"""POST /v1/embeddings, served by the embedding worker (the model in llama.cpp's embedding mode).

The embedding worker is llama.cpp's whichever runtime generates: its answers are checked on one shared
server (`one_engine`); what meets the generating lane (its status beside it, token ids from its tokenizer)
on both."""

from __future__ import annotations

import base64
import math
import os
import signal
import struct
import threading
import time

import httpx
import openai
import pytest

from conftest import KEYS, start_server, wait_until
from test_errors import assert_error
from test_metrics import scrape


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="any-placeholder")


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))  # the vectors have unit length


@pytest.mark.one_engine
def test_one_text_with_the_sdk(client, model):
    reply = client.embeddings.create(model=model, input="The cat sat on the mat.")
    assert reply.object == "list" and reply.model == model
    (item,) = reply.data
    assert item.index == 0 and item.object == "embedding"
    assert len(item.embedding) == 576  # SmolLM2-135M's hidden size
    assert math.sqrt(sum(x * x for x in item.embedding)) == pytest.approx(1.0, abs=1e-4)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 0


@pytest.mark.one_engine
def test_similar_texts_are_closer(client, model):
    texts = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue rose by eight percent."]
    reply = client.embeddings.create(model=model, input=texts)
    assert [d.index for d in reply.data] == [0, 1, 2]
    cat, kitten, revenue = (d.embedding for d in reply.data)
    assert cosine(cat, kitten) > cosine(cat, revenue)
    alone = client.embeddings.create(model=model, input=texts[2]).data[0].embedding
    assert cosine(alone, revenue) == pytest.approx(1.0, abs=1e-3)  # batching does not change a vector


def test_token_ids_embed_like_their_text(http, client, model):
    text = "Embeddings from token ids"
    tokens = http.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    from_text = client.embeddings.create(model=model, input=text).data[0].embedding
    from_ids = client.embeddings.create(model=model, input=tokens)
    assert from_ids.usage.prompt_tokens == len(tokens)
    assert cosine(from_ids.data[0].embedding, from_text) == pytest.approx(1.0, abs=1e-3)
    both = http.post("/v1/embeddings", json={"input": [tokens, tokens[:2]]}).json()
    assert len(both["data"]) == 2 and both["usage"]["prompt_tokens"] == len(tokens) + 2


@pytest.mark.one_engine
def test_base64_is_the_float32_bytes(http):
    body = {"input": "hello there"}
    floats = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    encoded = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert struct.unpack(f"<{len(raw) // 4}f", raw) == pytest.approx(floats, abs=1e-6)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": ["text", 3]}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": [10**9]}, "input"),  # beyond the vocabulary
        ({"input": 3}, "input"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 12}, "dimensions"),
        ({"input": "word " * 9000}, "input"),  # longer than the context (8192)
        ({"input": ["x"] * 2049}, "input"),
    ],
)
@pytest.mark.one_engine
def test_bad_input_is_400(http, body, param):
    assert_error(http.post("/v1/embeddings", json=body), 400, param)
    assert http.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


@pytest.mark.one_engine
def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/embeddings", json={"input": "x", "model": "nope"}), 404, "model", "model_not_found")


@pytest.mark.one_engine
def test_embeddings_are_counted_for_the_embedding_worker(http):
    def counted() -> tuple[float, float]:
        samples = scrape(http)
        return (samples.get('infersnap_requests_total{endpoint="embeddings",worker="embed",status="200"}', 0.0),
                samples.get('infersnap_prompt_tokens_total{worker="embed"}', 0.0))
    before = counted()
    usage = http.post("/v1/embeddings", json={"input": ["one", "two words"]}).json()["usage"]
    after = counted()
    assert after[0] == before[0] + 1 and after[1] == before[1] + usage["prompt_tokens"]


def test_status_shows_the_embedding_worker(server):
    workers = {w["id"]: w for w in server.status()["workers"]}
    assert workers["embed"]["task"] == "embed" and workers["embed"]["state"] == "ready"
    assert workers["embed"]["engine"].startswith("cpu")  # llama.cpp, whichever engine generates
    assert workers["cpu"]["task"] == "generate"


def test_embeddings_can_be_switched_off(keyed_server):
    # the keyed server runs with worker.embeddings=false (conftest.KEYED)
    key = {"Authorization": f"Bearer {KEYS[0]}"}
    error = assert_error(httpx.post(f"{keyed_server.url}/embeddings", json={"input": "x"}, headers=key), 501,
                         code="not_supported")
    assert "worker.embeddings" in error["message"]
    assert {w["task"] for w in keyed_server.status()["workers"]} == {"generate"}  # its other models may be loaded


def test_a_long_embedding_ends_with_504_and_the_worker_goes_on_even_when_it_dies(tmp_path):
    """Every accepted request ends: past queue.request-timeout with a 504 (the worker stops it between
    two batches, so the next request is answered soon), also when its worker dies: an embedding has no
    output before its last, so it is retried once on the restarted worker, where its timeout ends it."""
    server = start_server(tmp_path, **{"engines": "cpu", "queue.request-timeout": "2"})
    long_input = {"input": [f"sentence {i}: the quick brown fox jumps over the lazy dog" for i in range(1024)]}
    try:
        started = time.monotonic()
        assert_error(httpx.post(f"{server.url}/embeddings", json=long_input, timeout=30), 504, code="timeout")
        assert time.monotonic() - started < 6
        started = time.monotonic()
        assert httpx.post(f"{server.url}/embeddings", json={"input": "short"}, timeout=30).status_code == 200
        assert time.monotonic() - started < 8, "the timed-out embedding kept the worker busy"

        workers = {w["id"]: w for w in server.status()["workers"]}
        replies: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: replies.append(httpx.post(f"{server.url}/embeddings", json=long_input, timeout=30))
        )
        sender.start()
        wait_until(lambda: server.status()["workers"][-1]["running"] == 1, 5, "the embedding never started")
        os.kill(workers["embed"]["pid"], signal.SIGKILL)
        sender.join(10)
        assert not sender.is_alive(), "the embedding whose worker died hangs"
        assert_error(replies[0], 504, code="timeout")
        assert "had no output when worker embed stopped: retried once" in server.log.read_text()
        wait_until(lambda: server.status()["workers"][-1]["state"] == "ready", 30, "the embedding worker stayed down")
        assert server.status()["workers"][-1]["restarts"] == 1
        assert httpx.post(f"{server.url}/embeddings", json={"input": "back"}, timeout=30).status_code == 200
    finally:
        assert server.stop() == 0, server.log.read_text()
