"""API keys and CORS on the real server: who may call /v1/, and what browsers are told."""

from __future__ import annotations

import httpx
import anthropic
import openai
import pytest

from conftest import KEYED, cli, data_env, start_server
from infersnap import access_keys

# The keyed server's (conftest.keyed_server): two of its keys are set, the third comes from its keys file
KEYS = ["key-one", "key-two", "key-three"]
ORIGIN = KEYED["http.cors-origins"]
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3}


@pytest.fixture()
def http(keyed_server):
    with httpx.Client(base_url=keyed_server.base, timeout=60) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_key_error(response: httpx.Response, message_start: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None
    assert error["message"].startswith(message_start)


def test_no_key_gets_401_in_openai_shape(http):
    assert_key_error(http.post("/v1/chat/completions", json=CHAT), "You didn't provide an API key")
    # Another scheme is no bearer key either.
    assert_key_error(
        http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Basic a2V5LW9uZQ=="}),
        "You didn't provide an API key",
    )


def test_wrong_key_gets_401(http):
    assert_key_error(http.post("/v1/chat/completions", json=CHAT, headers=bearer("key-four")), "Incorrect API key")
    assert_key_error(http.post("/v1/completions", json={"prompt": "a"}, headers=bearer("key-on")), "Incorrect API key")
    # A comment in the keys file is not a key.
    assert_key_error(http.get("/v1/models", headers=bearer("added in March")), "Incorrect API key")


def test_an_unknown_v1_route_needs_a_key_too(http):
    assert http.get("/v1/nothing-here").status_code == 401
    assert http.get("/v1/nothing-here", headers=bearer("key-one")).status_code == 404


@pytest.mark.parametrize("key", KEYS)
def test_each_key_works_with_the_openai_sdk(keyed_server, key):
    client = openai.OpenAI(base_url=keyed_server.url, api_key=key)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=CHAT["messages"], max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 3
    chunks = list(client.chat.completions.create(model=model, messages=CHAT["messages"], max_tokens=3, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_sdk_reports_a_wrong_key_as_an_authentication_error(keyed_server):
    client = openai.OpenAI(base_url=keyed_server.url, api_key="sk-not-this-one", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="any", messages=CHAT["messages"], max_tokens=3)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_anthropic_clients_send_the_key_as_x_api_key_and_get_errors_in_anthropics_shape(keyed_server, http):
    client = anthropic.Anthropic(base_url=keyed_server.base, api_key="key-two", max_retries=0)
    model = client.models.list().data[0].id
    message = client.messages.create(model=model, max_tokens=2, messages=CHAT["messages"])
    assert message.usage.output_tokens <= 2
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=keyed_server.base, api_key="key-four", max_retries=0).messages.create(
            model="any", max_tokens=2, messages=CHAT["messages"])
    assert caught.value.body == {"type": "error", "error": {"type": "authentication_error", "message": caught.value.body[
        "error"]["message"]}} and "Incorrect API key" in caught.value.body["error"]["message"]
    assert http.post("/v1/messages", json={"max_tokens": 2, **CHAT}).json()["error"]["type"] == "authentication_error"
    # the Responses route takes either header, like the rest of /v1
    reply = http.post("/v1/responses", json={"input": "Hi", "max_output_tokens": 2}, headers={"x-api-key": "key-one"})
    assert reply.status_code == 200, reply.text


def test_health_is_open_and_models_need_the_key(http):
    assert http.get("/health").status_code == 200
    assert_key_error(http.get("/v1/models"), "You didn't provide an API key")
    models = http.get("/v1/models", headers=bearer("key-two"))
    assert models.status_code == 200
    assert models.json()["data"]


@pytest.mark.parametrize("path, body", [("/tokenize", {"content": "Hi"}), ("/detokenize", {"tokens": [1]})])
def test_the_tokenizer_routes_need_the_key_like_v1(http, path, body):
    # outside /v1/ as in llama-server, but they use the model: a trailing slash is no way around the key
    assert_key_error(http.post(path, json=body), "You didn't provide an API key")
    assert_key_error(http.post(f"{path}/", json=body), "You didn't provide an API key")
    assert http.post(path, json=body, headers=bearer("key-three")).status_code == 200


def test_preflight_from_an_allowed_origin_needs_no_key(http):
    response = http.options(
        "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert response.status_code == 204, response.text
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert "Origin" in response.headers["Vary"]
    assert "WWW-Authenticate" not in response.headers
    # Without Access-Control-Request-Headers the defaults are offered.
    plain = http.options("/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert plain.status_code == 204
    assert plain.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type, X-Api-Key"


def test_responses_to_an_allowed_origin_carry_the_header(http):
    origin = {"Origin": ORIGIN}
    ok = http.post("/v1/chat/completions", json=CHAT, headers={**origin, **bearer("key-one")})
    assert ok.status_code == 200, ok.text
    assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in ok.headers["Vary"]

    refused = http.post("/v1/chat/completions", json=CHAT, headers=origin)
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ORIGIN  # so the page can read why

    bad = http.post("/v1/chat/completions", json={"messages": []}, headers={**origin, **bearer("key-one")})
    assert bad.status_code == 400
    assert bad.headers["Access-Control-Allow-Origin"] == ORIGIN

    stream = {**CHAT, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=stream, headers={**origin, **bearer("key-three")}) as sse:
        assert sse.status_code == 200
        assert sse.headers["content-type"].startswith("text/event-stream")
        assert sse.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in sse.headers["Vary"]
        assert sse.read().rstrip().endswith(b"data: [DONE]")


def test_an_unlisted_origin_gets_no_cors_headers(http):
    other = {"Origin": "http://evil.example"}
    ok = http.post("/v1/chat/completions", json=CHAT, headers={**other, **bearer("key-one")})
    assert ok.status_code == 200
    assert "Access-Control-Allow-Origin" not in ok.headers
    preflight = http.options("/v1/chat/completions", headers={**other, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert "Access-Control-Allow-Methods" not in preflight.headers
    # Nor does a request that sends no Origin at all (not a browser).
    assert "Access-Control-Allow-Origin" not in http.get("/health").headers


def test_an_open_server_on_the_network_warns_and_needs_no_key(tmp_path):
    server = start_server(tmp_path, **{"http.host": "0.0.0.0", "worker.slots": "1", "engines": "cpu"})
    try:
        log = server.log.read_text()
        assert "serving on 0.0.0.0 to the network with no API key" in log, log
        assert f"port {server.port}" in log
        with httpx.Client(base_url=server.base, timeout=60) as http:
            reply = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
            assert reply.status_code == 200, reply.text
            assert "Access-Control-Allow-Origin" not in reply.headers  # no CORS configured
            # Without CORS origins, OPTIONS is still the OpenAI-shaped 405.
            options = http.options("/v1/chat/completions", headers={"Origin": ORIGIN})
            assert options.status_code == 405
            assert options.json()["error"]["code"] == "method_not_allowed"
            assert "Access-Control-Allow-Origin" not in options.headers
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_a_missing_keys_file_stops_serve_with_a_clear_message(tmp_path):
    env = data_env(tmp_path)
    missing = tmp_path / "no-such-keys.txt"
    cli(env, "set", f"http.api-keys-file={missing}")
    result = cli(env, "serve", check=False, timeout=60)
    assert result.returncode != 0
    assert str(missing) in result.stderr, result.stderr
    assert "http.api-keys-file" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_file_comments_and_loopback_hosts(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("  # comment\nalpha\nbe#ta\t# note\n\ngamma#\n")
    assert access_keys.read_keys_file(str(keys)) == ["alpha", "be#ta", "gamma#"]
    assert access_keys.api_keys("alpha, ,delta", str(keys)) == ["alpha", "delta", "be#ta", "gamma#"]
    assert access_keys.cors_origins("http://A.example/, *") == ["http://a.example", "*"]
    for host in ("127.0.0.1", "127.0.1.1", "::1", "localhost"):
        assert access_keys.open_network_warning(host, 1, []) is None
    assert access_keys.open_network_warning("0.0.0.0", 8328, ["k"]) is None
    assert "port 8328" in access_keys.open_network_warning("192.168.1.5", 8328, [])
