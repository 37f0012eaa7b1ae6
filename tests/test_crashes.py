"""Engines that crash on a machine are found, worked around or left out, never served (issue 21).

The crashes are real: the fault hook (workers/faults.py, INFERSNAP_FAULT) makes a worker or a probe kill
itself with SIGSEGV at a chosen point, as llama.cpp's AMX kernels do on a Sapphire Rapids Xeon; OpenVINO
dies for real on a GGUF cut short (tests/test_profiles.py). The servers are the real `infersnap serve`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import child_pid, cli, data_env, second_model, start_server, wait_until
from infersnap import probes
from infersnap.engines import Assignment, candidates, choose_lanes, manifests
from infersnap.hwdetect import detect
from infersnap.profiles import Level, Profile, PromptRead, Speed, Subject
from infersnap.workers.faults import FaultRuleError, parse

MACHINES = Path(__file__).parent / "machines"
XEON = str(MACHINES / "xeon-sapphire-rapids-kvm-2vcpu" / "machine-root")
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


def llamacpp_lane() -> str:
    """The llama.cpp engine auto runs on this machine's CPU (cpu-avx512, cpu-avx2 or cpu, by its flags)."""
    return next(a.engine for a in candidates(detect("/")) if manifests()[a.engine].runtime == "llamacpp")


def chat(server, model: str | None = None, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/chat/completions", json={**CHAT, **({"model": model} if model else {})},
                      timeout=timeout)


def workers(server) -> dict[str, dict]:
    return {w["id"]: w for w in server.status()["workers"]}


# --- the choice, the variants, the hook: no process -----------------------------------------------------


def test_on_the_recorded_xeon_a_crashing_llamacpp_gives_way_to_openvino_not_to_another_llamacpp_engine():
    machine = detect(XEON)
    assert {"amx_tile", "amx_int8", "amx_bf16"} <= set(machine.cpu.flags)
    lanes = {manifests()[a.engine].runtime: a for a in candidates(machine)}
    assert lanes["llamacpp"] == Assignment("cpu-avx512", "cpu") and lanes["openvino"].engine == "intel-cpu"
    crashed = {lanes["llamacpp"]: "every setting crashed: default: killed by SIGSEGV"}
    chosen, left_out = choose_lanes(machine, None, {}, crashed)
    assert chosen == [lanes["openvino"]]  # not cpu-avx2 or cpu: one llama.cpp build, the same crash
    assert any("cpu-avx512 on cpu: it crashes here" in note for note in left_out)
    with pytest.raises(ValueError, match="the engines named for cpu crash here"):
        choose_lanes(machine, ["cpu-avx512"], {}, crashed)
    # named beside one that runs, it stays: its worker fails at once with why (WorkerSpec.crashes)
    assert set(choose_lanes(machine, ["cpu-avx512", "intel-cpu"], {}, crashed)[0]) == set(lanes.values())


def test_a_measured_crash_is_never_beaten_by_the_static_score():
    machine = detect(XEON)
    lanes = {manifests()[a.engine].runtime: a for a in candidates(machine)}
    speed = Speed(levels=[Level(1, 50.0, 0.1)], prompts=[PromptRead(128, 0.5)])
    measured = {
        lanes["llamacpp"]: Profile(engine="cpu-avx512", device="cpu", key="a", measured_at="", threads=2, context=2048,
                                   error="the measuring process killed by SIGSEGV: the engine crashed", crashed=True),
        lanes["openvino"]: Profile(engine="intel-cpu", device="cpu", key="b", measured_at="", threads=2, context=2048,
                                   speed=speed),
    }
    assert choose_lanes(machine, None, measured)[0] == [lanes["openvino"]]
    # before: a lane without figures made the static score decide, and the crashed llama.cpp won
    assert choose_lanes(machine, None, {lanes["openvino"]: measured[lanes["openvino"]]})[0] == [lanes["llamacpp"]]


def test_variants_run_in_order_and_settings_fixed_by_hand_narrow_them():
    assert [v.label for v in probes.variants("llamacpp")] == ["default", "no-repack", "no-repack-no-mmap"]
    assert [v.label for v in probes.variants("openvino")] == ["default", "f32"]
    assert probes.fixed_settings({"repack": "off", "mmap": "auto"}) == {"repack": False}
    assert [v.label for v in probes.variants("llamacpp", {"repack": False})] == ["no-repack", "no-repack-no-mmap"]
    assert [v.label for v in probes.variants("llamacpp", {"repack": True, "mmap": False})] == ["no-mmap"]
    assert [v.label for v in probes.variants("openvino", {"precision": "bf16"})] == ["bf16"]


def test_a_crash_site_is_read_from_faulthandler_and_the_hook_refuses_what_it_cannot_read():
    stderr = ('Fatal Python error: Segmentation fault\n\nThread 0x2 (most recent call first):\n'
              '  File "/x/threading.py", line 9 in run\n\nCurrent thread 0x1 (most recent call first):\n'
              '  File "/x/infersnap/workers/llamacpp_engine.py", line 312 in step\n  File "/x/worker.py", line 9 in serve\n')
    assert probes.crash_site(stderr) == " in llamacpp_engine.py:312 step"
    assert probes.crash_site("nothing useful") == ""
    [rule] = parse("at=request after=2 engine=cpu model=gemma")
    assert rule.matches({"engine": "cpu", "model": "/m/gemma3.gguf", "in": "worker"})
    assert not rule.matches({"engine": "intel-cpu", "model": "/m/gemma3.gguf"})
    for bad in ("at=never", "at=load colour=red", "at=request after=x"):
        with pytest.raises(FaultRuleError):
            parse(bad)


def test_engine_settings_are_keys_a_user_sets_and_they_change_the_probe_key(tmp_path):
    env = data_env(tmp_path)
    cli(env, "set", "engine-settings.cpu.repack=off", "engine-settings.intel-cpu.precision=f32")
    assert yaml.safe_load(cli(env, "get", "engine-settings.cpu").stdout) == {"engine-settings.cpu.repack": "off"}
    for bad in ("engine-settings.cpu.repack=maybe", "engine-settings.nope.repack=off", "engine-settings.cpu.colour=red"):
        assert cli(env, "set", bad, check=False).returncode != 0
    subject = Subject(engine="cpu", runtime="llamacpp", device="cpu", model_path="/m.gguf", threads=2, context=0)
    machine = detect("/")
    keys = {probes.key(subject, machine, probes.variants("llamacpp", fixed))
            for fixed in ({}, {"repack": False}, {"mmap": False})}
    assert len(keys) == 3


# --- served for real, with the fault hook ---------------------------------------------------------------


def test_a_probe_that_crashes_with_the_defaults_falls_back_and_both_lanes_serve_a_crash_loop_is_quarantined(tmp_path):
    """llama.cpp crashes with its defaults at load, in the probe and in any worker that would try them: the
    probe finds no-repack, and embeddings are served with it. Its generating lane (first in plan order, so
    it takes a burst's first requests) also dies at each first request: each request it had no output for
    is retried on the OpenVINO lane, and after its second death soon after ready it is quarantined, not
    restarted in a loop, until `models load`."""
    llama = llamacpp_lane()
    fault = f"at=load engine={llama} variant=default; at=request engine={llama} task=generate in=worker"
    server = start_server(tmp_path, session_profiles_too=False, env={"INFERSNAP_FAULT": fault}, **{
        "engines": f"{llama},intel-cpu", "engines-measure": "false", "worker.slots": "2"})
    lane = f"cpu/{llama}"
    try:
        log = server.log.read_text()
        assert f"{llama} on cpu crashed with settings default: was killed by SIGSEGV" in log
        lanes = workers(server)
        assert lanes[lane]["state"] == "ready" and lanes[lane]["settings"].startswith("no-repack (default: was killed by SIGSEGV")
        assert lanes["embed"]["settings"].startswith("no-repack")
        shown = yaml.safe_load(cli(server.env, "engine", llama).stdout)["settings"][0]
        assert shown["runs-with"] == "no-repack" and "SIGSEGV" in shown["crashed"]["default"]
        embedded = httpx.post(f"{server.url}/embeddings", json={"input": ["a", "b"]}, timeout=30)
        assert embedded.status_code == 200 and len(embedded.json()["data"]) == 2

        # requests at once, so that both lanes take some: every one is answered (the OpenVINO lane's are retried)
        replies: list[httpx.Response] = []
        deadline = time.monotonic() + 60  # the lane takes seconds to load again after each death
        while workers(server)[lane]["state"] != "failed":
            assert time.monotonic() < deadline, "the crashing lane was not quarantined"
            batch = [threading.Thread(target=lambda: replies.append(chat(server))) for _ in range(4)]
            [t.start() for t in batch]
            [t.join(60) for t in batch]
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
        failed = workers(server)[lane]
        assert "killed by SIGSEGV twice within 60 s of becoming ready" in failed["error"] and "generate request" in failed["error"]
        assert "models load" in failed["error"]
        log = server.log.read_text()
        assert "retried once, on cpu/intel-cpu" in log and f"worker {lane} failed" in log
        restarts = failed.get("restarts", 0)
        time.sleep(3)  # no restart loop (a restart would come 1 s after a second death): it stays down
        assert workers(server)[lane]["state"] == "failed" and workers(server)[lane].get("restarts", 0) == restarts
        assert server.log.read_text().count(f"worker {lane} (cpu) is loading") == log.count(f"worker {lane} (cpu) is loading")
        assert httpx.get(f"{server.base}/health").status_code == 200 and chat(server).status_code == 200

        # the quarantine outlives the broker: a broker started anew is told it again
        os.kill(child_pid(server, "infersnap.broker"), signal.SIGKILL)
        wait_until(lambda: httpx.get(f"{server.base}/health", timeout=5).status_code == 200, 20, "no broker again")
        time.sleep(2)
        assert workers(server)[lane]["state"] == "failed" and "twice within 60 s" in workers(server)[lane]["error"]

        # `infersnap models load` lifts the quarantine: the lane is started afresh
        cli(server.env, "models", "load", server.status()["model"])
        wait_until(lambda: workers(server)[lane]["state"] == "ready", 30, "the lane was not tried again")
    finally:
        assert server.stop() == 0


def test_an_engine_that_crashes_whatever_its_settings_is_left_out_and_the_next_serves(tmp_path):
    """Every llama.cpp variant crashes at load: OpenVINO serves chat alone, the embedding worker (llama.cpp)
    and a model only llama.cpp reads get 503 saying why, and nothing restarts in a loop. The OpenVINO
    lane, alone on the CPU, crashes at its first requests with its defaults: it runs on with f32."""
    llama = llamacpp_lane()
    fault = f"at=load engine={llama}; at=request engine=intel-cpu task=generate in=worker variant=default"
    data = tmp_path / "data"
    cli(data_env(data), "models", "add", str(second_model()), "--name", "gemma")
    server = start_server(data, session_profiles_too=False, env={"INFERSNAP_FAULT": fault},
                          **{"engines-measure": "false"})
    try:
        lanes = workers(server)
        assert [w["engine"] for w in lanes.values() if w["state"] == "ready"] == ["intel-cpu"]
        assert lanes["embed"]["state"] == "failed" and "crashes here" in lanes["embed"]["error"]
        shown = json.loads(cli(server.env, "engines", "--format", "json").stdout)
        settings = next(e for e in shown if e["name"] == llama)["settings"][0]
        assert settings["crashes"] and set(settings["crashed"]) == {"default", "no-repack", "no-repack-no-mmap"}
        assert f"{llama}" in " ".join(server.status().get("left-out", []))
        embedded = httpx.post(f"{server.url}/embeddings", json={"input": "a"}, timeout=30)
        assert embedded.status_code == 503 and "crashes here" in embedded.json()["error"]["message"]

        # the first request: the lane dies of it twice (retried once, never a third time) and runs on with f32
        first = chat(server)
        assert first.status_code == 503 and "SIGSEGV" in first.json()["error"]["message"]
        assert "retry" not in first.json()["error"]["message"]
        wait_until(lambda: workers(server)["cpu"]["state"] == "ready", 30, "the lane did not come back with f32")
        assert workers(server)["cpu"]["settings"].startswith("f32 (instead of intel-cpu default: was killed by SIGSEGV")
        assert chat(server).status_code == 200

        # a model only llama.cpp reads: none of its engines runs here, and it says so; the default serves on
        refused = chat(server, "gemma")
        assert refused.status_code == 503 and "crashes here" in refused.json()["error"]["message"]
        assert chat(server).status_code == 200
    finally:
        assert server.stop() == 0


def test_a_lane_alone_whose_every_setting_crashes_while_serving_runs_on_as_another_runtime(tmp_path):
    """OpenVINO, the one lane named, probes fine with f32 (its defaults crash the probe) but dies at each
    first request: after its second death it runs on as the CPU's llama.cpp engine, probed at start (for
    the embedding worker), not quarantined while nothing else serves."""
    llama = llamacpp_lane()
    fault = "at=load engine=intel-cpu variant=default in=probe; at=request engine=intel-cpu task=generate in=worker"
    server = start_server(tmp_path, session_profiles_too=False, env={"INFERSNAP_FAULT": fault},
                          **{"engines": "intel-cpu", "engines-measure": "false"})
    try:
        assert workers(server)["cpu"]["settings"].startswith("f32 (default: was killed by SIGSEGV")
        first = chat(server)  # its worker died of it twice: it ends with the error, never retried a third time
        assert first.status_code == 503 and "was killed by SIGSEGV" in first.json()["error"]["message"]
        wait_until(lambda: workers(server)["cpu"]["state"] == "ready", 30, "the lane did not come back")
        lane = workers(server)["cpu"]
        assert lane["engine"] == llama and "instead of intel-cpu f32: was killed by SIGSEGV twice" in lane["settings"]
        assert chat(server).status_code == 200
        assert f"it runs on as {llama} with the settings" in server.log.read_text()
    finally:
        assert server.stop() == 0


def test_where_the_cpu_has_amx_a_fresh_default_install_serves_chat_and_embeddings(tmp_path):
    if "amx_tile" not in detect("/").cpu.flags:
        pytest.skip("this CPU has no AMX (the Sapphire Rapids crash is tested above with the fault hook)")
    server = start_server(tmp_path, session_profiles_too=False, **{"engines-measure": "false"})
    try:
        assert chat(server).status_code == 200
        assert httpx.post(f"{server.url}/embeddings", json={"input": "a"}, timeout=30).status_code == 200
        assert all(w["settings"] for w in server.status()["workers"])
    finally:
        assert server.stop() == 0
