"""The OpenVINO engine: openvino-genai's ContinuousBatchingPipeline.

The pipeline holds a paged KV cache shared by up to `slots` sequences and
does the batching itself: every step() is one inference over the next token
of each generating sequence plus chunks of prompts still being read
(dynamic split-fuse), with prefix caching so a repeated system prompt or chat
history is read once. It reads GGUF files directly.

This class gives it the llama.cpp engine's interface: requests wait here
until a slot is free, token ids come back from each request's handle and
are turned into text here (incrementally, never splitting a UTF-8
character), and stop strings are matched here through TextStream, so no part
of one ever reaches the client; a request that hits one is cancelled in the
pipeline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from infersnap import wire
from infersnap.models import trained_context
from infersnap.workers.engine_base import (
    BATCH_TOKENS,
    NO_CHAT_TEMPLATE,
    BatchingEngine,
    EngineError,
    EngineSettings,
    Sequence,
    first_line,
    seed_of,
)


@dataclass(eq=False)
class OpenVinoSequence(Sequence):
    config: object = None  # openvino_genai.GenerationConfig
    handle: object = None  # openvino_genai.GenerationHandle once admitted
    ids: list[int] = field(default_factory=list)  # generated tokens, stop tokens left out
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] were decoded into text already sent
    read_offset: int = 0


class OpenVinoEngine(BatchingEngine):
    runtime = "openvino"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__()
        model_path, slots, context, threads = settings.model_path, settings.slots, settings.context, settings.threads
        if not settings.verbose:
            os.environ.setdefault("OPENVINO_LOG_LEVEL", "1")  # errors only; read when the core starts
        import numpy as np
        import openvino
        import openvino_genai

        self._np, self._ov, self._genai = np, openvino, openvino_genai
        self.device = settings.device.upper()  # "cpu" -> "CPU"; "GPU.0" and "NPU" unchanged
        if not Path(model_path).exists():
            raise EngineError(f"model not found: {model_path}")
        model_context = trained_context(Path(model_path))
        self.context = min(context, model_context) if model_context else context
        self.slots = slots

        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_seqs = slots
        scheduler.max_num_batched_tokens = BATCH_TOKENS
        scheduler.dynamic_split_fuse = True
        scheduler.enable_prefix_caching = True
        block = 32 if self.device == "CPU" else 16  # the plugins' KV block sizes
        scheduler.num_kv_blocks = -(-slots * self.context // block) + slots  # every slot full, plus a partial block each
        scheduler.cache_size = 0

        properties: dict = {}
        if self.device == "CPU":
            properties = {
                "INFERENCE_NUM_THREADS": max(1, threads),
                # the worker process is already pinned to its CPUs; OpenVINO's threads inherit that
                # mask, so they are left to the OS inside it instead of being pinned one per core
                "ENABLE_CPU_PINNING": False,
            }
        if settings.options.precision:  # e.g. f32 where the plugin's own choice (bf16 on AMX) crashes or errs
            properties["INFERENCE_PRECISION_HINT"] = settings.options.precision
        try:
            self.pipe = openvino_genai.ContinuousBatchingPipeline(
                model_path, scheduler, self.device, properties, properties if self.device == "CPU" else {}
            )
        except Exception as exc:  # RuntimeError with OpenVINO's own message (bad file, unknown device, no memory)
            raise EngineError(f"OpenVINO could not load {model_path} on {self.device}: {first_line(exc)}") from None
        self.tokenizer = self.pipe.get_tokenizer()
        defaults = self.pipe.get_config()
        self.stop_ids: set[int] = set(defaults.stop_token_ids) | {defaults.eos_token_id}
        self.stop_ids.discard(-1)
        if settings.chat_template:
            self.tokenizer.set_chat_template(settings.chat_template)
        self._chat_template = self.tokenizer.chat_template
        self._vocab = _token_bytes(self.tokenizer)
        self.n_vocab = len(self._vocab)
        self.fim_tokens = _fim_tokens(self._vocab)
        bos = self.tokenizer.get_bos_token_id()
        self.bos_token = bos if bos >= 0 and bos in self.tokenize("", add_special=True) else None
        # logit_bias only as bans of every end-of-text token (done with stop tokens, see _config)
        self.ban_with = sorted(self.stop_ids)
        self._announce()
        self._next_id = 0

    # --- requests in -------------------------------------------------------

    def _queue(self, request: wire.Generate, prompt: list[int], max_tokens: int, thinking: bool | None
               ) -> wire.Failure | None:
        config = self._config(request.params, max(max_tokens, 1))
        seq = OpenVinoSequence(request=request, prompt=prompt, max_tokens=max_tokens, thinking=thinking, config=config)
        self.waiting.append(seq)
        return None

    # --- one step ----------------------------------------------------------

    def step(self) -> list[wire.Output]:
        outputs = self._admit()
        if not self.running:
            return outputs
        try:
            self.pipe.step()
        except Exception as exc:
            return outputs + self.fail_running(f"OpenVINO step failed: {first_line(exc)}")
        now = time.perf_counter()
        news: list[tuple[OpenVinoSequence, str | None]] = []
        for seq in list(self.running):
            finish = self._read(seq)
            if finish == "error":
                outputs.append(self._dropped(seq))
            elif finish is not None or len(seq.ids) > seq.read_offset:
                news.append((seq, finish))
        if news:
            for (seq, finish), piece in zip(news, self._decode_new([s for s, f in news], [f for s, f in news])):
                output = self._emit(seq, piece, finish, now)
                if output is not None:
                    outputs.append(output)
        return outputs

    def _admit(self) -> list[wire.Failure]:
        refused = []
        while self.waiting and len(self.running) < self.slots:
            seq = self.waiting.popleft()
            self._next_id += 1
            ids = self._ov.Tensor(self._np.array([seq.prompt], dtype=self._np.int64))
            try:
                seq.handle = self.pipe.add_request(self._next_id, ids, seq.config)
            except Exception as exc:  # the config failed OpenVINO's own validation
                refused.append(wire.failed(seq.request.id, 400, f"OpenVINO refused the request: {first_line(exc)}"))
                continue
            self._start(seq)
        return refused

    def _read(self, seq: OpenVinoSequence) -> str | None:
        """Take the tokens this step produced; return "stop"/"length" when the pipeline finished it, "error" if dropped."""
        handle, gen = seq.handle, self._genai
        finish = None
        while handle.can_read():
            for out in handle.read().values():
                for i, token in enumerate(out.generated_ids):
                    if token in self.stop_ids:
                        finish = "stop"
                    elif finish is None:
                        seq.ids.append(token)
                        if seq.request.params.logprobs >= 0:
                            seq.logprobs.append(wire.TokenLogprob(token, self.piece(token), out.generated_log_probs[i]))
                if out.finish_reason == gen.GenerationFinishReason.LENGTH:
                    finish = finish or "length"
                elif out.finish_reason != gen.GenerationFinishReason.NONE:
                    finish = finish or "stop"
        if finish is None:
            status = handle.get_status()
            if status == gen.GenerationStatus.FINISHED:
                finish = "length" if len(seq.ids) >= seq.max_tokens else "stop"
            elif status != gen.GenerationStatus.RUNNING:  # IGNORED: the pipeline could not fit it
                return "error"
        if (seq.ids or finish) and not seq.first_token_at:
            seq.first_token_at = time.perf_counter()
        return finish

    def _decode_new(self, seqs: list[OpenVinoSequence], finishes: list[str | None]) -> list[str]:
        """The new text of each sequence, from one batched decode (two windows per sequence).

        Each window starts at a token already decoded before (prefix_offset), so a tokenizer that
        drops a leading space or the bytes of a split character does it the same way in both.
        """
        windows = []
        for seq in seqs:
            windows.append(seq.ids[seq.prefix_offset : seq.read_offset])
            windows.append(seq.ids[seq.prefix_offset :])
        texts = self.tokenizer.decode(windows, skip_special_tokens=True)
        pieces = []
        for i, (seq, finish) in enumerate(zip(seqs, finishes)):
            before, after = texts[2 * i], texts[2 * i + 1]
            if finish is None and (len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before)):
                pieces.append("")  # a character is still incomplete: wait for its next token
                continue
            pieces.append(after[len(before) :])
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.ids)
        return pieces

    def _emit(self, seq: OpenVinoSequence, piece: str, finish: str | None, now: float) -> wire.Text | wire.Final | None:
        text = ""
        if piece:
            text, hit_stop = seq.text.push(piece.encode("utf-8"))
            if hit_stop:
                finish = "stop"
        if finish is not None:
            text += seq.text.flush()
        return self._output(seq, text, finish, len(seq.ids), len(seq.prompt), now)

    def _dropped(self, seq: OpenVinoSequence) -> wire.Failure:
        self._end(seq)
        return wire.failed(
            seq.request.id, 503, "the OpenVINO pipeline dropped the request (its KV cache could not hold it)"
        )

    def _release(self, seq: OpenVinoSequence) -> None:
        """The pipeline frees its KV blocks (prefix cache keeps what it can)."""
        if seq.handle is not None and seq.handle.get_status() == self._genai.GenerationStatus.RUNNING:
            seq.handle.cancel()

    # --- helpers -----------------------------------------------------------

    def _config(self, params: wire.SamplingParams, max_tokens: int):
        config = self._genai.GenerationConfig()
        config.max_new_tokens = max_tokens
        config.stop_token_ids = set(self.stop_ids)
        if params.json_schema is not None:
            # xgrammar masks the logits at each step. A schema it refuses breaks the pipeline, so add() takes only
            # schemas normalized (infersnap/json_schema.py) to the keywords it is known to accept
            config.structured_output_config = self._genai.StructuredOutputConfig(json_schema=params.json_schema)
        if params.logit_bias:
            # Only bans of every end-of-text token get here (capabilities.ban_with), without a schema: a
            # complete JSON allows only end-of-text. Every token in stop_token_ids is masked for the first
            # min_new_tokens tokens: banning them all for the whole generation bans these tokens.
            config.stop_token_ids = set(params.logit_bias)
            config.min_new_tokens = max_tokens
        if params.logprobs >= 0:
            config.logprobs = 1  # the chosen token's logprob; without it the pipeline reports 0.0
        config.presence_penalty = params.presence_penalty
        config.frequency_penalty = params.frequency_penalty
        if params.temperature <= 0:
            config.do_sample = False
            config.temperature = 0.0
            return config
        config.do_sample = True
        config.temperature = params.temperature
        config.top_k = params.top_k if params.top_k > 0 else 0
        config.top_p = params.top_p if 0 < params.top_p < 1 else 1.0
        config.min_p = max(params.min_p, 0.0)
        config.rng_seed = seed_of(params)
        return config

    def _chat_text(self, messages: list[dict[str, str]], variables: dict[str, Any]) -> str:
        if not self._chat_template:
            raise ValueError(NO_CHAT_TEMPLATE)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, extra_context=variables)

    # --- the tokenizer (/tokenize, /detokenize) ----------------------------

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=add_special).input_ids.data[0]]

    def piece(self, token: int) -> bytes:
        return self._vocab[token]

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([tokens], skip_special_tokens=False)[0] if tokens else ""


def _token_bytes(tokenizer) -> list[bytes]:
    """Each token's bytes, by id, from an openvino_genai.Tokenizer. decode() drops a token that holds
    part of a UTF-8 character; the vocabulary keeps its bytes (get_vocab_vector() fails on them)."""
    vocab = tokenizer.get_vocab()
    pieces = [b""] * (max(vocab.values(), default=-1) + 1)
    for piece, token in vocab.items():
        pieces[token] = piece if isinstance(piece, bytes) else piece.encode("utf-8")
    return pieces


# How code models spell their fill-in-the-middle tokens (prefix, suffix, middle): openvino-genai does not
# say which tokens they are, as llama.cpp's vocabulary does, so they are found by their text.
FIM_SPELLINGS = [
    (b"<|fim_prefix|>", b"<|fim_suffix|>", b"<|fim_middle|>"),  # Qwen2.5-Coder
    (b"<fim_prefix>", b"<fim_suffix>", b"<fim_middle>"),  # StarCoder
    ("<｜fim▁begin｜>".encode(), "<｜fim▁hole｜>".encode(), "<｜fim▁end｜>".encode()),  # DeepSeek-Coder
]


def _fim_tokens(vocab: list[bytes]) -> tuple[int, int, int] | None:
    ids = {piece: token for token, piece in enumerate(vocab)}
    for spelling in FIM_SPELLINGS:
        if all(piece in ids for piece in spelling):
            return tuple(ids[piece] for piece in spelling)
    return None
