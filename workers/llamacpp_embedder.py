"""The embedding engine: the model loaded in llama.cpp's embedding mode, for POST /v1/embeddings.

Several inputs go through one llama_decode, each as its own sequence, and
llama.cpp pools each sequence's hidden states into one vector: with the
model's own pooling where its GGUF names one (embedding models do), else
the mean over its tokens (a chat model has none). Vectors are scaled to unit
length, as OpenAI's are, so a dot product is their cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp import _internals, _logger

from infersnap import wire
from infersnap.workers.engine_base import Engine, EngineSettings
from infersnap.workers.llamacpp_engine import load_model, new_context

MAX_SEQUENCES = 32  # inputs per llama_decode
# Tokens per llama_decode, past the first input: an abort (a timeout, a client gone) or the next request
# waits for at most one such batch (a fraction of a second on 2 cores; 4x as many cost 4x the wait for
# a fifth more throughput). A single longer input still goes whole: pooling needs it in one batch.
STEP_TOKENS = 128


@dataclass(eq=False)
class EmbedJob:
    request: wire.Embed
    inputs: list[list[int]]
    vectors: list[bytes] = field(default_factory=list)  # one per input done so far


class LlamaCppEmbedder(Engine):
    """Each step is one llama_decode over the next inputs of the requests in its slots, oldest first,
    so an abort (a timeout, a client gone) stops a long request between two batches."""

    runtime = "llamacpp"
    capabilities = wire.Capabilities(tasks=["embed"])

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__()
        _logger.set_verbose(settings.verbose)
        llama_cpp.llama_backend_init()
        self.slots = settings.slots
        # on the CPU, even with a GPU build: the GPU is the generating worker's
        self.model = load_model(settings.model_path, 0, settings.options)
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = self.model.n_embd()
        self.context = min(settings.context, self.model.n_ctx_train())

        metadata = self.model.metadata()
        own_pooling = metadata.get(f"{metadata.get('general.architecture')}.pooling_type")
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = int(own_pooling) if own_pooling else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        if params.pooling_type == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN  # one vector per input, not per token
        params.n_ctx = self.context
        params.n_batch = params.n_ubatch = self.context  # a pooled sequence must fit one micro-batch
        params.n_seq_max = MAX_SEQUENCES
        params.n_threads = params.n_threads_batch = settings.threads
        params.kv_unified = True
        self.ctx = new_context(self.model, params, on_gpu=False)
        self.batch = _internals.LlamaBatch(n_tokens=self.context, embd=0, n_seq_max=1, verbose=False)

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
        batch: list[tuple[EmbedJob, list[int]]] = []
        used = 0
        for job in self.running:
            for tokens in job.inputs[len(job.vectors) :]:  # each job's inputs in order, from the first not done
                if batch and (len(batch) == MAX_SEQUENCES or used + len(tokens) > STEP_TOKENS):
                    break
                batch.append((job, tokens))
                used += len(tokens)
        if not batch:
            return []
        for (job, _), vector in zip(batch, self._embed([tokens for _, tokens in batch])):
            job.vectors.append(vector)
        outputs = []
        for job in [j for j in self.running if len(j.vectors) == len(j.inputs)]:
            self._end(job)
            prompt_tokens = sum(map(len, job.inputs))
            outputs.append(wire.Embeddings(job.request.id, job.vectors, prompt_tokens))
        return outputs

    def _tokens(self, text: str) -> list[int]:
        """A text as the model reads an input: with the BOS and EOS it adds (llama.cpp's add_special),
        its special tokens as text."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _problem(self, tokens: list[int]) -> str | None:
        if not tokens:
            return "is empty"
        if len(tokens) > self.context:
            return f"has {len(tokens)} tokens, more than the model's context of {self.context}"
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            return f"has token id {bad}, which is not in the model's vocabulary (ids 0 to {self.n_vocab - 1})"
        return None

    def _embed(self, inputs: list[list[int]]) -> list[bytes]:
        """One llama_decode over these inputs (they fit the context together), one unit vector each."""
        self.ctx.kv_cache_clear()
        self.batch.reset()
        for seq_id, tokens in enumerate(inputs):
            self.batch.add_sequence(tokens, seq_id, True)  # pooling reads every token's output
        self.ctx.decode(self.batch)
        vectors = []
        for seq_id in range(len(inputs)):
            pooled = llama_cpp.llama_get_embeddings_seq(self.ctx.ctx, seq_id)
            vector = np.ctypeslib.as_array(pooled, shape=(self.n_embd,)).astype(np.float32)
            norm = float(np.linalg.norm(vector))
            vectors.append((vector / norm if norm > 0 else vector).astype("<f4").tobytes())
        return vectors

