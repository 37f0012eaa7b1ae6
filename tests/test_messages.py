"""Anthropic's Messages API, end to end: the real server and model on both engines, the anthropic SDK and raw httpx."""

from __future__ import annotations

import json

import anthropic
import pytest

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}
HELLO = [{"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0, "top_k": 1}  # fields the 2026 SDK no longer names, which older clients send


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base, api_key="any-placeholder", max_retries=0)


def events_of(http, body: dict) -> list[tuple[str, dict]]:
    """POST a streamed Messages body; the (event name, data) of each event, checking that the two agree."""
    with http.stream("POST", "/v1/messages", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = []
    for block in [b for b in raw.split("\n\n") if b]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), block
        payload = json.loads(data[6:])
        assert payload["type"] == name[7:]
        events.append((name[7:], payload))
    return events


def test_messages_create_answers_with_a_text_block_and_usage(client, model):
    message = client.messages.create(model=model, max_tokens=16, messages=HELLO, system="You are terse.")
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == model
    assert [b.type for b in message.content] == ["text"] and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 5 and 0 < message.usage.output_tokens <= 16


def test_max_tokens_ends_with_stop_reason_max_tokens(client, model):
    message = client.messages.create(model=model, max_tokens=3, messages=[
        {"role": "user", "content": "Write a long story about a dragon."}])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_more_max_tokens_than_the_context_holds_is_clamped_not_refused(client, server, model, engine):
    # Claude Code asks for 32000: the answer ends where the context does, with stop_reason max_tokens
    if engine == "cpu":
        pytest.skip("filling the 8192-token context takes llama.cpp a minute on 2 cores; the clamp itself is "
                    "tested on both engines in test_context.py, and this route's part is the same on both")
    context = server.status()["workers"][0]["context"]
    words = lambda n: [{"role": "user", "content": "Repeat: " + "go " * n}]  # noqa: E731
    probe = client.messages.create(model=model, max_tokens=1, messages=words(100))
    per_word = (probe.usage.input_tokens - client.messages.create(
        model=model, max_tokens=1, messages=words(0)).usage.input_tokens) / 100
    room = 12
    n = int((context - probe.usage.input_tokens - room) / per_word) + 100
    with client.messages.stream(model=model, max_tokens=32000, messages=words(n), extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    used = final.usage.input_tokens + final.usage.output_tokens
    assert used <= context and (final.stop_reason == "max_tokens") == (used == context), (used, context, final)
    with pytest.raises(anthropic.BadRequestError):  # a prompt that alone does not fit is still refused
        client.messages.create(model=model, max_tokens=8, messages=words(int(context / per_word) + 50))


def test_a_stop_sequence_ends_with_stop_reason_stop_sequence_naming_it(client, http, model):
    body = {"model": model, "max_tokens": 32, "messages": HELLO, "stop_sequences": ["zzz", "e"], **GREEDY}
    message = http.post("/v1/messages", json=body).json()
    assert message["stop_reason"] == "stop_sequence" and message["stop_sequence"] == "e", message
    assert "e" not in message["content"][0]["text"]
    delta = events_of(http, body)[-2][1]["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "e"}


def test_count_tokens_counts_the_prompt_as_the_message_would(client, model):
    fields = {"model": model, "system": "Be terse.", "messages": HELLO, "tools": [WEATHER]}
    counted = client.messages.count_tokens(**fields)
    assert counted.input_tokens == client.messages.create(max_tokens=1, **fields).usage.input_tokens > 20


def test_messages_stream_sends_anthropics_events_in_order(client, http, model):
    events = events_of(http, {"model": model, "max_tokens": 12, "messages": HELLO})
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[2] == "content_block_start" and names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["usage"]["input_tokens"] > 5
    text = "".join(e["delta"]["text"] for n, e in events if n == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["usage"]["output_tokens"] > 0
    # the SDK assembles the same events into the message
    with client.messages.stream(model=model, max_tokens=12, messages=HELLO, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == streamed and streamed and text


def test_a_forced_tool_call_is_a_tool_use_block_and_its_result_goes_back(client, model):
    message = client.messages.create(model=model, max_tokens=64, tools=[WEATHER],
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert message.stop_reason == "tool_use"
    [call] = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input["city"], str) and call.id.startswith("toolu_")
    follow = client.messages.create(model=model, max_tokens=16, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}]},
    ], tool_choice={"type": "none"})
    assert follow.content[0].type == "text" and follow.stop_reason in ("end_turn", "max_tokens")


def test_a_streamed_tool_call_arrives_as_input_json_delta(client, model):
    with client.messages.stream(model=model, max_tokens=64, tools=[WEATHER], tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Oslo?"}], extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    [call] = [b for b in final.content if b.type == "tool_use"]
    assert call.name == "get_weather" and "city" in call.input and final.stop_reason == "tool_use"


@pytest.mark.one_engine  # the frontend drops the line, whatever the runtime
def test_claude_codes_billing_line_does_not_change_the_prompt(http, model):
    def tokens(system: str) -> int:
        body = {"model": model, "max_tokens": 1, "system": system, "messages": HELLO}
        return http.post("/v1/messages", json=body).json()["usage"]["input_tokens"]

    plain = tokens("You are a coding agent.")
    for cch in ("a1b2c", "ffff0"):
        billed = f"x-anthropic-billing-header: cc_version=2.1.0; cc_entrypoint=cli; cch={cch};\nYou are a coding agent."
        assert tokens(billed) == plain


@pytest.mark.parametrize(
    "body, status",
    [
        ({"messages": HELLO}, 400),  # max_tokens is required
        ({"max_tokens": "ten", "messages": HELLO}, 400),
        ({"max_tokens": 0, "messages": HELLO}, 400),
        ({"max_tokens": 8, "messages": []}, 400),
        ({"max_tokens": 8, "messages": [{"role": "tool", "content": "x"}]}, 400),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400),
        ({"max_tokens": 8, "messages": HELLO, "tools": [{"name": "bad name!", "input_schema": {}}]}, 400),
        ({"max_tokens": 8, "messages": HELLO, "tools": [{"name": "t", "input_schema": {"type": "wat"}}]}, 400),
        ({"max_tokens": 8, "messages": HELLO, "tool_choice": {"type": "tool", "name": "missing"}}, 400),
        ({"max_tokens": 8, "messages": HELLO, "temperature": 1.5}, 400),
        ({"max_tokens": 8, "messages": HELLO, "model": "no-such-model"}, 404),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": "go " * 3_000_000}]}, 413),  # past the body limit
        ({"max_tokens": 8, "messages": [{"role": "user", "content": "go " * 20_000}]}, 400),  # past the context
        ({"max_tokens": 8, "messages": HELLO, "output_config": {"format": {"type": "json_schema", "schema": 7}}}, 400),
    ],
)
@pytest.mark.one_engine  # the frontend's refusal, whatever the runtime
def test_bad_input_gets_anthropics_error_shape_and_the_server_keeps_serving(http, body, status):
    reply = http.post("/v1/messages", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}[status]
    assert error["error"]["message"]
    assert http.post("/v1/messages", json={"max_tokens": 2, "messages": HELLO}).status_code == 200


@pytest.mark.one_engine  # the frontend's refusal, whatever the runtime
def test_the_sdk_raises_its_own_errors(client):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="m", max_tokens=8, messages=[])
    assert caught.value.body["type"] == "error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)


@pytest.mark.one_engine  # the frontend's refusal, whatever the runtime
def test_not_json_and_unknown_routes_under_messages_are_in_anthropics_shape(http):
    reply = http.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["type"] == "error"
    reply = http.get("/v1/messages/nothing-here")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"
