"""Engine profiles from the CLI's side: which (engine, device) pairs need one, reading the stored ones,
and measuring the missing ones in a subprocess (`python -m infersnap.workers.profile`): the CLI never
imports an engine, and a runtime that crashes at load (a GPU driver's SIGSEGV) takes only that process.

Measuring happens alone on the machine's cores, before anything serves (measuring while serving spoils
both): in `infersnap use-engine --auto` and at the start of `infersnap serve` when a profile is missing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Callable, Iterable

import msgspec

from infersnap import probes, profiles, wire
from infersnap.cli.engines import detect, serving_assignments, summary
from infersnap.cli.status import NotRunning, query_status
from infersnap.config import Config, engine_settings
from infersnap.context import ContextChoice, Pool
from infersnap.context import choose as choose_context
from infersnap.engines import (MEMORY_SHARE, Assignment, EngineChoiceError, embedding_engine, parse_choice,
                               parse_embedding_choice, verdicts)
from infersnap.engines import candidates as auto_candidates
from infersnap.hwdetect import Machine
from infersnap.hwdetect.cpu import physical_core_cpus
from infersnap.models import ModelNotFound, model_shape, resolve
from infersnap.probes import Probe
from infersnap.profiles import Profile, Subject

MEASURE_TIMEOUT = {False: 900, True: 180}  # seconds, full and quick: a hung runtime is given up on

Say = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
    from infersnap.cli.supervisor import worker_specs  # not at the top: the supervisor imports this module

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


def probe_all(found: Iterable[Subject], machine: Machine, config: Config, say: Say = _stderr, run: bool = True,
              like: str = "") -> dict[Assignment, Probe]:
    """Each subject's probe (infersnap/probes.py): which settings run, or that none does. Stored ones are
    read; missing ones are run now (`run`), else taken from the model file `like` (the default model's:
    what crashes is the machine's, mostly), else left out (the subject keeps the defaults)."""
    probed: dict[Assignment, Probe] = {}
    for subject in found:
        lane = Assignment(subject.engine, subject.device)
        if lane in probed:
            continue
        fixed = probes.fixed_settings(engine_settings(config, subject.engine))
        probe = probes.stored(subject, machine, fixed)
        if probe is None and run:
            say(f"infersnap: checking that {subject.engine} runs on {subject.device} with this model "
                "(once for this machine and model)")
            probe = probes.find(subject, machine, fixed, say)
            say(f"  {subject.engine} on {subject.device}: " + (f"settings {probe.note}" if probe.options else probe.crashed)
                + f" ({probe.seconds:.0f} s)")
        elif probe is None and like:
            probe = probes.stored(msgspec.structs.replace(subject, model_path=like), machine, fixed)
        if probe is not None:
            probed[lane] = probe
    return probed


def with_options(found: Iterable[Subject], probed: dict[Assignment, Probe]) -> list[Subject]:
    """The subjects that run, each with the settings its probe found (the defaults where none was probed)."""
    runs = []
    for subject in found:
        probe = probed.get(Assignment(subject.engine, subject.device))
        if probe is None:
            runs.append(subject)
        elif probe.options is not None:
            runs.append(msgspec.structs.replace(subject, options=probe.options))
    return runs


def probe_lanes(config: Config, machine: Machine, context: int, run: bool = True, like: str = "",
                say: Say = _stderr) -> dict[Assignment, Probe]:
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


def profiles_for(found: Iterable[Subject], machine: Machine) -> dict[Assignment, Profile]:
    """The stored profiles of these subjects by (engine, device); one never measured is left out.
    Reads files only: never measures."""
    stored = {}
    for subject in found:
        profile = profiles.load(profiles.key(subject, machine))
        if profile is not None:
            stored[Assignment(subject.engine, subject.device)] = profile
    return stored


def measure(subject: Subject, key: str, quick: bool = False) -> Profile:
    """Measure one subject in its own process (its progress goes to stderr); a Profile with `error`
    when the process fails, crashes or hangs."""
    argv = [sys.executable, "-m", "infersnap.workers.profile", "--engine", subject.engine, "--device", subject.device,
            "--threads", str(subject.threads), "--context", str(subject.context), "--model", subject.model_path,
            "--cpus", ",".join(map(str, subject.cpus)), "--key", key, "--options",
            msgspec.json.encode(subject.options).decode(), *(["--quick"] if quick else [])]
    failed = Profile(engine=subject.engine, device=subject.device, key=key, measured_at=profiles.now(),
                     threads=subject.threads, context=subject.context, quick=quick)
    # cwd "/": from a source checkout, `-m infersnap...` would otherwise import the checkout's folder
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd="/")
    ended = probes.finish(process, MEASURE_TIMEOUT[quick])
    if ended is None:
        failed.error = f"measuring took longer than {MEASURE_TIMEOUT[quick]} s and was stopped"
        return failed
    lines = ended[0].decode(errors="replace").strip().splitlines()
    if process.returncode == 0 and lines:
        try:
            return msgspec.json.decode(lines[-1], type=Profile)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
    failed.error = f"the measuring process {wire.exit_words(process.returncode)}: the engine crashed"
    failed.crashed = process.returncode < 0  # a signal: native code died, as the probe's did not
    return failed


def measure_missing(found: list[Subject], machine: Machine, again: bool = False, quick: bool = False,
                    say: Say = _stderr) -> dict[Assignment, Profile]:
    """Measure each subject that has no stored profile (every one with `again`), one at a time, and
    store the profiles; returns every subject's profile by (engine, device). One line per engine, with
    the measuring process's own progress under it."""
    result: dict[Assignment, Profile] = {}
    todo = []
    for subject in found:
        key = profiles.key(subject, machine)
        stored = None if again else profiles.load(key)
        if stored is not None:
            result[Assignment(subject.engine, subject.device)] = stored
        else:
            todo.append((subject, key))
    for number, (subject, key) in enumerate(todo, 1):
        say(f"measuring {subject.engine} on {subject.device} ({number} of {len(todo)}, "
            f"{subject.threads} threads, context {subject.context}{', quick' if quick else ''})")
        start = time.monotonic()
        profile = measure(subject, key, quick)
        try:
            profiles.save(profile)
        except OSError as exc:  # a data folder this user may not write: measured again next time
            say(f"  cannot store the profile: {exc}")
        result[Assignment(subject.engine, subject.device)] = profile
        say(f"  {subject.engine} on {subject.device}: {summary(profile)} ({time.monotonic() - start:.0f} s)")
    return result


def before_serving(config: Config, machine: Machine | None = None, say: Say = _stderr,
                   context: int | None = None, probed: dict[Assignment, Probe] | None = None) -> dict[Assignment, Profile]:
    """What `serve` does before it starts anything: measure the engines it may run that have no profile
    yet (only when engines-measure is on), with the settings `probed` found (none that crashed), and
    return the profiles of all of them (stored_profiles), at `context` (serve_context's, if None).
    Anything that stops serving (no model, a server already running) is left for the supervisor to report."""
    machine = machine or detect("/")
    if not config.get("engines-measure"):
        return stored_profiles(config, machine, context, probed)
    try:
        query_status(timeout=0.5)
        return stored_profiles(config, machine, context, probed)  # a server runs here: measuring now would spoil its figures and ours
    except NotRunning:
        pass
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
