"""llama-server's /tokenize and /detokenize on both engines."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest

from conftest import wait_until

TEXT = "Hello world, 媽 and emoji 🤗 <|im_start|>"  # split characters, and a special token written out
VOCAB = 49152  # SmolLM2's
STREAMED = {  # runs until stopped
    "messages": [{"role": "user", "content": "Write a long story."}],
    "max_tokens": 1500,
    "logit_bias": {"0": -100, "2": -100},
    "stream": True,
}


def tokens(http: httpx.Client, content: str, **options) -> list:
    reply = http.post("/tokenize", json={"content": content, **options})
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def piece_bytes(piece: str | list[int]) -> bytes:
    return piece.encode() if isinstance(piece, str) else bytes(piece)


def assert_error(reply: httpx.Response, status: int, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


def test_tokenize_then_detokenize_gives_the_text_back(http):
    ids = tokens(http, TEXT)
    assert len(ids) > 10 and all(isinstance(t, int) for t in ids)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"content": TEXT}
    assert tokens(http, "") == [] and http.post("/detokenize", json={"tokens": []}).json() == {"content": ""}


def test_pieces_concatenate_to_the_text(http):
    pieces = tokens(http, TEXT, with_pieces=True)
    assert [p["id"] for p in pieces] == tokens(http, TEXT)
    assert all(set(p) == {"id", "piece"} for p in pieces)
    assert b"".join(piece_bytes(p["piece"]) for p in pieces) == TEXT.encode()
    # a token holding part of a character comes as its bytes, as llama-server sends it
    assert any(isinstance(p["piece"], list) for p in pieces)
    # a special token written in the text is one token, shown as its text
    assert pieces[-1]["piece"] == "<|im_start|>"


def test_add_special_follows_the_model(http):
    # SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false, and both engines follow it: add_special
    # adds nothing. Its BOS token (<|im_start|>, id 1) is one token when written in the text.
    assert tokens(http, TEXT, add_special=True) == tokens(http, TEXT)
    assert tokens(http, "<|im_start|>") == [1]


@pytest.mark.parametrize("prompt", ["The capital of France is", TEXT])
def test_token_counts_agree_with_prompt_usage(http, prompt):
    usage = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()["usage"]
    assert len(tokens(http, prompt, add_special=True)) == usage["prompt_tokens"]


def test_the_model_may_be_named(http, model):
    assert tokens(http, "Hi", model=model) == tokens(http, "Hi")
    assert http.post("/detokenize", json={"tokens": [19556], "model": model.upper()}).json() == {"content": "Hello"}
    error = assert_error(http.post("/tokenize", json={"content": "Hi", "model": "nope"}), 404, "model")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, None),  # no content
        ("/tokenize", {"content": 5}, "content"),
        ("/tokenize", {"content": "a", "with_pieces": "yes"}, "with_pieces"),
        ("/tokenize", {"content": "a", "add_special": 1}, "add_special"),
        ("/tokenize", b"content=a", None),
        ("/detokenize", {}, None),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
        ("/detokenize", {"tokens": [1, 2**40]}, "tokens[1]"),
        ("/detokenize", {"tokens": [1.5]}, "tokens[0]"),
        ("/detokenize", {"tokens": [[1]]}, "tokens[0]"),
    ],
)
@pytest.mark.one_engine  # the frontend's refusal, whatever the runtime
def test_bad_bodies_get_400(http, path, body, param):
    reply = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert_error(reply, 400, param)


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 1, 2**31 - 1])
def test_ids_outside_the_vocabulary_get_400(http, bad):
    error = assert_error(http.post("/detokenize", json={"tokens": [1, bad]}), 400, "tokens")
    assert str(bad) in error["message"] and str(VOCAB - 1) in error["message"]
    # the worker is unharmed
    assert http.post("/detokenize", json={"tokens": [VOCAB - 1]}).status_code == 200
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_lookups_answer_while_every_slot_generates(server):
    """Every slot busy and a request waiting in the broker: a lookup needs no slot and skips the queue."""
    slots = server.status()["workers"][0]["slots"]
    with httpx.Client(base_url=server.base, timeout=60) as client, contextlib.ExitStack() as streams:
        readers = []  # kept: a line iterator that is dropped closes its stream
        for _ in range(slots):
            response = streams.enter_context(client.stream("POST", "/v1/chat/completions", json=STREAMED))
            readers.append(response.iter_lines())
            next(line for line in readers[-1] if line.startswith("data: {"))
        quick = {"prompt": "Hi", "max_tokens": 1}
        queued = threading.Thread(target=httpx.post, args=(f"{server.url}/completions",), kwargs={"json": quick, "timeout": 60})
        queued.start()
        wait_until(lambda: server.status()["queued"] == 1, 5, "the extra request never waited in the broker")

        start = time.monotonic()
        ids = tokens(client, TEXT, with_pieces=True)
        content = client.post("/detokenize", json={"tokens": [p["id"] for p in ids]}).json()["content"]
        assert content == TEXT and time.monotonic() - start < 5
        assert server.status()["workers"][0]["running"] == slots  # the generations go on
    queued.join(30)  # closing the streams stopped them: the waiting request gets a slot
    assert not queued.is_alive()
