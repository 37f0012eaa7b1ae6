"""The Sanic app: the OpenAI routes (a /v1 blueprint) and llama-server's, SSE streaming, and OpenAI-shaped
errors for everything."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from typing import Any, Callable, TypeVar

import msgspec
from sanic import Blueprint, Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, raw

from infersnap import wire
from infersnap.frontend import access, anthropic, convert, metrics, openapi, render, responses, schema, tools, webui
from infersnap.frontend.broker_client import STATUS_TIMEOUT, BrokerClient, BrokerUnavailable
from infersnap.frontend.errors import STATUS_CODES, APIError, failure_error
from infersnap.frontend.reader import Reader, choice_requests
from infersnap.frontend.metrics import RequestRecord
from infersnap.plan import PlanFile, ServePlan

log = logging.getLogger("infersnap.frontend")
Body = TypeVar("Body")
JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STREAM_SEND_BUFFER = 16 * 1024  # bytes; the kernel doubles it, asyncio adds 64 KiB before a send waits
ANTHROPIC_PATHS = "/v1/messages"  # its errors are in Anthropic's shape
LOOKUP_TIMEOUT = 30.0  # seconds; a worker answers a lookup between two engine steps
NO_WORKER = wire.Failure("", 503, "no worker answered; retry shortly")
NO_BROKER = wire.Failure("", 503, "the server's broker does not answer; please retry")


def json_response(body: bytes, status: int = 200) -> HTTPResponse:
    return raw(body, status=status, content_type=JSON)


def decode_body(request: Request, kind: type[Body]) -> Body:
    try:
        return msgspec.json.decode(request.body, type=kind)
    except msgspec.ValidationError as exc:
        field = re.search(r"at `\$\.?([^`]*)`", str(exc))
        raise APIError(400, f"Invalid request: {exc}", param=field.group(1) if field else None) from None
    except msgspec.DecodeError as exc:
        raise APIError(400, f"The body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # invalid UTF-8 inside a string
        raise APIError(400, f"The body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except RecursionError:  # unknown fields are skipped recursively
        raise APIError(400, "The body is nested too deeply") from None


def create_app(plan: ServePlan, plan_file: PlanFile | None = None) -> Sanic:
    """The app serving `plan`; with its `plan_file`, the plan follows the file (models added or removed)."""
    app = Sanic("infersnap")
    app.config.REQUEST_MAX_SIZE = plan.max_body_bytes
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # generations end on their own terms
    app.config.KEEP_ALIVE_TIMEOUT = 30

    def follow_plan() -> None:
        # The broker read the plan file anew (or is a new broker): read it too. Read after the broker,
        # a model listed here is one it serves, and one no longer listed here it refuses.
        replanned = plan_file.changed()
        if replanned is not None:
            app.ctx.plan = replanned

    @app.before_server_start
    async def connect(app: Sanic) -> None:
        app.ctx.broker = BrokerClient(on_replan=follow_plan if plan_file is not None else None)
        app.ctx.broker.start()

    @app.after_server_stop
    async def disconnect(app: Sanic) -> None:
        await app.ctx.broker.close()

    @app.exception(Exception)
    async def on_error(request: Request, exc: Exception) -> HTTPResponse:
        if isinstance(exc, APIError):
            error = exc
        elif isinstance(exc, SanicException):
            status = exc.status_code
            error = APIError(status, str(exc) or "request failed", code=STATUS_CODES.get(status))
        elif isinstance(exc, BrokerUnavailable):
            error = APIError(503, "the server is starting or restarting; retry shortly", headers={"Retry-After": "1"})
        else:
            log.exception("unexpected error on %s %s", request.method, request.path)
            error = APIError(500, "internal server error")
        body = error.anthropic_body() if request.path.startswith(ANTHROPIC_PATHS) else error.body()
        return raw(body, status=error.status, headers=error.headers, content_type=JSON)

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        """200 while the default model can be served, now or by loading it on demand; 503 only while
        starting, draining, or when every lane of it failed. Busy is healthy: load is /get_load's."""
        status = await request.app.ctx.broker.status()
        if status.draining:
            raise APIError(503, "Shutting down", type="unavailable_error", headers={"Retry-After": "1"})
        default = request.app.ctx.plan.default_model.name.lower()
        generating = [w for w in status.workers if w.model.lower() == default and "generate" in w.capabilities.tasks]
        if any(w.state == "ready" for w in generating):
            request.app.ctx.served = True
            return json_response(b'{"status":"ok"}')
        if generating and all(w.state == "failed" for w in generating):  # nothing to wait for: say why
            reasons = "; ".join(f"{w.worker_id}: {w.error}" for w in generating)
            raise APIError(503, f"No worker can serve: {reasons}", type="unavailable_error", headers={"Retry-After": "60"})
        state = next((m.state for m in status.models if m.name.lower() == default), "loading")
        if request.app.ctx.served or state in ("unloaded", "unloading"):  # idle, or loading again: a request loads it
            return json_response(b'{"status":"ok"}')
        raise APIError(503, "Loading model", type="unavailable_error", headers={"Retry-After": "1"})

    @app.get("/get_load")
    async def get_load(request: Request) -> HTTPResponse:
        """The default model's running and waiting requests, as vllm-router's power_of_two policy reads a node."""
        status = await request.app.ctx.broker.status(fresh=True)
        load = metrics.model_load(status, request.app.ctx.plan.default_model.name)
        return json_response(msgspec.json.encode({"load": load.running + load.waiting}))

    @app.get("/metrics")
    async def prometheus(request: Request) -> HTTPResponse:
        # asked now, not as last pushed: a scrape's gauges (what runs, what waits) are exact at its moment
        status = await request.app.ctx.broker.status(fresh=True)
        return raw(request.app.ctx.metrics.exposition(status), content_type=metrics.CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> HTTPResponse:
        body = decode_body(request, schema.TokenizeRequest)
        message = wire.Tokenize(
            id=f"tok-{uuid.uuid4().hex}",
            model=body.model or plan.default_model.name,
            content=body.content,
            add_special=body.add_special,
            with_pieces=body.with_pieces,
        )
        result = await lookup(request, message)
        tokens: list[int | schema.TokenPiece] = list(result.tokens)
        if body.with_pieces:
            tokens = [schema.TokenPiece(t, piece_json(p)) for t, p in zip(result.tokens, result.pieces)]
        return json_response(msgspec.json.encode(schema.TokenizeResponse(tokens=tokens)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> HTTPResponse:
        body = decode_body(request, schema.DetokenizeRequest)
        model = body.model or plan.default_model.name
        result = await lookup(request, wire.Detokenize(id=f"detok-{uuid.uuid4().hex}", model=model, tokens=body.tokens))
        return json_response(msgspec.json.encode(schema.DetokenizeResponse(content=result.text)))

    app.blueprint(openai_routes())
    app.ctx.started = schema.now()
    app.ctx.plan = plan
    app.ctx.metrics = metrics.Metrics()
    app.ctx.served = False  # /health has seen the default model ready: loading it again later is not starting
    app.ctx.responses = responses.Store()
    access.install(app, plan)
    openapi.install(app, plan)
    webui.install(app, plan)
    return app


def openai_routes() -> Blueprint:
    """The OpenAI API, under /v1. Its handlers find the plan, broker and metrics on request.app.ctx."""
    v1 = Blueprint("openai", url_prefix="/v1")

    @v1.get("/models")
    async def list_models(request: Request) -> HTTPResponse:
        cards = await model_cards(request)
        return json_response(msgspec.json.encode(schema.ModelList(data=list(cards.values()))))

    @v1.get("/models/<model_id:path>")
    async def get_model(request: Request, model_id: str) -> HTTPResponse:
        return json_response(msgspec.json.encode(await model_card(request, model_id)))

    @v1.post("/models/load")
    async def load_model(request: Request) -> HTTPResponse:
        return await control_model(request, load=True)

    @v1.post("/models/unload")
    async def unload_model(request: Request) -> HTTPResponse:
        return await control_model(request, load=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> HTTPResponse | None:
        return await complete(request, schema.ChatCompletionRequest, prepare_chat)

    @v1.post("/completions")
    async def completions(request: Request) -> HTTPResponse | None:
        return await complete(request, schema.CompletionRequest, prepare_text)

    # vLLM's render routes: the prompt's tokens as the request would have them, which vllm-router's
    # cache_aware policy asks of every node to find the one that holds the longest beginning of it
    @v1.post("/chat/completions/render")
    async def render_chat(request: Request) -> HTTPResponse:
        tokens = await chat_prompt_tokens(request, decode_body(request, schema.ChatCompletionRequest))
        return json_response(msgspec.json.encode(schema.RenderedPrompt(token_ids=tokens)))

    @v1.post("/completions/render")
    async def render_completion(request: Request) -> HTTPResponse:
        body = decode_body(request, schema.CompletionRequest)
        model = body.model or request.app.ctx.plan.default_model.name
        message = wire.Tokenize(id=f"tok-{uuid.uuid4().hex}", model=model, content=body.prompts()[0], add_special=True)
        tokens = list((await lookup(request, message)).tokens)
        return json_response(msgspec.json.encode(schema.RenderedPrompt(token_ids=tokens)))

    @v1.post("/messages")
    async def messages(request: Request) -> HTTPResponse | None:
        return await complete(request, anthropic.MessagesRequest, prepare_messages)

    @v1.post("/messages/count_tokens")
    async def count_message_tokens(request: Request) -> HTTPResponse:
        body = decode_body(request, anthropic.CountTokensRequest)
        count = len(await chat_prompt_tokens(request, anthropic.to_chat(body)))
        return json_response(msgspec.json.encode(anthropic.TokenCount(count)))

    @v1.post("/responses")
    async def create_response(request: Request) -> HTTPResponse | None:
        store = request.app.ctx.responses

        def prepare(body: responses.ResponsesRequest, plan: ServePlan):
            chat = responses.to_chat(body, store)
            prompts, toolset = agent_prompts(chat, plan)
            return prompts, responses.ResponsesRender(body, chat, prompts[0].model, toolset, store)

        return await complete(request, responses.ResponsesRequest, prepare)

    @v1.post("/responses/input_tokens")
    async def count_response_tokens(request: Request) -> HTTPResponse:
        body = decode_body(request, responses.InputTokensRequest)
        count = len(await chat_prompt_tokens(request, responses.to_chat(body, request.app.ctx.responses)))
        return json_response(msgspec.json.encode(responses.InputTokens(count)))

    @v1.get("/responses/<response_id>")
    async def get_response(request: Request, response_id: str) -> HTTPResponse:
        return json_response(request.app.ctx.responses.get(response_id).response)

    @v1.delete("/responses/<response_id>")
    async def delete_response(request: Request, response_id: str) -> HTTPResponse:
        request.app.ctx.responses.delete(response_id)
        return json_response(msgspec.json.encode(responses.Deleted(response_id)))

    @v1.post("/embeddings")
    async def embeddings(request: Request) -> HTTPResponse:
        plan: ServePlan = request.app.ctx.plan
        with RequestRecord(request.app.ctx.metrics, "embeddings") as record:
            body = decode_body(request, schema.EmbeddingRequest)
            embed = convert.embedding_request(body, plan.default_model.name)
            if plan.model(embed.model) is not None and not plan.embeddings(embed.model):
                raise APIError(501, "this server runs no embedding worker (worker.embeddings is false, or no "
                               "llama.cpp engine runs on this CPU)", type="not_supported_error", code="not_supported")
            record.request_id, record.model = embed.id, embed.model
            reader = record.reader = Reader(request.app.ctx.broker, [embed], plan.request_timeout)
            async with reader:
                [answer] = await reader.wait()
            record.status = 200
            return json_response(render.embeddings(answer, embed.model, body.encoding_format))

    return v1


async def model_cards(request: Request, fresh: bool = False) -> dict[str, schema.ModelCard]:
    """Every model of the plan (the default first) with its state from the broker, by lowercase id;
    `fresh`: as the broker has it now, not as it last sent it."""
    plan: ServePlan = request.app.ctx.plan
    states = {m.name.lower(): m for m in (await request.app.ctx.broker.status(fresh)).models}
    cards = {}
    for spec in plan.models:
        state = states.get(spec.name.lower())
        can = [*(["chat", "tools"] if spec.chat else []), "completions", *(["embeddings"] if plan.embeddings(spec.name) else [])]
        cards[spec.name.lower()] = schema.ModelCard(
            id=spec.name, created=request.app.ctx.started, state=state.state if state else "unloaded",
            error=(state.error or None) if state else None, capabilities=can, context_length=spec.context)
    return cards


async def model_card(request: Request, model_id: str, fresh: bool = False) -> schema.ModelCard:
    cards = await model_cards(request, fresh)
    card = cards.get(model_id.lower())
    if card is None:
        known = ", ".join(c.id for c in cards.values())
        raise APIError(404, f"The model '{model_id}' does not exist. Models served here: {known}", param="model",
                       code="model_not_found")
    return card


async def control_model(request: Request, load: bool) -> HTTPResponse:
    """Load a model now (it keeps loading after the answer), or unload it once its requests end."""
    body = decode_body(request, schema.ModelControlRequest)
    control = wire.ModelControl(f"ctl-{uuid.uuid4().hex}", body.model, load, convert.keep_alive_seconds(body.keep_alive))
    async with Reader(request.app.ctx.broker, [control], STATUS_TIMEOUT, late=NO_BROKER) as reader:
        await reader.wait()
    # its state as the control left it: the broker's next push may not have come yet
    return json_response(msgspec.json.encode(await model_card(request, body.model, fresh=True)))


async def chat_prompt_tokens(request: Request, chat: schema.ChatCompletionRequest) -> list[int]:
    """The tokens of this chat body's prompt, by a worker's tokenizer and template."""
    plan: ServePlan = request.app.ctx.plan
    [generate] = convert.chat_request(chat, plan.default_model.name, tools.from_request(chat))
    count = wire.Tokenize(id=f"tok-{uuid.uuid4().hex}", model=generate.model, content="",
                          messages=generate.messages, template_args=generate.template_args)
    return list((await lookup(request, count)).tokens)


async def lookup(request: Request, message: wire.Tokenize | wire.Detokenize) -> wire.Tokens:
    """A worker tokenizer's answer; its failure (unknown model, bad token id, no worker) as the HTTP error."""
    async with Reader(request.app.ctx.broker, [message], LOOKUP_TIMEOUT, late=NO_WORKER) as reader:
        [answer] = await reader.wait()
    return answer


def piece_json(piece: bytes) -> str | list[int]:
    """A token's piece as llama-server shows it: text, or its bytes when they are not UTF-8 on their own."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


class ClientStalled(Exception):
    """A streaming client left the answer unread for longer than http.send-timeout."""


class EventStream:
    """An answer sent as server-sent events, ended by [DONE]."""

    def __init__(self, response: Any, send_timeout: float) -> None:
        self.response, self.send_timeout = response, send_timeout

    @classmethod
    async def open(cls, request: Request, send_timeout: float) -> EventStream:
        """Send the headers. The kernel's send buffer is capped first (Linux would grow it to megabytes),
        so that a client that stops reading shows as a send that waits, within a few hundred tokens."""
        connection = request.transport.get_extra_info("socket")
        if connection is not None:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
        return cls(await request.respond(content_type="text/event-stream", headers=SSE_HEADERS), send_timeout)

    async def send(self, *events: bytes) -> None:
        """Send events (render.sse). Sending waits while the connection's buffers are full, that is while
        the client reads nothing; past send_timeout seconds of that the client counts as stalled."""
        for event in events:
            try:
                await asyncio.wait_for(self.response.send(event), self.send_timeout)
            except asyncio.TimeoutError:
                raise ClientStalled from None

    async def end(self) -> None:
        await self.response.eof()


def prepare_chat(body: schema.ChatCompletionRequest, plan: ServePlan) -> tuple[list[wire.Generate], render.ChatRender]:
    convert.check_limits(body, plan)
    toolset = tools.from_request(body)  # read once: convert describes the tools to the model, the render parses calls
    prompts = convert.chat_request(body, plan.default_model.name, toolset)
    return prompts, render.ChatRender(prompts[0].id, prompts[0].model, body, toolset)


def prepare_text(body: schema.CompletionRequest, plan: ServePlan) -> tuple[list[wire.Generate], render.TextRender]:
    convert.check_limits(body, plan)
    prompts = convert.completion_request(body, plan.default_model.name)
    return prompts, render.TextRender(prompts[0].id, prompts[0].model, body)


def prepare_messages(
    body: anthropic.MessagesRequest, plan: ServePlan
) -> tuple[list[wire.Generate], anthropic.MessagesRender]:
    chat = anthropic.to_chat(body)
    prompts, toolset = agent_prompts(chat, plan)
    return prompts, anthropic.MessagesRender(prompts[0].model, chat, toolset)


def agent_prompts(
    chat: schema.ChatCompletionRequest, plan: ServePlan
) -> tuple[list[wire.Generate], tools.ToolSet | None]:
    """The Generate of a chat body translated from an agents' API, and its tools. Agents ask for more than
    a local context holds: the answer ends where the context (or limits.max-tokens) does, not refused."""
    chat.max_tokens = min(chat.max_tokens or plan.max_tokens, plan.max_tokens)
    toolset = tools.from_request(chat)
    return convert.chat_request(chat, plan.default_model.name, toolset, fit_context=True), toolset


async def complete(
    request: Request,
    kind: type[Body],
    prepare: Callable[[Body, ServePlan], tuple[list[wire.Generate], render.Render]],
) -> HTTPResponse | None:
    """Run a request's generations (one per choice) and answer with JSON, or with SSE when the body
    asks to stream; count it in the metrics and log its line however it ends."""
    plan: ServePlan = request.app.ctx.plan
    with RequestRecord(request.app.ctx.metrics, request.path.removeprefix("/v1/")) as record:
        prompts, renderer = prepare(decode_body(request, kind), plan)
        record.request_id, record.model = prompts[0].id, prompts[0].model
        n = len(renderer.choices) // len(prompts)
        requests = choice_requests(prompts, n)
        reader = record.reader = Reader(request.app.ctx.broker, requests, plan.request_timeout, choices_per_prompt=n)
        stream: EventStream | None = None  # opened at the first output: a failure before it gets a real HTTP status
        failure: wire.Failure | None = None
        try:
            async with reader:
                while not reader.ended:
                    index, output = await reader.next()
                    record.output_arrived()
                    if isinstance(output, wire.Failure):
                        failure = output
                        break
                    events = renderer.feed(index, *render.split(output))
                    if renderer.stream:
                        stream = stream or await EventStream.open(request, plan.send_timeout)
                        await stream.send(*events)
            if stream is None:
                if failure is not None:
                    raise failure_error(failure)
                record.status = 200
                return json_response(renderer.final(reader.summary()))
            last = renderer.failed(failure_error(failure)) if failure is not None else renderer.closing(reader.summary())
            # Set before the last events: a client that closes as soon as it reads them still got its whole answer.
            record.status = failure.status if failure is not None else 200
            await stream.send(*last)
            await stream.end()
            return None
        except ClientStalled:
            request.transport.close()  # its generations were cancelled on the way out
            return None
