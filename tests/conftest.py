"""Start the real `infersnap serve` with the real default model, isolated in its own data folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

INFERSNAP = str(Path(sys.executable).parent / "infersnap")
START_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(env: dict[str, str], *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    result = subprocess.run([INFERSNAP, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"infersnap {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def wait_until(condition, seconds: float, failure: str) -> None:
    """Poll `condition` until it holds; fail with `failure` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass
class Server:
    env: dict[str, str]
    process: subprocess.Popen
    log: Path
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def status(self) -> dict:
        """What `infersnap status` prints, parsed."""
        return yaml.safe_load(cli(self.env, "status").stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def data_env(data: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["INFERSNAP_DATA"] = str(data)
    return env


def start_server(data: Path, command: list[str] | None = None, **settings: str) -> Server:
    """Configure a data folder through `infersnap set`, start `infersnap serve` (or `command`), wait until it answers."""
    env = data_env(data)
    port = int(settings.pop("http.port", free_port()))
    cli(env, "set", f"http.port={port}", *(f"{k}={v}" for k, v in settings.items()))
    log = data / "serve.log"
    data.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(command or [INFERSNAP, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(env, process, log, port)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"infersnap serve exited with {process.returncode}:\n{log.read_text()}")
        if "infersnap is serving" in log.read_text():
            return server
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"infersnap serve did not get ready in {START_TIMEOUT}s:\n{log.read_text()}")


# The served path is tested on both runtimes: llama.cpp ("cpu", any CPU) and OpenVINO ("intel-cpu").
ENGINES = ["cpu", "intel-cpu"]


@pytest.fixture(scope="session", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, engine: str):
    running = start_server(tmp_path_factory.mktemp("data"), **{"worker.slots": "4", "engines": engine})
    yield running
    assert running.stop() == 0, running.log.read_text()


@pytest.fixture(scope="session")
def model(server: Server) -> str:
    return httpx.get(f"{server.url}/models").json()["data"][0]["id"]


@pytest.fixture()
def http(server: Server):
    with httpx.Client(base_url=server.base, timeout=60) as client:
        yield client
