"""The context: what serve chooses (the model's own, lowered for memory), and fit_context in both engines."""

from __future__ import annotations


import pytest
from conftest import ENGINES, probed_options

from infersnap import wire
from infersnap.planning import serve_context
from infersnap.config import Config
from infersnap.context import MIN_CONTEXT, Pool, choose
from infersnap.engines import MEMORY_SHARE, candidates
from infersnap.hwdetect import detect
from infersnap.models import ModelShape, default_model_path, model_shape, trained_context
from infersnap.profiles import MOST_STREAMS

SMOLLM2 = ModelShape(trained_context=8192, kv_bytes_per_token=23040, weights_bytes=98_362_432)
GIB = 1 << 30


def test_the_default_model_shape_comes_from_its_gguf_header():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 K and V
    assert model_shape(default_model_path()) == SMOLLM2
    assert trained_context(default_model_path()) == 8192


def test_a_file_that_is_no_gguf_has_no_shape(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    assert model_shape(junk) == ModelShape(None, 0, 18)
    assert choose(None, model_shape(junk), []).tokens == 2048


def test_the_models_own_context_when_memory_holds_it():
    pools = [Pool("memory", 16 * GIB, sequences=2 * 16 + 1, copies=3)]
    assert choose(None, SMOLLM2, pools) == choose(None, SMOLLM2, pools)
    assert choose(None, SMOLLM2, pools).tokens == 8192
    assert choose(None, SMOLLM2, pools).why == "the model's trained context"
    assert choose(None, SMOLLM2, [Pool("memory", 0, 33, 3)]).tokens == 8192  # unknown memory: no limit


def test_lowered_by_halving_to_what_memory_holds_and_says_why():
    # 33 sequences of 8192 tokens need 5.9 GiB of KV; 4096 need 2.9 GiB
    choice = choose(None, SMOLLM2, [Pool("memory", 4 * GIB, sequences=33, copies=3)])
    assert choice.tokens == 4096
    assert "lowered from the model's trained context of 8192" in choice.why and "33 sequences" in choice.why
    # never below MIN_CONTEXT, however little memory there is
    assert choose(None, SMOLLM2, [Pool("memory", 1 << 20, 33, 3)]).tokens == MIN_CONTEXT
    # every pool must hold its workers: a small GPU lowers it too
    pools = [Pool("memory", 64 * GIB, 17, 2), Pool("cuda:0", 2 * GIB, 16, 1)]
    assert choose(None, SMOLLM2, pools).tokens == 4096 and "cuda:0" in choose(None, SMOLLM2, pools).why


def test_a_set_context_is_kept_capped_at_the_models():
    assert choose(1024, SMOLLM2, [Pool("memory", 1, 1000, 9)]) == choose(1024, SMOLLM2, [])
    assert choose(1024, SMOLLM2, []).tokens == 1024 and "worker.context" in choose(1024, SMOLLM2, []).why
    capped = choose(65536, SMOLLM2, [])
    assert capped.tokens == 8192 and "capped" in capped.why


def expected_context(machine, lanes: list, slots: int, embeddings: bool = True) -> int:
    """The context serve should choose for the default model, computed from this machine's memory reading:
    on each memory pool (the machine's, or a device's own), each lane's slots and the embedding worker's
    one stream of KV cache at the context, and a copy of the weights per worker, in MEMORY_SHARE of what
    is there; the model's trained context halved until that fits, never below MIN_CONTEXT."""
    own = {a.device: a.vram_bytes for a in machine.accelerators if a.vram_bytes}
    pools: dict[str, list[int]] = {}  # pool -> [bytes, sequences, copies]
    for device, sequences in [(lane.device, slots) for lane in lanes] + ([("cpu", 1)] if embeddings else []):
        pool = pools.setdefault(device if device in own else "memory",
                                [own.get(device, machine.memory.available_bytes or 0), 0, 0])
        pool[1] += sequences
        pool[2] += 1
    tokens = SMOLLM2.trained_context

    def fits(bytes_, sequences, copies) -> bool:
        need = copies * SMOLLM2.weights_bytes + sequences * tokens * SMOLLM2.kv_bytes_per_token
        return not bytes_ or need <= bytes_ * MEMORY_SHARE

    while tokens > MIN_CONTEXT and not all(fits(*pool) for pool in pools.values()):
        tokens //= 2
    return tokens


def test_serve_context_counts_every_lane_and_the_slots_in_the_memory_it_reads(tmp_path):
    config = Config(tmp_path / "config.json")
    machine = detect("/")
    lanes = candidates(machine)  # engines=auto: serve may run each of them, and counts them all
    # left unset, a lane may take up to MOST_STREAMS slots; set, each lane takes worker.slots
    assert serve_context(config, machine).tokens == expected_context(machine, lanes, MOST_STREAMS)
    for slots in (64, 256):  # enough to lower the context where memory is short (on 20 GiB: 4096, 2048)
        config.set_many({"worker.slots": str(slots)})
        assert serve_context(config, machine).tokens == expected_context(machine, lanes, slots), slots
    config.set_many({"worker.embeddings": "false"})
    assert serve_context(config, machine).tokens == expected_context(machine, lanes, 256, embeddings=False)
    config.set_many({"worker.context": "1024"})
    assert serve_context(config, machine).tokens == 1024
    config.set_many({"worker.context": "0", "worker.slots": "8", "worker.embeddings": "true"})  # 0: the model's own again
    assert serve_context(config, machine).tokens == expected_context(machine, lanes, 8)


def test_worker_context_takes_0_or_128_and_more(tmp_path):
    from infersnap.config import ConfigError

    config = Config(tmp_path / "config.json")
    assert config.get("worker.context") == 0
    with pytest.raises(ConfigError, match="between 128"):
        config.set_many({"worker.context": "64"})


# --- fit_context: both engines built in this process, with a small context --------------------------------

CONTEXT = 256


@pytest.fixture(scope="module", params=ENGINES)
def built(request):
    from infersnap.engines import manifests
    from infersnap.workers.engine_base import EngineSettings
    from infersnap.workers.worker import engine_class

    # with the settings the probe found: llama.cpp's defaults crash this process on some CPUs (AMX)
    settings = EngineSettings(str(default_model_path()), "cpu", 2, CONTEXT, 2, options=probed_options(request.param))
    return engine_class(manifests()[request.param].runtime, "generate")(settings)


def end_of_text_bans(built) -> dict[int, float]:
    """Every end-of-text token banned, so that only the length ends a generation."""
    if built.ban_with is not None:  # OpenVINO: bans of exactly this set
        return {t: -100.0 for t in built.ban_with}
    import llama_cpp

    return {t: -100.0 for t in range(built.n_vocab) if llama_cpp.llama_vocab_is_eog(built.vocab, t)}


def run(built, request: wire.Generate) -> wire.Ending:
    """The request to its end; the output that ended it."""
    refused = built.add(request)
    if refused is not None:
        return refused
    last = None
    while built.busy:
        for output in built.step():
            last = output
    return last


def generate(built, words: int, **params) -> wire.Generate:
    prompt = " ".join(["river", "mountain", "lantern", "garden"] * (words // 4))
    sampling = wire.SamplingParams(temperature=0, logit_bias=end_of_text_bans(built), **params)
    return wire.Generate(id=f"r{words}-{sorted(params.items())}", model="m", params=sampling, prompt=prompt)


@pytest.mark.parametrize("max_tokens", [None, 100_000])
def test_fit_context_ends_the_generation_where_the_context_does(built, max_tokens):
    last = run(built, generate(built, 200, max_tokens=max_tokens, fit_context=True))
    assert isinstance(last, wire.Final) and last.finish_reason == "length"
    room = CONTEXT - last.prompt_tokens
    assert 0 < room < 100
    assert last.completion_tokens == room


def test_fit_context_keeps_a_max_tokens_that_fits(built):
    last = run(built, generate(built, 200, max_tokens=5, fit_context=True))
    assert (last.finish_reason, last.completion_tokens) == ("length", 5)


def test_a_prompt_that_alone_does_not_fit_is_still_refused(built):
    for fit in (True, False):
        last = run(built, generate(built, 400, fit_context=fit))
        assert isinstance(last, wire.Failure) and last.status == 400
        assert last.code == "context_length_exceeded"


def test_without_fit_context_too_many_tokens_are_refused_as_before(built):
    last = run(built, generate(built, 200, max_tokens=100_000))
    assert last.status == 400 and last.code == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in last.message
