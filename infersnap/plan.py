"""What `infersnap serve` decided at start: the settings every process it starts runs with.

The supervisor reads the config once, resolves it into a ServePlan and
writes it into the runtime folder; the broker, the frontend and the
workers read that file, so all of them (and any of them restarted later)
agree on one snapshot of the configuration. The catalog is the one part
that changes while serving: when a model file is added to or removed from
the models folders, the supervisor writes the plan again with that model
added or removed (every other model's spec as it was), and the broker and
the frontend read it again (PlanFile).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from infersnap import wire
from infersnap.profiles import EngineOptions, Speed

# What a worker of each task takes before its engine says more (its features come once it is loaded).
SPEC_TASKS = {"generate": ["generate", "tokenize"], "embed": ["embed"]}


def room(slots: int, max_waiting: int) -> int:
    """Requests one lane can run and have queued for it in the broker at once (a device's lanes share one room)."""
    return slots + max_waiting


class Fallback(msgspec.Struct, frozen=True):
    """Another way to run a worker whose way crashes while serving, in the order they are tried: its
    runtime's next settings, then its device's engine of another runtime that its stored probe says
    runs with the model (infersnap/planning.py). The broker picks one (wire.WorkerStart.fallback)."""

    engine: str
    runtime: str
    options: EngineOptions
    gpu_layers: int = 0
    note: str = ""  # its settings as status shows them (its probe's note, or the settings' label)


class WorkerSpec(msgspec.Struct, frozen=True):
    worker_id: str
    device: str  # "cpu", "GPU.0", "NPU", "cuda:0", ...
    engine: str  # engine manifest name, e.g. "cpu-avx2"
    runtime: str  # a name in infersnap.runtimes.RUNTIMES
    cpus: list[int]  # logical CPUs the worker's threads may run on
    threads: int
    slots: int  # requests it runs at once
    gpu_layers: int = 0  # llama.cpp layers offloaded to the device
    task: str = "generate"  # "generate" | "embed" (the model in embedding mode, for /v1/embeddings)
    speed: Speed | None = None  # its engine's measured profile, for the broker to route by
    model: str = ""  # the id of the model it serves (a ModelSpec's name)
    options: EngineOptions = EngineOptions()  # the runtime settings found to run here (infersnap/probes.py)
    settings: str = ""  # those settings and why, as status shows them
    crashes: str = ""  # set: every setting of its engine crashed here; it fails at once with this reason
    fallbacks: list[Fallback] = []  # where its settings crash while serving (Fallback)

    def way(self, fallback: int) -> tuple[str, str]:
        """The engine and the settings' label it runs with on this fallback (0: none): "intel-cpu", "f32"."""
        if not fallback:
            return self.engine, self.options.label
        return self.fallbacks[fallback - 1].engine, self.fallbacks[fallback - 1].options.label

    def started(self, start: wire.WorkerStart) -> WorkerSpec:
        """The spec as this start runs it: on the fallback it names, with that start's settings note."""
        if not start.fallback:
            return self
        way = self.fallbacks[start.fallback - 1]
        return msgspec.structs.replace(
            self, engine=way.engine, runtime=way.runtime, options=way.options, gpu_layers=way.gpu_layers,
            settings=start.settings, speed=self.speed if way.engine == self.engine else None)


class ModelSpec(msgspec.Struct, frozen=True):
    """A model `serve` can serve: its file, the context its sequences get, what it can do, what its
    workers hold in memory. Its workers (WorkerSpec.model) run only while it is loaded."""

    name: str  # the id clients send as `model`
    path: str
    context: int
    context_note: str = ""  # why `context` is what it is (infersnap/context.py)
    left_out: list[str] = []  # lanes not started, and why (e.g. not enough memory for a second copy)
    keep_alive: int = 300  # seconds idle before it is unloaded; 0: after each request; -1: never
    memory: dict[str, int] = {}  # device -> bytes its workers hold there (weights and KV caches), for the budget
    chat: bool = True  # it has a chat template (its GGUF's, or chat_template)
    chat_template: str = ""  # a Jinja chat template that replaces the GGUF's; "": the GGUF's own


class ServePlan(msgspec.Struct, frozen=True):
    host: str
    port: int
    max_body_bytes: int
    models: list[ModelSpec]  # the default model first: loaded at start
    max_waiting: int
    request_timeout: int  # seconds from arrival to the last token; 0: no limit
    verbose: bool
    workers: list[WorkerSpec]  # of every model, each model's in the order its lanes are preferred
    api_keys: list[str] = []  # empty: no key needed
    cors_origins: list[str] = []  # empty: no CORS headers; ["*"]: any origin
    max_tokens: int = 32768  # the largest max_tokens a request may ask for
    max_n: int = 8
    drain_timeout: int = 30  # seconds running requests may take after SIGTERM
    drain_linger: int = 2  # seconds the port stays open after SIGTERM, answering 503, even with nothing running
    send_timeout: int = 30  # seconds a stream may stay unread before its client is dropped
    # per device ("cpu" for the machine's RAM, or an accelerator with its own memory): the bytes loaded
    # models may hold there; a device not listed has no bound
    budgets: dict[str, int] = {}
    max_loaded: int = 3  # models loaded at once per device
    webui: bool = True  # serve the web chat at / (webui.enabled)

    @property
    def default_model(self) -> ModelSpec:
        """The model a request that names none gets; loaded at start."""
        return self.models[0]

    def model(self, name: str) -> ModelSpec | None:
        """The model clients call `name` (ids match whatever their case)."""
        return next((m for m in self.models if m.name.lower() == name.lower()), None)

    def workers_of(self, model: str) -> list[WorkerSpec]:
        return [w for w in self.workers if w.model.lower() == model.lower()]

    def capacity(self, model: str) -> int:
        """Generations the model's workers can run and queue at once, all of them ready: more in one
        request could never be accepted. Per device: lanes on the same cores do not add room."""
        per_device: dict[str, int] = {}
        for w in self.workers_of(model):
            if w.task == "generate":
                per_device[w.device] = max(per_device.get(w.device, 0), room(w.slots, self.max_waiting))
        return sum(per_device.values())

    def embeddings(self, model: str) -> bool:
        """Whether a worker of this model serves /v1/embeddings."""
        return any(w.task == "embed" for w in self.workers_of(model))

    @property
    def api_url(self) -> str:
        shown = "localhost" if self.host in ("127.0.0.1", "::1", "localhost") else self.host
        if shown in ("0.0.0.0", "::"):
            shown = "localhost"
        return f"http://{shown}:{self.port}/v1"

    @property
    def webui_url(self) -> str:
        return self.api_url.removesuffix("v1")


def write(plan: ServePlan, path: Path) -> None:
    """Whole or not at all: a process reading the plan while it changes reads the old or the new one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(msgspec.json.encode(plan))
    os.replace(partial, path)


def read(path: Path) -> ServePlan:
    return msgspec.json.decode(path.read_bytes(), type=ServePlan)


class PlanFile:
    """The plan file as the broker and the frontend hold it: they outlive a change of it (a model added to
    or removed from the catalog while serving; the supervisor writes the new plan) and read it again when
    told: the broker on the supervisor's PlanChanged, the frontend when the broker's Status.replans moves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = self._stamp()
        self.plan = read(path)

    def _stamp(self) -> tuple[int, int, int]:
        stat = self.path.stat()  # write() replaces the file: a new inode each time
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def changed(self) -> ServePlan | None:
        """The plan as the file says now, if it changed since it was last read; else None."""
        try:
            stamp = self._stamp()
        except OSError:
            return None  # being replaced this instant, or the serve is ending: the next look sees it
        if stamp == self.stamp:
            return None
        self.stamp, self.plan = stamp, read(self.path)
        return self.plan


def announced(plan: ServePlan, spec: WorkerSpec, state: str = "loading", error: str = "",
              pid: int = 0, restarts: int = 0) -> wire.WorkerInfo:
    """The WorkerInfo a worker of this spec announces before its engine has loaded (and says what it can
    do); the broker's own entry for one that is not running."""
    model = plan.model(spec.model)
    return wire.WorkerInfo(
        worker_id=spec.worker_id,
        device=spec.device,
        engine=spec.engine,
        runtime=spec.runtime,
        model=spec.model,
        slots=spec.slots,
        context=model.context if model else 0,
        state=state,
        error=error,
        pid=pid,
        restarts=restarts,
        capabilities=wire.Capabilities(tasks=SPEC_TASKS[spec.task]),
        speed=spec.speed,
        settings=spec.settings,
    )
