"""Engines: their manifests, their verdicts on a machine, and which ones serve.

Auto selection gives every device of the machine to the best-scoring
compatible, non-experimental engine that can run on it: on a Lunar Lake
laptop that is an OpenVINO worker on GPU.0, another on the NPU, and the best
CPU engine on the CPU. With measured profiles, a device gets a lane for each
runtime whose best engine is the fastest there at some load (one request,
many at once, or reading a long prompt), as long as the memory holds them
all; the lanes take turns on the device's cores (see broker/broker.py).
"""

from __future__ import annotations

import msgspec

from infersnap import runtimes
from infersnap.engines.manifest import Manifest, manifests, parse_size
from infersnap.engines.verdict import Verdict, evaluate
from infersnap.hwdetect import Machine
from infersnap.profiles import Profile

AUTO = "auto"
LANE_MARGIN = 1.1  # a second lane must beat the first by this factor somewhere to be worth its memory
MEMORY_SHARE = 0.8  # the share of the available memory that the lanes of a machine may use

__all__ = ["AUTO", "Assignment", "EngineChoiceError", "Manifest", "Verdict", "evaluate", "manifests", "parse_size",
           "parse_choice", "select", "choose_lanes", "crashes", "verdicts", "embedding_engine", "parse_embedding_choice", "candidates"]


class EngineChoiceError(ValueError):
    """A named engine is unknown, incompatible, or competes with another for the same device."""


class Assignment(msgspec.Struct, frozen=True):
    engine: str
    device: str


def verdicts(machine: Machine) -> list[Verdict]:
    """Every engine's verdict, best first."""
    found = [evaluate(m, machine) for m in manifests().values()]
    return sorted(found, key=lambda v: (not v.compatible, -v.score, v.engine))


def parse_choice(text: str) -> list[str] | None:
    """The engines named in the config value ("auto" or "a,b"), or None for auto."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or names == [AUTO]:
        return None
    unknown = [n for n in names if n not in manifests()]
    if unknown:
        raise EngineChoiceError(f"unknown engine {', '.join(unknown)}; known engines: {', '.join(manifests())}")
    return names


def candidates(machine: Machine) -> list[Assignment]:
    """What auto may run: on each device, the best-scoring compatible, non-experimental engine of each
    runtime that generates (the ones a profile measures)."""
    found: dict[tuple[str, str], Assignment] = {}
    for verdict in verdicts(machine):
        if verdict.compatible and not verdict.experimental and runtimes.does(manifests()[verdict.engine].runtime, "generate"):
            for device in verdict.devices:
                found.setdefault((device, manifests()[verdict.engine].runtime), Assignment(verdict.engine, device))
    return list(found.values())


def select(machine: Machine, names: list[str] | None = None,
           profiles: dict[Assignment, Profile] | None = None) -> list[Assignment]:
    """The (engine, device) pairs to run: the named engines, or the automatic choice when None."""
    return choose_lanes(machine, names, profiles)[0]


def crashes(profiles: dict[Assignment, Profile]) -> dict[Assignment, str]:
    """The lanes whose measuring process crashed, and how: a crash is a measurement too."""
    return {lane: p.error or "crashed" for lane, p in profiles.items() if p.crashed}


def choose_lanes(machine: Machine, names: list[str] | None = None,
                 profiles: dict[Assignment, Profile] | None = None,
                 crashed: dict[Assignment, str] | None = None) -> tuple[list[Assignment], list[str]]:
    """The (engine, device) pairs to run, each device's fastest lane first (the one a seeded request
    takes), and why any candidate is left out: the named engines, or for auto the lanes the profiles
    say are worth it (the best-scoring engine per device where none is measured). A lane in `crashed`
    (every settings variant crashed in its probe: infersnap/probes.py) or whose measuring crashed never
    runs: auto takes the best of the others; a named one is kept beside a named lane of its device that
    runs (its worker fails at once, saying why), and where none does it is an EngineChoiceError."""
    crashed = {**crashes(profiles or {}), **(crashed or {})}
    if names is None:
        return _auto(machine, profiles or {}, crashed)
    ranked = verdicts(machine)
    by_name = {v.engine: v for v in ranked}
    chosen: dict[str, dict[str, str]] = {}  # device -> runtime -> engine
    for name in names:
        if name not in by_name:
            raise EngineChoiceError(f"unknown engine {name!r}; known engines: {', '.join(manifests())}")
        verdict = by_name[name]
        if not verdict.compatible:
            raise EngineChoiceError(f"engine {name} cannot run on this machine: {'; '.join(verdict.reasons)}")
        runtime = manifests()[name].runtime
        if not runtimes.does(runtime, "generate"):
            raise EngineChoiceError(f"engine {name} only embeds; name it in worker.embedding-engine")
        for device in verdict.devices:
            engines = chosen.setdefault(device, {})
            # two engines of one runtime on a device would do the same work
            if runtime in engines:
                raise EngineChoiceError(f"engines {engines[runtime]} and {name} both run on {device}; pick one")
            engines[runtime] = name
    lanes = [Assignment(engine, device) for device, engines in chosen.items() for engine in engines.values()]
    for device, engines in chosen.items():  # a named lane that crashes stays (failed, saying why) beside one that runs
        if all(Assignment(engine, device) in crashed for engine in engines.values()):
            why = "; ".join(f"{engine}: {crashed[Assignment(engine, device)]}" for engine in engines.values())
            raise EngineChoiceError(f"the engines named for {device} crash here ({why})")
    return _fastest_first(lanes, profiles or {}), []


def _auto(machine: Machine, profiles: dict[Assignment, Profile],
          crashed: dict[Assignment, str]) -> tuple[list[Assignment], list[str]]:
    by_device: dict[str, list[Assignment]] = {}
    chosen, left_out = [], []
    for lane in candidates(machine):
        if lane in crashed:  # its runtime crashes here whatever its settings: no other engine of it is tried
            left_out.append(f"{lane.engine} on {lane.device}: it crashes here ({crashed[lane]})")
            continue
        by_device.setdefault(lane.device, []).append(lane)
    budget = (machine.memory.available_bytes or 0) * MEMORY_SHARE
    for device, lanes in by_device.items():
        measured = [a for a in lanes if profiles.get(a) is not None and profiles[a].speed is not None]
        if len(measured) < len(lanes):  # the static score decides among the lanes that run: the best-scoring
            chosen.append(lanes[0])
            continue
        lanes = _fastest_first(lanes, profiles)
        kept = [lanes[0]]
        for lane in lanes[1:]:
            if not _wins_somewhere(profiles[lane], [profiles[k] for k in kept]):
                continue
            used = sum(profiles[k].memory_bytes for k in kept) + profiles[lane].memory_bytes
            if device == "cpu" and budget and used > budget:
                left_out.append(f"{lane.engine} on {device}: its lane would not fit in memory beside "
                                f"{', '.join(k.engine for k in kept)} ({used >> 20} MiB, {int(budget) >> 20} MiB free)")
                continue
            kept.append(lane)
        chosen += kept
    return chosen, left_out


def _fastest_first(lanes: list[Assignment], profiles: dict[Assignment, Profile]) -> list[Assignment]:
    """Each device's lanes, the one that ends a lone short request soonest first (stable otherwise)."""
    def lone(lane: Assignment) -> float:
        profile = profiles.get(lane)
        if profile is None or profile.speed is None:
            return float("inf")
        return profile.speed.finish_seconds(0, 32, 128)

    order = {device: i for i, device in enumerate(dict.fromkeys(a.device for a in lanes))}
    return sorted(lanes, key=lambda a: (order[a.device], lone(a)))


def _wins_somewhere(profile: Profile, others: list[Profile]) -> bool:
    """Whether this lane beats every other by LANE_MARGIN at some level, or at reading a long prompt."""
    speed = profile.speed
    streams = sorted({lv.streams for p in [profile, *others] for lv in p.speed.levels})
    for n in streams:
        if all(speed.per_stream(n) > LANE_MARGIN * o.speed.per_stream(n) for o in others):
            return True
    return all(o.speed.prompt_seconds(4096) > LANE_MARGIN * speed.prompt_seconds(4096) for o in others)


def parse_embedding_choice(text: str) -> str | None:
    """The engine named in worker.embedding-engine, or None for auto."""
    name = text.strip()
    if name in ("", AUTO):
        return None
    if name not in manifests():
        raise EngineChoiceError(f"unknown engine {name}; known engines: {', '.join(manifests())}")
    manifest = manifests()[name]
    if manifest.device != "cpu" or not runtimes.does(manifest.runtime, "embed"):
        raise EngineChoiceError(f"engine {name} does not embed on the CPU; those that do: {', '.join(_embedders())}")
    return name


def _embedders() -> list[str]:
    return [n for n, m in manifests().items() if m.device == "cpu" and runtimes.does(m.runtime, "embed")]


def embedding_engine(machine: Machine, name: str | None = None, architecture: str | None = None,
                     quantization: str = "") -> str | None:
    """The engine of the embedding worker, on the CPU whichever engines generate: the one named
    (worker.embedding-engine) where it runs here and its runtime reads the model (given by its GGUF
    architecture and file type), else the best-scoring non-experimental CPU engine whose runtime embeds."""
    for verdict in verdicts(machine):
        manifest = manifests()[verdict.engine]
        if name is not None and verdict.engine == name and verdict.compatible and (
                architecture is None or runtimes.runtime(manifest.runtime).reads(architecture, quantization)):
            return name
    for verdict in verdicts(machine):
        if verdict.compatible and not verdict.experimental and verdict.engine in _embedders():
            return verdict.engine
    return None
