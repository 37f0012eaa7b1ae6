"""Every bad input gets an OpenAI-shaped error with the right status, and the server keeps serving."""

from __future__ import annotations

import pytest

GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(reply, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 2}, None),  # no messages
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role"),
        ({"messages": [{"content": "Hi"}]}, None),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({**GOOD, "max_tokens": "ten"}, "max_tokens"),
        ({**GOOD, "max_tokens": 0}, "max_tokens"),
        ({**GOOD, "max_tokens": -5}, "max_tokens"),
        ({**GOOD, "temperature": 7}, "temperature"),
        ({**GOOD, "top_p": 1.5}, "top_p"),
        ({**GOOD, "presence_penalty": -3}, "presence_penalty"),
        ({**GOOD, "n": 3}, "n"),
        ({**GOOD, "stop": 5}, "stop"),
        ({**GOOD, "logit_bias": {"token": 1}}, "logit_bias"),
        ({**GOOD, "logit_bias": {"10": 500}}, None),
        ({**GOOD, "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ],
)
def test_invalid_chat_bodies_are_400(http, body, param):
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"messages": [', b"not json", b"[1, 2]", b"\xff\xfe{}"])
def test_malformed_json_is_400(http, raw):
    assert_error(http.post("/v1/chat/completions", content=raw), 400)


def test_invalid_completion_body_is_400(http):
    assert_error(http.post("/v1/completions", json={"max_tokens": 3}), 400)
    assert_error(http.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")


def test_context_length_exceeded(http):
    long_prompt = "hello " * 5000
    error = assert_error(http.post("/v1/completions", json={"prompt": long_prompt}), 400, code="context_length_exceeded")
    assert "maximum context length" in error["message"]
    too_many = {**GOOD, "max_tokens": 100_000}
    assert_error(http.post("/v1/chat/completions", json=too_many), 400, code="context_length_exceeded")


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/chat/completions", json={**GOOD, "model": "gpt-17"}), 404, "model", "model_not_found")
    assert_error(http.get("/v1/models/gpt-17"), 404, code="model_not_found")


def test_unknown_route_is_404_and_wrong_method_405(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)
    assert_error(http.delete("/v1/models"), 405)


def test_body_over_the_limit_is_413(http):
    huge = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    assert_error(http.post("/v1/completions", content=huge), 413)


def test_server_keeps_serving_after_errors(http):
    for _ in range(3):
        http.post("/v1/chat/completions", content=b"{")
        http.post("/v1/chat/completions", json={**GOOD, "model": "nope"})
    reply = http.post("/v1/chat/completions", json=GOOD)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
