"""The Sanic app: OpenAI routes, SSE streaming, and OpenAI-shaped errors for everything."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from typing import Any, Callable, TypeVar

import msgspec
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import HTTPResponse, raw

from infersnap import wire
from infersnap.frontend import access, convert, metrics, openapi, schema
from infersnap.frontend.broker_client import BrokerClient, BrokerUnavailable
from infersnap.frontend.errors import STATUS_CODES, APIError
from infersnap.frontend.metrics import RequestRecord
from infersnap.frontend.render import ChatRender, TextRender
from infersnap.plan import ServePlan

log = logging.getLogger("infersnap.frontend")
Body = TypeVar("Body")
JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STALL_CHECK_SECONDS = 5.0
STREAM_SEND_BUFFER = 16 * 1024  # bytes; the kernel doubles it, asyncio adds 64 KiB before a send waits


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


def failure_error(failure: wire.Failure) -> APIError:
    headers = {"Retry-After": "1"} if failure.status == 503 else None
    return APIError(failure.status, failure.message, param=failure.param, code=failure.code, headers=headers)


def create_app(plan: ServePlan) -> Sanic:
    app = Sanic("infersnap")
    app.config.REQUEST_MAX_SIZE = plan.max_body_bytes
    app.config.RESPONSE_TIMEOUT = 24 * 3600  # generations end on their own terms
    app.config.KEEP_ALIVE_TIMEOUT = 30

    @app.before_server_start
    async def connect(app: Sanic) -> None:
        app.ctx.broker = BrokerClient()
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
        return raw(error.body(), status=error.status, headers=error.headers, content_type=JSON)

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        status = await request.app.ctx.broker.status()
        if status.draining:
            raise APIError(503, "Shutting down", type="unavailable_error", headers={"Retry-After": "1"})
        if any(w.state == "ready" for w in status.workers):
            return json_response(b'{"status":"ok"}')
        raise APIError(503, "Loading model", type="unavailable_error", headers={"Retry-After": "1"})

    @app.get("/v1/models")
    async def list_models(request: Request) -> HTTPResponse:
        status = await request.app.ctx.broker.status()
        cards = [schema.ModelCard(id=m, created=app.ctx.started) for m in wire.models_of(status)]
        return json_response(msgspec.json.encode(schema.ModelList(data=cards)))

    @app.get("/v1/models/<model_id:path>")
    async def get_model(request: Request, model_id: str) -> HTTPResponse:
        status = await request.app.ctx.broker.status()
        for model in wire.models_of(status):
            if model.lower() == model_id.lower():
                return json_response(msgspec.json.encode(schema.ModelCard(id=model, created=app.ctx.started)))
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> HTTPResponse | None:
        return await complete(request, schema.ChatCompletionRequest, convert.chat_request, ChatRender)

    @app.post("/v1/completions")
    async def completions(request: Request) -> HTTPResponse | None:
        return await complete(request, schema.CompletionRequest, convert.completion_request, TextRender)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> HTTPResponse:
        body = decode_body(request, schema.TokenizeRequest)
        message = wire.Tokenize(
            id=f"tok-{uuid.uuid4().hex}",
            model=body.model or plan.model_name,
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
        model = body.model or plan.model_name
        result = await lookup(request, wire.Detokenize(id=f"detok-{uuid.uuid4().hex}", model=model, tokens=body.tokens))
        return json_response(msgspec.json.encode(schema.DetokenizeResponse(content=result.content)))

    app.ctx.started = schema.now()
    app.ctx.plan = plan
    app.ctx.metrics = metrics.install(app)
    access.install(app, plan)
    openapi.install(app, plan)
    return app


async def lookup(request: Request, message: wire.Tokenize | wire.Detokenize) -> wire.TokenizeResult:
    """A worker tokenizer's answer; its failure (unknown model, bad token id, no worker) as the HTTP error."""
    result = await request.app.ctx.broker.lookup(message)
    if result.failure is not None:
        raise failure_error(result.failure)
    return result


def piece_json(piece: bytes) -> str | list[int]:
    """A token's piece as llama-server shows it: text, or its bytes when they are not UTF-8 on their own."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


async def next_output(
    broker: BrokerClient, request_id: str, outputs: asyncio.Queue[wire.Output], deadline: float | None
) -> wire.Output:
    """The request's next output; an error Output if the broker no longer knows the request,
    or if the request ran past its deadline (then it is stopped where it runs).

    A broker that restarted has lost its routes: without this check such a
    request would wait forever. Requests and status queries share one socket,
    so the broker has always seen the request before it answers the query.
    """
    loop = asyncio.get_running_loop()
    while True:
        wait = STALL_CHECK_SECONDS if deadline is None else min(STALL_CHECK_SECONDS, deadline - loop.time())
        try:
            return await asyncio.wait_for(outputs.get(), max(wait, 0))
        except asyncio.TimeoutError:
            pass
        if deadline is not None and loop.time() >= deadline:
            broker.abort(request_id)
            return wire.failed(
                request_id, 504, "the request took longer than the server's queue.request-timeout", code="timeout"
            )
        try:
            known = request_id in (await broker.status()).in_flight
        except BrokerUnavailable:
            known = False
        if not known and outputs.empty():
            return wire.failed(request_id, 503, "the server lost this request while restarting; please retry")


class ClientStalled(Exception):
    """A streaming client left the answer unread for longer than http.send-timeout."""


def bound_send_buffer(request: Request) -> None:
    """Cap what the kernel buffers for a stream (Linux would grow it to megabytes), so that
    a client that stops reading shows as a send that waits, within a few hundred tokens."""
    connection = request.transport.get_extra_info("socket")
    if connection is not None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)


async def send_event(response: Any, data: bytes, timeout: float) -> None:
    """Send one SSE event. Sending waits while the connection's buffers are full, that is while
    the client reads nothing; past `timeout` seconds of that the client counts as stalled."""
    try:
        await asyncio.wait_for(response.send(b"data: " + data + b"\n\n"), timeout)
    except asyncio.TimeoutError:
        raise ClientStalled from None


async def complete(
    request: Request,
    kind: type[schema.SamplingFields],
    to_generate: Callable[[Any, str], wire.Generate],
    render_class: type[ChatRender] | type[TextRender],
) -> HTTPResponse | None:
    """Run one generation and answer with JSON, or with SSE when the body asks to stream;
    count it in the metrics and log its line however it ends."""
    record = RequestRecord(request.app.ctx.metrics, request.path.removeprefix("/v1/"))
    output: wire.Output | None = None  # the last one read; finish_reason set once the request ended
    try:
        body = decode_body(request, kind)
        convert.check_limits(body, request.app.ctx.plan)
        generate = to_generate(body, request.app.ctx.plan.model_name)
        record.request_id, record.model = generate.id, generate.model
        render = render_class(generate.id, generate.model, body)
        broker: BrokerClient = request.app.ctx.broker
        timeout = request.app.ctx.plan.request_timeout
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        outputs = await broker.submit(generate)
        try:
            output = await next_output(broker, generate.id, outputs, deadline)
            record.output_arrived()
            if not body.stream:
                pieces, tokens = [], []
                while True:
                    if output.failure is not None:
                        raise failure_error(output.failure)
                    pieces.append(output.text)
                    tokens += output.logprobs
                    if output.finish_reason is not None:
                        record.status = 200
                        return json_response(render.response("".join(pieces), tokens, output))
                    output = await next_output(broker, generate.id, outputs, deadline)

            if output.failure is not None:  # before any byte is sent: a real HTTP error status
                raise failure_error(output.failure)
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            send_timeout = request.app.ctx.plan.send_timeout
            bound_send_buffer(request)
            response = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
            while True:
                if output.failure is not None:
                    await send_event(response, failure_error(output.failure).body(), send_timeout)
                    break
                for event in render.chunks(output):
                    await send_event(response, event, send_timeout)
                if output.finish_reason is not None:
                    if include_usage:
                        await send_event(response, render.usage_chunk(output), send_timeout)
                    break
                output = await next_output(broker, generate.id, outputs, deadline)
            # Ended: a client that closes as soon as it reads [DONE] still got its whole answer.
            record.status = output.failure.status if output.failure is not None else 200
            await send_event(response, b"[DONE]", send_timeout)
            await response.eof()
            return None
        finally:
            # A request still generating when the handler ends (client gone, send failed) is stopped.
            if output is not None and output.finish_reason is not None:
                broker.forget(generate.id)
            else:
                broker.abort(generate.id)
    except APIError as exc:
        record.status = exc.status
        raise
    except ClientStalled:
        request.transport.close()  # its generation was stopped on the way out (output unfinished)
        return None
    finally:
        record.finish(output if output is not None and output.finish_reason is not None else None)
