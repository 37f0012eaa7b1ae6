"""The llama.cpp engine: continuous batching over llama-cpp-python's low-level API.

One llama context holds `slots` sequences, each with its own KV cache stream
and its own sampler chain. Every step is one llama_decode over a batch with
the next token of each generating sequence plus chunks of prompts that are
still being read, so a new request joins at the next step and a finished one
leaves at once. A slot keeps the tokens of its last request in its KV cache,
and a new request goes to the free slot that shares the longest prefix with
it, so a repeated system prompt or chat history is read only once.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals, _logger
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from infersnap import wire
from infersnap.profiles import EngineOptions
from infersnap.workers.engine_base import (
    BATCH_TOKENS,
    NO_CHAT_TEMPLATE,
    BatchingEngine,
    EngineError,
    EngineSettings,
    Sequence,
    schema_refused,
    seed_of,
)
from infersnap.workers.llamacpp_grammar import schema_to_gbnf


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V this sequence holds


@dataclass(eq=False)
class LlamaSequence(Sequence):
    slot: Slot | None = None  # once admitted
    fed: int = 0  # prompt tokens already in the KV cache
    sampler: _internals.LlamaSampler | None = None
    # the output must follow this grammar (from params.json_schema): its state, outside the chain
    grammar_sampler: llama_cpp.llama_sampler_p | None = None
    next_token: int = -1  # sampled, not yet fed back
    completion_tokens: int = 0
    prompt_evaluated: int = 0


def load_model(model_path: str, gpu_layers: int, options: EngineOptions) -> _internals.LlamaModel:
    """The GGUF with `gpu_layers` layers offloaded to the GPU; EngineError if it cannot be loaded.
    `options.repack` off keeps the weights as the file has them: ggml's repacked "extra buffer types"
    (AMX on Sapphire Rapids) crash on some machines (llama-server's --no-repack)."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    params.use_extra_bufts = options.repack
    if not options.mmap:
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # read into memory (llama-server's --no-mmap)
    try:
        return _internals.LlamaModel(path_model=model_path, params=params, verbose=False)
    except ValueError as exc:
        raise EngineError(str(exc)) from None


def new_context(
    model: _internals.LlamaModel, params: llama_cpp.llama_context_params, on_gpu: bool
) -> _internals.LlamaContext:
    """A context; off the GPU (`on_gpu` false) it keeps its KV cache and big batches off any GPU that
    a CUDA or Vulkan build of llama.cpp finds, where llama.cpp would otherwise put them."""
    if not on_gpu:
        params.offload_kqv = False
        params.op_offload = False
    params.no_perf = True
    try:
        return _internals.LlamaContext(model=model, params=params, verbose=False)
    except ValueError as exc:
        raise EngineError(str(exc)) from None


class LlamaCppEngine(BatchingEngine):
    runtime = "llamacpp"
    FEATURES = ("top_logprobs", "prompt_logprobs", "logit_bias")

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__()
        _logger.set_verbose(settings.verbose)  # llama.cpp's own log: errors only unless asked
        llama_cpp.llama_backend_init()
        slots, threads, gpu_layers = settings.slots, settings.threads, settings.gpu_layers
        self.model = load_model(settings.model_path, gpu_layers, settings.options)  # 0 on the CPU; a GPU engine offloads them all
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._candidates = _internals.LlamaTokenDataArray(n_vocab=self.n_vocab)  # for constrained sampling
        self._scratch = np.empty(self.n_vocab, dtype=np.float32)  # for logprobs
        self.context = min(settings.context, self.model.n_ctx_train())

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.context * slots
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = slots
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False  # each slot its own KV stream of `context` tokens
        self.ctx = new_context(self.model, params, on_gpu=gpu_layers > 0)
        self.batch = _internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)

        self.free_slots = [Slot(seq_id) for seq_id in range(slots)]
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.prompt_add_special = llama_cpp.llama_vocab_get_add_bos(self.vocab)
        self.bos_token = llama_cpp.llama_vocab_bos(self.vocab) if self.prompt_add_special else None
        fim = (llama_cpp.llama_vocab_fim_pre(self.vocab), llama_cpp.llama_vocab_fim_suf(self.vocab),
               llama_cpp.llama_vocab_fim_mid(self.vocab))
        self.fim_tokens = fim if min(fim) >= 0 else None
        self._chat_template = self._load_chat_template(settings.chat_template)
        self._announce()

    # --- requests in -------------------------------------------------------

    def _queue(self, request: wire.Generate, prompt: list[int], max_tokens: int, thinking: bool | None
               ) -> wire.Failure | None:
        seq = LlamaSequence(request=request, prompt=prompt, max_tokens=max_tokens, thinking=thinking)
        if request.params.json_schema is not None:
            try:  # refused now rather than when admitted
                seq.grammar_sampler = self._grammar_sampler(schema_to_gbnf(request.params.json_schema))
            except ValueError as exc:  # beyond what the converter or llama.cpp's grammar parser handle
                return schema_refused(request, str(exc))
        self.waiting.append(seq)
        return None

    # --- one step ----------------------------------------------------------

    def step(self) -> list[wire.Output]:
        self._admit()
        if not self.running:
            return []
        sampling_rows, prompt_rows = self._fill_batch()
        rc = llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if rc != 0:
            return self.fail_running(f"llama_decode failed with code {rc}")
        for seq, i, row in prompt_rows:  # the logits at prompt token i predict token i + 1
            seq.prompt_logprobs.append(self._logprob(row, seq.prompt[i + 1], seq.request.params.prompt_logprobs))
        now = time.perf_counter()
        outputs = []
        for seq, row in sampling_rows:
            output = self._sample(seq, row, now)
            if output is not None:
                outputs.append(output)
        return outputs

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            shared, slot = max(((_common_prefix(s.cached, seq.prompt), s) for s in self.free_slots), key=lambda p: p[0])
            self.free_slots.remove(slot)
            keep = min(shared, len(seq.prompt) - 1)  # at least one token is evaluated, for its logits
            if seq.request.params.seed is not None:
                # Logits differ in the last bits with how the prompt was split into batches, so a seeded
                # request reads its whole prompt afresh: the same request then gives the same text.
                keep = 0
            if seq.request.params.prompt_logprobs >= 0:  # the cached part has no logits to read
                keep = 0
                seq.prompt_logprobs = [wire.TokenLogprob(seq.prompt[0], self._piece(seq.prompt[0]), float("nan"))]
            self.ctx.kv_cache_seq_rm(slot.seq_id, keep, -1)
            del slot.cached[keep:]
            seq.slot, seq.fed = slot, keep
            seq.prompt_evaluated = len(seq.prompt) - keep
            seq.sampler = self._sampler(seq.request.params)
            self._start(seq)

    def _fill_batch(self) -> tuple[list[tuple[LlamaSequence, int]], list[tuple[LlamaSequence, int, int]]]:
        """Put every generating sequence's next token, then prompt chunks, into the batch. Returns the
        rows to sample from, and the rows whose logits give prompt logprobs (sequence, prompt index, row)."""
        batch = self.batch.batch
        n = 0
        rows: list[tuple[LlamaSequence, int]] = []
        prompt_rows: list[tuple[LlamaSequence, int, int]] = []

        def put(seq: LlamaSequence, token: int, wants_logits: bool) -> int:
            """Add the token at the sequence's next position; its batch row."""
            nonlocal n
            slot = seq.slot
            batch.token[n] = token
            batch.pos[n] = len(slot.cached)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = wants_logits
            slot.cached.append(token)
            n += 1
            return n - 1

        for seq in self.running:
            if seq.fed == len(seq.prompt):
                rows.append((seq, put(seq, seq.next_token, True)))
        for seq in self.running:
            if seq.fed < len(seq.prompt) and n < BATCH_TOKENS:
                chunk_end = min(len(seq.prompt), seq.fed + BATCH_TOKENS - n)
                every_row = seq.request.params.prompt_logprobs >= 0
                for i in range(seq.fed, chunk_end):
                    last = i == len(seq.prompt) - 1
                    row = put(seq, seq.prompt[i], last or every_row)
                    if last:
                        rows.append((seq, row))
                    elif every_row:
                        prompt_rows.append((seq, i, row))
                seq.fed = chunk_end
        batch.n_tokens = n
        return rows, prompt_rows

    def _sample(self, seq: LlamaSequence, row: int, now: float) -> wire.Text | wire.Final | None:
        if seq.grammar_sampler is None:
            token = llama_cpp.llama_sampler_sample(seq.sampler.sampler, self.ctx.ctx, row)
        else:
            token = self._sample_constrained(seq, row)
        if not seq.first_token_at:
            seq.first_token_at = now
        finish = None
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            text, finish = seq.text.flush(), "stop"
        else:
            seq.completion_tokens += 1
            if seq.request.params.logprobs >= 0:
                seq.logprobs.append(self._logprob(row, token, seq.request.params.logprobs))
            text, hit_stop = seq.text.push(self._piece(token))
            if hit_stop:
                finish = "stop"
            elif seq.completion_tokens >= seq.max_tokens or len(seq.slot.cached) + 1 >= self.context:
                text += seq.text.flush()
                finish = "length"
        seq.next_token = token
        return self._output(seq, text, finish, seq.completion_tokens, seq.prompt_evaluated, now)

    def _release(self, seq: LlamaSequence) -> None:
        """Free the sequence's slot (keeping its KV cache for prefix reuse) and its samplers."""
        if seq.slot is not None:
            if seq.fed < len(seq.prompt):  # aborted while its prompt was half read
                del seq.slot.cached[seq.fed :]
            seq.sampler.close()
            self.free_slots.append(seq.slot)
        if seq.grammar_sampler is not None:
            llama_cpp.llama_sampler_free(seq.grammar_sampler)
            seq.grammar_sampler = None

    # --- helpers -----------------------------------------------------------

    def _sampler(self, params: wire.SamplingParams) -> _internals.LlamaSampler:
        sampler = _internals.LlamaSampler()
        if params.logit_bias:
            sampler.add_logit_bias(self.n_vocab, params.logit_bias)
        if params.presence_penalty or params.frequency_penalty:
            sampler.add_penalties(self.n_vocab, 64, 1.0, params.frequency_penalty, params.presence_penalty)
        if params.temperature <= 0:
            sampler.add_greedy()
            return sampler
        if params.top_k > 0:
            sampler.add_top_k(params.top_k)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_min_p(params.min_p, 1)
        sampler.add_temp(params.temperature)
        sampler.add_dist(seed_of(params))
        return sampler

    def _sample_constrained(self, seq: LlamaSequence, row: int) -> int:
        """The chain's pick among the tokens the grammar allows, then both told about it.

        As llama.cpp's own sampling does: the chain picks from all tokens first and the grammar checks
        just that one; only when it refuses is the grammar applied to the whole vocabulary (as costly as
        a decode step for a small model) before the chain picks again. Same result as grammar first.
        Once the JSON is complete the grammar allows only end-of-text, which ends the request with
        "stop"; a -100 logit_bias only lowers a logit, so a banned end-of-text still can.
        """
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, row), shape=(self.n_vocab,))
        candidates = self._candidates
        candidates.copy_logits(logits)
        llama_cpp.llama_sampler_apply(seq.sampler.sampler, ctypes.byref(candidates.candidates))
        token = int(candidates.candidates_data.id[candidates.candidates.selected])
        if not self._allowed(seq.grammar_sampler, token):
            candidates.copy_logits(logits)
            llama_cpp.llama_sampler_apply(seq.grammar_sampler, ctypes.byref(candidates.candidates))
            llama_cpp.llama_sampler_apply(seq.sampler.sampler, ctypes.byref(candidates.candidates))
            token = int(candidates.candidates_data.id[candidates.candidates.selected])
        llama_cpp.llama_sampler_accept(seq.grammar_sampler, token)
        llama_cpp.llama_sampler_accept(seq.sampler.sampler, token)
        return token

    @staticmethod
    def _allowed(grammar: llama_cpp.llama_sampler_p, token: int) -> bool:
        single = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
        array = llama_cpp.llama_token_data_array(data=single, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return single[0].logit != float("-inf")

    def _grammar_sampler(self, grammar: str) -> llama_cpp.llama_sampler_p:
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise ValueError("llama.cpp could not parse the grammar made from it")
        return sampler

    def _logprob(self, row: int, token: int, top: int) -> wire.TokenLogprob:
        """The chosen token's logprob, and the `top` most likely tokens', from the raw logits at its batch row.

        The log-softmax of the model's own distribution, before any sampler (penalties, temperature, top-k/p,
        grammar) changed it, as OpenAI reports it; llama-server reports the probabilities after sampling.
        """
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, row), shape=(self.n_vocab,))
        peak = float(logits.max())
        scratch = self._scratch  # exp in float32 into one reused buffer: half the time of float64
        np.subtract(logits, peak, out=scratch)
        np.exp(scratch, out=scratch)
        norm = peak + float(np.log(scratch.sum(dtype=np.float64)))
        best: list[wire.TopLogprob] = []
        if top > 0:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            # special=True so that an end-of-turn among them shows its text instead of nothing
            best = [wire.TopLogprob(int(t), self._piece(int(t), special=True), float(logits[t]) - norm) for t in ids]
        return wire.TokenLogprob(token, self._piece(token), float(logits[token]) - norm, best)

    def _piece(self, token: int, special: bool = False) -> bytes:
        """A token's bytes, cached; without `special`, special tokens (end of turn, ...) give none, as in the text."""
        piece = self._pieces.get((token, special))
        if piece is None:
            piece = self._pieces[(token, special)] = _token_bytes(self.vocab, token, special=special)
        return piece

    def _load_chat_template(self, override: str) -> Jinja2ChatFormatter | None:
        template = override or self.model.metadata().get("tokenizer.chat_template")
        if not template:
            return None
        eos = llama_cpp.llama_vocab_eos(self.vocab)
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self.model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.model.token_get_text(bos) if bos != -1 else "",
        )

    def _chat_text(self, messages: list[dict[str, str]], variables: dict[str, Any]) -> str:
        if self._chat_template is None:
            raise ValueError(NO_CHAT_TEMPLATE)
        return self._chat_template(messages=messages, **variables).prompt

    # --- the tokenizer (/tokenize, /detokenize) ----------------------------

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def piece(self, token: int) -> bytes:
        return self._piece(token, special=True)  # llama-server shows special tokens' text

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")


def _token_bytes(vocab: llama_cpp.llama_vocab_p, token: int, special: bool) -> bytes:
    """llama_token_to_piece, with a buffer as long as the piece needs (a negative length says how long)."""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[: max(n, 0)]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
