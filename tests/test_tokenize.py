"""llama-server's /tokenize and /detokenize on both engines, and how the broker routes them."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time

import httpx
import pytest
import zmq

from conftest import wait_until
from infersnap import paths, wire
from infersnap.broker.broker import Broker
from infersnap.plan import ServePlan

TEXT = "Hello world, 媽 and emoji 🤗 <|im_start|>"  # split characters, and a special token written out
VOCAB = 49152  # SmolLM2's
STREAMED = {  # runs until stopped
    "messages": [{"role": "user", "content": "Write a long story."}],
    "max_tokens": 1500,
    "logit_bias": {"2": -100},
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
        wait_until(lambda: server.status()["waiting"] == 1, 5, "the extra request never waited in the broker")

        start = time.monotonic()
        ids = tokens(client, TEXT, with_pieces=True)
        content = client.post("/detokenize", json={"tokens": [p["id"] for p in ids]}).json()["content"]
        assert content == TEXT and time.monotonic() - start < 5
        assert server.status()["workers"][0]["running"] == slots  # the generations go on
    queued.join(30)  # closing the streams stopped them: the waiting request gets a slot
    assert not queued.is_alive()


# --- the broker's routing, without processes ----------------------------------


@pytest.fixture()
def broker(tmp_path, monkeypatch):
    """A Broker on its own sockets, whose messages are recorded instead of sent."""
    monkeypatch.setenv("INFERSNAP_DATA", str(tmp_path))
    runtime = paths.runtime_dir(create=True)
    plan = ServePlan(
        host="127.0.0.1", port=0, max_body_bytes=1 << 20, model_path="m.gguf", model_name="m",
        slots=1, context=512, max_waiting=4, request_timeout=0, verbose=False, workers=[],
    )
    instance = Broker(plan, zctx=zmq.Context())
    instance.sent = []
    monkeypatch.setattr(instance, "_send", lambda socket, identity, message: instance.sent.append((identity, message)))
    info = wire.WorkerInfo(worker_id="cpu", device="cpu", engine="cpu", model="m", slots=1, context=512,
                           state="ready", pid=1)
    instance._on_worker(b"cpu", wire.WorkerStatus(info=info))
    yield instance
    instance.clients.close()
    instance.workers_socket.close()
    instance.zctx.term()
    shutil.rmtree(runtime, ignore_errors=True)


def generate(request_id: str) -> wire.Generate:
    return wire.Generate(id=request_id, model="m", params=wire.SamplingParams(), prompt="x")


def test_a_lookup_takes_no_slot_and_skips_the_queue(broker):
    broker._on_client(b"app", generate("g1"))  # takes the one slot
    broker._on_client(b"app", generate("g2"))  # waits
    broker._on_client(b"app", wire.Tokenize(id="t1", model="M", content="x"))
    assert [(who, m.id) for who, m in broker.sent] == [(b"cpu", "g1"), (b"cpu", "t1")]
    status = broker.status("q")
    assert status.waiting == 1 and status.workers[0].running == 1 and "t1" in status.in_flight

    broker.sent.clear()
    answer = wire.TokenizeResult(id="t1", tokens=[7])
    broker._on_worker(b"cpu", answer)
    assert broker.sent == [(b"app", answer)] and "t1" not in broker.status("q").in_flight


def test_a_lookup_on_a_lost_worker_ends_with_503(broker):
    broker._on_client(b"app", wire.Detokenize(id="d1", model="m", tokens=[1]))
    broker.sent.clear()
    broker._on_client(b"supervisor", wire.WorkerExited(worker_id="cpu", code=-9))
    [(who, results)] = broker.sent
    assert who == b"app" and [(o.id, o.failure.status) for o in results.outputs] == [("d1", 503)]
    assert broker.status("q").in_flight == []


def test_a_lookup_for_an_unknown_model_or_an_aborted_one_gets_nothing_from_the_worker(broker):
    broker._on_client(b"app", wire.Tokenize(id="t1", model="other", content="x"))
    [(who, results)] = broker.sent
    assert who == b"app" and results.outputs[0].failure.code == "model_not_found"

    broker.sent.clear()
    broker._on_client(b"app", wire.Tokenize(id="t2", model="m", content="x"))
    broker._on_client(b"app", wire.Abort(ids=["t2"]))
    broker.sent.clear()
    broker._on_worker(b"cpu", wire.TokenizeResult(id="t2", tokens=[7]))  # late: dropped
    assert broker.sent == [] and broker.workers[b"cpu"].lookups == set()
