"""Engine manifests judged against recorded real machines, through the CLI a user runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import cli, data_env

from infersnap.planning import embedding_specs, worker_specs
from infersnap.engines import Assignment, embedding_engine, manifests, select
from infersnap.hwdetect import detect
from infersnap.runtimes import RUNTIMES

MACHINES = Path(__file__).parent / "machines"
LUNAR_LAKE = "intel-core-ultra-7-256v"
CPU_ENGINES = {name for name, m in manifests().items() if m.device == "cpu"}


def root(machine: str) -> str:
    return str(MACHINES / machine / "machine-root")


def engines_on(machine: str, env: dict[str, str]) -> dict[str, dict]:
    shown = json.loads(cli(env, "engines", "--root", root(machine), "--format", "json").stdout)
    return {entry["name"]: entry for entry in shown}


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    return data_env(tmp_path)


def test_every_manifest_loads_with_the_fields_the_issue_names():
    expected = {"cpu", "cpu-avx2", "cpu-avx512", "arm64", "intel-cpu", "intel-gpu", "intel-npu", "nvidia-gpu", "amd-gpu"}
    assert expected <= set(manifests())
    assert manifests()["amd-gpu"].experimental and not manifests()["intel-gpu"].experimental
    assert {m.runtime for m in manifests().values()} == set(RUNTIMES)  # every runtime has a manifest


@pytest.mark.parametrize(
    "machine, compatible, incompatible",
    [
        (LUNAR_LAKE, {"intel-gpu", "intel-npu", "intel-cpu", "cpu-avx2", "cpu"}, {"nvidia-gpu", "arm64", "cpu-avx512"}),
        ("i5-3570k+arc-a580+gtx1080ti", {"intel-gpu", "nvidia-gpu", "cpu"}, {"cpu-avx2", "intel-cpu", "intel-npu"}),
        ("i7-2600k+arc-a580", {"intel-gpu", "cpu"}, {"cpu-avx2", "nvidia-gpu", "amd-gpu"}),
        ("lenovo-thinkpad-p16s", {"cpu-avx2", "cpu"}, {"intel-gpu", "nvidia-gpu", "intel-npu"}),
        ("raspberry-pi-5", {"arm64", "cpu"}, {"cpu-avx2", "intel-cpu", "intel-gpu"}),
        ("raspberry-pi-5+hailo-8", {"arm64", "cpu"}, {"intel-npu"}),
        ("orange-pi-rv2", {"cpu"}, {"arm64", "cpu-avx2", "intel-cpu"}),
    ],
)
def test_verdicts_on_recorded_machines(env, machine, compatible, incompatible):
    shown = engines_on(machine, env)
    assert {n for n in compatible if shown[n]["compat"] == "yes"} == compatible
    assert {n for n in incompatible if shown[n]["compat"] == "no"} == incompatible


def test_an_experimental_engine_is_shown_but_never_picked_automatically(env):
    shown = engines_on("hp-zbook-i712850HX+RadeonPROW6600M", env)
    assert shown["amd-gpu"]["compat"] == "exptl" and not shown["amd-gpu"]["active"]


def test_auto_gives_each_device_its_best_engine(env):
    shown = engines_on(LUNAR_LAKE, env)
    active = {name for name, entry in shown.items() if entry["active"]}
    assert {"intel-gpu", "intel-npu"} <= active
    [cpu_engine] = active & CPU_ENGINES
    best_cpu = max((e for e in shown.values() if e["name"] in CPU_ENGINES), key=lambda e: e["score"])
    assert cpu_engine == best_cpu["name"]
    assert shown["cpu-avx2"]["score"] > shown["cpu"]["score"]  # the more specific build ranks higher
    table = cli(env, "engines", "--root", root(LUNAR_LAKE)).stdout.splitlines()
    assert table[0].split()[:3] == ["engine", "vendor", "compat"]
    assert any(line.startswith("intel-npu*") for line in table)


def test_engine_shows_manifest_verdict_and_reasons(env):
    shown = yaml.safe_load(cli(env, "engine", "intel-npu", "--root", root(LUNAR_LAKE)).stdout)
    assert shown["name"] == "intel-npu" and shown["runtime"] == "openvino" and shown["compat"] == "yes"
    assert shown["devices-found"] == ["NPU"]
    refused = yaml.safe_load(cli(env, "engine", "nvidia-gpu", "--root", root(LUNAR_LAKE)).stdout)
    assert refused["compat"] == "no" and "no gpu from vendor 0x10de found" in refused["reasons"][0]
    old_cpu = yaml.safe_load(cli(env, "engine", "cpu-avx2", "--root", root("i7-2600k+arc-a580")).stdout)
    assert "avx2" in old_cpu["reasons"][0]
    unknown = cli(env, "engine", "tpu", check=False)
    assert unknown.returncode != 0 and "unknown engine 'tpu'" in unknown.stderr


def test_use_engine_persists_a_valid_choice_and_refuses_the_rest(env):
    lunar = root(LUNAR_LAKE)
    cli(env, "use-engine", "intel-npu", "cpu", "--root", lunar)
    assert cli(env, "get", "engines").stdout.strip() == "intel-npu,cpu"
    shown = engines_on(LUNAR_LAKE, env)
    assert {n for n, e in shown.items() if e["active"]} == {"intel-npu", "cpu"}

    for bad, words in [
        (["nvidia-gpu"], "cannot run on this machine"),
        (["warp-drive"], "unknown engine"),
        (["cpu", "cpu-avx2"], "both run on cpu"),
    ]:
        result = cli(env, "use-engine", *bad, "--root", lunar, check=False)
        assert result.returncode != 0 and words in result.stderr and "nothing was changed" in result.stderr
        assert cli(env, "get", "engines").stdout.strip() == "intel-npu,cpu"

    cli(env, "use-engine", "--auto", "--root", lunar)
    assert cli(env, "get", "engines").stdout.strip() == "auto"
    assert cli(env, "use-engine", "--root", lunar, check=False).returncode != 0
    assert cli(env, "set", "engines=nope", check=False).returncode != 0


def test_machine_prints_the_recorded_hardware(env):
    shown = json.loads(cli(env, "machine", "--root", root(LUNAR_LAKE), "--format", "json").stdout)
    devices = {a["device"] for a in shown["accelerators"]}
    assert {"GPU.0", "NPU"} <= devices
    assert shown["cpu"]["architecture"] == "amd64"
    assert yaml.safe_load(cli(env, "machine").stdout)["cpu"]["logical_cpus"] >= 1


def test_gpu_and_npu_workers_take_their_host_cores_off_the_cpu_worker():
    assignments = select(detect(root(LUNAR_LAKE)))
    specs = worker_specs(assignments, cores=list(range(8)), cpu_threads=0, slots=4)
    by_device = {s.device: s for s in specs}
    assert set(by_device) == {"cpu", "GPU.0", "NPU"}
    cpu = by_device["cpu"]
    assert cpu.threads == len(cpu.cpus) == 6
    for device in ("GPU.0", "NPU"):
        assert by_device[device].runtime == "openvino" and len(by_device[device].cpus) == 1
        assert not set(by_device[device].cpus) & set(cpu.cpus)
    # on a 1-core machine nobody is left without a core
    tiny = worker_specs(assignments, cores=[0], cpu_threads=0, slots=4)
    assert all(s.cpus == [0] for s in tiny)


def test_nvidia_engine_offloads_every_layer():
    specs = worker_specs([Assignment("nvidia-gpu", "cuda:0")], cores=[0, 1, 2, 3], cpu_threads=0, slots=4)
    assert specs[0].gpu_layers >= 999 and specs[0].device == "cuda:0" and specs[0].runtime == "llamacpp"


def test_the_embedding_worker_runs_llamacpp_on_the_cpu_workers_cores():
    machine = detect(root(LUNAR_LAKE))
    best = embedding_engine(machine)
    assert best == "cpu-avx2"  # Lunar Lake has AVX2, not AVX-512
    cores = list(range(8))
    # a CPU worker on OpenVINO: the embedding worker takes the best llama.cpp engine, on the same cores
    specs = worker_specs(select(machine, ["intel-cpu", "intel-gpu"]), cores, 0, 4)
    cpu = next(s for s in specs if s.device == "cpu")
    [embed] = embedding_specs(specs, cores, best)
    assert (embed.worker_id, embed.task, embed.engine, embed.runtime) == ("embed", "embed", best, "llamacpp")
    assert (embed.cpus, embed.threads) == (cpu.cpus, cpu.threads)
    # a llama.cpp CPU worker lends its own engine; with no CPU worker, all cores
    [same] = embedding_specs(worker_specs([Assignment("cpu", "cpu")], [0, 1], 0, 4), [0, 1], best)
    assert same.engine == "cpu"
    [alone] = embedding_specs(worker_specs([Assignment("nvidia-gpu", "cuda:0")], [0, 1, 2], 0, 4), [0, 1, 2], best)
    assert (alone.cpus, alone.threads, alone.device) == ([0, 1, 2], 3, "cpu")
    # no llama.cpp engine for this CPU, and an OpenVINO CPU worker: no embedding worker
    assert embedding_specs(specs, cores, None) == []
