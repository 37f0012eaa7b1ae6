"""The runtime registry (infersnap/runtimes.py) is the one list of runtimes, and a third runtime added
through it alone (an engine file, a registry entry, a manifest) really embeds: OpenVINO GenAI's
TextEmbeddingPipeline on the default model, in-process and served."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import start_server
from infersnap import routing, runtimes, wire
from infersnap.engines import EngineChoiceError, manifests, parse_choice, parse_embedding_choice
from infersnap.models import default_model_path
from infersnap.workers.engine_base import EngineSettings

REPO = Path(__file__).parent.parent
TEXTS = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Quarterly revenue rose by eight percent."]


def test_every_runtime_is_listed_in_the_registry_alone():
    assert {m.runtime for m in manifests().values()} <= set(runtimes.RUNTIMES)
    for runtime in runtimes.RUNTIMES.values():
        assert runtime.engines and set(runtime.engines) <= {"generate", "embed"}
        for where in runtime.engines.values():
            module, _, name = where.partition(":")
            assert (REPO / "workers" / f"{module.rsplit('.', 1)[1]}.py").exists() and name
    # no runtime name as a string literal outside the registry, its engines and their manifests
    names = {f'"{name}"' for name in runtimes.RUNTIMES}
    for folder in ("infersnap", "broker", "cli", "frontend", "workers"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "runtimes.py" or path.name.endswith(("_engine.py", "_embedder.py")):
                continue
            text = path.read_text()
            assert not [n for n in names if n in text], f"{path} names a runtime"


def test_refusals_name_runtimes_by_their_registry_display_names():
    needs = wire.Needs(task="generate")
    for name, runtime in runtimes.RUNTIMES.items():
        refused = routing.refusal("r", needs, "fim", [name], "m")
        assert f"the {runtime.display} engine serving 'm'" in refused.message


def test_an_embedding_only_runtime_never_generates_and_is_chosen_for_embeddings_by_name():
    with pytest.raises(EngineChoiceError, match="only embeds"):
        from infersnap.engines import select
        from infersnap.hwdetect import detect
        select(detect("/"), parse_choice("openvino-embed-cpu"))
    assert parse_embedding_choice("auto") is None and parse_embedding_choice("openvino-embed-cpu") == "openvino-embed-cpu"
    with pytest.raises(EngineChoiceError, match="does not embed"):
        parse_embedding_choice("intel-cpu")


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    patch = pytest.MonkeyPatch()
    patch.setenv("INFERSNAP_DATA", str(data))  # where the converted model goes
    engine_class = runtimes.RUNTIMES["openvino-embed"].engines["embed"]
    module, _, name = engine_class.partition(":")
    cls = getattr(importlib.import_module(module), name)
    yield cls(EngineSettings(str(default_model_path()), "cpu", 2, 2048, 2))
    patch.undo()


def embed(engine, request: wire.Embed) -> wire.Output:
    assert engine.add(request) is None
    while not (outputs := engine.step()):
        pass
    [output] = outputs
    return output


def test_the_third_runtime_embeds_the_default_model(embedder):
    output = embed(embedder, wire.Embed(id="e", model="m", texts=TEXTS))
    vectors = [np.frombuffer(v, dtype="<f4") for v in output.vectors]
    assert all(v.shape == (576,) and math.isclose(float(np.linalg.norm(v)), 1.0, abs_tol=1e-4) for v in vectors)
    cat, kitten, revenue = vectors
    assert float(cat @ kitten) > float(cat @ revenue)
    assert output.prompt_tokens == sum(len(embedder._tokens(t)) for t in TEXTS) > 0
    alone = np.frombuffer(embed(embedder, wire.Embed(id="a", model="m", texts=[TEXTS[2]])).vectors[0], "<f4")
    assert float(alone @ revenue) == pytest.approx(1.0, abs=1e-3)  # batching does not change a vector
    too_long = embedder.add(wire.Embed(id="l", model="m", texts=["word " * 3000]))
    assert too_long.status == 400 and "more than the model's context of 2048" in too_long.message


def test_the_third_runtime_serves_v1_embeddings(tmp_path):
    server = start_server(tmp_path, session_profiles_too=False, **{
        "engines": "cpu", "engines-measure": "false", "worker.embedding-engine": "openvino-embed-cpu"})
    try:
        embed_worker = next(w for w in server.status()["workers"] if w["task"] == "embed")
        assert embed_worker["engine"] == "openvino-embed-cpu" and embed_worker["state"] == "ready"
        reply = httpx.post(f"{server.url}/embeddings", json={"input": TEXTS}, timeout=60).json()
        cat, kitten, revenue = (np.array(d["embedding"]) for d in reply["data"])
        assert float(cat @ kitten) > float(cat @ revenue) and reply["usage"]["prompt_tokens"] > 0
    finally:
        assert server.stop() == 0, server.log.read_text()
