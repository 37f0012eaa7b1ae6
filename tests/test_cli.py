"""The CLI, run as a user runs it: config get/set/unset, status, and serve's lifecycle."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
import yaml

from conftest import cli, data_env, free_port, start_server, wait_until


def test_get_shows_the_http_defaults(tmp_path):
    env = data_env(tmp_path)
    shown = yaml.safe_load(cli(env, "get", "http").stdout)
    assert shown["http.host"] == "127.0.0.1" and isinstance(shown["http.port"], int)
    assert all(key.startswith("http.") for key in shown)
    assert cli(env, "get", "http.host").stdout.strip() == "127.0.0.1"


def test_set_persists_and_unset_restores(tmp_path):
    env = data_env(tmp_path)
    default_port = cli(env, "get", "http.port").stdout.strip()
    cli(env, "set", "http.port=9090", "http.host=0.0.0.0")
    assert cli(env, "get", "http.port").stdout.strip() == "9090"
    assert cli(env, "get", "http.host").stdout.strip() == "0.0.0.0"
    assert json.loads(cli(env, "get", "http", "--format", "json").stdout)["http.port"] == 9090
    cli(env, "unset", "http.port")
    assert cli(env, "get", "http.port").stdout.strip() == default_port
    assert cli(env, "get", "http.host").stdout.strip() == "0.0.0.0"


def test_bad_set_changes_nothing(tmp_path):
    env = data_env(tmp_path)
    config = tmp_path / "config.json"
    result = cli(env, "set", "http.port=9091", "worker.slots=0", check=False)
    assert result.returncode != 0 and "worker.slots" in result.stderr and "between" in result.stderr
    assert not config.exists()  # no file is made for a refused set either

    cli(env, "set", "http.port=9090", "worker.slots=4")
    before = config.read_bytes()
    for bad, words in [
        (["http.port=70000"], "between"),
        (["http.port=abc"], "whole number"),
        (["http.port=9091", "no.such.key=1"], "unknown key"),
        (["verbose=maybe"], "true or false"),
        (["http.host="], "empty"),
        (["http.port"], "KEY=VALUE"),
        # several assignments where only the last is bad: none of them is applied
        (["http.port=9091", "worker.slots=8", "verbose=true", "queue.max-waiting=-1"], "queue.max-waiting: must be between"),
        (["http.port=9091", "worker.slots=8", "worker.context=lots"], "worker.context: expected a whole number"),
        (["http.port=9091", "http.host=0.0.0.0", "engines=no-such-engine"], "engines"),
        (["http.port=9091", "worker.slots=8", "http.port"], "KEY=VALUE"),
    ]:
        result = cli(env, "set", *bad, check=False)
        assert result.returncode != 0 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert config.read_bytes() == before, f"set {bad} changed config.json"
    assert cli(env, "get", "http.port").stdout.strip() == "9090"
    assert cli(env, "get", "worker.slots").stdout.strip() == "4"


DAMAGED = {
    "not JSON": "{http.port: 9090,\n",
    "not an object": '["http.port", 9090]\n',
    "a wrong type": '{"http.port": "9090", "worker.slots": 4}\n',
    "a bool for a number": '{"http.port": true, "worker.slots": 4}\n',
    "out of range": '{"http.port": 70000, "worker.slots": 4}\n',
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_config_is_a_warning_for_get(tmp_path, damage):
    env = data_env(tmp_path)
    default_port = cli(env, "get", "http.port").stdout.strip()
    config = tmp_path / "config.json"
    config.write_text(DAMAGED[damage])

    shown = cli(env, "get", "http.port")  # exit 0
    assert shown.stdout.strip() == default_port
    assert "warning" in shown.stderr and str(config) in shown.stderr, shown.stderr
    if damage not in ("not JSON", "not an object"):
        assert "http.port" in shown.stderr  # names the bad key
        assert cli(env, "get", "worker.slots").stdout.strip() == "4"  # the good keys still apply
    everything = cli(env, "get", "--format", "json")
    assert json.loads(everything.stdout)["http.port"] == int(default_port)
    assert "Traceback" not in everything.stderr
    assert config.read_text() == DAMAGED[damage]  # reading leaves it alone


@pytest.mark.parametrize("damage", DAMAGED)
def test_set_and_serve_refuse_a_damaged_config(tmp_path, damage):
    env = data_env(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(DAMAGED[damage])
    for command in (["set", "worker.context=4096"], ["unset", "worker.context"], ["set", "verbose=true", "worker.slots=2"]):
        refused = cli(env, *command, check=False)
        assert refused.returncode != 0 and str(config) in refused.stderr, refused.stderr
        assert "nothing was changed" in refused.stderr and "Traceback" not in refused.stderr
        assert config.read_text() == DAMAGED[damage], f"{command} wrote over the damaged file"

    refused = cli(env, "serve", check=False, timeout=60)
    assert refused.returncode != 0 and "not starting" in refused.stderr and str(config) in refused.stderr
    assert "Traceback" not in refused.stderr, refused.stderr
    assert config.read_text() == DAMAGED[damage]

    if damage in ("not JSON", "not an object"):
        return
    # a bad value is fixed by setting (or unsetting) that very key; the rest of the file is kept
    cli(env, "set", "http.port=9090", "verbose=true")
    assert json.loads(config.read_text()) == {"http.port": 9090, "verbose": True, "worker.slots": 4}
    shown = cli(env, "get", "http.port")
    assert shown.stdout.strip() == "9090" and shown.stderr == ""


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """A server as `infersnap serve` starts with the defaults, for two tests: the last of them kills it."""
    server = start_server(tmp_path_factory.mktemp("default"))
    yield server
    if server.process.poll() is None:  # the killing test did not run
        assert server.stop() == 0, server.log.read_text()


def test_status_warns_about_a_damaged_config_and_still_answers(default_server):
    config = default_server.log.parent / "config.json"
    kept = config.read_text()
    try:
        for damage, text in DAMAGED.items():
            config.write_text(text)
            shown = cli(default_server.env, "status")  # exit 0
            assert "warning" in shown.stderr and str(config) in shown.stderr, (damage, shown.stderr)
            assert yaml.safe_load(shown.stdout)["endpoints"]["openai"] == f"http://localhost:{default_server.port}/v1"
    finally:
        config.write_text(kept)


def test_get_unknown_key_fails(tmp_path):
    result = cli(data_env(tmp_path), "get", "nope", check=False)
    assert result.returncode != 0 and "unknown key" in result.stderr


def test_status_without_a_server_says_so(tmp_path):
    result = cli(data_env(tmp_path), "status", check=False)
    assert result.returncode != 0 and "not running" in result.stderr


@pytest.mark.one_engine  # status reads what the broker knows, whatever the runtime
def test_status_asks_the_running_server(server, model, engine):
    shown = yaml.safe_load(cli(server.env, "status").stdout)
    assert shown["endpoints"]["openai"] == f"http://localhost:{server.port}/v1"
    assert shown["model"] == model and shown["engine"] == engine
    [worker] = [w for w in shown["workers"] if w["task"] == "generate"]
    assert worker["device"] == "cpu" and worker["engine"] == engine
    assert worker["state"] == "ready" and worker["model"] == model
    as_json = json.loads(cli(server.env, "status", "--format", "json").stdout)
    assert as_json["workers"][0]["id"] == worker["id"]


def test_restart_applies_a_new_port_and_ctrl_c_leaves_no_orphans(tmp_path):
    first = start_server(tmp_path, engines="cpu")  # one lane: the default install has its own server above
    assert first.status()["endpoints"]["openai"].endswith(f":{first.port}/v1")
    second_port = free_port()
    cli(first.env, "set", f"http.port={second_port}")  # persisted, applies on restart
    assert httpx.get(f"{first.base}/health").status_code == 200
    assert first.stop(signal.SIGINT) == 0

    second = start_server(tmp_path, **{"http.port": str(second_port)})
    try:
        shown = second.status()
        assert shown["endpoints"]["openai"] == f"http://localhost:{second_port}/v1"
        pids = [w["pid"] for w in shown["workers"]]
        assert httpx.get(f"{second.base}/v1/models").status_code == 200
    finally:
        assert second.stop(signal.SIGINT) == 0
    time.sleep(0.5)
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived the server"
    assert cli(second.env, "status", check=False).returncode != 0


def test_a_killed_supervisor_takes_its_processes_along(default_server):
    pids = [w["pid"] for w in default_server.status()["workers"]]
    default_server.stop(signal.SIGKILL)
    wait_until(lambda: not any(_alive(p) for p in pids), 10, "a child outlived the killed supervisor")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie awaiting its parent counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_set_where_the_config_cannot_be_written_says_so(tmp_path):
    (tmp_path / "config.tmp").mkdir()  # where set writes before it renames: a folder, so writing fails
    refused = cli(data_env(tmp_path), "set", "http.port=9999", check=False)
    assert refused.returncode != 0 and "cannot write the config file" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "config.json").exists()
