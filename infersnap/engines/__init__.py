"""Engines: their manifests, their verdicts on a machine, and which ones serve.

Auto selection gives every device of the machine to the best-scoring
compatible, non-experimental engine that can run on it: on a Lunar Lake
laptop that is an OpenVINO worker on GPU.0, another on the NPU, and the best
CPU engine on the CPU.
"""

from __future__ import annotations

import msgspec

from infersnap.engines.manifest import Manifest, manifests, parse_size
from infersnap.engines.verdict import Verdict, evaluate
from infersnap.hwdetect import Machine

AUTO = "auto"

__all__ = ["AUTO", "Assignment", "EngineChoiceError", "Manifest", "Verdict", "evaluate", "manifests", "parse_size",
           "parse_choice", "select", "verdicts", "embedding_engine"]


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


def select(machine: Machine, names: list[str] | None = None) -> list[Assignment]:
    """The (engine, device) pairs to run: the named engines, or the best per device when None."""
    ranked = verdicts(machine)
    if names is None:
        chosen = [v for v in ranked if v.compatible and not v.experimental]
    else:
        by_name = {v.engine: v for v in ranked}
        chosen = []
        for name in names:
            if name not in by_name:
                raise EngineChoiceError(f"unknown engine {name!r}; known engines: {', '.join(manifests())}")
            verdict = by_name[name]
            if not verdict.compatible:
                raise EngineChoiceError(f"engine {name} cannot run on this machine: {'; '.join(verdict.reasons)}")
            chosen.append(verdict)
    # A device runs one engine of each runtime: two named engines of one runtime on it would do the same work.
    owners: dict[str, dict[str, str]] = {}  # device -> runtime -> engine
    for verdict in chosen:
        runtime = manifests()[verdict.engine].runtime
        for device in verdict.devices:
            engines = owners.setdefault(device, {})
            if names is None and engines:
                continue  # auto: the best-scoring engine only
            if runtime in engines:
                raise EngineChoiceError(
                    f"engines {engines[runtime]} and {verdict.engine} both run on {device}; pick one"
                )
            engines[runtime] = verdict.engine
    return [Assignment(engine, device) for device, engines in owners.items() for engine in engines.values()]


def embedding_engine(machine: Machine) -> str | None:
    """The best llama.cpp engine for the CPU: embeddings run there, whichever engines generate."""
    for verdict in verdicts(machine):
        manifest = manifests()[verdict.engine]
        if verdict.compatible and not verdict.experimental and manifest.runtime == "llamacpp" and verdict.devices == ["cpu"]:
            return verdict.engine
    return None
