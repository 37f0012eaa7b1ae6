"""Building the plan `serve` runs (infersnap/plan.py) from the config, the machine, the catalog and the
engines' probes and profiles: which lanes serve each model, their workers (cores, threads, slots, the
settings that run), the context, what each model holds in memory and the memory budgets.

It runs the probes and measurements that are missing (infersnap/profiling.py) for the default model;
another model uses what is stored, so that adding one while serving never waits for either.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

import msgspec

from infersnap import access_keys, catalog, probes, profiles
from infersnap.catalog import ModelEntry
from infersnap.config import Config, engine_settings
from infersnap.context import ContextChoice, Pool
from infersnap.context import choose as choose_context
from infersnap.engines import (MEMORY_SHARE, Assignment, EngineChoiceError, choose_lanes, embedding_engine, manifests,
                               parse_choice, parse_embedding_choice, verdicts)
from infersnap.engines import candidates as auto_candidates
from infersnap.hwdetect import Machine
from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import ModelNotFound, ModelShape, model_shape, resolve
from infersnap.plan import Fallback, ModelSpec, ServePlan, WorkerSpec
from infersnap.probes import Probe
from infersnap.profiles import Profile, Speed, Subject
from infersnap.profiling import Say, to_stderr, measure_missing, probe_all, profiles_for, with_options


class PlanError(Exception):
    """The plan cannot be made (a keys file that cannot be read, a chat template that cannot be read)."""


def _say(text: str) -> None:
    print(f"infersnap: {text}", file=sys.stderr, flush=True)


class Lineup(msgspec.Struct):
    """What `serve` runs: the (engine, device) pairs, each device's first lane its fastest for one request."""

    assignments: list[Assignment]
    warning: str | None = None  # the configured engines cannot run here: the automatic choice serves
    left_out: list[str] = []  # lanes auto would run but did not, and why


def serving_assignments(config: Config, machine: Machine, profiles: dict[Assignment, Profile] | None = None,
                        crashed: dict[Assignment, str] | None = None) -> Lineup:
    """The (engine, device) pairs `serve` runs: the configured engines; the automatic choice, with the
    reason, when they cannot run on this machine (the config itself is kept), or crash here (`crashed`:
    what the probes found). With profiles, auto runs the lanes they say are worth it."""
    try:
        assignments, left_out = choose_lanes(machine, parse_choice(config.get("engines")), profiles, crashed)
        return Lineup(assignments, left_out=left_out)
    except EngineChoiceError as exc:
        assignments, left_out = choose_lanes(machine, None, profiles, crashed)
        return Lineup(assignments, f"{exc}; serving with the automatic choice instead", left_out)



def _wanted(config: Config, machine: Machine) -> tuple[list[Assignment], list[Assignment]]:
    """The lanes `serve` may run with this config (see candidates), and those it serves without profiles."""
    try:
        named = parse_choice(config.get("engines"))
    except EngineChoiceError:
        named = None
    lineup = serving_assignments(config, machine)
    return (auto_candidates(machine) if named is None or lineup.warning else lineup.assignments), lineup.assignments


def candidates(config: Config, machine: Machine, context: int | None = None) -> list[Subject]:
    """What `serve` may run with this config, as profiles are keyed: the named engines, or with `auto`
    (or named engines that cannot run here) every lane auto may choose (on each device the best engine
    of each runtime: infersnap.engines.candidates), since the choice among them needs all their profiles.
    `context`: the one serve chose (serve_context), if known."""
    wanted, serving = _wanted(config, machine)
    return subjects(wanted, serving, config, context or serve_context(config, machine).tokens)


def serve_context(config: Config, machine: Machine) -> ContextChoice:
    """The context `serve` gives each sequence (infersnap/context.py), counting the memory of every lane it
    may run (each with worker.slots, or left unset the most streams a profile measures, from which a
    lane's slots are chosen) and the embedding worker; a GPU with its own memory is its own pool."""
    model = resolve(config.get("model.path"), config.get("model.name"))[0]
    shape = model_shape(model)
    if config.get("worker.context"):
        return choose_context(config.get("worker.context"), shape, [])
    slots = config.get("worker.slots") if "worker.slots" in config.user else profiles.MOST_STREAMS
    own_memory = {a.device: a.vram_bytes for a in machine.accelerators if a.vram_bytes}
    pools: dict[str, list[int]] = {}  # name -> [budget, sequences, copies]

    def hold(device: str, sequences: int) -> None:
        name = device if device in own_memory else "memory"
        budget = own_memory[device] if device in own_memory else machine.memory.available_bytes or 0
        pool = pools.setdefault(name, [int(budget * MEMORY_SHARE), 0, 0])
        pool[1] += sequences
        pool[2] += 1

    for lane in _wanted(config, machine)[0]:
        hold(lane.device, slots)
    if config.get("worker.embeddings"):
        hold("cpu", 1)  # its KV cache: one stream of the context, that its inputs share
    return choose_context(None, shape, [Pool(name, *numbers) for name, numbers in pools.items()])


def subjects(wanted: Iterable[Assignment], serving: list[Assignment], config: Config, context: int) -> list[Subject]:
    """Each wanted (engine, device) with the threads and CPUs its worker would get beside the serving
    workers of the other devices (an accelerator's host threads come off the CPU worker's cores), and
    the context serve gives each sequence."""
    model_path = str(resolve(config.get("model.path"), config.get("model.name"))[0])
    cores = physical_core_cpus()
    found = []
    for assignment in wanted:
        lineup = [a for a in serving if a.device != assignment.device] + [assignment]
        specs = worker_specs(lineup, cores, config.get("worker.threads"), config.get("worker.slots"))
        spec = next(s for s in specs if (s.engine, s.device) == (assignment.engine, assignment.device))
        found.append(Subject(engine=spec.engine, runtime=spec.runtime, device=spec.device, model_path=model_path,
                             threads=spec.threads, context=context, cpus=spec.cpus,
                             gpu_layers=spec.gpu_layers))
    return found


def probe_lanes(config: Config, machine: Machine, context: int, run: bool = True, like: str = "",
                say: Say = to_stderr) -> dict[Assignment, Probe]:
    """The probes of what `serve` may run with this config (probe_all): the candidates (with engines-measure
    off, the engines that serve) and the embedding worker's engine; where one of those crashes, auto's
    candidates too, which serve instead."""
    wanted, serving = _wanted(config, machine)
    if not config.get("engines-measure"):  # nothing is measured: only what serves is probed (others if it crashes)
        wanted = serving
    embedder = embedding_engine(machine, parse_embedding_choice(config.get("worker.embedding-engine")))
    if config.get("worker.embeddings") and embedder is not None:
        wanted = list(dict.fromkeys([*wanted, Assignment(embedder, "cpu")]))
    probed = probe_all(subjects(wanted, serving, config, context), machine, config, say, run, like)
    if probes.crashed_lanes(probed):
        instead = [a for a in auto_candidates(machine) if a not in probed]
        probed |= probe_all(subjects(instead, serving, config, context), machine, config, say, run, like)
    return probed


def stored_profiles(config: Config, machine: Machine, context: int | None = None,
                    probed: dict[Assignment, Probe] | None = None) -> dict[Assignment, Profile]:
    """For the supervisor (what `select` and the lanes take): the stored profiles of every candidate that
    `serve` may run with this config, by Assignment, measured with the settings `probed` found; those
    never measured are left out, and none at all where the model cannot be found. Reads files only:
    `before_serving` has measured what was missing."""
    try:
        return profiles_for(with_options(candidates(config, machine, context), probed or {}), machine)
    except ModelNotFound:
        return {}


def shown(config: Config, machine: Machine) -> tuple[dict[Assignment, Profile], dict[Assignment, Probe]]:
    """The stored profiles and probes of every compatible engine (experimental ones too, measured by
    hand), for `infersnap engines` and `infersnap engine`; none where the model cannot be found."""
    every = [Assignment(v.engine, d) for v in verdicts(machine) if v.compatible for d in v.devices]
    try:
        serving = serving_assignments(config, machine).assignments
        found = subjects(every, serving, config, serve_context(config, machine).tokens)
    except ModelNotFound:
        return {}, {}
    probed = probe_all(found, machine, config, run=False)
    return profiles_for(with_options(found, probed), machine), probed


def before_serving(config: Config, machine: Machine, say: Say = to_stderr,
                   context: int | None = None, probed: dict[Assignment, Probe] | None = None) -> dict[Assignment, Profile]:
    """What `serve` does before it starts anything: measure the engines it may run that have no profile
    yet (only when engines-measure is on), with the settings `probed` found (none that crashed), and
    return the profiles of all of them (stored_profiles), at `context` (serve_context's, if None).
    The caller makes sure no server runs here: measuring beside one would spoil its figures and ours."""
    if not config.get("engines-measure"):
        return stored_profiles(config, machine, context, probed)
    try:
        found = with_options(candidates(config, machine, context), probed or {})
    except ModelNotFound:
        return {}
    stored = profiles_for(found, machine)
    missing = len(found) - len(stored)
    if not missing:
        return stored
    say(f"infersnap: measuring {missing} engine{'s' if missing > 1 else ''} before serving, once for "
        "this machine and model (`infersnap use-engine --no-measure` skips it)")
    return measure_missing(found, machine, say=say)


def build_plan(config: Config, machine: Machine) -> ServePlan:
    try:
        api_keys = access_keys.api_keys(config.get("http.api-keys"), config.get("http.api-keys-file"))
    except access_keys.KeysFileError as exc:
        raise PlanError(str(exc)) from None
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
        drain_linger=config.get("queue.drain-linger"),
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
        except PlanError as exc:
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
    specs = [msgspec.structs.replace(s, fallbacks=fallbacks(s, config, machine, entry.path, context.tokens))
             for s in specs]
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
            raise PlanError(f"{catalog.PER_MODEL}.{entry.slug}.chat-template: cannot read {template_file}: {exc}") from None
    model = ModelSpec(
        name=entry.id, path=entry.path, context=context.tokens, context_note=context.why, left_out=lineup.left_out,
        keep_alive=keep_alive, memory=memory_of(specs, context.tokens, model_shape(Path(entry.path))),
        chat=entry.chat_template or bool(template), chat_template=template,
    )
    return model, specs


def fallbacks(spec: WorkerSpec, config: Config, machine: Machine, model_path: str, context: int) -> list[Fallback]:
    """The ways a worker may run on when its settings crash while serving, in the order tried: its runtime's
    settings after its own (infersnap/probes.py), then, for a generating worker, its device's engine of
    another runtime whose stored probe says it runs with this model (none is probed while serving)."""
    if spec.crashes:
        return []
    tried = probes.variants(spec.runtime, probes.fixed_settings(engine_settings(config, spec.engine)))
    later = tried[tried.index(spec.options) + 1:] if spec.options in tried else []
    ways = [Fallback(spec.engine, spec.runtime, options, spec.gpu_layers, options.label) for options in later]
    if spec.task != "generate":
        return ways
    for lane in auto_candidates(machine):
        manifest = manifests()[lane.engine]
        if lane.device != spec.device or manifest.runtime == spec.runtime:
            continue
        subject = Subject(engine=lane.engine, runtime=manifest.runtime, device=lane.device, model_path=model_path,
                          threads=spec.threads, context=context, gpu_layers=manifest.settings.gpu_layers)
        probe = probes.stored(subject, machine, probes.fixed_settings(engine_settings(config, lane.engine)))
        if probe is not None and probe.options is not None and not probe.refused:
            ways.append(Fallback(lane.engine, manifest.runtime, probe.options, manifest.settings.gpu_layers, probe.note))
            break
    return ways


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


