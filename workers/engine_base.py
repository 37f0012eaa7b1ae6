"""What every engine shares: the interface the worker loop runs, the request queue, aborts, the checks
before a request is queued, the prompt, the seed, and the output of a step.

An engine takes requests with `add` (answering at once when it can: a refusal, a tokenizer lookup),
works on them one `step` at a time (each step returns the outputs it produced: a generation's Text
chunks, then its Final; any request's one answer or Failure), and drops them with `abort`. Requests wait in `waiting` until the engine
admits them into `running`, one per slot; the worker reports both in its heartbeats.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from infersnap import routing, wire
from infersnap.profiles import EngineOptions
from infersnap.workers.text import TextStream
from infersnap.workers.thinking import ThinkingSplit, opens_thinking


BATCH_TOKENS = 512  # tokens per engine step: every running sequence's next token first, prompt chunks fill the rest
# what the engines' chat templates are given themselves: a request's template_args cannot replace them
TEMPLATE_NAMES = frozenset({
    "messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "strftime_now",
    "tools", "tool_choice", "functions", "function_call",
})


class EngineError(Exception):
    """The engine could not start (bad model file, unknown device, out of memory)."""


@dataclass(frozen=True)
class EngineSettings:
    """What every engine is built from (one signature for all, so the worker builds any of them alike)."""

    model_path: str
    device: str  # "cpu", "GPU.0", "NPU", "cuda:0", ...
    slots: int
    context: int
    threads: int
    gpu_layers: int = 0  # llama.cpp layers offloaded to the device
    verbose: bool = False
    chat_template: str = ""  # a Jinja chat template instead of the model's own (ModelSpec.chat_template)
    options: EngineOptions = EngineOptions()  # runtime settings found to run on this machine (infersnap/probes.py)


class Engine:
    """The interface the worker loop runs, with the queue and aborts every engine has. Subclasses set
    `context` and `capabilities`, take a checked request in `_add`, and free a request's resources
    in `_release` (called once for each request that leaves, admitted or not)."""

    context: int
    capabilities: wire.Capabilities
    runtime: str = ""  # a name in infersnap.runtimes.RUNTIMES: named in refusals

    def __init__(self) -> None:
        self.waiting: deque[Any] = deque()  # each with `.request`
        self.running: list[Any] = []

    def add(self, request: wire.Request) -> wire.Output | None:
        """Take a request; return its answer at once if it has one now (a refusal, a lookup's answer)."""
        needs = routing.needs_of(request)
        feature = routing.unmet(needs, self.capabilities)
        if feature is not None:  # the broker sends none such: the same rule, in case
            return routing.refusal(request.id, needs, feature, [self.runtime], request.model)
        return self._add(request)

    def step(self) -> list[wire.Output]:
        raise NotImplementedError

    def abort(self, ids: list[str]) -> None:
        """Drop these requests wherever they are; unknown ids are ignored."""
        wanted = set(ids)
        for item in [s for s in [*self.waiting, *self.running] if s.request.id in wanted]:
            self._end(item)

    def fail_running(self, message: str) -> list[wire.Failure]:
        """End every running request with a 500 (the engine's step failed); the engine serves on."""
        outputs = [wire.failed(s.request.id, 500, message) for s in self.running]
        for item in list(self.running):
            self._end(item)
        return outputs

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def kv_tokens(self) -> int:
        """Tokens the running requests hold in the KV cache (WorkerInfo.kv_used); 0 where it keeps none."""
        return 0

    def _add(self, request: wire.Request) -> wire.Output | None:
        raise NotImplementedError

    def _end(self, item: Any) -> None:
        """Take a request out of the engine, wherever it is, and free what it holds."""
        if item in self.running:
            self.running.remove(item)
        else:
            self.waiting.remove(item)
        self._release(item)

    def _release(self, item: Any) -> None:
        """Free what a request that left holds (its slot, its samplers)."""


class Unloaded(Engine):
    """The engine of a worker whose engine could not load: it refuses every request with why."""

    def __init__(self, capabilities: wire.Capabilities, message: str) -> None:
        super().__init__()
        self.capabilities, self.message, self.context = capabilities, message, 0

    def add(self, request: wire.Request) -> wire.Output | None:
        return wire.failed(request.id, 503, self.message)

    def step(self) -> list[wire.Output]:
        return []


# Embedders: inputs per embedding step, and tokens per step past the first input. An abort (a timeout, a
# client gone) or the next request waits for at most one such batch (a fraction of a second on 2 cores;
# 4x as many cost 4x the wait for a fifth more throughput). A single longer input still goes whole:
# pooling needs it in one batch.
MAX_SEQUENCES = 32
STEP_TOKENS = 128


@dataclass(eq=False)
class EmbedJob:
    request: wire.Embed
    inputs: list[list[int]]  # each input's tokens
    vectors: list[bytes] = field(default_factory=list)  # one per input done so far


class Embedder(Engine):
    """An embedding engine: each step embeds the next inputs of the requests in its slots, oldest first,
    so an abort (a timeout, a client gone) stops a long request between two batches. Vectors are unit
    length float32 (little-endian bytes), as OpenAI's are, so a dot product is their cosine similarity.
    A runtime gives `_tokens` and `_embed`, and sets slots, context, n_vocab and n_embd."""

    capabilities = wire.Capabilities(tasks=["embed"])
    n_vocab = 0
    n_embd = 0

    def _add(self, request: wire.Embed) -> wire.Failure | None:
        """Queue the request, or refuse at once with a 400 naming what the model cannot take."""
        if request.dimensions is not None and request.dimensions != self.n_embd:
            message = f"this model's embeddings have {self.n_embd} dimensions; it cannot give {request.dimensions}"
            return wire.failed(request.id, 400, message, param="dimensions")
        inputs = [self._tokens(text) for text in request.texts] if request.texts else request.token_lists
        for i, tokens in enumerate(inputs):
            problem = self._problem(tokens)
            if problem is not None:
                return wire.failed(request.id, 400, f"input[{i}] {problem}", param="input")
        self.waiting.append(EmbedJob(request, inputs))
        return None

    def step(self) -> list[wire.Output]:
        while self.waiting and len(self.running) < self.slots:
            self.running.append(self.waiting.popleft())
        batch: list[tuple[EmbedJob, int]] = []  # (job, index of its input)
        used = 0
        for job in self.running:
            for i in range(len(job.vectors), len(job.inputs)):  # each job's inputs in order, from the first not done
                tokens = job.inputs[i]
                if batch and (len(batch) == MAX_SEQUENCES or used + len(tokens) > STEP_TOKENS):
                    break
                batch.append((job, i))
                used += len(tokens)
        if not batch:
            return []
        for (job, _), vector in zip(batch, self._embed(batch)):
            job.vectors.append(vector)
        outputs = []
        for job in [j for j in self.running if len(j.vectors) == len(j.inputs)]:
            self._end(job)
            prompt_tokens = sum(map(len, job.inputs))
            outputs.append(wire.Embeddings(job.request.id, job.vectors, prompt_tokens))
        return outputs

    def _tokens(self, text: str) -> list[int]:
        """A text as the model reads an input, with the special tokens the model adds."""
        raise NotImplementedError

    def _embed(self, batch: list[tuple[EmbedJob, int]]) -> list[bytes]:
        """One unit vector for each (job, input index); the inputs fit the context together."""
        raise NotImplementedError

    def _problem(self, tokens: list[int]) -> str | None:
        if not tokens:
            return "is empty"
        if len(tokens) > self.context:
            return f"has {len(tokens)} tokens, more than the model's context of {self.context}"
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            return f"has token id {bad}, which is not in the model's vocabulary (ids 0 to {self.n_vocab - 1})"
        return None


def unit_vector(vector: Any) -> bytes:
    """A numpy vector scaled to unit length, as little-endian float32 bytes (a zero vector stays zero)."""
    import numpy as np

    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype("<f4").tobytes()


@dataclass(eq=False)  # compared by identity: two requests are never the same sequence
class Sequence:
    """A generation inside an engine; each engine adds what is its own."""

    request: wire.Generate
    prompt: list[int]
    max_tokens: int
    text: TextStream | None = None  # once admitted
    started: float = 0.0
    first_token_at: float = 0.0
    logprobs: list[wire.TokenLogprob] = field(default_factory=list)  # not yet sent
    prompt_logprobs: list[wire.TokenLogprob] = field(default_factory=list)  # not yet sent (go with the first chunk)
    tokens_sent: int = 0  # completion tokens counted in the chunks made so far
    chunks: int = 0  # chunks made so far: the first carries the prompt's size
    # a chat's thinking is split from its answer: True when the prompt left it inside a think
    # block, False when not; None (a text completion): no split
    thinking: bool | None = None


class BatchingEngine(Engine):
    """A generating engine: Generate (continuous batching) and tokenizer lookups. Subclasses set
    `n_vocab`, `FEATURES`, and `fim_tokens`/`bos_token` where the model has them, give their chat
    template in `_chat_text`, build their sequence in `_queue`, and give the tokenizer through
    `tokenize`, `piece` and `detokenize`."""

    n_vocab: int  # token ids run from 0 to n_vocab - 1
    FEATURES: tuple[str, ...] = ()  # what the engine can do for any model (routing.FEATURES)
    ban_with: list[int] | None = None  # see wire.Capabilities
    fim_tokens: tuple[int, int, int] | None = None  # fill in the middle: prefix, suffix, middle; None: none
    bos_token: int | None = None  # the BOS the model starts a prompt with; None: it adds none
    prompt_add_special: bool = True  # whether a prompt is tokenized with the tokenizer's BOS/EOS

    def kv_tokens(self) -> int:
        return sum(len(seq.prompt) + seq.tokens_sent for seq in self.running)

    def _announce(self) -> None:
        """Set `capabilities` once the model is loaded (FIM depends on its tokens)."""
        features = [*self.FEATURES, *(["fim"] if self.fim_tokens is not None else [])]
        self.capabilities = wire.Capabilities(tasks=["generate", "tokenize"], features=features, ban_with=self.ban_with)

    def _add(self, request: wire.Request) -> wire.Output | None:
        if isinstance(request, wire.Tokenize | wire.Detokenize):
            return self._lookup(request)
        if request.suffix:
            prompt, thinking = self._fill_in_middle(request.prompt or "", request.suffix), None
        else:
            try:
                prompt, thinking = self._prompt_tokens(request)
            except ValueError as exc:
                return wire.failed(request.id, 400, f"could not format the prompt: {exc}", param="messages")
        if thinking and request.params.json_schema is not None:
            thinking = False  # a schema holds the output to JSON from its first token: that is the answer
        max_tokens = completion_budget(request, prompt, self.context)
        if isinstance(max_tokens, wire.Failure):
            return max_tokens
        return self._queue(request, prompt, max_tokens, thinking)

    def _lookup(self, request: wire.Tokenize | wire.Detokenize) -> wire.Tokens | wire.Failure:
        """A tokenizer lookup's answer; an id outside the vocabulary is a 400 (the tokenizers would crash or guess)."""
        if isinstance(request, wire.Tokenize):
            try:  # a chat prompt, counted as its Generate's would be (count_tokens, input_tokens)
                tokens = self._prompt_tokens(request)[0] if request.messages is not None else \
                    self.tokenize(request.content, request.add_special)
            except ValueError as exc:
                return wire.failed(request.id, 400, f"could not format the prompt: {exc}", param="messages")
            pieces = [self.piece(t) for t in tokens] if request.with_pieces else []
            return wire.Tokens(request.id, tokens=tokens, pieces=pieces)
        bad = next((t for t in request.tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            message = f"token id {bad} is not in the model's vocabulary (ids 0 to {self.n_vocab - 1})"
            return wire.failed(request.id, 400, message, param="tokens")
        return wire.Tokens(request.id, text=self.detokenize(request.tokens))

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """`text` as token ids, special tokens written in it included; `add_special`: with the BOS (or EOS)
        the model's tokenizer adds to a prompt, if any."""
        raise NotImplementedError

    def piece(self, token: int) -> bytes:
        """A valid token's bytes (a special token's text); part of a UTF-8 character for some tokens."""
        raise NotImplementedError

    def detokenize(self, tokens: list[int]) -> str:
        """Valid token ids back to text, special tokens written out."""
        raise NotImplementedError

    def _fill_in_middle(self, prefix: str, suffix: str) -> list[int]:
        """The prompt that asks a code model for the text between `prefix` and `suffix`, in the
        prefix-suffix-middle order that llama.cpp's infill uses, after the BOS if the model adds one."""
        pre, suf, mid = self.fim_tokens
        bos = [] if self.bos_token is None else [self.bos_token]
        return bos + [pre, *self.tokenize(prefix, False), suf, *self.tokenize(suffix, False), mid]

    def _prompt_tokens(self, request: wire.Generate | wire.Tokenize) -> tuple[list[int], bool | None]:
        """The prompt as token ids (chat messages through the model's template), and for a chat whether
        it leaves the model inside a think block (Sequence.thinking); ValueError if it can't be made."""
        thinking = None
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            variables = {k: v for k, v in request.template_args.items() if k not in TEMPLATE_NAMES}
            try:
                text = self._chat_text(messages, variables)
            except Exception as exc:  # no template, or it rejects these messages (jinja's raise_exception)
                raise ValueError(first_line(exc)) from None
            thinking = opens_thinking(text)
        else:
            text = request.prompt or ""
        return (self.tokenize(text, add_special=self.prompt_add_special) if text else []), thinking

    def _chat_text(self, messages: list[dict[str, str]], variables: dict[str, Any]) -> str:
        """The messages through the model's chat template, given `variables` too (enable_thinking, ...),
        ready for the assistant's turn; ValueError when the model has none."""
        raise NotImplementedError

    def _queue(self, request: wire.Generate, prompt: list[int], max_tokens: int, thinking: bool | None
               ) -> wire.Failure | None:
        """Put a checked request in `waiting` (its sequence with `thinking`), or refuse it with a Failure."""
        raise NotImplementedError

    def _start(self, seq: Sequence) -> None:
        """What every engine does as it admits a sequence into a slot."""
        split = None if seq.thinking is None else ThinkingSplit(seq.thinking)
        seq.text = TextStream(seq.request.params.stop, split)
        seq.started = time.perf_counter()
        self.running.append(seq)

    def _output(self, seq: Sequence, text: str, finish: str | None, completion_tokens: int, prompt_evaluated: int,
                now: float) -> wire.Text | wire.Final | None:
        """One step's output of a sequence: a Text chunk, None while it has nothing to send, or the Final
        (finish set) that carries the last text and the timings and frees the sequence. `text` is answer
        text; its thinking comes from seq.text."""
        reasoning = seq.text.take_reasoning()
        if finish is None and not text and not reasoning:
            return None
        # a token whose text is held back (part of a character or of a stop string) goes out with the next chunk
        chunk = wire.Text(
            seq.request.id, text, reasoning, completion_tokens - seq.tokens_sent, seq.logprobs,
            0 if seq.chunks else len(seq.prompt), seq.prompt_logprobs,
        )
        seq.logprobs, seq.prompt_logprobs, seq.tokens_sent, seq.chunks = [], [], completion_tokens, seq.chunks + 1
        if finish is None:
            return chunk
        timings = wire.Timings(
            prompt_n=prompt_evaluated,
            prompt_ms=(seq.first_token_at - seq.started) * 1000,
            predicted_n=completion_tokens,
            predicted_ms=(now - seq.first_token_at) * 1000,
        )
        self._end(seq)
        return wire.Final(seq.request.id, finish, len(seq.prompt), completion_tokens, seq.text.reasoning_tokens,
                          timings, seq.text.stopped_by, last=chunk)


NO_CHAT_TEMPLATE = "the model has no chat template; use /v1/completions"


def seed_of(params: wire.SamplingParams) -> int:
    """The sampler's seed: the request's own, or a random one; 32 bits, as both engines take."""
    return (params.seed if params.seed is not None else random.getrandbits(32)) & 0xFFFFFFFF


def first_line(exc: BaseException) -> str:
    """An engine's error in one line: without OpenVINO's "Exception from <file>:<line>:" and "Check ..." lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0]


def schema_refused(request: wire.Generate, reason: str) -> wire.Failure:
    """The 400 for a JSON schema (from response_format or tools) that the engine cannot enforce."""
    return wire.failed(request.id, 400, f"the JSON schema cannot be enforced: {reason}", param="response_format")


def completion_budget(request: wire.Generate, prompt: list[int], context: int) -> int | wire.Failure:
    """How many tokens the request may generate, or the 400 to answer when it cannot fit the context.
    With `fit_context`, max_tokens is lowered to the room the prompt leaves (the engines end the
    generation there with "length"); only a prompt that leaves no room is refused."""
    if not prompt:
        return wire.failed(request.id, 400, "the prompt is empty", param="prompt")
    asked = request.params.max_tokens
    room = context - len(prompt)
    max_tokens = room if asked is None else min(asked, room) if request.params.fit_context else asked
    if len(prompt) + max(max_tokens, 1) <= context:
        return max_tokens
    return wire.failed(
        request.id,
        400,
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{len(prompt) + (asked or 0)} tokens ({len(prompt)} in the prompt, {asked or 0} for the completion). "
        "Please reduce the length of the prompt or the completion.",
        param="messages" if request.messages is not None else "prompt",
        code="context_length_exceeded",
    )
