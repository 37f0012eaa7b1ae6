"""Every message that crosses a ZeroMQ socket, in one place.

Messages are msgspec Structs encoded as msgpack arrays (array_like) with a
tag as the first element, so each side decodes any message with one typed
decoder. The frontend, the CLI, the broker and the workers all import this
module; nothing else is shared between them.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, array_like=True, frozen=True):
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: list[str] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = {}
    # The output must be JSON matching this schema (JSON text, normalized by infersnap.json_schema):
    # response_format and forced tool calls both become one, and each engine enforces it with a grammar.
    json_schema: str | None = None
    logprobs: int = -1  # -1: none; 0: each generated token's own logprob; k > 0: also the k most likely tokens
    prompt_logprobs: int = -1  # the same for the prompt's tokens (completions' echo with logprobs)


class ChatMessage(msgspec.Struct, array_like=True, frozen=True):
    role: str
    content: str


class Timings(msgspec.Struct, array_like=True):
    """Like llama-server's `timings`: prompt processing and generation."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0


class Failure(msgspec.Struct, array_like=True, frozen=True):
    """Why a request ended without an answer: becomes an OpenAI error body (its type follows the status)."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None


class Message(msgspec.Struct, tag=True, array_like=True):
    """Base of every message on the wire."""


# --- frontend or CLI -> broker -> worker -------------------------------------


class Generate(Message):
    """One completion request. Exactly one of `prompt` and `messages` is set; `suffix` only with `prompt`."""

    id: str
    model: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    suffix: str | None = None  # fill in the middle: generate what goes between `prompt` and this


class Embed(Message):
    """One embeddings request: texts, or token id lists (exactly one of the two is set). Queued and
    routed like a Generate, to a worker whose task is "embed"; answered by one Output with `embeddings`."""

    id: str
    model: str
    texts: list[str] = []
    token_lists: list[list[int]] = []
    dimensions: int | None = None  # None: the model's own


class Abort(Message):
    """Stop these requests; safe to send more than once or after they ended."""

    ids: list[str]


class StatusQuery(Message):
    id: str  # echoed in the Status reply


class WorkerExited(Message):
    """From the supervisor: a worker's process ended (its requests will get no more output)."""

    worker_id: str
    code: int


class Drain(Message):
    """Shutting down: refuse new requests; those accepted may run `grace` seconds more, then end with 503."""

    grace: float


# --- worker -> broker -> frontend --------------------------------------------


class TopLogprob(msgspec.Struct, array_like=True, frozen=True):
    token: int
    piece: bytes  # its bytes (a special token's text); may be part of a UTF-8 character
    logprob: float


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    """A generated token's logprob, and the most likely tokens at its place when asked (SamplingParams.logprobs)."""

    token: int
    piece: bytes  # the bytes it added to the text
    logprob: float
    top: list[TopLogprob] = []  # most likely first


class Output(msgspec.Struct, array_like=True):
    """What one request produced in one engine step."""

    id: str
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | None while running
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None  # set on the last output
    failure: Failure | None = None
    worker: str = ""  # on the last output: the worker that served it (the broker fills it in)
    logprobs: list[TokenLogprob] = []  # with SamplingParams.logprobs >= 0: the tokens generated since the last output
    embeddings: list[bytes] = []  # the answer to an Embed, one per input: float32 little-endian, unit length
    # with SamplingParams.prompt_logprobs >= 0, on the first output: every prompt token, the first with
    # logprob NaN (nothing comes before it to predict it) and no top tokens
    prompt_logprobs: list[TokenLogprob] = []


Request = Generate | Embed  # what the broker queues and a worker's slot runs


def task_of(request: Message) -> str:
    """Which workers take it (WorkerInfo.task): Embed goes to embedding workers, the rest to generating ones."""
    return "embed" if isinstance(request, Embed) else "generate"


def failed(request_id: str, status: int, message: str, *, param: str | None = None, code: str | None = None) -> Output:
    """The last Output of a request that ends with an error instead of an answer."""
    return Output(id=request_id, finish_reason="error", failure=Failure(status, message, code=code, param=param))


class Results(Message):
    """The outputs of one engine step, all requests together."""

    outputs: list[Output]


# --- worker <-> broker -------------------------------------------------------


class WorkerInfo(msgspec.Struct, array_like=True):
    worker_id: str
    device: str
    engine: str
    model: str
    slots: int
    context: int
    state: str  # "loading" | "ready" | "failed"
    error: str = ""
    running: int = 0
    waiting: int = 0
    pid: int = 0
    restarts: int = 0  # times the supervisor restarted this worker's process
    task: str = "generate"  # "generate": Generate and tokenizer lookups; "embed": Embed


class WorkerStatus(Message):
    """Sent by a worker when it starts, when its state changes, and as its heartbeat."""

    info: WorkerInfo


# --- broker -> CLI or frontend -----------------------------------------------


class Status(Message):
    id: str
    endpoints: dict[str, str]
    workers: list[WorkerInfo]
    in_flight: list[str] = []  # request ids the broker is routing now, queued ones included
    waiting: int = 0  # requests queued in the broker for a free slot
    draining: bool = False


def models_of(status: Status) -> list[str]:
    """The distinct model ids that live workers serve or are loading."""
    return sorted({w.model for w in status.workers if w.state != "failed"})


# --- tokenizer lookups: frontend -> broker -> worker -> broker -> frontend ----
# Answered by any ready worker serving the model, between two engine steps: they take no slot and
# never wait in the broker's queue. A lookup the broker or a lost worker ends early gets a failed
# Output in Results, like a Generate.


class Tokenize(Message):
    id: str
    model: str
    content: str
    add_special: bool = False  # BOS (and EOS) where the model's tokenizer adds them to a prompt
    with_pieces: bool = False


class Detokenize(Message):
    id: str
    model: str
    tokens: list[int]


class TokenizeResult(Message):
    """The answer to a Tokenize (tokens, and their pieces if asked) or a Detokenize (content), or its failure."""

    id: str
    tokens: list[int] = []
    pieces: list[bytes] = []  # each token's bytes: a piece may hold part of a UTF-8 character
    content: str = ""
    failure: Failure | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(
    Generate | Abort | StatusQuery | Drain | WorkerExited | Results | WorkerStatus | Status
    | Tokenize | Detokenize | TokenizeResult | Embed
)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)
