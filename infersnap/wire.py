"""Every message that crosses a ZeroMQ socket, in one place.

Messages are msgspec Structs encoded as msgpack arrays (array_like) with a
tag as the first element, so each side decodes any message with one typed
decoder. The frontend, the CLI, the supervisor, the broker and the workers all
import this module; it holds messages only. What they share beside it lives in
infersnap/ too: the plan (plan.py), the rule between a request's needs and a
worker's capabilities (routing.py), the runtime registry (runtimes.py).
"""

from __future__ import annotations

import signal
from typing import Any

import msgspec

from infersnap.profiles import Speed


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
    # True (the agents' APIs): max_tokens is lowered to the room the prompt leaves in the context, ending
    # with "length" there; False (chat and text completions): a prompt plus max_tokens past it is refused
    fit_context: bool = False


class ChatMessage(msgspec.Struct, array_like=True, frozen=True):
    role: str
    content: str


class Timings(msgspec.Struct, array_like=True):
    """Like llama-server's `timings`: prompt processing and generation."""

    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0


class Message(msgspec.Struct, tag=True, array_like=True):
    """Base of every message on the wire."""


# --- the requests: frontend -> broker -> worker --------------------------------
# A request travels as two frames, a Submit (or Dispatch) that the broker reads and the request's
# body, which it passes on unread. Every request is answered by Outputs (the tagged results below):
# a Generate by Text chunks, then a Final; the others by one answer; any of them by a Failure instead.


class Generate(Message):
    """One completion request. Exactly one of `prompt` and `messages` is set; `suffix` only with `prompt`."""

    id: str
    model: str
    params: SamplingParams
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    suffix: str | None = None  # fill in the middle: generate what goes between `prompt` and this
    # variables for the chat template beside the messages (enable_thinking, reasoning_effort, ...)
    template_args: dict[str, Any] = {}
    keep_alive: int | None = None  # seconds its model stays loaded once idle (Work.keep_alive)


class Embed(Message):
    """One embeddings request: texts, or token id lists (exactly one of the two is set), answered
    by one Embeddings."""

    id: str
    model: str
    texts: list[str] = []
    token_lists: list[list[int]] = []
    dimensions: int | None = None  # None: the model's own
    keep_alive: int | None = None  # seconds its model stays loaded once idle (Work.keep_alive)


class Tokenize(Message):
    """Answered by one Tokens with `tokens` (and `pieces` if asked)."""

    id: str
    model: str
    content: str
    add_special: bool = False  # BOS (and EOS) where the model's tokenizer adds them to a prompt
    with_pieces: bool = False
    # set: the prompt these chat messages make (through the chat template, as a Generate's), not `content`
    messages: list[ChatMessage] | None = None
    template_args: dict[str, Any] = {}


class Detokenize(Message):
    """Answered by one Tokens whose `text` is the tokens' text."""

    id: str
    model: str
    tokens: list[int]


Request = Generate | Embed | Tokenize | Detokenize


# --- what a request needs, what a worker can do (the rule: infersnap/routing.py) ---------------------


class Needs(msgspec.Struct, array_like=True, frozen=True):
    task: str  # "generate", "embed" or "tokenize" (Tokenize and Detokenize, which take no slot)
    features: dict[str, str] = {}  # feature -> the request parameter that asks for it
    bans: list[int] | None = None  # with "logit_bias": the tokens it bans, when every bias is a ban (<= -100)
    json_schema: bool = False


class Capabilities(msgspec.Struct, array_like=True, frozen=True):
    tasks: list[str]  # which requests it takes
    features: list[str] = []
    # Without "logit_bias": a bias may still ban tokens (-100) if it bans each of these and no schema is asked for
    # (OpenVINO: banning every end-of-text token is done with stop tokens); None: no bias at all.
    ban_with: list[int] | None = None


class Work(msgspec.Struct, array_like=True, frozen=True):
    """How much a request asks of an engine, for the broker to guess which lane ends it sooner."""

    prompt_tokens: int = 0  # an estimate from its length: the frontend does not tokenize
    max_tokens: int | None = None  # None: up to the end of the context
    seeded: bool = False  # a seeded request goes to one lane always, for the same text every time
    # hashes of the request's text up to the end of each PREFIX_BLOCK characters: a lane sent the same
    # beginning before may hold it in its prompt cache, and read only the rest
    prefix: list[int] = []
    keep_alive: int | None = None  # seconds its model stays loaded once idle (Ollama's); None: the model's own


class Submit(Message):
    """Frontend -> broker, followed by the request's body: what the broker routes it by."""

    id: str
    model: str
    needs: Needs
    work: Work = Work()


class Dispatch(Message):
    """Broker -> worker, followed by the request's body: who to answer (the client's identity)."""

    client: bytes
    id: str


class Abort(Message):
    """Stop these requests; safe to send more than once or after they ended."""

    ids: list[str]


class StatusQuery(Message):
    id: str  # echoed in the Status reply
    # True: the broker also pushes this client a Status (id "") whenever a worker's or a model's state
    # changes, and at least every second, until the client is gone (the frontend and the supervisor follow)
    follow: bool = False


class ModelControl(Message):
    """Load a model now (to warm it), or unload it once idle; answered as a request is: a Final, or a Failure."""

    id: str
    model: str
    load: bool  # False: unload
    keep_alive: int | None = None  # for a load: seconds it stays once idle; None: the model's own


class WorkerExited(Message):
    """From the supervisor: a worker's process ended (its requests will get no more output)."""

    worker_id: str
    code: int  # as subprocess gives it: negative, the signal that killed it


class WorkerStart(msgspec.Struct, array_like=True, frozen=True):
    """One start of a worker's process, as the broker orders it."""

    number: int  # counts the starts ordered for this worker: the supervisor starts a process for each new one
    fallback: int = 0  # how it runs: 0 as its spec says, i > 0 as its spec's fallbacks[i - 1] (infersnap/plan.py)
    restarts: int = 0  # how often its process was started again after it died
    settings: str = ""  # on a fallback: its settings and why, as status shows them ("f32 (instead of ...)")


class Orders(Message):
    """Broker -> supervisor, whenever they change: the worker processes that should run now, each with the
    start it is on; a running process not listed is stopped. `failed`: the workers that are not started
    again (quarantined), and why; handed back in Supervise so that a broker started anew keeps them."""

    run: dict[str, WorkerStart]
    failed: dict[str, str] = {}


class Supervise(Message):
    """Supervisor -> broker, first on its one channel, and again on a new channel whenever it started the
    broker anew: it carries out the broker's Orders and reports its workers' exits (WorkerExited). A broker
    started anew goes on from what it hands back: the last start of every worker it ran, those whose
    process runs now, and the workers the last Orders said are quarantined."""

    starts: dict[str, WorkerStart] = {}
    alive: list[str] = []
    failed: dict[str, str] = {}


class PlanChanged(Message):
    """Supervisor -> broker: the plan file was written anew (the catalog changed); read it again."""


def exit_words(code: int) -> str:
    """How a process ended, from its exit status as subprocess gives it (WorkerExited.code; negative: the
    signal that killed it): "was killed by SIGSEGV", "exited with code 1"."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


class Drain(Message):
    """Shutting down: refuse new requests; those accepted may run `grace` seconds more, then end with 503."""

    grace: float


# --- results: worker -> broker -> frontend ------------------------------------


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


class Result(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """What a request produced: one of the types below, tagged, so that each says which it is and carries
    only its own fields (a streamed chunk has 7, where the one flat result had 16). Flags as vLLM's outputs: no cyclic garbage collection (they hold no cycles); omit_defaults
    drops nothing from an array_like struct in msgspec 0.23, so it costs nothing either."""

    id: str

    def then(self, later: Output) -> Output:
        """This result followed by a later one of the same request, as one: the later one, unless this is text."""
        return later


class Text(Result):
    """A running generation's text since its last chunk. Every field holds what came since the chunk
    before, so two chunks make one by adding each field up (`then`)."""

    text: str = ""  # the answer's text
    reasoning: str = ""  # thinking (a <think> block's text), apart from the answer
    tokens: int = 0  # tokens generated
    # with SamplingParams.logprobs >= 0: each generated token's
    logprobs: list[TokenLogprob] = []
    prompt_tokens: int = 0  # on the first chunk: the prompt's tokens (0 after)
    # with SamplingParams.prompt_logprobs >= 0, on the first chunk: every prompt token, the first with
    # logprob NaN (nothing comes before it to predict it) and no top tokens
    prompt_logprobs: list[TokenLogprob] = []

    def then(self, later: Output) -> Output:
        """This chunk and a later result of the same request as one (a worker merges what it holds back)."""
        if isinstance(later, Text):
            return Text(self.id, **{name: getattr(self, name) + getattr(later, name) for name in _ADDED_UP})
        if isinstance(later, Final):
            return msgspec.structs.replace(later, last=self if later.last is None else self.then(later.last))
        return later  # a failure: the text before it goes unread


_ADDED_UP = Text.__struct_fields__[1:]  # every field but the id


class Ending(Result, kw_only=True):
    """A result that ends its request: nothing follows it."""

    worker: str = ""  # the worker that served it (it stamps its own id as it sends it)


class Final(Ending):
    """A generation's end: its counts and timings, and its text since the last chunk."""

    finish_reason: str  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # how many of completion_tokens were thinking
    timings: Timings | None = None
    stop: str = ""  # the stop string that ended it, if one did
    last: Text | None = None  # what came since the last chunk (the whole answer if none was sent)


class Embeddings(Ending):
    """An Embed's answer."""

    vectors: list[bytes]  # one per input: float32 little-endian, unit length
    prompt_tokens: int = 0


class Tokens(Ending):
    """A tokenizer lookup's answer: a Tokenize's tokens (and their pieces if asked), or a Detokenize's text."""

    tokens: list[int] = []
    pieces: list[bytes] = []  # with Tokenize.with_pieces: each token's bytes (may hold part of a UTF-8 character)
    text: str = ""


class Failure(Ending):
    """Why a request ended without an answer: becomes an error body of its API (its type follows the status)."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None


Output = Text | Final | Embeddings | Tokens | Failure  # what a request is answered with, chunk by chunk


def failed(request_id: str, status: int, message: str, *, param: str | None = None, code: str | None = None) -> Failure:
    """The Failure that ends a request with an error instead of an answer."""
    return Failure(request_id, status, message, code=code, param=param)


class Results(Message):
    """Outputs for one client: what a worker's step produced for it, or what the broker ended."""

    outputs: list[Output]


class Deliver(Message):
    """Worker -> broker, followed by a Results for `client` that the broker passes on unread; `ended`
    are the requests that Results finishes (their slots are free)."""

    client: bytes
    ended: list[str]
    # the requests whose first output that Results carries: until then the broker may retry one on
    # another worker if this one dies, without opening the Results
    first: list[str] = []


# --- worker <-> broker -------------------------------------------------------


class WorkerInfo(msgspec.Struct, array_like=True, frozen=True):
    """A worker as it announces itself. Frozen: the engine thread makes a new one on each change and the
    I/O thread sends whichever is current, so neither ever sees one half written."""

    worker_id: str
    device: str
    engine: str  # the engine manifest's name
    runtime: str  # a name in infersnap.runtimes.RUNTIMES
    model: str
    slots: int
    context: int
    # "loading" | "ready" | "failed"; in the broker's Status also "restarting", and for a worker of a model
    # not loaded "unloaded" (no process) or "unloading" (its process is being stopped)
    state: str
    error: str = ""
    running: list[str] = []  # the requests in its slots: the broker aborts those it has no route for
    waiting: int = 0  # requests it holds that wait for a slot inside the engine
    pid: int = 0
    restarts: int = 0  # times the supervisor restarted this worker's process
    # its tasks from the start; its features once loaded (a loading worker may still gain some)
    capabilities: Capabilities = Capabilities(tasks=[])
    speed: Speed | None = None  # its engine's measured profile on this machine; None: not measured
    settings: str = ""  # the runtime settings it runs with, and why (infersnap/probes.py): "no-repack (default: ...)"
    kv_used: float = 0.0  # the share of its KV cache (slots x context tokens) its running sequences hold, 0 to 1


class WorkerStatus(Message):
    """Sent by a worker when it starts, when its state changes, and as its heartbeat."""

    info: WorkerInfo


# --- broker -> CLI or frontend -----------------------------------------------


class ModelState(msgspec.Struct, array_like=True, frozen=True):
    """A model as the broker sees it: whether it is loaded, and what it cost to decide."""

    name: str
    # "loaded" (a worker of it is ready), "loading", "unloading", "unloaded", or "failed" (none of its
    # workers could load; `error` says why; not tried again until it is loaded explicitly)
    state: str
    error: str = ""
    wanted: bool = False  # its workers should run (loading or loaded): what the supervisor starts
    keep_alive: int = 0  # seconds it stays loaded once idle (-1: always)
    idle_seconds: float | None = None  # since its last request ended; None: busy, or not loaded
    context: int = 0  # tokens per sequence (ModelSpec.context)
    context_note: str = ""  # why
    left_out: list[str] = []  # lanes `serve` did not start for it, and why
    queued: int = 0  # its requests queued in the broker for a free slot


class Status(Message):
    """The broker's view: the answer to a StatusQuery, and what it pushes to the clients that follow it
    (id "") whenever a worker's or a model's state changes, and at least every second."""

    id: str
    boot: str  # new each time the broker starts: a frontend that sees it change knows its routes are gone
    endpoints: dict[str, str]
    workers: list[WorkerInfo]  # `running` as the broker routes them
    routed: list[str] = []  # request ids the broker is routing now, queued ones included
    queued: int = 0  # requests queued in the broker for a free slot
    draining: bool = False
    models: list[ModelState] = []  # every model of the plan, the default first
    replans: int = 0  # times this broker read the plan file anew: a frontend that sees it change reads it too


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(
    Generate | Embed | Tokenize | Detokenize | Submit | Dispatch | Abort | StatusQuery | ModelControl | Drain
    | WorkerExited | Orders | Supervise | PlanChanged
    | Results | Deliver | WorkerStatus | Status
)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)
