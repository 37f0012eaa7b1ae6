"""`infersnap serve`: start the broker, the frontend and the workers, and carry out the broker's word.

Each process is started in its own session (so a terminal's Ctrl-C reaches
only the supervisor, which then stops them in order) and with a parent-death
signal (so none outlives a supervisor that was killed outright).

The broker and the frontend are the supervisor's own: one that exits is
started again, after a pause that grows while it keeps failing. The workers
are the broker's: it alone decides which worker processes run, when one is
started again, falls back to other settings or is quarantined
(broker/lives.py). The supervisor holds one channel to it (a DEALER socket
with the identity "supervisor"), on which Orders and status pushes come and
each worker's exit goes back at once; it keeps no state of a worker beyond
the process it runs. When it starts the broker anew, it opens a new channel
and hands back what runs and what the last Orders quarantined
(wire.Supervise), so that the broker's decisions outlive it.

The catalog is followed while serving: when a model file appears in or leaves
the models folders, the supervisor writes the plan again with that model added
or removed (replan) and tells the broker (PlanChanged), which reads it and
moves Status.replans, on which frontends read it too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import msgspec
import zmq

from infersnap import catalog, paths, wire
from infersnap import plan as serve_plan
from infersnap.cli.engines import detect
from infersnap.cli.status import NotRunning, query_status
from infersnap.config import Config
from infersnap.hwdetect import Machine
from infersnap.plan import ServePlan
from infersnap.planning import build_plan, replan

STOP_GRACE_SECONDS = 10
MAX_BACKOFF_SECONDS = 30
CATALOG_LOOK_SECONDS = 2.0  # how often the models folders are looked at (a stat of each file) while serving
STEP_SECONDS = 0.2  # the longest the supervisor waits on its channel before it looks at its processes
IDENTITY = b"supervisor"  # its identity on the broker's clients socket


class ServeError(Exception):
    pass


def _say(text: str) -> None:
    print(f"infersnap: {text}", file=sys.stderr, flush=True)


def _refuse_second_server() -> None:
    try:
        query_status(timeout=0.5)
    except NotRunning:
        return
    raise ServeError(f"infersnap is already running for the data folder {paths.data_dir()}")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(argv: list[str]) -> subprocess.Popen:
    # the data and runtime folders as absolute paths: the children run in "/" (below)
    env = {**os.environ, "INFERSNAP_DATA": str(paths.data_dir()), "XDG_RUNTIME_DIR": str(paths.runtime_base())}
    # cwd "/": run from a source checkout, `python -m infersnap.broker` would otherwise import the
    # checkout's infersnap/ folder (sys.path[0] is the cwd) instead of the installed package
    return subprocess.Popen(argv, env=env, cwd="/", start_new_session=True, preexec_fn=_die_with_parent)


@dataclass
class Child:
    """The broker or the frontend: kept running by the supervisor itself."""

    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    failures: int = 0  # in a row, each followed by a longer pause
    restart_at: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        self.process, self.started_at, self.restart_at = _spawn(self.argv), time.monotonic(), 0.0

    def ended(self) -> bool:
        return self.process is not None and self.process.poll() is not None


@dataclass
class WorkerProcess:
    """A worker's process as the broker last ordered it started."""

    start: wire.WorkerStart
    process: subprocess.Popen | None = None
    stopping_at: float = 0.0  # set: asked to end (SIGTERM) at this time; killed if it has not after STOP_GRACE_SECONDS


class Supervisor:
    def __init__(self, plan: ServePlan, config: Config | None = None, machine: Machine | None = None,
                 catalog_mark: tuple = ()) -> None:
        """With the config and machine the plan was made from, and what the models folders held before
        (catalog.signature), the catalog is followed while serving."""
        self.plan = plan
        self.config, self.machine = config, machine
        self.catalog_at = 0.0  # when the models folders were last looked at
        self.catalog_mark = catalog_mark
        self.catalog_waits = False  # a new model file was not steady yet at the last look
        self.runtime = paths.runtime_dir(create=True)
        self.plan_file = self.runtime / "plan.json"
        module, plan_arg = [sys.executable, "-m"], str(self.plan_file)
        self.broker = Child("broker", [*module, "infersnap.broker", plan_arg])
        self.frontend = Child("frontend", [*module, "infersnap.frontend", plan_arg])
        self.workers: dict[str, WorkerProcess] = {}
        self.failed: dict[str, str] = {}  # the quarantines the last Orders named: handed back to a broker started anew
        self.status: wire.Status | None = None  # as the broker last pushed it
        self.channel: zmq.Socket | None = None
        self.stopping = False
        self.hurry = False  # a second signal: stop without waiting for running requests

    def run(self) -> int:
        _refuse_second_server()
        for stale in self.runtime.glob("*.sock"):
            stale.unlink()
        serve_plan.write(self.plan, self.plan_file)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        serving = False
        try:
            self._start_broker()  # first: it binds the sockets the others connect to
            self.frontend.start()
            self._wait_until_ready()
            print(f"infersnap is serving {self.plan.default_model.name} at {self.plan.api_url}", flush=True)
            serving = True
            while not self.stopping:
                self._step()
        finally:
            if serving:
                self._drain()
            self._stop_all()
            if self.channel is not None:
                self.channel.close(linger=0)
        return 0

    def _on_signal(self, *_: object) -> None:
        self.hurry = self.stopping
        self.stopping = True

    # --- the channel to the broker ------------------------------------------

    def _start_broker(self) -> None:
        """Start the broker and open a new channel to it (what the old one held is for a broker that is
        gone), handing back what runs and what was quarantined, and following its status."""
        self.broker.start()
        if self.channel is not None:
            self.channel.close(linger=0)
        self.channel = zmq.Context.instance().socket(zmq.DEALER)
        self.channel.setsockopt(zmq.IDENTITY, IDENTITY)
        self.channel.setsockopt(zmq.LINGER, 0)
        self.channel.connect(paths.socket_address("clients"))  # queued until the broker has bound it
        for worker in self.workers.values():  # what ended meanwhile is simply not alive for the new broker
            if worker.process is not None and worker.process.poll() is not None:
                worker.process, worker.stopping_at = None, 0.0
        starts = {worker_id: w.start for worker_id, w in self.workers.items()}
        alive = [worker_id for worker_id, w in self.workers.items() if w.process is not None]
        self._tell(wire.Supervise(starts, alive, dict(self.failed)))
        self._tell(wire.StatusQuery(id=uuid.uuid4().hex, follow=True))

    def _tell(self, message: wire.Message) -> None:
        try:
            self.channel.send(wire.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:  # a full pipe to a broker that is gone: the next one is told anew
            pass

    def _hear(self, timeout: float) -> None:
        """Carry out what the broker says within `timeout` seconds."""
        if not self.channel.poll(int(timeout * 1000)):
            return
        while True:
            try:
                message = wire.decode(self.channel.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(message, wire.Orders):
                self._carry_out(message)
            elif isinstance(message, wire.Status):
                self.status = message

    def _carry_out(self, orders: wire.Orders) -> None:
        """Start each worker the Orders list on a start it has not run yet, and stop those they do not list."""
        self.failed = dict(orders.failed)
        for worker_id, start in orders.run.items():
            worker = self.workers.get(worker_id)
            alive = worker is not None and worker.process is not None and worker.process.poll() is None
            if alive or (worker is not None and worker.start == start):
                continue  # running, or that start already ran and ended (its exit is on its way to the broker)
            argv = [sys.executable, "-m", "infersnap.workers", str(self.plan_file), worker_id,
                    msgspec.json.encode(start).decode()]
            self.workers[worker_id] = WorkerProcess(start, _spawn(argv))
        for worker_id, worker in self.workers.items():
            if worker_id not in orders.run and worker.process is not None and worker.process.poll() is None:
                if not worker.stopping_at:
                    worker.stopping_at = time.monotonic()
                    worker.process.terminate()

    # --- processes --------------------------------------------------------

    def _step(self) -> None:
        self._hear(STEP_SECONDS)
        now = time.monotonic()
        self._keep(self.broker, now)
        self._keep(self.frontend, now)
        for worker_id, worker in self.workers.items():
            if worker.process is None:
                continue
            if worker.process.poll() is not None:
                self._tell(wire.WorkerExited(worker_id, worker.process.returncode))  # the broker decides what next
                worker.process, worker.stopping_at = None, 0.0
            elif worker.stopping_at and now - worker.stopping_at > STOP_GRACE_SECONDS:
                worker.process.kill()  # hung where SIGTERM's handler cannot run (in native code)
        self._follow_catalog(now)

    def _keep(self, child: Child, now: float) -> None:
        """Start the broker or the frontend again when it ended, after a pause that grows while it fails."""
        if child.restart_at:
            if now >= child.restart_at:
                self._start_broker() if child is self.broker else child.start()
            return
        if not child.ended():
            return
        if now - child.started_at > 60:
            child.failures = 0  # it ran long enough to count as healthy
        child.failures += 1
        delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (child.failures - 1))
        _say(f"the {child.name} process exited with code {child.process.returncode}; restarting in {delay:.1f}s")
        child.restart_at = now + delay

    def _health_url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.plan.host, self.plan.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.plan.port}/health"

    def _frontend_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self._health_url(), timeout=2):
                return True
        except urllib.error.HTTPError:  # 503: it answers, no worker is ready
            return True
        except (urllib.error.URLError, OSError):
            return False

    def _wait_until_ready(self) -> None:
        """Until every worker of the default model has loaded or failed, and the frontend answers."""
        at_start = {w.worker_id for w in self.plan.workers_of(self.plan.default_model.name)}
        while not self.stopping:
            for child in (self.broker, self.frontend):
                if child.ended():
                    raise ServeError(f"the {child.name} process exited with code {child.process.returncode} at start")
            self._step()
            workers = [w for w in (self.status.workers if self.status else []) if w.worker_id in at_start]
            settled = len(workers) == len(at_start) and all(w.state in ("ready", "failed") for w in workers)
            if settled and self._frontend_answers():
                for worker in workers:
                    if worker.state == "failed":
                        _say(f"worker {worker.worker_id} failed: {worker.error}")
                return

    def _drain(self) -> None:
        """New requests (and /health) get 503 while running ones finish, for up to the drain timeout, and
        for at least the drain linger: a router's health check sees the 503 and sends clients elsewhere
        before the port closes and connections are refused."""
        began = time.monotonic()
        self._tell(wire.Drain(grace=self.plan.drain_timeout))
        self._hear(0.5)  # the Status the drain pushes
        running = len(self.status.routed) if self.status else 0
        if running:
            _say(f"stopping; letting {running} running requests finish "
                 f"(up to {self.plan.drain_timeout}s; signal again to stop now)")
        deadline = began + self.plan.drain_timeout + 2  # the broker ends them at the timeout
        linger_until = began + self.plan.drain_linger
        while (running and time.monotonic() < deadline or time.monotonic() < linger_until) \
                and not self.hurry and not self.broker.ended():
            self._hear(0.1)
            running = len(self.status.routed) if self.status else 0
        time.sleep(0.3)  # the frontend writes the last bytes of the answers that just ended

    def _follow_catalog(self, now: float) -> None:
        """Write the plan anew when a model file was added or removed, and tell the broker."""
        if self.config is None or self.machine is None or now - self.catalog_at < CATALOG_LOOK_SECONDS:
            return
        self.catalog_at = now
        mark = catalog.signature(self.config)
        if mark != self.catalog_mark or self.catalog_waits:
            steady = {path for path, *_ in set(mark) & set(self.catalog_mark)}  # the same stat at both looks
            self.catalog_mark = mark
            try:
                plan, self.catalog_waits = replan(self.plan, self.config, self.machine, steady)
            except Exception as exc:  # serving goes on with the plan it has; the next change tries again
                _say(f"the models folders changed, but the plan could not be made anew: {exc!r}")
                plan = self.plan
            if plan != self.plan:
                serve_plan.write(plan, self.plan_file)
                self.plan = plan
                self._tell(wire.PlanChanged())

    def _stop_all(self) -> None:
        # All get SIGTERM at once; whichever is still running after the grace period is killed.
        processes = [self.broker.process, self.frontend.process, *(w.process for w in self.workers.values())]
        running = [p for p in processes if p is not None and p.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for leftover in self.runtime.glob("*.sock"):
            leftover.unlink(missing_ok=True)


def serve(config: Config) -> int:
    paths.runtime_dir(create=True)  # an unsafe runtime folder is refused before the plan (which may measure)
    _refuse_second_server()  # before the plan, which may measure: beside a server, its figures and ours suffer
    machine = detect("/")
    mark = catalog.signature(config)  # before the plan: a file added while it is made (measured) is seen after
    return Supervisor(build_plan(config, machine), config, machine, mark).run()
