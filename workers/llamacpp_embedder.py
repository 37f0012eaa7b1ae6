"""The embedding engine: the model loaded in llama.cpp's embedding mode, for POST /v1/embeddings.

Several inputs go through one llama_decode, each as its own sequence, and
llama.cpp pools each sequence's hidden states into one vector: with the
model's own pooling where its GGUF names one (embedding models do), else
the mean over its tokens (a chat model has none). Vectors are scaled to unit
length, as OpenAI's are, so a dot product is their cosine similarity.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
from llama_cpp import _internals, _logger

from infersnap.workers.engine_base import MAX_SEQUENCES, Embedder, EmbedJob, EngineSettings, unit_vector
from infersnap.workers.llamacpp_engine import load_model, new_context


class LlamaCppEmbedder(Embedder):
    """Each step is one llama_decode over the next inputs of the requests in its slots."""

    runtime = "llamacpp"

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

    def _tokens(self, text: str) -> list[int]:
        """A text as the model reads an input: with the BOS and EOS it adds (llama.cpp's add_special),
        its special tokens as text."""
        return self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _embed(self, batch: list[tuple[EmbedJob, int]]) -> list[bytes]:
        """One llama_decode over these inputs."""
        self.ctx.kv_cache_clear()
        self.batch.reset()
        for seq_id, (job, i) in enumerate(batch):
            self.batch.add_sequence(job.inputs[i], seq_id, True)  # pooling reads every token's output
        self.ctx.decode(self.batch)
        vectors = []
        for seq_id in range(len(batch)):
            pooled = llama_cpp.llama_get_embeddings_seq(self.ctx.ctx, seq_id)
            vectors.append(unit_vector(np.ctypeslib.as_array(pooled, shape=(self.n_embd,))))
        return vectors

