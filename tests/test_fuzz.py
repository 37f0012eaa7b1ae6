"""Fuzzing the completion routes on the real server, and the /openapi.json document the fuzzing reads.

Bodies are generated from the server's own /openapi.json request schemas
(valid ones), then mutated off the schema: a field set to a wrong type, a
null, a huge number or a random JSON value; a key removed; the whole body
replaced; raw bytes truncated or flipped, or raw tokens such as NaN spliced
in. Besides the random examples, every field gets every nasty value in turn.
Whatever comes in, the answer is a 200 or a 4xx in OpenAI's error shape,
never a 5xx, and the server goes on serving. Generations are kept to a few
tokens: the bodies ask for max_tokens <= 4, placed where mutations leave it.
The hand-written bad inputs live in test_errors.py.

Schema-valid bodies reach the engine with every feature in any combination: fuzzed on both runtimes.
Off-schema bodies and bad values are refused by the frontend whatever the runtime (`one_engine`).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infersnap.frontend import openapi
from infersnap.plan import ModelSpec, ServePlan
from test_errors import GOOD, assert_error

ROUTES = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
    "/v1/messages": "MessagesRequest",
    "/v1/responses": "ResponsesRequest",
}
LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")  # the fields that bound the generation
# Per route, 30 schema-valid bodies (most of them generate, so they cost more) and 70 off-schema ones.
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples on every run, so CI is reproducible
    database=None,
    suppress_health_check=list(HealthCheck),
)
SMALL = 4  # most tokens any fuzzed request may generate
DEEP = 10_000

# --- strategies ----------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NASTY_VALUES = [
    None, True, False, 0, -1, 2**31, 2**63, 2**64, 10**30, -(10**30), 1e308, -1e308, 5e-324, 0.5, "", "NaN",
    "Infinity", "1e308", "x " * 9000, [], {}, [None], {"": None}, [[[[[]]]]], {"role": "user"},
]  # fmt: skip
# JSON text spliced in as a field's value: not JSON at all, numbers past any range, bad escapes and UTF-8, deep nesting
RAW_VALUES = [
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 5000, b"-0", b"0x10", b"01", b"1.",
    b".5", b"+1", b"tru", b"undefined", b"'x'", b'"\\ud800"', b'"\\u0000"', b'"\xff\xfe"', b'"\xc3"',
    b"[" * DEEP, b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP,
]  # fmt: skip
ANY = st.sampled_from(NASTY_VALUES) | JSON_VALUES
RAW_TOKENS = st.sampled_from(RAW_VALUES)
UNKNOWN_FIELDS = ["tools", "response_format", "logprobs", "parallel_tool_calls", "metadata", ""]


def from_schema(node: dict[str, Any], schemas: dict[str, Any]) -> st.SearchStrategy:
    """Valid values of a JSON Schema node, as msgspec writes them (refs into components, anyOf, enum, ...)."""
    if "$ref" in node:
        return st.deferred(lambda: from_schema(schemas[node["$ref"].rsplit("/", 1)[1]], schemas))
    if "anyOf" in node:
        return st.one_of([from_schema(option, schemas) for option in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kind = node.get("type")
    if kind == "object":
        properties = node.get("properties")
        if not properties:
            values = from_schema(node.get("additionalProperties", {}), schemas)
            return st.dictionaries(st.text(max_size=8), values, max_size=3)
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, schemas) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, schemas) for k, v in properties.items() if k not in required},
        )
    if kind == "array":
        low = node.get("minItems", 0)
        high = min(node.get("maxItems", low + 3), low + 3)
        return st.lists(from_schema(node.get("items", {}), schemas), min_size=low, max_size=high)
    if kind == "string":
        return st.text(max_size=30)
    if kind == "integer":
        return st.integers(node.get("minimum"), node.get("maximum"))
    if kind == "number":
        return st.floats(node.get("minimum"), node.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON_VALUES


@st.composite
def valid_body(draw, schemas: dict[str, Any], name: str, model: str) -> dict[str, Any]:
    body = draw(from_schema(schemas[name], schemas))
    # mostly: also meet what the schema cannot say (content set, text parts), so the engine gets to run
    if draw(st.sampled_from(["meet", "meet", "meet", "as is"])) == "meet":
        for message in body.get("messages", []):
            if message.get("content") is None and message["role"] != "assistant":
                message["content"] = draw(st.text(max_size=30))
            for part in message["content"] if isinstance(message.get("content"), list) else []:
                part["type"] = "text"
                part["text"] = part.get("text") or draw(st.text(max_size=30))
        if body.get("logit_bias"):
            body["logit_bias"] = {str(draw(st.integers(0, 40_000))): bias for bias in body["logit_bias"].values()}
        for item in body["input"] if isinstance(body.get("input"), list) else []:
            item.update(type="message", role="user", content=draw(st.text(min_size=1, max_size=30)))
    limit = "max_output_tokens" if name == "ResponsesRequest" else "max_tokens"
    body[limit] = draw(st.integers(1, SMALL))
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = draw(st.integers(1, SMALL))
    body.pop("model", None)
    # a keep_alive of 0 would unload the model after the example, and each next one wait for it to load
    # again: handled (tests/test_models.py), but slow here
    body.pop("keep_alive", None)
    choice = draw(st.sampled_from(["absent", "served", "upper"]))
    if choice != "absent":
        body["model"] = model if choice == "served" else model.upper()
    return body


def keep_small(body: Any) -> Any:
    """A mutation that leaves max_tokens valid but large (or null: up to the context) is brought back to SMALL."""
    if isinstance(body, dict):
        for field in LIMITS:
            value = body.get(field, 0)
            if (value is None and field in ("max_tokens", "max_output_tokens")) or (
                isinstance(value, int) and not isinstance(value, bool) and SMALL < value <= 1 << 20
            ):
                body[field] = SMALL
    return body


@st.composite
def mutated_body(draw, schemas: dict[str, Any], name: str, model: str) -> bytes:
    """A valid body made invalid (or not) in one of several ways; as the raw bytes to send."""
    body = draw(valid_body(schemas, name, model))
    fields = sorted(schemas[name]["properties"]) + UNKNOWN_FIELDS
    how = draw(st.sampled_from(["field", "delete", "nested", "whole", "raw-token", "raw-bytes"]))
    if how == "field":
        body[draw(st.sampled_from(fields))] = draw(ANY)
    elif how == "delete":
        deletable = sorted(set(body) - set(LIMITS))
        if deletable:
            del body[draw(st.sampled_from(deletable))]
    elif how == "nested":  # inside the messages or the prompt
        if "messages" in body:
            message = body["messages"][draw(st.integers(0, len(body["messages"]) - 1))]
            message[draw(st.sampled_from(["role", "content", "name", "extra"]))] = draw(ANY)
        else:
            body["prompt"] = draw(ANY)
    elif how == "whole":
        return json.dumps(draw(ANY)).encode()
    if how in ("raw-token", "raw-bytes"):
        # max_tokens goes first, outside the part that is mutated, so no mutation can lift it
        limit = next(f for f in LIMITS if f in body)
        for field in LIMITS:
            body.pop(field, None)
        rest = json.dumps(body).encode()[1:]
        prefix = b'{"%s": %d, ' % (limit.encode(), SMALL)
        if how == "raw-token":
            field = draw(st.sampled_from(fields)).encode()
            return prefix + b'"' + field + b'": ' + draw(RAW_TOKENS) + b", " + rest
        at = draw(st.integers(0, len(rest)))
        action = draw(st.sampled_from(["truncate", "insert", "replace"]))
        if action == "truncate":
            return prefix + rest[:at]
        byte = bytes([draw(st.integers(0, 255))])
        return prefix + rest[:at] + byte + rest[at + (action == "replace") :]
    return json.dumps(keep_small(body)).encode()


# --- checks --------------------------------------------------------------------


STREAM_ENDS = {"/v1/messages": "event: message_stop", "/v1/responses": "event: response."}


def assert_handled(reply, route: str = "") -> None:
    """A 200 with an answer, or a 4xx in the API's error shape; never a 5xx or a traceback."""
    assert reply.status_code < 500, reply.text[:2000]
    if reply.status_code >= 400:
        if route == "/v1/messages":
            error = reply.json()
            assert error["type"] == "error" and error["error"]["message"] and "Traceback" not in reply.text
        else:
            assert_error(reply, reply.status_code)  # the shape, a message, no traceback
        return
    assert reply.status_code == 200
    if reply.headers["content-type"].startswith("text/event-stream"):
        last = reply.text.rstrip().rsplit("\n\n", 1)[-1]
        assert last.startswith(STREAM_ENDS.get(route, "data: [DONE]")), reply.text[-500:]
    else:
        answer = reply.json()  # a completion, a message, a response, or a tokenizer's answer
        assert answer.get("choices") or "tokens" in answer or "content" in answer or "output" in answer, reply.text


@pytest.fixture(scope="module")
def published(server) -> dict[str, Any]:
    """The component schemas of the server's /openapi.json."""
    return httpx.get(f"{server.base}/openapi.json").json()["components"]["schemas"]


@pytest.mark.parametrize("route", ROUTES)
def test_fuzz_valid_bodies(http, published, model, route):
    @FUZZ
    @given(st.data())
    def run(data):
        body = data.draw(valid_body(published, ROUTES[route], model), label="body")
        assert_handled(http.post(route, json=body), route)

    run()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.one_engine
def test_fuzz_off_schema_bodies(http, published, model, route):
    @settings(FUZZ, max_examples=70)
    @given(st.data())
    def run(data):
        raw = data.draw(mutated_body(published, ROUTES[route], model), label="raw body")
        assert_handled(http.post(route, content=raw, headers={"content-type": "application/json"}), route)

    run()
    # ... and the server goes on serving
    reply = http.post("/v1/chat/completions", json=GOOD)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] is not None


def with_value(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `body` with `path` (a field, or messages[0].<field>) set to `value`."""
    body = json.loads(json.dumps(body))
    if path.startswith("messages[0]."):
        body["messages"][0][path.split(".", 1)[1]] = value
    else:
        body[path] = value
    return body


@pytest.mark.one_engine
def test_every_field_survives_every_bad_value(http, published):
    """Each field of both request schemas, and of a chat message, gets each nasty value and each raw token.

    The shared fields go to /v1/completions only (the same decoder serves both routes); chat gets its own.
    Unknown fields ("tools", "messages[0].x") are skipped whatever they hold, so they only get the raw tokens.
    """
    text_fields = sorted(published["CompletionRequest"]["properties"]) + ["tools"]
    chat_fields = sorted(set(published["ChatCompletionRequest"]["properties"]) - set(text_fields))
    chat_fields += [f"messages[0].{f}" for f in sorted(published["ChatMessageIn"]["properties"])] + ["messages[0].x"]
    cases = [("/v1/completions", {"prompt": "Hi", "max_tokens": 1}, f) for f in text_fields]
    cases += [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}, f)
              for f in chat_fields]  # fmt: skip
    marker = "\u0001raw\u0001"
    sends = []  # (route, the body as sent, what it is)
    for route, base, field in cases:
        for value in NASTY_VALUES if field not in ("tools", "messages[0].x") else []:
            sends.append((route, json.dumps(keep_small(with_value(base, field, value))).encode(), (field, value)))
        for raw in RAW_VALUES:
            body = json.dumps(with_value(base, field, marker)).encode().replace(json.dumps(marker).encode(), raw)
            sends.append((route, body, (field, raw[:20])))

    def send(case: tuple[str, bytes, tuple]) -> tuple[httpx.Response, tuple]:
        route, body, what = case
        return http.post(route, content=body, headers={"content-type": "application/json"}), (route, *what)

    # 8 at a time, as clients would: the server answers each the same way, and the 2,000 take half the time
    with ThreadPoolExecutor(8) as pool:
        for reply, what in pool.map(send, sends):
            assert reply.status_code < 500, what
            assert_handled(reply)


# --- the published document ------------------------------------------------------


@pytest.mark.one_engine
def test_openapi_document(http):
    reply = http.get("/openapi.json")  # outside /v1: no API key, ever
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    document = reply.json()
    assert document["openapi"] == "3.1.0" and document["info"]["title"] == "infersnap"
    paths = document["paths"]
    assert set(paths) >= {
        "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "/tokenize", "/detokenize", "/health",
        "/get_load",
        "/v1/embeddings", "/v1/responses", "/v1/responses/{response_id}", "/v1/responses/input_tokens",
        "/v1/messages", "/v1/messages/count_tokens",
    }
    schemas = document["components"]["schemas"]
    for path, request, response, error in [
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletion", "ErrorBody"),
        ("/v1/completions", "CompletionRequest", "Completion", "ErrorBody"),
        ("/v1/embeddings", "EmbeddingRequest", "EmbeddingList", "ErrorBody"),
        ("/v1/responses", "ResponsesRequest", "Response", "ErrorBody"),
        ("/v1/messages", "MessagesRequest", "Message", "AnthropicErrorBody"),
    ]:
        post = paths[path]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + request)
        assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + response)
        for status in ("400", "401", "404", "413", "503"):
            assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/" + error)
    assert {"delete", "get"} <= set(paths["/v1/responses/{response_id}"])
    # the server's limits are the published maxima
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        properties = schemas[request]["properties"]
        assert {"type": "integer", "minimum": 1, "maximum": 32768} in properties["max_tokens"]["anyOf"]
        assert {"type": "integer", "minimum": 1, "maximum": 8} in properties["n"]["anyOf"]
    assert paths["/v1/models/{model}"]["get"]["parameters"][0]["name"] == "model"
    assert "404" in paths["/v1/models/{model}"]["get"]["responses"]
    assert "503" in paths["/health"]["get"]["responses"]
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', reply.text))
    assert refs and refs <= set(schemas), refs - set(schemas)


def test_openapi_names_the_key_when_the_server_needs_one():
    plan = ServePlan(
        host="127.0.0.1", port=1, max_body_bytes=1024, models=[ModelSpec("m", "m.gguf", 128)],
        max_waiting=1, request_timeout=0, verbose=False, workers=[], api_keys=["k"], max_tokens=64, max_n=3,
    )  # fmt: skip
    document = openapi.build(plan)
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert document["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in document["paths"]["/health"]["get"]
    n = document["components"]["schemas"]["CompletionRequest"]["properties"]["n"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 3} in n
    assert "securitySchemes" not in openapi.build(msgspec.structs.replace(plan, api_keys=[]))["components"]
