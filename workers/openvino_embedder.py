"""An embedding engine on OpenVINO GenAI's TextEmbeddingPipeline (the runtime "openvino-embed").

TextEmbeddingPipeline reads an OpenVINO IR folder only: given the GGUF it fails with "ir: Could not open
the file: <model>.gguf/openvino_model.xml". So the GGUF is converted once, into a folder of the data
folder keyed by the file's path, size and mtime: openvino-genai's own GGUF reader (the one LLMPipeline
uses, with enable_save_ov_model) writes the decoder and its tokenizer as IR, and the decoder is then
cut into an encoder that TextEmbeddingPipeline can run: no KV cache (every input is read whole, from
an empty cache), positions from the attention mask, and the final norm's output (before the LM head)
as `last_hidden_state`, mean-pooled over each input's tokens as llama.cpp pools a chat model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from infersnap import paths, wire
from infersnap.models import gguf_metadata, trained_context
from infersnap.profiles import model_stamp
from infersnap.workers.engine_base import Embedder, EmbedJob, EngineError, EngineSettings, first_line, unit_vector

CONVERTED = "openvino-embed"  # the folder in the data folder that holds the converted models


class OpenVinoEmbedder(Embedder):
    """Each step is one TextEmbeddingPipeline.embed_documents over the next inputs of the requests in its slots."""

    runtime = "openvino-embed"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__()
        if not settings.verbose:
            os.environ.setdefault("OPENVINO_LOG_LEVEL", "1")  # errors only; read when the core starts
        import openvino_genai

        if not Path(settings.model_path).exists():
            raise EngineError(f"model not found: {settings.model_path}")
        self.slots = settings.slots
        model_context = trained_context(Path(settings.model_path))
        self.context = min(settings.context, model_context) if model_context else settings.context
        meta = gguf_metadata(Path(settings.model_path)) or {}
        self.n_embd = int(meta.get(f"{meta.get('general.architecture')}.embedding_length") or 0)
        try:
            folder = converted(settings.model_path)
            config = openvino_genai.TextEmbeddingPipeline.Config()
            config.pooling_type = openvino_genai.TextEmbeddingPipeline.PoolingType.MEAN
            config.normalize = True
            config.max_length = self.context  # longer inputs are refused before, never cut here
            properties: dict = {"INFERENCE_NUM_THREADS": max(1, settings.threads), "ENABLE_CPU_PINNING": False}
            if settings.options.precision:
                properties["INFERENCE_PRECISION_HINT"] = settings.options.precision
            self.pipe = openvino_genai.TextEmbeddingPipeline(str(folder), "CPU", config, **properties)
            self.tokenizer = openvino_genai.Tokenizer(str(folder))
        except Exception as exc:  # RuntimeError with OpenVINO's own message (architecture or file type it cannot read)
            raise EngineError(f"OpenVINO could not load {settings.model_path} for embeddings: {first_line(exc)}") from None
        self.n_vocab = max(self.tokenizer.get_vocab().values()) + 1  # get_vocab_vector fails on partial UTF-8

    def _add(self, request: wire.Embed) -> wire.Output | None:
        if request.token_lists:  # the pipeline takes text and tokenizes it itself
            return wire.failed(request.id, 400, "this embedding engine (OpenVINO text embedding) takes text "
                               "inputs only, not token ids", param="input")
        return super()._add(request)

    def _tokens(self, text: str) -> list[int]:
        """The text as the pipeline's tokenizer reads it (the GGUF's tokenizer, with its special tokens)."""
        return self.tokenizer.encode(text).input_ids.data[0].tolist()

    def _embed(self, batch: list[tuple[EmbedJob, int]]) -> list[bytes]:
        """One embed_documents over these inputs."""
        vectors = self.pipe.embed_documents([job.request.texts[i] for job, i in batch])
        return [unit_vector(v) for v in vectors]


def converted(model_path: str) -> Path:
    """The folder of the model converted for TextEmbeddingPipeline; converted now if it is not there yet."""
    digest = hashlib.sha1(json.dumps(model_stamp(model_path)).encode()).hexdigest()[:16]
    folder = paths.data_dir() / CONVERTED / digest
    if (folder / "openvino_model.xml").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        _convert(Path(model_path), work)
        try:
            work.rename(folder)
        except OSError:  # another worker converted it meanwhile
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def _convert(model_path: Path, work: Path) -> None:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    import openvino_genai

    # the GGUF reader writes its IR beside the file it reads: a link to the GGUF in the work folder
    (work / "model.gguf").symlink_to(model_path.resolve())
    openvino_genai.LLMPipeline(str(work / "model.gguf"), "CPU", enable_save_ov_model=True)
    (work / "model.gguf").unlink()
    decoder = work / "openvino_model.xml"
    model = ov.Core().read_model(decoder)
    inputs = {p.get_output_tensor(0).get_any_name(): p for p in model.get_parameters()}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            op.output(0).replace(op.input_value(0))  # the KV cache: always the empty one it starts from
        elif op.get_type_name() == "Broadcast" and op.get_output_partial_shape(0).rank.get_length() == 5:
            # grouped-query attention repeats K and V with a bidirectional Broadcast whose target length
            # is 0, which only the fused KV-cache attention of the stateful model accepts: 1 keeps it
            op.input_value(1).get_node().input(3).replace_source_output(ops.constant([1], dtype=np.int64).output(0))
    for sink in list(model.get_sinks()):
        model.remove_sink(sink)
    batch = ops.squeeze(ops.gather(ops.shape_of(ids), ops.constant([0]), ops.constant(0)), ops.constant([0]))
    beams = inputs["beam_idx"]
    beams.output(0).replace(ops.convert(ops.range(ops.constant(0, dtype=np.int64), batch, ops.constant(1, dtype=np.int64),
                                                  "i64"), beams.get_element_type()).output(0))
    # each token's position is the count of real tokens before it, whichever side the padding is on
    positions = ops.maximum(ops.subtract(ops.cumsum(ops.convert(mask, "i64"), ops.constant(1)), ops.constant(np.int64(1))),
                            ops.constant(np.int64(0)))
    inputs["position_ids"].output(0).replace(ops.convert(positions, inputs["position_ids"].get_element_type()).output(0))
    lm_head = model.output("logits").get_node().input_value(0).get_node()  # MatMul(final norm, LM head)
    hidden = lm_head.input_value(0)
    hidden.get_tensor().set_names({"last_hidden_state"})
    encoder = ov.Model([ops.result(hidden)], [ids, mask], "embedder")
    decoder.unlink()
    (work / "openvino_model.bin").unlink()
    ov.save_model(encoder, decoder, compress_to_fp16=False)
