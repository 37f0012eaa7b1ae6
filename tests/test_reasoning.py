"""Thinking apart from the answer: the splitter on streamed pieces, the template's thinking choices,
the chat render's reasoning fields, and a served copy of the default model whose template thinks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import msgspec
import pytest

from infersnap import wire
from infersnap.frontend import convert, render, schema, tools
from infersnap.frontend.errors import APIError
from infersnap.models import default_model_path
from infersnap.workers.text import TextStream
from infersnap.workers.thinking import ThinkingSplit, opens_thinking

from conftest import ENGINES, TEST_CACHE, start_server


def split(pieces: list[str], inside: bool = False) -> tuple[list[tuple[str, str]], str, str]:
    """Each piece's (thinking, answer) as sent, then all thinking and all answer, the held-back end included."""
    splitter = ThinkingSplit(inside)
    sent = [splitter.push(p) for p in pieces]
    end = splitter.flush()
    both = [*sent, end]
    return sent, "".join(t for t, _ in both), "".join(a for _, a in both)


def test_a_think_block_is_split_from_the_answer():
    _, thinking, answer = split(["<think>\nLet me see.\n</think>\n\nIt is 4."])
    assert (thinking, answer) == ("Let me see.", "It is 4.")


@pytest.mark.parametrize("cut", range(1, len("<think>a</think>b")))
def test_tags_split_anywhere_across_pieces(cut):
    text = "<think>a</think>b"
    sent, thinking, answer = split([text[:cut], text[cut:]])
    assert (thinking, answer) == ("a", "b")
    assert all("<" not in t + a for t, a in sent), sent  # no part of a tag is ever sent


def test_one_character_at_a_time():
    text = "<think>\nhmm, 2 + 2\n</think>\n\n4 < 5 and <b>bold</b>"
    sent, thinking, answer = split(list(text))
    assert (thinking, answer) == ("hmm, 2 + 2", "4 < 5 and <b>bold</b>")
    assert "".join(t for t, _ in sent) == "hmm, 2 + 2"  # all the thinking went out before the end


def test_a_partial_tag_is_held_until_it_resolves():
    splitter = ThinkingSplit(inside=True)
    assert splitter.push("abc </th") == ("abc", "")
    assert splitter.push("ing") == (" </thing", "")  # not the close after all: thinking
    assert splitter.push("</think>x") == ("", "x")


def test_a_block_that_never_closes_is_all_thinking():
    _, thinking, answer = split(["<think>I keep", " thinking </thi"])
    assert (thinking, answer) == ("I keep thinking </thi", "")


def test_no_think_block_is_all_answer_unchanged():
    text = "  Hello <there>, a < b, <thin ice>."
    for pieces in ([text], list(text)):
        _, thinking, answer = split(pieces)
        assert (thinking, answer) == ("", text)


def test_text_before_the_block_is_answer():
    _, thinking, answer = split(["Sure. <think>why</think> Done."])
    assert (thinking, answer) == ("why", "Sure. Done.")


def test_a_prompt_ending_in_an_open_block_starts_inside():
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert opens_thinking("...<think>")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_thinking("<|im_start|>assistant\n")
    _, thinking, answer = split(["\nfirst, ", "think.</think>", "\n\nanswer"], inside=True)
    assert (thinking, answer) == ("first, think.", "answer")


def test_stop_strings_apply_to_the_answer_only():
    stream = TextStream(["STOP"], ThinkingSplit(inside=True))
    texts = [stream.push(p.encode()) for p in ["no STOP in thinking", "</think>answer ST", "OP more"]]
    assert texts[-1] == ("", True) and "".join(t for t, _ in texts) == "answer "
    assert stream.take_reasoning() == "no STOP in thinking"


def test_a_text_completion_has_no_split():
    stream = TextStream([])
    assert stream.push(b"<think>x</think>y") == ("<think>x</think>y", False) and stream.take_reasoning() == ""


def test_the_worker_merges_held_outputs_thinking_too():
    from infersnap.workers.worker import Held

    held = Held()
    held.add([wire.Text("a", reasoning="one ")])
    held.add([wire.Text("a", reasoning="two", text="x"), wire.Final("a", "stop", last=wire.Text("a", text="y"))])
    [output] = held.take()
    assert (output.last.reasoning, output.last.text) == ("one two", "xy")


def chat_body(**fields) -> schema.ChatCompletionRequest:
    return msgspec.convert({"messages": [{"role": "user", "content": "hi"}], **fields}, schema.ChatCompletionRequest)


def test_thinking_choices_reach_the_template_args():
    def args(**fields):
        return convert.chat_request(chat_body(**fields), "m", None)[0].template_args

    assert args() == {}
    assert args(chat_template_kwargs={"enable_thinking": False}) == {"enable_thinking": False}
    assert args(reasoning_effort="high") == {"reasoning_effort": "high"}
    assert args(reasoning_effort="none") == {"reasoning_effort": "none", "enable_thinking": False}
    # the explicit template variable wins
    assert args(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}) == {
        "reasoning_effort": "none", "enable_thinking": True}


def test_template_args_the_wire_cannot_carry_are_a_400():
    with pytest.raises(APIError) as refused:
        convert.chat_request(chat_body(chat_template_kwargs={"x": 2**70}), "m", None)
    assert refused.value.status == 400 and refused.value.param == "chat_template_kwargs"


def rendered(outputs: list[wire.Output], **fields) -> list[dict]:
    """What a ChatRender sends for these outputs of one choice: the chunks, or the one response."""
    body = chat_body(**fields)
    toolset = tools.from_request(body)
    chat = render.ChatRender("chatcmpl-1", "m", body, toolset)
    sent = [event.removeprefix(b"data: ") for output in outputs for event in chat.feed(0, *render.split(output))]
    if not chat.stream:
        sent.append(chat.final(wire.Final("x", "stop", prompt_tokens=3, completion_tokens=5)))
    return [json.loads(s) for s in sent]


OUTPUTS = [
    wire.Text("x", reasoning="Let me"),
    wire.Text("x", reasoning=" see."),
    wire.Text("x", text="It is"),
    wire.Final("x", "stop", last=wire.Text("x", text=" 4.")),
]


def test_the_message_carries_reasoning_and_every_required_field():
    [response] = rendered(OUTPUTS)
    choice = response["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is 4.", "refusal": None,
                                 "reasoning_content": "Let me see.", "reasoning": "Let me see."}
    assert choice["logprobs"] is None and choice["finish_reason"] == "stop"
    assert response["system_fingerprint"].startswith("infersnap-")
    [plain] = rendered([wire.Final("x", "stop", last=wire.Text("x", text="Hi"))])
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "Hi", "refusal": None}


def test_streamed_deltas_carry_the_reasoning():
    chunks = rendered(OUTPUTS, stream=True)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me see."
    assert "".join(d.get("reasoning", "") for d in deltas) == "Let me see."
    assert "".join(d.get("content") or "" for d in deltas) == "It is 4."
    assert "content" not in deltas[0] and deltas[0]["role"] == "assistant"
    assert all(c["system_fingerprint"].startswith("infersnap-") for c in chunks)


def test_thinking_streams_while_an_answer_that_may_be_a_call_is_held():
    tools_field = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    outputs = [wire.Text("x", reasoning="call f"), wire.Text("x", text='{"name": "f", '),
               wire.Final("x", "stop", last=wire.Text("x", text='"arguments": {}}'))]
    chunks = rendered(outputs, stream=True, tools=tools_field)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "reasoning_content": "call f", "reasoning": "call f"}
    assert deltas[-1]["tool_calls"][0]["function"]["name"] == "f"
    assert not any(d.get("content") for d in deltas)


# --- served: a copy of the default model whose chat template opens a think block ----------------

THINK_OFF = "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
GENERATION_PROMPT = "{{ '<|im_start|>assistant\n' }}"  # the default model's template has a real newline there
THINKING_PROMPT = GENERATION_PROMPT + THINK_OFF + "{% else %}{{ '<think>\\n' }}{% endif %}"
# The default model never closes a think block by itself: a schema holds its output to this JSON string.
# (Held to a schema, the output is JSON from its first token, so it does not start inside the block the
# template opened: the block is in the string, and the string's quotes are the answer's.)
FORCED = "<think>Two and two make four</think>The answer is 4"


def thinking_model() -> Path:
    """The default model with its chat template opening `<think>` at the generation prompt (Qwen3's way:
    `enable_thinking` false gives an empty, closed block), written once into the test cache."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    source = default_model_path()
    reader = gguf.GGUFReader(str(source))
    template = reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents()
    assert GENERATION_PROMPT in template, template
    template = template.replace(GENERATION_PROMPT, THINKING_PROMPT)
    key = hashlib.sha256(f"{source}:{source.stat().st_size}:{template}".encode()).hexdigest()[:12]
    path = TEST_CACHE / f"smollm2-thinking-{key}.gguf"
    if not path.exists():
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        writer = gguf.GGUFWriter(str(partial), reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
        new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
        copy_with_new_metadata(reader, writer, new, [])
        partial.rename(path)  # whole or absent, should a run be killed meanwhile
    return path


@pytest.fixture(scope="module", params=ENGINES)
def thinker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    settings = {"engines": request.param, "model.path": str(thinking_model()), "engines-measure": "false",
                "worker.slots": "2", "worker.embeddings": "false"}
    server = start_server(tmp_path_factory.mktemp("thinking"), **settings)
    yield server
    assert server.stop() == 0, server.log.read_text()


def ask(server, stream: bool = False, **fields) -> dict | list[dict]:
    body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "temperature": 0, "max_tokens": 48,
            "stream": stream, **fields}
    reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    if not stream:
        return reply.json()
    return [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]


# a pattern, not an enum: xgrammar writes an enum's "/" as "\/" (and no "\." in it: llama.cpp's
# converter writes that into a GBNF literal, which llama.cpp cannot parse)
FORCED_SCHEMA = {"type": "string", "pattern": "^" + FORCED + "$"}
FORCE_CLOSE = {"response_format": {"type": "json_schema", "json_schema": {"name": "forced", "schema": FORCED_SCHEMA}}}
THINKING, ANSWER = "Two and two make four", '"The answer is 4"'


def test_served_thinking_is_split_from_the_answer(thinker):
    reply = ask(thinker, **FORCE_CLOSE)
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == THINKING, message
    assert message["content"] == ANSWER and reply["choices"][0]["finish_reason"] == "stop"
    # every generated token counts, the thinking's too
    answer_tokens = httpx.post(f"{thinker.base}/tokenize", json={"content": ANSWER}).json()["tokens"]
    assert reply["usage"]["completion_tokens"] > len(answer_tokens) + 3, reply["usage"]


def test_served_thinking_streams_as_deltas(thinker):
    chunks = ask(thinker, stream=True, **FORCE_CLOSE)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THINKING
    assert "".join(d.get("reasoning", "") for d in deltas) == THINKING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    thought = [i for i, d in enumerate(deltas) if d.get("reasoning_content")]
    answered = [i for i, d in enumerate(deltas) if d.get("content")]
    assert answered[0] < thought[0] and thought[-1] < answered[1], deltas  # '"', the thinking, the rest


def test_a_think_block_that_never_closes_is_all_reasoning(thinker):
    reply = ask(thinker, max_tokens=8)
    message, choice = reply["choices"][0]["message"], reply["choices"][0]
    assert message["reasoning_content"] and message["content"] == "" and choice["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("fields", [{"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}])
def test_a_request_can_turn_thinking_off(thinker, fields):
    reply = ask(thinker, max_tokens=16, **fields)
    message = reply["choices"][0]["message"]
    assert "reasoning_content" not in message and "reasoning" not in message and message["content"], message


# --- the agents' APIs: the same split, as their own items and blocks ----------------------------------------

RESPONSE_FORMAT = {"format": {"type": "json_schema", "name": "forced", "schema": FORCED_SCHEMA}}


def test_a_response_carries_the_thinking_as_a_reasoning_item(thinker):
    body = {"input": "What is 2 + 2?", "temperature": 0, "max_output_tokens": 48, "text": RESPONSE_FORMAT}
    reply = httpx.post(f"{thinker.url}/responses", json=body, timeout=120).json()
    # the forced JSON string's opening quote comes before the block: '"', the thinking, the rest
    assert [item["type"] for item in reply["output"]] == ["message", "reasoning", "message"], reply
    assert reply["output"][1]["content"][0]["text"] == THINKING and reply["status"] == "completed"
    assert "".join(reply["output"][i]["content"][0]["text"] for i in (0, 2)) == ANSWER
    details = reply["usage"]["output_tokens_details"]
    assert 5 < details["reasoning_tokens"] < reply["usage"]["output_tokens"], reply["usage"]
    streamed = httpx.post(f"{thinker.url}/responses", json={**body, "stream": True}, timeout=120).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: ")]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == THINKING
    assert events[-1]["response"]["output"][1]["type"] == "reasoning"


def test_a_message_carries_the_thinking_as_a_thinking_block(thinker):
    body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 48, "temperature": 0,
            "output_config": {"format": {"type": "json_schema", "schema": FORCED_SCHEMA}}}
    reply = httpx.post(f"{thinker.url}/messages", json=body, timeout=120).json()
    assert [block["type"] for block in reply["content"]] == ["text", "thinking", "text"], reply
    assert reply["content"][1]["thinking"] == THINKING and reply["stop_reason"] == "end_turn"
    assert reply["content"][0]["text"] + reply["content"][2]["text"] == ANSWER
    streamed = httpx.post(f"{thinker.url}/messages", json={**body, "stream": True}, timeout=120).text
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == THINKING


def test_a_think_block_that_never_closes_ends_the_agents_answers_as_cut(thinker):
    reply = httpx.post(f"{thinker.url}/messages", json={
        "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8, "temperature": 0}, timeout=120).json()
    assert [b["type"] for b in reply["content"]] == ["thinking"] and reply["stop_reason"] == "max_tokens", reply
    reply = httpx.post(f"{thinker.url}/responses", json={"input": "What is 2 + 2?", "max_output_tokens": 8,
                                                          "temperature": 0}, timeout=120).json()
    assert [i["type"] for i in reply["output"]] == ["reasoning"] and reply["status"] == "incomplete", reply
