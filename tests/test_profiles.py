"""Engine profiles: measured once per machine, model, engine build, threads and context; stored; shown.

The live measurements use the real engines and the default model in quick mode (seconds an engine)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import msgspec
import pytest
import yaml
from conftest import cli, data_env, session_data, session_measured

from infersnap import probes, profiles
from infersnap import planning, profiling
from infersnap.config import Config
from infersnap.engines import candidates
from infersnap.hwdetect import detect
from infersnap.models import default_model_path
from infersnap.profiles import Level, Profile, PromptRead, Speed, Subject


def stored(data: Path) -> dict[str, Profile]:
    return {p.stem: msgspec.json.decode(p.read_bytes(), type=Profile) for p in (data / "profiles").glob("*.json")}


def measured_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("measuring ")]


def test_use_engine_auto_measures_each_engine_once_and_engines_shows_the_figures(tmp_path):
    # The run under test is the session's own `use-engine --auto --quick` in a fresh data folder
    # (conftest.session_data, which every test server copies its profiles from): measured once, not again here.
    # Its data folder as that run left it is copied here, to be shown and asked again.
    first, written = session_measured()
    shutil.copy(session_data() / "config.json", tmp_path / "config.json")
    shutil.copytree(session_data() / "probes", tmp_path / "probes")
    (tmp_path / "profiles").mkdir()
    for name in written:
        shutil.copy(session_data() / "profiles" / name, tmp_path / "profiles" / name)
    env = data_env(tmp_path)
    shown = json.loads(cli(env, "engines", "--format", "json").stdout)
    wanted = {a.engine for a in candidates(detect("/"))}  # each device's best engine of each runtime
    assert {line.split()[1] for line in measured_lines(first.stderr)} == wanted
    assert "streams:" in first.stderr and "tokens/s" in first.stderr  # the measuring process's progress
    found = stored(tmp_path)
    assert {p.engine for p in found.values()} == wanted and len(found) == len(wanted)
    for key, profile in found.items():
        assert profile.key == key and profile.quick and profile.error is None
        assert profile.load_seconds > 0 and profile.memory_bytes > 50 * 2**20
        assert [lv.streams for lv in profile.speed.levels] == [1, 4]
        assert all(lv.tokens_per_second > 0 and lv.ttft_seconds > 0 for lv in profile.speed.levels)
        assert len(profile.speed.prompts) == 2 and profile.speed.prompts[0].tokens < profile.speed.prompts[1].tokens
    assert cli(env, "get", "engines").stdout.strip() == "auto"
    assert cli(env, "get", "engines-measure").stdout.strip() == "true"

    # shown beside the verdicts: the table, json and one engine
    for entry in shown:
        assert bool(entry["measured"]) == (entry["name"] in wanted)
    one = next(e for e in shown if e["name"] in wanted)["measured"][0]
    assert one["device"] == "cpu" and set(one["tokens-per-second"]) == {"1", "4"} and one["memory-mib"] > 50
    table = cli(env, "engines").stdout.splitlines()
    assert table[0].split()[:4] == ["engine", "vendor", "compat", "measured"]
    assert all("tok/s x1" in line for line in table if line.split()[0].rstrip("*") in wanted)
    engine = yaml.safe_load(cli(env, "engine", sorted(wanted)[0]).stdout)
    assert engine["measured"][0]["tokens-per-second"][1] > 0 and engine["compat"] == "yes"

    again = cli(env, "use-engine", "--auto", "--quick", timeout=600)
    assert measured_lines(again.stderr) == [] and stored(tmp_path) == found  # measured once, then read
    assert "tok/s" in again.stdout
    # `--again` measures anew: tested where measuring is quick, on a model no engine loads (below)


def test_no_measure_keeps_the_static_score_and_is_stored(tmp_path):
    env = data_env(tmp_path)
    done = cli(env, "use-engine", "--auto", "--no-measure")
    assert measured_lines(done.stderr) == [] and not (tmp_path / "profiles").exists()
    assert cli(env, "get", "engines-measure").stdout.strip() == "false"
    assert cli(env, "get", "engines").stdout.strip() == "auto"
    assert cli(env, "use-engine", "cpu", "--again", check=False).returncode != 0  # --again goes with --auto


def test_an_engine_that_cannot_load_gets_a_profile_with_why_and_one_that_crashes_a_probe_that_says_so(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_path().read_bytes()[:200_000])  # a truncated copy of the real model
    env = data_env(tmp_path / "data")
    cli(env, "set", f"model.path={broken}")
    done = cli(env, "use-engine", "--auto", "--quick", timeout=600)
    found = stored(tmp_path / "data")
    probed = {p.engine: p for p in (msgspec.json.decode(f.read_bytes(), type=probes.Probe)
                                    for f in (tmp_path / "data" / "probes").glob("*.json"))}
    lanes = {a.engine for a in candidates(detect("/"))}
    assert set(probed) == lanes
    # llama.cpp refuses the file (its probe runs, as any settings would refuse it), and is measured failing;
    # OpenVINO 2026.4 dies of SIGSEGV reading it on some machines: its probe's every variant crashed, and
    # it is not measured (elsewhere it refuses the file too, and is measured failing)
    crashed = {name for name, p in probed.items() if p.crashed}
    assert all("SIGSEGV" in probed[name].crashed and name in done.stdout for name in crashed)
    assert {p.engine for p in found.values()} == lanes - crashed and lanes - crashed
    assert all(probed[p.engine].refused for p in found.values())
    assert all(p.speed is None and p.error.startswith("the engine could not load: ") for p in found.values())
    assert "failed: the engine could not load" in done.stdout
    shown = {e["name"]: e for e in json.loads(cli(env, "engines", "--format", "json").stdout)}
    for profile in found.values():
        entry = shown[profile.engine]
        assert entry["compat"] == "yes" and entry["measured"][0]["error"] == profile.error
    for name in crashed:
        assert shown[name]["settings"][0]["crashes"] and not shown[name]["measured"]
    assert any("failed: the engine could not load" in line for line in cli(env, "engines").stdout.splitlines())
    # stored: the next run says the same without loading anything again
    again = cli(env, "use-engine", "--auto", "--quick").stderr
    assert measured_lines(again) == [] and "checking that" not in again
    # and with --again, each engine measured before is measured anew, under the same key
    remeasured = cli(env, "use-engine", "--auto", "--quick", "--again", timeout=600)
    assert len(measured_lines(remeasured.stderr)) == len(found), remeasured.stderr
    assert set(stored(tmp_path / "data")) == set(found)
    assert all(stored(tmp_path / "data")[k].measured_at >= found[k].measured_at for k in found)


@pytest.mark.one_engine
def test_a_test_server_uses_the_session_profiles_and_measures_nothing(server):
    data = server.log.parent  # the shared server's data folder (conftest.start_server)
    assert "measuring" not in server.log.read_text() and "checking that" not in server.log.read_text()
    assert (data / "profiles").is_dir() and (data / "probes").is_dir()  # probed and measured once


# --- serve measures first, once; in-process with a stand-in for the measuring process -------------------


@pytest.fixture()
def data(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("INFERSNAP_DATA", str(tmp_path))
    return tmp_path


def fake_profile(subject: Subject, key: str, quick: bool = False) -> Profile:
    speed = Speed(levels=[Level(1, 100.0, 0.05)], prompts=[PromptRead(128, 0.2)])
    return Profile(engine=subject.engine, device=subject.device, key=key, measured_at=profiles.now(),
                   threads=subject.threads, context=subject.context, speed=speed)


def test_serve_measures_the_missing_profiles_first_and_only_once(data, monkeypatch):
    runs: list[str] = []
    monkeypatch.setattr(profiling, "measure", lambda s, k, q=False: runs.append(s.engine) or fake_profile(s, k))
    said: list[str] = []
    machine = detect("/")
    config = Config()
    config.set_many({"engines": "cpu"})
    planning.before_serving(config, machine, say=said.append)
    assert runs == ["cpu"] and "before serving" in said[0]
    planning.before_serving(config, machine, say=said.append)
    assert runs == ["cpu"]  # stored: the next serve does not wait

    config.set_many({"engines": "auto"})  # auto: every candidate of each device, for the choice among them
    planning.before_serving(config, machine, say=said.append)
    lanes = candidates(machine)  # each device's best engine of each runtime
    assert set(runs) == {"cpu"} | {a.engine for a in lanes} and len(runs) == len(set(runs))
    assert set(planning.stored_profiles(config, machine)) == set(lanes)

    runs.clear()
    config.set_many({"engines-measure": "false", "worker.context": "1024"})  # new key, but measuring is off
    planning.before_serving(config, machine, say=said.append)
    assert runs == []


# --- the key --------------------------------------------------------------------------------------------


def test_the_key_changes_with_threads_context_model_and_engine_but_not_slots(tmp_path):
    machine = detect("/")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    base = Subject(engine="cpu", runtime="llamacpp", device="cpu", model_path=str(model), threads=2, context=2048)
    key = profiles.key(base, machine)
    assert key == profiles.key(base, machine) and len(key) >= 16
    assert profiles.key(msgspec.structs.replace(base, cpus=[0]), machine) == key  # where it runs is not in it
    changed = [
        msgspec.structs.replace(base, threads=1),
        msgspec.structs.replace(base, context=4096),
        msgspec.structs.replace(base, engine="cpu-avx2"),
        msgspec.structs.replace(base, runtime="openvino"),
        msgspec.structs.replace(base, model_path=str(tmp_path / "other.gguf")),
    ]
    assert len({profiles.key(s, machine) for s in changed} | {key}) == len(changed) + 1
    os.utime(model, ns=(1, 1))  # the same file, changed
    assert profiles.key(base, machine) != key
    other = msgspec.structs.replace(machine, cpu=msgspec.structs.replace(machine.cpu, model_name="Another CPU"))
    assert profiles.key(base, other) != profiles.key(base, machine)


def test_profiles_are_stored_by_key_and_a_damaged_file_counts_as_none(data):
    profile = fake_profile(Subject("cpu", "llamacpp", "cpu", "m.gguf", 2, 2048), "abc123")
    path = profiles.save(profile)
    assert path == data / "profiles" / "abc123.json" and profiles.load("abc123") == profile
    assert profiles.load("nothing") is None
    path.write_text("{not json")
    assert profiles.load("abc123") is None


# --- Speed's arithmetic ---------------------------------------------------------------------------------

SPEED = Speed(levels=[Level(1, 100.0, 0.1), Level(4, 200.0, 0.2), Level(8, 240.0, 0.4)],
              prompts=[PromptRead(100, 0.5), PromptRead(1000, 2.0)])


def test_per_stream_interpolates_between_levels_and_is_flat_past_them():
    assert SPEED.per_stream(1) == 100.0
    assert SPEED.per_stream(4) == 50.0
    assert SPEED.per_stream(2) == pytest.approx((100 + 100 * 1 / 3) / 2)  # aggregate 133.3 at 2 streams
    assert SPEED.per_stream(6) == pytest.approx(220.0 / 6)
    assert SPEED.per_stream(16) == pytest.approx(240.0 / 16)  # the aggregate stays at the last level's
    assert SPEED.per_stream(0) == 100.0  # as one stream
    assert Speed(levels=[], prompts=[]).per_stream(3) == 0.0


def test_prompt_seconds_interpolates_from_zero_and_extrapolates_at_the_longest_rate():
    assert SPEED.prompt_seconds(0) == 0.0
    assert SPEED.prompt_seconds(50) == pytest.approx(0.25)
    assert SPEED.prompt_seconds(550) == pytest.approx(1.25)
    assert SPEED.prompt_seconds(1000) == pytest.approx(2.0)
    assert SPEED.prompt_seconds(4000) == pytest.approx(8.0)  # 500 tokens/s, the longest prompt's rate


def test_finish_seconds_counts_the_prompt_and_the_tokens_at_the_load_with_the_request():
    assert SPEED.finish_seconds(running=0, prompt_tokens=100, max_tokens=100) == pytest.approx(0.5 + 1.0)
    assert SPEED.finish_seconds(running=3, prompt_tokens=1000, max_tokens=100) == pytest.approx(2.0 + 100 / 50)
    busy = SPEED.finish_seconds(running=7, prompt_tokens=100, max_tokens=100)
    assert busy == pytest.approx(0.5 + 100 / 30)
    assert Speed(levels=[], prompts=[]).finish_seconds(0, 10, 10) == float("inf")
