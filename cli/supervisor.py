"""`infersnap serve`: start the broker, the workers and the frontend, and keep them running.

Each process is started in its own session (so a terminal's Ctrl-C reaches
only the supervisor, which then stops them in order) and with a parent-death
signal (so none outlives a supervisor that was killed outright). A process
that exits on its own is started again, with a growing pause if it keeps failing.

Which workers run follows the broker: it wants the models that requests ask for
(and unloads idle ones), and says so in its Status (`ModelState.wanted`). The
supervisor starts the workers of each wanted model and stops the others; the
default model's are started with the broker, before it is asked.

The catalog is followed while serving: when a model file appears in or leaves
the models folders, the supervisor writes the plan again with that model added
or removed (replan), and the broker and the frontend read it again.
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
from dataclasses import dataclass


import msgspec

from infersnap import catalog, paths, probes, wire
from infersnap import plan as serve_plan
from infersnap.cli.status import NotRunning, query_status, tell_broker
from infersnap.config import Config, engine_settings
from infersnap.cli.engines import detect
from infersnap.engines import manifests
from infersnap.engines import candidates as auto_candidates
from infersnap.hwdetect import Machine
from infersnap.plan import RESTARTS_VARIABLE, ServePlan, WorkerSpec
from infersnap.planning import build_plan, replan
from infersnap.profiles import Subject

STOP_GRACE_SECONDS = 10
MAX_BACKOFF_SECONDS = 30
CATALOG_LOOK_SECONDS = 2.0  # how often the models folders are looked at (a stat of each file) while serving
SOON_AFTER_READY = 60.0  # a worker that dies twice in a row this soon after becoming ready is not restarted


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


@dataclass
class Child:
    name: str
    argv: list[str]
    worker_id: str = ""  # for a worker process
    model: str = ""  # a worker's model, lowercase: it runs while the broker wants that model
    process: subprocess.Popen | None = None
    failures: int = 0  # in a row, each followed by a longer pause
    restarts: int = 0
    restart_at: float = 0.0
    started_at: float = 0.0
    given_up: str = ""  # why a worker is failed, not restarted: it died while loading, or soon after ready twice
    stopping: bool = False  # its model was unloaded: its process is ending, not to be restarted
    seen_ready: bool = False  # since it last started, by the supervisor's own asking: for when the broker cannot say
    ready_at: float = 0.0  # when it was first seen ready since it last started
    early_deaths: int = 0  # in a row, each within SOON_AFTER_READY of becoming ready

    def saw(self, ready: bool, now: float) -> None:
        if ready and not self.seen_ready:
            self.seen_ready, self.ready_at = True, now

    def start(self) -> None:
        # the data and runtime folders as absolute paths: the children run in "/" (below)
        env = {
            **os.environ,
            "INFERSNAP_DATA": str(paths.data_dir()),
            "XDG_RUNTIME_DIR": str(paths.runtime_base()),
            RESTARTS_VARIABLE: str(self.restarts),
        }
        # cwd "/": run from a source checkout, `python -m infersnap.broker` would otherwise import the
        # checkout's infersnap/ folder (sys.path[0] is the cwd) instead of the installed package
        self.process = subprocess.Popen(
            self.argv, env=env, cwd="/", start_new_session=True, preexec_fn=_die_with_parent
        )
        self.started_at = time.monotonic()
        self.seen_ready = False


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
        module = [sys.executable, "-m"]
        plan_arg = str(self.plan_file)
        # Start order matters: the broker binds the sockets the others connect to.
        self.children = [Child("broker", [*module, "infersnap.broker", plan_arg])]
        self.children += [self._worker(w) for w in plan.workers]
        self.children.append(Child("frontend", [*module, "infersnap.frontend", plan_arg]))
        self.at_start = {w.worker_id for w in plan.workers_of(plan.default_model.name)}
        self.asked_at = 0.0  # when the broker was last asked which models it wants
        self.boot, self.boot_seen_at = "", 0.0  # the broker's, as last seen: a new one is told the failures again
        self.wanted = {plan.default_model.name.lower()}  # the models whose workers run, as the broker last said
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
            for child in self.children:
                if not child.worker_id or child.worker_id in self.at_start:
                    child.start()
            self._wait_until_ready()
            print(f"infersnap is serving {self.plan.default_model.name} at {self.plan.api_url}", flush=True)
            serving = True
            while not self.stopping:
                self._watch()
                time.sleep(0.2)
        finally:
            if serving:
                self._drain()
            self._stop_all()
        return 0

    def _on_signal(self, *_: object) -> None:
        self.hurry = self.stopping
        self.stopping = True

    def _drain(self) -> None:
        """New requests get 503 while running ones finish, for up to the drain timeout."""
        try:
            tell_broker(wire.Drain(grace=self.plan.drain_timeout))
            running = len(query_status(timeout=1).routed)
        except NotRunning:
            return
        if running:
            print(f"infersnap: stopping; letting {running} running requests finish "
                  f"(up to {self.plan.drain_timeout}s; signal again to stop now)", file=sys.stderr, flush=True)
        deadline = time.monotonic() + self.plan.drain_timeout + 2  # the broker ends them at the timeout
        while running and not self.hurry and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                running = len(query_status(timeout=1).routed)
            except NotRunning:
                return
        time.sleep(0.3)  # the frontend writes the last bytes of the answers that just ended

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
        while not self.stopping:
            for child in self.children:
                if not child.worker_id and child.process.poll() is not None:
                    raise ServeError(f"the {child.name} process exited with code {child.process.returncode} at start")
            self._watch()  # a worker that exits while loading is marked failed; the others serve
            try:
                workers = [w for w in query_status(timeout=0.5).workers if w.worker_id in self.at_start]
            except NotRunning:
                workers = []
            ready = {w.worker_id for w in workers if w.state == "ready"}
            for child in self.children:
                child.saw(child.worker_id in ready, time.monotonic())
            settled = len(workers) == len(self.at_start) and all(w.state in ("ready", "failed") for w in workers)
            if settled and self._frontend_answers():
                for worker in workers:
                    if worker.state == "failed":
                        print(f"infersnap: worker {worker.worker_id} failed: {worker.error}", file=sys.stderr, flush=True)
                return
            time.sleep(0.2)

    def _follow_catalog(self, now: float) -> None:
        """Write the plan anew when a model file was added or removed; a child for each worker added, and
        none kept for a removed model's worker once its process has ended."""
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
        planned = {w.worker_id for w in self.plan.workers}
        # a removed model's child goes once its exit is reported (process None) or it failed
        self.children = [c for c in self.children if not c.worker_id or c.worker_id in planned
                         or (c.process is not None and not c.given_up)]
        have = {c.worker_id for c in self.children}
        new = [self._worker(w) for w in self.plan.workers if w.worker_id not in have]
        self.children[-1:-1] = new  # before the frontend, which stays last

    def _worker(self, spec: WorkerSpec) -> Child:
        argv = [sys.executable, "-m", "infersnap.workers", str(self.plan_file), spec.worker_id]
        return Child(f"worker {spec.worker_id}", argv, spec.worker_id, spec.model.lower())

    def _follow_broker(self, now: float) -> None:
        """Start the workers of the models the broker wants, and stop the others' (at most every 0.2 s)."""
        if now - self.asked_at < 0.2:
            return
        self.asked_at = now
        try:
            status = query_status(timeout=1)
        except NotRunning:
            return  # nothing changes while the broker cannot say (it is restarted meanwhile)
        self.wanted = {m.name.lower() for m in status.models if m.wanted}
        ready = {w.worker_id for w in status.workers if w.state == "ready"}
        loading = {w.worker_id for w in status.workers if w.state == "loading"}
        if status.boot != self.boot:  # a broker started anew knows no failures: tell it again
            self.boot, self.boot_seen_at = status.boot, now
            for child in self.children:
                if child.given_up:
                    tell_broker(wire.WorkerExited(child.worker_id, child.process.returncode if child.process else 0,
                                                  child.given_up))
        settled = now - self.boot_seen_at > 1.0  # what it was told again has reached it
        for child in self.children:
            if not child.worker_id:
                continue
            child.saw(child.worker_id in ready, now)
            running = child.process is not None and child.process.poll() is None
            if child.model in self.wanted:
                if child.given_up and settled and child.worker_id in loading:
                    # `infersnap models load` lifted its quarantine: tried afresh
                    _say(f"worker {child.worker_id} is tried again (its model was loaded by name)")
                    child.given_up, child.early_deaths, child.failures = "", 0, 0
                    child.start()
                elif child.process is None:  # never started, or stopped when its model was unloaded
                    child.failures = 0
                    child.start()  # a load, not a restart
            elif running and not child.stopping:
                child.stopping = True
                child.process.terminate()
            elif not running and child.given_up:
                child.given_up, child.process = "", None  # unloaded: the next load tries it afresh

    def _watch(self) -> None:
        now = time.monotonic()
        self._follow_catalog(now)
        self._follow_broker(now)
        for child in self.children:
            if child.given_up or child.process is None:
                continue
            if child.process.poll() is None:
                if now - child.started_at > 60:
                    child.failures = 0  # it has run long enough to count as healthy
                continue
            if child.stopping or (child.worker_id and child.model not in self.wanted):  # unloaded: its memory is free now
                child.stopping = False
                tell_broker(wire.WorkerExited(child.worker_id, child.process.returncode))
                child.process = None
                continue
            if not child.restart_at:
                code = child.process.returncode
                why = self._quarantine(child, code, now) if child.worker_id else ""
                if why and self._fall_back(child, why):
                    tell_broker(wire.WorkerExited(child.worker_id, code))
                    child.start()
                    continue
                if why:
                    # Starting it again would crash again (a damaged model, an engine that cannot run here):
                    # the worker is failed, with why, instead of restarted in a loop.
                    print(f"infersnap: worker {child.worker_id} failed: {why}", file=sys.stderr, flush=True)
                    tell_broker(wire.WorkerExited(child.worker_id, code, why))
                    child.given_up = why
                    continue
                if child.worker_id:  # the broker ends its requests now, not after a missed heartbeat
                    tell_broker(wire.WorkerExited(child.worker_id, code))
                child.failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (child.failures - 1))
                print(
                    f"infersnap: the {child.name} process exited with code {child.process.returncode}; "
                    f"restarting in {delay:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                child.restart_at = now + delay
            elif now >= child.restart_at:
                child.restart_at = 0.0
                child.restarts += 1
                child.start()

    def _quarantine(self, child: Child, code: int, now: float) -> str:
        """Why a worker whose process just ended is not to be restarted: it died while loading, or twice
        in a row within SOON_AFTER_READY of becoming ready (an engine that crashes on what it runs); "" if
        it is restarted."""
        if not self._had_loaded(child):
            return f"its process {wire.exit_words(code)} while loading the model; it is not restarted"
        child.saw(True, now)  # ready by the broker's word, if it died before the supervisor saw it so
        child.early_deaths = child.early_deaths + 1 if now - child.ready_at < SOON_AFTER_READY else 0
        if child.early_deaths < 2:
            return ""
        model = self.plan.model(child.model)
        return (f"its process {wire.exit_words(code)} twice within {SOON_AFTER_READY:.0f} s of becoming ready; "
                f"it is not restarted until `infersnap models load {model.name if model else child.model}` "
                "or serve starts again")

    def _fall_back(self, child: Child, why: str) -> bool:
        """Where the worker's device has no other lane for its model, plan it anew instead of failing it: with
        its runtime's next settings variant (infersnap/probes.py), else as the device's engine of another
        runtime that reads the model and runs here (by its stored probe). Whether one was left to try."""
        spec = next((w for w in self.plan.workers if w.worker_id == child.worker_id), None)
        if spec is None or spec.crashes:
            return False
        lanes = {w.worker_id for w in self.plan.workers_of(spec.model) if (w.device, w.task) == (spec.device, spec.task)}
        if any(c.worker_id in lanes and c is not child and not c.given_up for c in self.children):
            return False  # the device's other lanes serve the model
        crashed = f"{spec.engine} {spec.options.label}: {why.split(';')[0].removeprefix('its process ')}"
        fixed = probes.fixed_settings(engine_settings(self.config, spec.engine)) if self.config else {}
        tried = probes.variants(spec.runtime, fixed)
        later = tried[tried.index(spec.options) + 1:] if spec.options in tried else []
        if later:
            new = msgspec.structs.replace(spec, options=later[0], settings=f"{later[0].label} (instead of {crashed})")
        else:
            new = self._other_runtime(spec, crashed)
            if new is None:
                return False
        self.plan = msgspec.structs.replace(self.plan, workers=[new if w is spec else w for w in self.plan.workers])
        serve_plan.write(self.plan, self.plan_file)
        _say(f"worker {child.worker_id}: {crashed}; it runs on as {new.engine} with the settings {new.options.label}")
        child.early_deaths = 0
        child.restarts += 1
        return True

    def _other_runtime(self, spec: WorkerSpec, crashed: str) -> WorkerSpec | None:
        """The worker as its device's engine of another runtime, with the settings its stored probe found
        for the model (none is probed while serving); None if there is none that reads the model and runs."""
        model = self.plan.model(spec.model)
        if self.machine is None or self.config is None or model is None or spec.task != "generate":
            return None
        for lane in auto_candidates(self.machine):
            manifest = manifests()[lane.engine]
            if lane.device != spec.device or manifest.runtime == spec.runtime:
                continue
            subject = Subject(engine=lane.engine, runtime=manifest.runtime, device=lane.device, model_path=model.path,
                              threads=spec.threads, context=model.context, gpu_layers=manifest.settings.gpu_layers)
            fixed = probes.fixed_settings(engine_settings(self.config, lane.engine))
            probe = probes.stored(subject, self.machine, fixed)
            if probe is not None and probe.options is not None and not probe.refused:
                return msgspec.structs.replace(spec, engine=lane.engine, runtime=manifest.runtime, speed=None,
                                               gpu_layers=manifest.settings.gpu_layers, options=probe.options,
                                               settings=f"{probe.note} (instead of {crashed})")
        return None

    @staticmethod
    def _had_loaded(child: Child) -> bool:
        """Whether the broker last heard this worker ready (not loading, or not at all since it started)."""
        try:
            workers = query_status(timeout=1).workers
        except NotRunning:
            # No broker to ask (still starting, or restarting): what the supervisor saw itself. A worker
            # that dies before the broker is up, e.g. of SIGILL importing its engine, was never ready.
            return child.seen_ready
        return any(w.worker_id == child.worker_id and w.state == "ready" for w in workers)

    def _stop_all(self) -> None:
        # All get SIGTERM at once; whichever is still running after the grace period is killed.
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
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

