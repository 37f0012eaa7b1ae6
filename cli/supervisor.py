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
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from pathlib import Path

import msgspec

from infersnap import catalog, paths, probes, wire
from infersnap import plan as serve_plan
from infersnap.catalog import ModelEntry
from infersnap.cli import access_keys
from infersnap.cli.status import NotRunning, query_status, tell_broker
from infersnap.config import Config, engine_settings
from infersnap.cli.engines import detect, serving_assignments
from infersnap.engines import MEMORY_SHARE, Assignment, embedding_engine, manifests, parse_embedding_choice
from infersnap.engines import candidates as auto_candidates
from infersnap.hwdetect import Machine
from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.cli.profiling import before_serving, probe_lanes, serve_context, stored_profiles
from infersnap.models import ModelNotFound, ModelShape, model_shape
from infersnap.plan import RESTARTS_VARIABLE, ModelSpec, ServePlan, WorkerSpec
from infersnap.probes import Probe
from infersnap.profiles import Profile, Speed, Subject

STOP_GRACE_SECONDS = 10
MAX_BACKOFF_SECONDS = 30
CATALOG_LOOK_SECONDS = 2.0  # how often the models folders are looked at (a stat of each file) while serving
SOON_AFTER_READY = 60.0  # a worker that dies twice in a row this soon after becoming ready is not restarted


class ServeError(Exception):
    pass


def _say(text: str) -> None:
    print(f"infersnap: {text}", file=sys.stderr, flush=True)


def build_plan(config: Config, machine: Machine) -> ServePlan:
    try:
        api_keys = access_keys.api_keys(config.get("http.api-keys"), config.get("http.api-keys-file"))
    except access_keys.KeysFileError as exc:
        raise ServeError(str(exc)) from None
    open_warning = access_keys.open_network_warning(config.get("http.host"), config.get("http.port"), api_keys)
    if open_warning:
        _say(open_warning)
    entries = catalog.scan(config, warn=_say)
    default = catalog.default_entry(config, entries)
    if not Path(default.path).is_file():
        raise ModelNotFound(f"model file not found: {default.path}")
    models: list[ModelSpec] = []
    workers: list[WorkerSpec] = []
    for entry in [default, *servable(e for e in entries if e is not default)]:
        model, specs = model_plan(catalog.model_config(config, entry), machine, entry, entry is default, default.path)
        models.append(model)
        workers += specs
    return ServePlan(
        host=config.get("http.host"),
        port=config.get("http.port"),
        max_body_bytes=config.get("http.max-body-bytes"),
        models=models,
        budgets=memory_budgets(config, machine),
        max_loaded=config.get("models.max-loaded"),
        max_waiting=config.get("queue.max-waiting"),
        request_timeout=config.get("queue.request-timeout"),
        verbose=config.get("verbose"),
        workers=workers,
        api_keys=api_keys,
        cors_origins=access_keys.cors_origins(config.get("http.cors-origins")),
        max_tokens=config.get("limits.max-tokens"),
        max_n=config.get("limits.max-n"),
        drain_timeout=config.get("queue.drain-timeout"),
        send_timeout=config.get("http.send-timeout"),
        webui=config.get("webui.enabled"),
    )


def servable(entries: Iterable[ModelEntry]) -> list[ModelEntry]:
    """The entries whose file is there: a link to a file since deleted (`models add` links) is said and left
    out, as a file that is gone; a damaged file is planned, and fails with its reason when it loads."""
    there = []
    for entry in entries:
        if Path(entry.path).is_file():
            there.append(entry)
        else:
            _say(f"the model {entry.id} is left out: {entry.path} is not a file (a link to a file since deleted?)")
    return there


def replan(plan: ServePlan, config: Config, machine: Machine, steady: set[str]) -> tuple[ServePlan, bool]:
    """The plan with the catalog as it is now, and whether a new file waits: each model found since is planned
    as at start once its file is `steady` (unchanged since the last look: not still being copied), each model
    whose file is gone is left out; the others, and the default model, keep their specs and workers."""
    entries = servable(catalog.scan(config, warn=_say))
    found = {(e.id.lower(), e.path) for e in entries}
    default = plan.default_model
    kept = [m for m in plan.models if m is default or (m.name.lower(), m.path) in found]
    names = {m.name.lower() for m in kept}
    models, workers = list(kept), [w for w in plan.workers if w.model.lower() in names]
    waiting = False
    for entry in entries:
        if entry.id.lower() in names:
            continue
        if entry.path not in steady:
            waiting = True  # its header may not be whole yet: planned at the next look if it stays as it is
            continue
        try:
            model, specs = model_plan(catalog.model_config(config, entry), machine, entry, False, default.path)
        except ServeError as exc:
            _say(f"{entry.id} is not served: {exc}")
            continue
        _say(f"the model {entry.id} was added ({entry.path})")
        models.append(model)
        workers += specs
    planned = {m.name.lower() for m in models}
    for model in plan.models:
        if model.name.lower() not in planned:
            _say(f"the model {model.name} was removed ({model.path} is gone); it is unloaded once its requests end")
    return msgspec.structs.replace(plan, models=models, workers=workers), waiting


def model_plan(config: Config, machine: Machine, entry: ModelEntry, default: bool,
               default_path: str = "") -> tuple[ModelSpec, list[WorkerSpec]]:
    """One model's workers and what they cost, from the config as its workers see it (catalog.model_config).
    The default model's engines are probed (which settings run: infersnap/probes.py), then measured,
    first where they have neither yet; another model's use the probes and profiles stored (or the
    default model's probes), so that its first request never waits for either."""
    context = serve_context(config, machine)  # once: the profiles are keyed by it
    probed = probe_lanes(config, machine, context.tokens, run=default, like=default_path)
    crashed = probes.crashed_lanes(probed)
    if default:
        measured = before_serving(config, machine, context=context.tokens, probed=probed)  # measures what has no profile yet
    else:
        measured = stored_profiles(config, machine, context.tokens, probed)
    lineup = serving_assignments(config, machine, measured, crashed)
    assignments = lineup.assignments
    # a header that cannot be read names no runtime: the engines chosen then say why they cannot load it
    runtimes = entry.runtimes or [manifests()[a.engine].runtime for a in assignments]
    if lineup.warning or config.get("engines").strip() in ("", "auto"):  # auto: engines that can read this model
        assignments = runnable(assignments, runtimes, machine, crashed)
    if not assignments:  # every engine that can read it crashes here: planned failed, so requests get why
        assignments = [a for a in auto_candidates(machine) if manifests()[a.engine].runtime in runtimes][:1]
    label = "" if default else f" ({entry.id})"
    for note in [lineup.warning, *lineup.left_out]:
        if note:
            _say(note + label)
    cores = physical_core_cpus()
    # worker.slots as set; left at its default, each lane's profile picks its own
    specs = worker_specs(assignments, cores, config.get("worker.threads"), config.get("worker.slots"),
                         measured, choose_slots="worker.slots" not in config.user, probed=probed)
    if config.get("worker.embeddings"):
        named = parse_embedding_choice(config.get("worker.embedding-engine"))
        embedder = embedding_engine(machine, named, entry.architecture, entry.quantization)
        specs += embedding_specs(specs, cores, embedder, config.get("worker.embedding-slots"), probed)
    # worker ids are ZeroMQ identities, unique across models: the default model's keep the plain ones
    specs = [msgspec.structs.replace(w, model=entry.id, worker_id=w.worker_id if default else f"{w.worker_id}@{entry.slug}")
             for w in specs]
    keep_alive_key = f"{catalog.PER_MODEL}.{entry.slug}.keep-alive"
    # the default model stays loaded unless its own keep-alive says otherwise: it is what clients get
    keep_alive = -1 if default and keep_alive_key not in config.user else config.get("models.keep-alive")
    template_file = config.get(f"{catalog.PER_MODEL}.{entry.slug}.chat-template")
    template = ""
    if template_file:
        try:
            template = Path(template_file).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeError(f"{catalog.PER_MODEL}.{entry.slug}.chat-template: cannot read {template_file}: {exc}") from None
    model = ModelSpec(
        name=entry.id, path=entry.path, context=context.tokens, context_note=context.why, left_out=lineup.left_out,
        keep_alive=keep_alive, memory=memory_of(specs, context.tokens, model_shape(Path(entry.path))),
        chat=entry.chat_template or bool(template), chat_template=template,
    )
    return model, specs


def memory_of(specs: list[WorkerSpec], context: int, shape: ModelShape) -> dict[str, int]:
    """What a model's workers hold on each device once loaded: a copy of the weights each, and each slot's
    KV cache at full context (infersnap/context.py); the embedding worker's inputs share one."""
    held: dict[str, int] = {}
    for w in specs:
        sequences = 1 if w.task == "embed" else w.slots
        held[w.device] = held.get(w.device, 0) + shape.weights_bytes + sequences * context * shape.kv_bytes_per_token
    return held


def memory_budgets(config: Config, machine: Machine) -> dict[str, int]:
    """What loaded models may hold per device: models.memory-budget (MiB) or a share of the memory free
    at start on the CPU, a share of its own memory on an accelerator that has some; none where unknown."""
    budgets = {}
    if config.get("models.memory-budget"):
        budgets["cpu"] = config.get("models.memory-budget") << 20
    elif machine.memory.available_bytes:
        budgets["cpu"] = int(machine.memory.available_bytes * MEMORY_SHARE)
    for accelerator in machine.accelerators:
        if accelerator.vram_bytes:
            budgets[accelerator.device] = int(accelerator.vram_bytes * MEMORY_SHARE)
    return budgets


def runnable(assignments: list[Assignment], runtimes: list[str], machine: Machine,
             crashed: dict[Assignment, str] | None = None) -> list[Assignment]:
    """The lanes whose runtime can read the model; a device left with none gets its best candidate that
    can, and does not crash here."""
    kept = [a for a in assignments if manifests()[a.engine].runtime in runtimes]
    for device in dict.fromkeys(a.device for a in assignments):
        if not any(a.device == device for a in kept):
            kept += [a for a in auto_candidates(machine) if a.device == device and a not in (crashed or {})
                     and manifests()[a.engine].runtime in runtimes][:1]
    return kept


def _probed_fields(probe: Probe | None) -> dict:
    """A WorkerSpec's settings from its engine's probe: the options that run, or why none does."""
    if probe is None:
        return {}
    if probe.options is None:
        return {"settings": probe.crashed, "crashes": probe.crashed}
    return {"options": probe.options, "settings": probe.note}


def worker_specs(assignments: list[Assignment], cores: list[int], cpu_threads: int, slots: int,
                 profiles: dict[Assignment, Profile] | None = None, choose_slots: bool = False,
                 probed: dict[Assignment, Probe] | None = None) -> list[WorkerSpec]:
    """One worker per (engine, device), named after its device, or `device/engine` where two engines
    (of two runtimes) share one device: a worker id is its ZeroMQ identity, so it must be unique. A GPU
    or NPU worker takes the cores its host threads need from the end of the list, while the CPU
    workers keep one at least; two CPU engines share the CPU's cores. Each carries its engine's measured
    speed, the settings its probe found, and with `choose_slots` the slots its profile says serve most
    (else `slots`)."""
    per_device = Counter(a.device for a in assignments)
    profiles = profiles or {}
    probed = probed or {}

    def speed(assignment: Assignment) -> Speed | None:
        profile = profiles.get(assignment)
        return profile.speed if profile is not None else None

    def slots_of(assignment: Assignment) -> int:
        measured = speed(assignment)
        return best_slots(measured, slots) if choose_slots and measured is not None else slots

    def worker_id(assignment: Assignment) -> str:
        return assignment.device if per_device[assignment.device] == 1 else f"{assignment.device}/{assignment.engine}"

    cpu_cores = list(cores)
    accelerators = []
    for assignment in (a for a in assignments if a.device != "cpu"):
        manifest = manifests()[assignment.engine]
        wanted = manifest.settings.host_threads
        if 0 < wanted < len(cpu_cores):
            own, cpu_cores = cpu_cores[-wanted:], cpu_cores[:-wanted]
        else:
            own = list(cores)
        accelerators.append(
            WorkerSpec(worker_id(assignment), assignment.device, assignment.engine, manifest.runtime, own,
                       max(wanted, 1), slots_of(assignment), manifest.settings.gpu_layers, speed=speed(assignment),
                       **_probed_fields(probed.get(assignment)))
        )
    cpu = [
        WorkerSpec(worker_id(a), "cpu", a.engine, manifests()[a.engine].runtime, cpu_cores,
                   cpu_threads or len(cpu_cores), slots_of(a), speed=speed(a), **_probed_fields(probed.get(a)))
        for a in assignments
        if a.device == "cpu"
    ]
    return cpu + accelerators


SLOTS_TTFT_SECONDS = 1.0  # the slowest first token (median, all starting at once) a slot count may cost
SLOTS_ENOUGH = 0.95  # fewer slots that give this share of the most throughput are better: less memory


def best_slots(speed: Speed, default: int) -> int:
    """The slot count a profile says serves the most tokens/s with the median first token within
    SLOTS_TTFT_SECONDS: the fewest streams measured within SLOTS_ENOUGH of the best such level."""
    fast = [lv for lv in speed.levels if lv.ttft_seconds <= SLOTS_TTFT_SECONDS]
    if not fast:
        return default
    most = max(lv.tokens_per_second for lv in fast)
    return min(lv.streams for lv in fast if lv.tokens_per_second >= SLOTS_ENOUGH * most)


def embedding_specs(
    workers: list[WorkerSpec], cores: list[int], embedder: str | None, slots: int = 1,
    probed: dict[Assignment, Probe] | None = None,
) -> list[WorkerSpec]:
    """The embedding worker: `embedder` (infersnap.engines.embedding_engine) on the CPU workers' cores (or
    all of them without one), or a CPU worker's engine if that is of the same runtime (the build chosen
    there); none where no embedding engine can run. Its threads share those cores with the CPU worker's,
    which is cheap while one of the two is idle. It runs with the settings its engine's probe found (the
    probe embeds too), or fails at once where every one crashed."""
    if embedder is None:
        return []
    cpu = [w for w in workers if w.device == "cpu"]
    same = next((w for w in cpu if w.runtime == manifests()[embedder].runtime), None)
    engine = same.engine if same is not None else embedder
    cpus, threads = (cpu[0].cpus, cpu[0].threads) if cpu else (cores, len(cores))
    return [WorkerSpec("embed", "cpu", engine, manifests()[engine].runtime, cpus, threads, slots, task="embed",
                       **_probed_fields((probed or {}).get(Assignment(engine, "cpu"))))]


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
        try:
            query_status(timeout=0.5)
            raise ServeError(f"infersnap is already running for the data folder {paths.data_dir()}")
        except NotRunning:
            pass
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
    machine = detect("/")
    mark = catalog.signature(config)  # before the plan: a file added while it is made (measured) is seen after
    return Supervisor(build_plan(config, machine), config, machine, mark).run()

