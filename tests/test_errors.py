"""Every bad input gets an OpenAI-shaped error with the right status, and the server keeps serving.

The frontend checks and refuses these whatever the runtime (the engines' own refusals of a prompt past the
context are tested on both in test_context): llama.cpp's server is enough."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.one_engine

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
        ({**GOOD, "n": 9}, "n"),
        ({**GOOD, "n": 0}, "n"),
        ({"messages": None}, "messages"),
        ({"messages": [None]}, "messages[0]"),
        ({"messages": [{"role": None, "content": "Hi"}]}, "messages[0].role"),
        ({**GOOD, "max_tokens": 10**30}, "max_tokens"),
        ({**GOOD, "max_tokens": 1.5}, "max_tokens"),
        ({**GOOD, "max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({**GOOD, "temperature": 1e308}, "temperature"),
        ({**GOOD, "temperature": "NaN"}, "temperature"),
        ({**GOOD, "seed": 2**70}, "seed"),
        ({**GOOD, "seed": 2**63}, "seed"),
        ({**GOOD, "top_k": 2**40}, "top_k"),
        ({**GOOD, "logit_bias": {"9" * 30: 1}}, "logit_bias"),
        ({**GOOD, "logit_bias": {"1" * 5000: 1}}, "logit_bias"),
        ({**GOOD, "logit_bias": {"-1": 1}}, "logit_bias"),
        ({**GOOD, "stop": 5}, "stop"),
        ({**GOOD, "logit_bias": {"token": 1}}, "logit_bias"),
        ({**GOOD, "logit_bias": {"10": 500}}, None),
        ({**GOOD, "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ],
)
def test_invalid_chat_bodies_are_400(http, body, param):
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


DEEP = 10_000


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"messages": [',
        b"not json",
        b"[1, 2]",
        b"[]",
        b'"x"',
        b"1",
        b"null",
        b"\xff\xfe{}",
        b"\xef\xbb\xbf" + b'{"messages": [{"role": "user", "content": "Hi"}]}',  # a BOM: not JSON either
        b'{"messages": [{"role": "user", "content": "\xff\xc3"}]}',  # invalid UTF-8 inside a string
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate
        b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1e999}',
        # 10000 levels of nesting, in an unknown field (skipped: must not blow the stack), in a field, unclosed
        b'{"messages": [{"role": "user", "content": "Hi"}], "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        b'{"messages": [{"role": "user", "content": "Hi"}], "x": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}",
        b'{"messages": [{"role": "user", "content": ' + b"[" * DEEP + b"]" * DEEP + b"}]}",
        b'{"messages": [{"role": "user", "content": "Hi"}], "stop": ' + b"[" * DEEP,
    ],
)
def test_malformed_json_is_400(http, raw):
    error = assert_error(http.post("/v1/chat/completions", content=raw), 400)
    assert len(error["message"]) < 1000


def test_form_bodies_are_400(http):
    assert_error(http.post("/v1/chat/completions", data={"messages": "Hi", "max_tokens": "2"}), 400)
    assert_error(http.post("/v1/chat/completions", files={"body": ("body.json", b'{"messages": []}')}), 400)


def test_json_is_read_whatever_the_content_type(http):
    """Like llama-server (and so that `curl -d` works): a JSON body is JSON under any Content-Type."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        reply = http.post("/v1/chat/completions", content=json.dumps(GOOD), headers={"content-type": content_type})
        assert reply.status_code == 200, reply.text


def test_unknown_fields_and_null_options_are_accepted(http):
    body = {
        **GOOD,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "text"},
        "x": {"deep": [[[None]]]},
        "max_completion_tokens": None,
        "n": None,
        "stream": None,
        "seed": -1,
        "logprobs": None,
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    text = {"prompt": "Hi", "max_tokens": 1, "n": 1, "seed": 2**63 - 1}
    assert http.post("/v1/completions", json=text).status_code == 200


def test_limits(http):
    """limits.max-tokens (default 32768) and limits.max-n (default 8): 400 naming the field and the limit."""
    for field in ("max_tokens", "max_completion_tokens"):
        error = assert_error(http.post("/v1/chat/completions", json={**GOOD, field: 32769}), 400, field)
        assert "32768" in error["message"] and "limits.max-tokens" in error["message"]
    error = assert_error(http.post("/v1/completions", json={"prompt": "Hi", "n": 9}), 400, "n")
    assert "at most 8" in error["message"]
    # at the limit, the context decides
    at_limit = {"prompt": "Hi", "max_tokens": 32768}
    assert_error(http.post("/v1/completions", json=at_limit), 400, code="context_length_exceeded")


def test_a_megabyte_of_content(http):
    body = {"messages": [{"role": "user", "content": "x" * (1 << 20)}], "max_tokens": 1}
    reply = http.post("/v1/chat/completions", json=body)
    if reply.status_code != 200:
        assert_error(reply, 400, code="context_length_exceeded")


def test_invalid_completion_body_is_400(http):
    assert_error(http.post("/v1/completions", json={"max_tokens": 3}), 400)
    assert_error(http.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    too_many = assert_error(http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3}), 400, "prompt")
    assert "9 choices" in too_many["message"] and "limits.max-n" in too_many["message"]


def test_context_length_exceeded(http):
    long_prompt = "hello " * 9000  # past the default model's 8192
    error = assert_error(http.post("/v1/completions", json={"prompt": long_prompt}), 400, code="context_length_exceeded")
    assert "maximum context length" in error["message"]
    too_many = {**GOOD, "max_tokens": 30_000}  # under limits.max-tokens, over the context
    assert_error(http.post("/v1/chat/completions", json=too_many), 400, code="context_length_exceeded")


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/chat/completions", json={**GOOD, "model": "gpt-17"}), 404, "model", "model_not_found")
    assert_error(http.get("/v1/models/gpt-17"), 404, code="model_not_found")


def test_unknown_route_is_404_and_wrong_method_405(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)
    assert_error(http.delete("/v1/models"), 405)
    assert_error(http.post("/health"), 405)
    assert_error(http.put("/v1/completions", json={"prompt": "Hi"}), 405)


def test_body_over_the_limit_is_413(http):
    huge = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    assert_error(http.post("/v1/completions", content=huge), 413)


def test_server_keeps_serving_after_errors(http):
    for _ in range(3):
        http.post("/v1/chat/completions", content=b"{")
        http.post("/v1/chat/completions", json={**GOOD, "model": "nope"})
    reply = http.post("/v1/chat/completions", json=GOOD)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None
