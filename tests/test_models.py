"""Many models on one server, for real: the default SmolLM2 and Gemma 3 270M (another architecture, no
chat template) from the models folder, loaded on the first request, unloaded when idle or when another
needs the memory, and a corrupt file that fails with its reason while the others serve."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import cli, data_env, second_model, start_server, tree_rss_kib, wait_until
from infersnap.models import default_model_path

DEFAULT = default_model_path().name.removesuffix(".gguf")
GEMMA = "gemma3-270m"
# llama.cpp only (it reads both models), few slots and a short context: small and quick to load
SETTINGS = {"engines": "cpu", "engines-measure": "false", "worker.slots": "2", "worker.context": "2048",
            "worker.embeddings": "false"}


def models(server) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{server.url}/models", timeout=30).json()["data"]}


def complete(server, model: str, prompt: str = "The capital of France is", **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(f"{server.url}/completions", json=body, timeout=120)


def tokens(server, model: str, text: str = "Hello, infersnap!") -> list[int]:
    reply = httpx.post(f"{server.base}/tokenize", json={"model": model, "content": text}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def worker_pid(server, model: str) -> int:
    return next(w["pid"] for w in server.status()["workers"] if w["model"] == model and w["state"] == "ready")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """A server with the default model and Gemma 3 (added to the models folder), idle models kept 3 s."""
    data = tmp_path_factory.mktemp("data")
    env = data_env(data)
    cli(env, "models", "add", str(second_model()), "--name", GEMMA)
    server = start_server(data, **SETTINGS, **{"models.keep-alive": "3"})
    yield server
    assert server.stop() == 0, server.log.read_text()


def test_every_model_is_listed_with_its_state_and_what_it_can_do(two):
    listed = models(two)
    assert list(listed) == [DEFAULT, GEMMA]  # the default first
    assert listed[DEFAULT]["state"] == "loaded" and listed[GEMMA]["state"] in ("unloaded", "loaded")
    assert "chat" in listed[DEFAULT]["capabilities"] and "chat" not in listed[GEMMA]["capabilities"]
    assert listed[GEMMA]["context_length"] == 2048
    one = httpx.get(f"{two.url}/models/{GEMMA.upper()}", timeout=30).json()
    assert one["id"] == GEMMA and one["object"] == "model"
    missing = httpx.get(f"{two.url}/models/nope", timeout=30)
    assert missing.status_code == 404 and GEMMA in missing.json()["error"]["message"]


def test_a_cold_model_loads_on_its_first_request_and_two_serve_side_by_side(two):
    wait_until(lambda: models(two)[GEMMA]["state"] == "unloaded", 30, "Gemma 3 was loaded before any request")
    reply = complete(two, GEMMA)  # waits while it loads
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == GEMMA and reply.json()["choices"][0]["text"]
    # each model answers with its own tokenizer: the ids of one text differ between the two vocabularies
    assert tokens(two, GEMMA) != tokens(two, DEFAULT)
    assert models(two)[GEMMA]["state"] == "loaded" and models(two)[DEFAULT]["state"] == "loaded"
    chat = httpx.post(f"{two.url}/chat/completions", timeout=60,
                      json={"model": GEMMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
    unknown = complete(two, "nope")
    assert unknown.status_code == 404 and DEFAULT in unknown.json()["error"]["message"]


def test_an_idle_model_is_unloaded_after_its_keep_alive_and_its_memory_freed(two):
    assert complete(two, GEMMA, keep_alive="5s").status_code == 200  # loaded still while it is measured
    pid = worker_pid(two, GEMMA)
    loaded_kib = tree_rss_kib(two.process.pid)
    wait_until(lambda: models(two)[GEMMA]["state"] == "unloaded", 30, "Gemma 3 was not unloaded when idle")
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the unloaded model's worker process lives on")
    freed_mib = (loaded_kib - tree_rss_kib(two.process.pid)) / 1024
    assert freed_mib > 150, f"only {freed_mib:.0f} MiB freed by unloading Gemma 3 (241 MB of weights)"
    assert models(two)[DEFAULT]["state"] == "loaded"  # the default model stays (its keep-alive is -1)
    # a request's own keep_alive keeps it longer, as Ollama's does
    assert complete(two, GEMMA, keep_alive="1m").status_code == 200
    time.sleep(4)
    assert models(two)[GEMMA]["state"] == "loaded"
    bad = complete(two, GEMMA, keep_alive="soon")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def test_models_load_and_unload_from_the_cli(two):
    done = cli(two.env, "models", "unload", GEMMA, timeout=60)
    assert "unloaded" in done.stdout, done.stdout
    assert models(two)[GEMMA]["state"] == "unloaded"
    done = cli(two.env, "models", "load", GEMMA, "--keep-alive", "1m", timeout=120)  # loaded still when listed
    assert "loaded" in done.stdout, done.stdout
    assert models(two)[GEMMA]["state"] == "loaded"
    listed = cli(two.env, "models", "--format", "json").stdout
    assert '"loaded"' in listed
    missing = cli(two.env, "models", "load", "nope", check=False)
    assert missing.returncode != 0 and "nope" in missing.stderr


def test_a_budget_that_fits_one_model_evicts_and_reloads_and_a_too_large_one_is_refused(tmp_path):
    env = data_env(tmp_path)
    cli(env, "models", "add", str(second_model()), "--name", GEMMA)
    # a copy of the default model that, with 8 slots of its full context, needs more than the budget
    cli(env, "models", "add", str(default_model_path()), "--name", "big", "--copy")
    default_slug = DEFAULT.lower().replace(".", "-").replace("_", "-")
    server = start_server(tmp_path, **SETTINGS, **{
        "models.memory-budget": "450", f"model-settings.{default_slug}.keep-alive": "300",
        "model-settings.big.slots": "8", "model-settings.big.context": "8192"})
    try:
        for model in [GEMMA, DEFAULT, GEMMA, DEFAULT]:  # each evicts the other: none fails
            reply = complete(server, model)
            assert reply.status_code == 200, (model, reply.text)
            assert [m for m, card in models(server).items() if card["state"] == "loaded"] == [model]
        too_big = complete(server, "big")
        assert too_big.status_code == 507, too_big.text
        error = too_big.json()["error"]
        assert error["code"] == "model_too_large" and "models.memory-budget" in error["message"]
        assert models(server)[DEFAULT]["state"] == "loaded"  # nothing else disturbed
        assert complete(server, DEFAULT).status_code == 200
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_a_corrupt_model_is_failed_with_its_reason_not_retried_and_the_others_serve(two, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_path().read_bytes()[:300_000])  # the header, cut short
    link = two.log.parent / "models" / "broken.gguf"  # in the models folder of `two`'s data folder
    os.symlink(broken, link)
    try:
        wait_until(lambda: "broken" in models(two), 15, "a model put in the models folder was not listed")
        first = complete(two, "broken")
        assert first.status_code == 503 and "broken.gguf" in first.json()["error"]["message"], first.text
        card = models(two)["broken"]
        assert card["state"] == "failed" and "broken.gguf" in card["error"]
        log_before = two.log.read_text().count("loading model broken")
        again = complete(two, "broken")
        assert again.status_code == 503
        time.sleep(1)
        assert two.log.read_text().count("loading model broken") == log_before  # not tried again
        assert complete(two, DEFAULT).status_code == 200
    finally:
        link.unlink()
        wait_until(lambda: "broken" not in models(two), 15, "a model taken out of the models folder is still listed")


def test_a_model_added_while_serving_is_served_within_seconds_and_one_removed_is_refused(two, tmp_path):
    copy = tmp_path / "smol-copy.gguf"
    shutil.copyfile(default_model_path(), copy)
    added = cli(two.env, "models", "add", str(copy), "--name", "live-smol")
    assert "within seconds" in added.stdout, added.stdout
    wait_until(lambda: "live-smol" in models(two), 15, "a model added while serving was not listed")
    reply = complete(two, "live-smol", keep_alive="5m")  # loads it, as any model not loaded, and keeps it
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "live-smol"
    pid = worker_pid(two, "live-smol")
    cli(two.env, "models", "remove", "live-smol")  # loaded: unloaded at once, as it is idle
    wait_until(lambda: "live-smol" not in models(two), 15, "a model removed while serving is still listed")
    gone = complete(two, "live-smol")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found", gone.text
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "the removed model's worker process lives on")
    assert "live-smol" not in {w["model"] for w in two.status()["workers"]}
    assert list(models(two)) == [DEFAULT, GEMMA]
    assert complete(two, DEFAULT).status_code == 200
