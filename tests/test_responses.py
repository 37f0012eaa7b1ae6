"""OpenAI's Responses API, end to end: the real server and model on both engines, the openai SDK and raw httpx."""

from __future__ import annotations

import json

import openai
import pytest

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="any-placeholder", max_retries=0)


def events_of(http, body: dict) -> list[dict]:
    """POST a streamed Responses body; each event's data, checking its event line and sequence number."""
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        raw = response.read().decode()
    events = []
    for block in [b for b in raw.split("\n\n") if b]:
        name, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}" and payload["sequence_number"] == len(events), block
        events.append(payload)
    return events


def test_responses_create_answers_with_a_message_item_and_usage(client, model):
    response = client.responses.create(model=model, input="Say hello.", instructions="Be terse.", max_output_tokens=16)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == model
    assert response.status in ("completed", "incomplete")
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert response.output_text and response.output_text == item.content[0].text
    usage = response.usage
    assert usage.input_tokens > 5 and 0 < usage.output_tokens <= 16
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_max_output_tokens_makes_it_incomplete(client, model):
    response = client.responses.create(model=model, input="Write a long story about a dragon.", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_the_stream_sends_the_typed_events_in_order_and_the_sdk_assembles_them(client, http, model):
    events = events_of(http, {"model": model, "input": "Say hello.", "max_output_tokens": 12})
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1]["type"]]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-4]["text"] == text and events[-1]["response"]["output"][0]["content"][0]["text"] == text
    # an answer that ends before max_output_tokens (a JSON object closes): response.completed, which the SDK needs
    form = {"type": "json_schema", "name": "word", "schema": {"type": "object", "properties": {
        "word": {"type": "string", "maxLength": 8}}, "required": ["word"]}}
    with client.responses.stream(model=model, input="Say hello.", max_output_tokens=60, temperature=0,
                                 text={"format": form}) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas and final.output_text == deltas and final.status == "completed"


def test_a_function_call_round_trip(client, model):
    first = client.responses.create(model=model, input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                    max_output_tokens=64)
    [call] = [i for i in first.output if i.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments) and call.call_id
    second = client.responses.create(model=model, tools=[WEATHER], max_output_tokens=16, tool_choice="none", input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ])
    assert second.output[0].type == "message"


def test_a_streamed_function_call(client, model):
    with client.responses.stream(model=model, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                                 max_output_tokens=64) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments)["city"]


def test_text_format_json_schema_is_enforced(client, model):
    form = {"type": "json_schema", "name": "colour", "strict": True,
            "schema": {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}},
                       "required": ["colour"]}}
    response = client.responses.create(model=model, input="Name a colour.", text={"format": form},
                                       max_output_tokens=40, temperature=0)
    assert isinstance(json.loads(response.output_text)["colour"], str)


def test_previous_response_id_continues_and_stored_responses_can_be_read_and_deleted(client, http, model):
    first = client.responses.create(model=model, input="My name is Ada.", max_output_tokens=8)
    second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=8)
    alone = client.responses.create(model=model, input="What is my name?", max_output_tokens=8)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens  # it holds the first turn
    assert second.previous_response_id == first.id
    # instructions are not carried to the next turn
    instructed = client.responses.create(model=model, input="Hi", instructions="Answer in French. " * 20,
                                         max_output_tokens=2)
    plain = client.responses.create(model=model, input="Hi", max_output_tokens=2)
    after = client.responses.create(model=model, input="Hi", previous_response_id=instructed.id, max_output_tokens=2)
    after_plain = client.responses.create(model=model, input="Hi", previous_response_id=plain.id, max_output_tokens=2)
    assert instructed.usage.input_tokens > plain.usage.input_tokens + 60
    assert abs(after.usage.input_tokens - after_plain.usage.input_tokens) <= 4  # only the 2-token answers differ
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    reply = http.post("/v1/responses", json={"input": "Hi", "previous_response_id": first.id})
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "previous_response_id" or \
        reply.json()["error"]["param"] == "response_id"
    unstored = client.responses.create(model=model, input="Hi", store=False, max_output_tokens=2)
    assert http.get(f"/v1/responses/{unstored.id}").status_code == 404


def test_input_tokens_counts_the_prompt_as_the_response_would(client, http, model):
    body = {"model": model, "input": "Say hello.", "instructions": "Be terse."}
    counted = http.post("/v1/responses/input_tokens", json=body).json()
    assert counted["object"] == "response.input_tokens"
    used = client.responses.create(**body, max_output_tokens=2).usage.input_tokens
    assert counted["input_tokens"] == used


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": 5},
        {"input": []},
        {"input": [{"type": "message", "content": "no role"}]},
        {"input": [{"type": "input_audio", "data": "x"}]},
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        {"input": [{"type": "function_call", "name": "f"}]},
        {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "wat"}}]},
        {"input": "hi", "tools": [{"type": "function", "name": "bad name!"}]},
        {"input": "hi", "tool_choice": {"type": "function", "name": "missing"}, "tools": [WEATHER]},
        {"input": "hi", "max_output_tokens": 0},
        {"input": "hi", "temperature": 3},
        {"input": "hi", "text": {"format": {"type": "yaml"}}},
        {"input": "hi", "previous_response_id": "resp_unknown"},
        {"input": "hi", "model": "no-such-model"},
    ],
)
@pytest.mark.one_engine  # the frontend's refusal, whatever the runtime
def test_bad_input_gets_a_4xx_in_openais_shape_and_the_server_keeps_serving(http, body):
    reply = http.post("/v1/responses", json=body)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["error"]["message"]
    assert http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2}).status_code == 200
