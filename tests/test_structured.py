"""Structured output (response_format) and tools, end to end on both engines, with the openai SDK.

Forced outputs (json_schema, tool_choice "required" or a named function) go through a grammar, so
they parse and validate whatever the sampling settings; the 135M model itself rarely calls a tool
unasked, so the free ("auto") path is only checked to answer at all.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import msgspec
import openai
import pytest
from pydantic import BaseModel, Field

from infersnap.frontend import convert, schema, tools
from infersnap.workers.llamacpp_grammar import integer_range
from test_chat_api import stream_chunks
from test_errors import assert_error

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK_PERSON = [{"role": "user", "content": "Make up a person: name, age and favourite color. Reply in JSON."}]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 30}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone", "parameters": TIME}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris?"}]
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}
SAMPLINGS = [(0.0, None), (0.7, 1), (1.0, 2), (1.3, 3)]  # (temperature, seed)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=18, le=99)
    color: Literal["red", "green", "blue"]


class GetWeather(BaseModel):
    """The weather in a city now."""

    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="x")


def assert_call(call, names: list[str]) -> dict:
    """A well-formed tool call to one of `names`, its arguments valid for that tool; returns them."""
    assert call.type == "function" and re.fullmatch(r"call_\w+", call.id)
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS[call.function.name])
    return arguments


# --- response_format ---------------------------------------------------------


def test_json_object_output_parses(client, model):
    """Any object is allowed, so the model decides when it ends; an answer it ended is always whole JSON."""
    messages = [
        {"role": "system", "content": 'You answer in JSON: {"answer": "<short answer>"}'},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    finishes = []
    for temperature, seed in SAMPLINGS:
        reply = client.chat.completions.create(
            model=model, messages=messages, response_format={"type": "json_object"},
            max_tokens=128, temperature=temperature, seed=seed,
        )  # fmt: skip
        choice = reply.choices[0]
        finishes.append(choice.finish_reason)
        if choice.finish_reason == "stop":  # the grammar ended it: the object is complete
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        else:  # cut by max_tokens: the start of an object
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert finishes.count("stop") >= len(SAMPLINGS) // 2, finishes


@pytest.mark.parametrize("temperature, seed", SAMPLINGS)
def test_json_schema_output_validates(client, model, temperature, seed):
    reply = client.chat.completions.create(
        model=model, messages=ASK_PERSON, response_format=PERSON_FORMAT, max_tokens=96, temperature=temperature, seed=seed
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_patterns_and_references_are_enforced(http):
    code = {"type": "string", "pattern": "^[A-Z]{2}\\d{3}$"}
    schema_ = {
        "$defs": {"Code": code, "Size": {"type": "string", "enum": ["S", "M", "L"]}},
        "type": "object",
        "properties": {"code": {"$ref": "#/$defs/Code"}, "size": {"$ref": "#/$defs/Size"}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["code", "size", "count"],
        "title": "Item",  # annotations are dropped, not refused
        "description": "An item in stock",
    }  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": schema_}}
    messages = [{"role": "user", "content": "Describe an item in stock as JSON."}]
    for temperature, seed in SAMPLINGS[:2]:
        body = {"messages": messages, "response_format": response_format, "max_tokens": 64, "temperature": temperature, "seed": seed}
        choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema_)


def test_banning_end_of_text_with_a_schema(http, engine):
    body = {"messages": ASK_PERSON, "response_format": PERSON_FORMAT, "max_tokens": 64, "temperature": 0,
            "logit_bias": {"0": -100, "2": -100}}  # fmt: skip
    reply = http.post("/v1/chat/completions", json=body)
    if engine == "intel-cpu":  # a ban there masks end-of-text for good, and a complete JSON allows nothing else
        assert_error(reply, 400, param="logit_bias")
        return
    choice = reply.json()["choices"][0]  # a -100 bias only lowers end-of-text: the grammar still ends the JSON
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_max_tokens_cuts_a_schema_answer_with_length(http):
    body = {"messages": ASK_PERSON, "response_format": PERSON_FORMAT, "max_tokens": 5, "temperature": 0}
    reply = http.post("/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["choices"][0]["message"]["content"].startswith("{")


def test_streamed_schema_answer(http):
    body = {"messages": ASK_PERSON, "response_format": PERSON_FORMAT, "max_tokens": 96, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sdk_parse_and_stream_with_a_pydantic_model(client, model):
    reply = client.chat.completions.parse(
        model=model, messages=ASK_PERSON, response_format=Person, max_tokens=96, temperature=0
    )
    assert isinstance(reply.choices[0].message.parsed, Person)
    with client.chat.completions.stream(
        model=model, messages=ASK_PERSON, response_format=Person, max_tokens=96, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == reply.choices[0].message.parsed


def test_text_completions_take_response_format_too(http):
    body = {"prompt": "A person as JSON:", "response_format": PERSON_FORMAT, "max_tokens": 96, "temperature": 0}
    reply = http.post("/v1/completions", json=body).json()
    assert reply["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(reply["choices"][0]["text"]), PERSON)


def test_response_format_text_is_plain(http):
    body = {"messages": ASK_WEATHER, "response_format": {"type": "text"}, "max_tokens": 8, "temperature": 0}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] and choice["finish_reason"] == "length"


# --- tools -------------------------------------------------------------------


@pytest.mark.parametrize("temperature, seed", SAMPLINGS[:3])
def test_tool_choice_required_calls_a_tool(client, model, temperature, seed):
    reply = client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
        max_tokens=64, temperature=temperature, seed=seed,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert_call(call, ["get_weather", "get_time"])


def test_a_named_tool_is_the_one_called(client, model):
    reply = client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=TOOLS, tool_choice=NAMED_TIME, max_tokens=64, temperature=0
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    [call] = reply.choices[0].message.tool_calls
    assert_call(call, ["get_time"])


def test_streamed_tool_call_assembles(client, model):
    stream = client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=TOOLS, tool_choice=NAMED_TIME, max_tokens=64, temperature=0,
        stream=True,
    )  # fmt: skip
    calls: dict[int, dict] = {}
    finishes, contents = [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        contents.append(delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
    assert finishes[-1] == "tool_calls" and not "".join(contents)
    [call] = calls.values()
    assert call["id"].startswith("call_") and call["name"] == "get_time"
    jsonschema.validate(json.loads(call["arguments"]), TIME)


def test_sdk_helpers_parse_tool_arguments(client, model):
    tool = openai.pydantic_function_tool(GetWeather)
    reply = client.chat.completions.parse(
        model=model, messages=ASK_WEATHER, tools=[tool], tool_choice="required", max_tokens=64, temperature=0
    )
    [call] = reply.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)
    with client.chat.completions.stream(
        model=model, messages=ASK_WEATHER, tools=[tool], tool_choice="required", max_tokens=64, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == call.function.parsed_arguments


def test_the_tool_result_gets_an_answer(client, model):
    first = client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", max_tokens=64, temperature=0
    )
    [call] = first.choices[0].message.tool_calls
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "cloudy"}'},
    ]
    reply = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, max_tokens=48, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content.strip()
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result were read


def test_tool_choice_none_answers_in_text(client, model):
    reply = client.chat.completions.create(
        model=model, messages=ASK_WEATHER, tools=TOOLS, tool_choice="none", max_tokens=16, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_tool_choice_auto_answers(client, model):
    reply = client.chat.completions.create(model=model, messages=ASK_WEATHER, tools=TOOLS, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    if choice.message.tool_calls:  # the model chose a tool: then it is a well-formed call
        assert choice.finish_reason == "tool_calls"
        assert_call(choice.message.tool_calls[0], ["get_weather", "get_time"])
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_streamed_auto_answer_is_the_plain_one(http):
    """With tools, an answer is held back only while it may still be a call; text then streams as usual."""
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "max_tokens": 24, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = stream_chunks(http, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    if plain["message"].get("tool_calls"):
        assert chunks[-1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"]
    else:
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain["message"]["content"]
        assert len(chunks) > 2  # streamed, not held to the end
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": NAMED_TIME}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "thing"}}}]},
         "tools[0].function.parameters"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
         "response_format.json_schema.schema"),
    ],
)  # fmt: skip
@pytest.mark.one_engine  # the frontend's refusal, whatever the runtime
def test_bad_tools_and_formats_are_400(http, extra, param):
    body = {"messages": ASK_WEATHER, "max_tokens": 4, **extra}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_the_server_serves_on_after_refusing_a_schema(http):
    """A schema the grammar engine would refuse must never reach it: on OpenVINO that breaks the pipeline."""
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "\\p{L}+"}}}
    assert_error(http.post("/v1/chat/completions", json={"messages": ASK_PERSON, "response_format": bad}), 400)
    body = {"messages": ASK_PERSON, "response_format": PERSON_FORMAT, "max_tokens": 96, "temperature": 0}
    assert http.post("/v1/chat/completions", json=body).json()["choices"][0]["finish_reason"] == "stop"


# --- pieces, without the server ------------------------------------------------


def test_tool_history_becomes_text_turns():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}
    body = schema.ChatCompletionRequest(
        messages=[
            schema.ChatMessageIn(role="user", content="Time?"),
            schema.ChatMessageIn(role="assistant", tool_calls=[schema.ToolCall(id="call_1", function=schema.FunctionCall(**call["function"]))]),
            schema.ChatMessageIn(role="tool", tool_call_id="call_1", content="12:00"),
            schema.ChatMessageIn(role="tool", tool_call_id="call_2", name="clock", content="noon"),
        ]
    )  # fmt: skip
    messages = convert.chat_request(body, "m", tools.from_request(body))[0].messages
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Time?"),
        ("assistant", '{"name": "get_time", "arguments": {"timezone": "UTC"}}'),
        ("user", "Tool result (get_time): 12:00\nTool result (clock): noon"),
    ]


@pytest.mark.parametrize(
    "text, held",
    [
        ("", True), ("  {", True), ("`", True), ("```", True), ("```js", True), ("```json\n", True),
        ("```json\n{\"name\"", True), ("```\n{", True), ("Sure", False), ("```python", False),
        ("```python\nprint(1)", False), ("```json\n[1, 2]", False), ("```\ndef f():", False),
    ],
)  # fmt: skip
def test_only_an_answer_that_may_still_be_a_call_is_held_back(text, held):
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    body = msgspec.convert({"messages": [{"role": "user", "content": "Hi"}], "tools": [tool]}, schema.ChatCompletionRequest)
    assert tools.from_request(body).could_be_call(text) is held


def test_forced_tools_with_references_keep_them_resolvable():
    parameters = {"$defs": {"Unit": {"enum": ["c", "f"]}}, "type": "object", "properties": {"unit": {"$ref": "#/$defs/Unit"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    body = schema.ChatCompletionRequest(
        messages=[schema.ChatMessageIn(role="user", content="x")], tools=[schema.Tool(**{**tool, "function": schema.FunctionDefinition(**tool["function"])})],
        tool_choice="required",
    )  # fmt: skip
    constraint = json.loads(convert.chat_request(body, "m", tools.from_request(body))[0].params.json_schema)
    jsonschema.validate({"name": "f", "arguments": {"unit": "c"}}, constraint)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "f", "arguments": {"unit": "k"}}, constraint)
    assert convert.chat_request(body, "m", tools.from_request(body))[0].messages[0].role == "system"


@pytest.mark.parametrize("low, high", [(18, 99), (0, 120), (-5, 5), (-120, -3), (7, 7), (None, 10), (3, None), (None, None), (99, 1000)])
def test_integer_ranges_for_llama_cpp(low, high):
    pattern = re.compile(integer_range(low, high).replace('"', "").replace(" ", ""))  # digits, "-", [0-9], ( | )
    for value in range(-1500, 1500):
        inside = (low is None or value >= low) and (high is None or value <= high)
        assert bool(pattern.fullmatch(str(value))) == inside, value
    assert not any(pattern.fullmatch(text) for text in ("01", "-0", "007", "1.0", ""))
