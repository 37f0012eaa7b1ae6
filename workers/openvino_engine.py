"""The OpenVINO engine: openvino-genai's ContinuousBatchingPipeline.

The pipeline holds a paged KV cache shared by up to `slots` sequences and
does the batching itself: every step() is one inference over the next token
of each generating sequence plus chunks of prompts still being read
(dynamic split-fuse), with prefix caching so a repeated system prompt or chat
history is read once. It reads GGUF files directly, as well as OpenVINO IR
folders.

This class gives it the llama.cpp engine's interface: requests wait here
until a slot is free, token ids come back from each request's handle and
are turned into text here (incrementally, never splitting a UTF-8
character), and stop strings are matched here through TextStream, so no part
of one ever reaches the client; a request that hits one is cancelled in the
pipeline.
"""

from __future__ import annotations

import json
import os
import random
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from infersnap import wire
from infersnap.workers.engine_base import BatchingEngine
from infersnap.workers.text import TextStream

BATCH_TOKENS = 512  # tokens per pipeline step: decode tokens first, prompt chunks fill the rest
BAN = -100.0  # a logit_bias at or below this bans the token (OpenAI's convention)


class EngineError(Exception):
    """The engine could not start (bad model file, unknown device, out of memory)."""


@dataclass
class Sequence:
    request: wire.Generate
    prompt: list[int]
    max_tokens: int
    config: object  # openvino_genai.GenerationConfig
    handle: object = None  # openvino_genai.GenerationHandle once admitted
    ids: list[int] | None = None  # generated tokens, stop tokens left out
    prefix_offset: int = 0  # ids[prefix_offset:read_offset] were decoded into text already sent
    read_offset: int = 0
    text: TextStream | None = None
    started: float = 0.0
    first_token_at: float = 0.0
    logprobs: list[wire.TokenLogprob] = field(default_factory=list)  # not yet sent


class OpenVinoEngine(BatchingEngine):
    def __init__(
        self, model_path: str, device: str, slots: int, context: int, threads: int, verbose: bool = False
    ) -> None:
        super().__init__()
        if not verbose:
            os.environ.setdefault("OPENVINO_LOG_LEVEL", "1")  # errors only; read when the core starts
        import numpy as np
        import openvino
        import openvino_genai

        self._np, self._ov, self._genai = np, openvino, openvino_genai
        self.device = device.upper()  # "cpu" -> "CPU"; "GPU.0" and "NPU" unchanged
        if not Path(model_path).exists():
            raise EngineError(f"model not found: {model_path}")
        model_context = _model_context(model_path)
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
        try:
            self.pipe = openvino_genai.ContinuousBatchingPipeline(
                model_path, scheduler, self.device, properties, properties if self.device == "CPU" else {}
            )
        except Exception as exc:  # RuntimeError with OpenVINO's own message (bad file, unknown device, no memory)
            raise EngineError(f"OpenVINO could not load {model_path} on {self.device}: {_first_line(exc)}") from None
        self.tokenizer = self.pipe.get_tokenizer()
        defaults = self.pipe.get_config()
        self.stop_ids: set[int] = set(defaults.stop_token_ids) | {defaults.eos_token_id}
        self.stop_ids.discard(-1)
        self._chat_template = self.tokenizer.chat_template
        self._vocab = _token_bytes(self.tokenizer)
        self.n_vocab = len(self._vocab)
        self.fim_tokens = _fim_tokens(self._vocab)
        bos = self.tokenizer.get_bos_token_id()
        self.bos_token = bos if bos >= 0 and bos in self.tokenize("", add_special=True) else None

        self._next_id = 0
        self.verbose = verbose

    # --- requests in -------------------------------------------------------

    def _queue(self, request: wire.Generate, prompt: list[int], max_tokens: int) -> wire.Output | None:
        if request.params.prompt_logprobs >= 0:
            message = "echo with logprobs is not supported by the OpenVINO engine: it gives no logprobs for the prompt"
            return wire.failed(request.id, 400, message, param="echo")
        if request.params.logprobs > 0:
            # openvino-genai computes only the chosen token's logprob, not the most likely ones
            param = "top_logprobs" if request.messages is not None else "logprobs"
            message = (
                f"{param} above 0 is not supported by the OpenVINO engine: it gives only the chosen token's logprob"
            )
            return wire.failed(request.id, 400, message, param=param)
        try:
            config = self._config(request.params, max(max_tokens, 1))
        except ValueError as exc:
            return wire.failed(request.id, 400, str(exc), param="logit_bias")
        self.waiting.append(Sequence(request=request, prompt=prompt, max_tokens=max_tokens, config=config))
        return None

    # --- one step ----------------------------------------------------------

    def step(self) -> list[wire.Output]:
        outputs = self._admit()
        if not self.running:
            return outputs
        try:
            self.pipe.step()
        except Exception as exc:
            outputs += [wire.failed(s.request.id, 500, f"OpenVINO step failed: {_first_line(exc)}") for s in self.running]
            for seq in list(self.running):
                self._release(seq)
            return outputs
        now = time.perf_counter()
        news: list[tuple[Sequence, str | None]] = []
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

    def _admit(self) -> list[wire.Output]:
        refused = []
        while self.waiting and len(self.running) < self.slots:
            seq = self.waiting.popleft()
            self._next_id += 1
            ids = self._ov.Tensor(self._np.array([seq.prompt], dtype=self._np.int64))
            try:
                seq.handle = self.pipe.add_request(self._next_id, ids, seq.config)
            except Exception as exc:  # the config failed OpenVINO's own validation
                refused.append(wire.failed(seq.request.id, 400, f"OpenVINO refused the request: {_first_line(exc)}"))
                continue
            seq.ids = []
            seq.text = TextStream(seq.request.params.stop)
            seq.started = time.perf_counter()
            self.running.append(seq)
        return refused

    def _read(self, seq: Sequence) -> str | None:
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

    def _decode_new(self, seqs: list[Sequence], finishes: list[str | None]) -> list[str]:
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

    def _emit(self, seq: Sequence, piece: str, finish: str | None, now: float) -> wire.Output | None:
        text = ""
        if piece:
            text, hit_stop = seq.text.push(piece.encode("utf-8"))
            if hit_stop:
                finish = "stop"
        if finish is not None:
            text += seq.text.flush()
        if finish is None and not text:
            return None
        return self._output(seq, text, finish, len(seq.ids), len(seq.prompt), now)

    def _dropped(self, seq: Sequence) -> wire.Output:
        self._release(seq)
        return wire.failed(
            seq.request.id, 503, "the OpenVINO pipeline dropped the request (its KV cache could not hold it)"
        )

    def _release(self, seq: Sequence) -> None:
        """Take the sequence out; the pipeline frees its KV blocks (prefix cache keeps what it can)."""
        self.running.remove(seq)
        if seq.handle.get_status() == self._genai.GenerationStatus.RUNNING:
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
            if params.json_schema is not None:
                # the ban below masks end-of-text, which is all a complete JSON allows: it would go on with junk
                raise ValueError("logit_bias cannot be used with response_format or tools on the OpenVINO engine")
            banned = {token for token, bias in params.logit_bias.items() if bias <= BAN}
            if len(banned) != len(params.logit_bias) or not self.stop_ids <= banned:
                raise ValueError(
                    "logit_bias is not supported by the OpenVINO engine, except banning (-100) the "
                    f"end-of-text token{'s' if len(self.stop_ids) > 1 else ''} {sorted(self.stop_ids)}, "
                    "alone or with other tokens"
                )
            # every token in stop_token_ids is masked for the first min_new_tokens tokens: banning them
            # all for the whole generation is banning these tokens (EOS among them, so it runs to max_tokens)
            config.stop_token_ids = banned
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
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        config.rng_seed = seed & 0xFFFFFFFF
        return config

    def _prompt_tokens(self, request: wire.Generate) -> list[int]:
        if request.messages is not None:
            if not self._chat_template:
                raise ValueError("the model has no chat template; use /v1/completions")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except Exception as exc:
                raise ValueError(_first_line(exc)) from None
        else:
            text = request.prompt or ""
        return self.tokenize(text, add_special=True) if text else []

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


def _first_line(exc: BaseException) -> str:
    """OpenVINO's message without its "Exception from <source file>:<line>:" and "Check ..." lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0]


def _model_context(model_path: str) -> int | None:
    """The context length the model was trained with, from GGUF metadata or an IR folder's config.json."""
    path = Path(model_path)
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text())
            return int(config.get("max_position_embeddings") or 0) or None
        return _gguf_context(path)
    except (OSError, ValueError, struct.error):
        return None


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_context(path: Path) -> int | None:
    """`<architecture>.context_length` from a GGUF header (reads only the metadata)."""
    with path.open("rb") as f:

        def read(fmt: str):
            fmt = "<" + fmt
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("I"), read("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return None
            return read(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF":
            return None
        read("I")  # version
        read("Q")  # tensors
        metadata = {}
        for _ in range(read("Q")):
            key = string()
            metadata[key] = value(read("I"))
            arch = metadata.get("general.architecture")
            if arch and f"{arch}.context_length" in metadata:
                return int(metadata[f"{arch}.context_length"])
    return None


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
