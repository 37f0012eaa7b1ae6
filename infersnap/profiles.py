"""Engine profiles: what an engine measured on this machine with this model, and what it predicts.

A profile is measured once per (machine, model file, engine and its build, threads, context) by
`infersnap use-engine --auto` (or the first `serve`), stored in the data folder, and carried by the
lane's WorkerInfo so that the broker can send each request to the lane that finishes it sooner.
This module holds the figures and the arithmetic on them; measuring needs an engine and lives in
workers/profile.py.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from infersnap import __version__, paths
from infersnap.runtimes import RUNTIMES

if TYPE_CHECKING:  # the broker imports this module for Speed: no hardware detection there
    from infersnap.hwdetect import Machine

MOST_STREAMS = 16  # the most streams a full profile measures: a lane left to choose its slots takes at most this


class Level(msgspec.Struct, array_like=True, frozen=True):
    """Generation with `streams` requests running at once."""

    streams: int
    tokens_per_second: float  # generated tokens/s of all streams together
    ttft_seconds: float  # median time to first token when they all start together


class PromptRead(msgspec.Struct, array_like=True, frozen=True):
    """A lone request's prompt of `tokens` tokens, read in `seconds` (to its first token)."""

    tokens: int
    seconds: float


class Speed(msgspec.Struct, array_like=True, frozen=True):
    """The figures the broker routes by, sorted by streams and by tokens."""

    levels: list[Level]
    prompts: list[PromptRead]

    def per_stream(self, streams: int) -> float:
        """Tokens/s that each of `streams` running requests gets (flat past the last level measured)."""
        return _interpolate([(lv.streams, lv.tokens_per_second) for lv in self.levels], streams) / max(streams, 1)

    def prompt_seconds(self, tokens: int) -> float:
        """Seconds to read a prompt of `tokens` tokens (past the longest one measured, at its rate)."""
        points = [(0, 0.0)] + [(p.tokens, p.seconds) for p in self.prompts]
        if tokens > points[-1][0] and points[-1][0] > 0:
            return points[-1][1] * tokens / points[-1][0]
        return _interpolate(points, tokens)

    def finish_seconds(self, running: int, prompt_tokens: int, max_tokens: int) -> float:
        """When a request would end on this lane, now running `running` others: its prompt read, then
        its tokens generated at the per-stream rate of running + 1 streams."""
        rate = self.per_stream(running + 1)
        return self.prompt_seconds(prompt_tokens) + (max_tokens / rate if rate > 0 else float("inf"))


class Profile(msgspec.Struct, kw_only=True):
    """One engine on one device, as measured."""

    engine: str
    device: str
    key: str  # what the figures depend on, hashed: see key()
    measured_at: str  # ISO 8601, UTC
    threads: int
    context: int
    load_seconds: float = 0.0
    memory_bytes: int = 0  # the worker process's PSS once loaded with its most streams
    speed: Speed | None = None
    error: str | None = None  # why it could not be measured; then the static score decides
    crashed: bool = False  # the measuring process died (a signal): the engine is never planned here
    quick: bool = False  # a short measurement (tests): rougher figures
    contention: float = 0.0  # share of its cores' time other processes took while it was measured (0-1)


def now() -> str:
    """A profile's `measured_at`: now, ISO 8601 in UTC."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    """Linear between measured points, flat outside them."""
    if not points:
        return 0.0
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1
    return points[-1][1]


# --- what a profile is of, and its key ---------------------------------------------------------------

class EngineOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Settings of a runtime that its native code may crash on, on some machines: the probe
    (infersnap/probes.py) finds ones that run, and every engine of that runtime is built with them."""

    repack: bool = True  # llama.cpp: weights repacked for the CPU's own kernels (extra buffer types: AMX, ...)
    mmap: bool = True  # llama.cpp: weights mapped from the file (off: read into memory)
    precision: str = ""  # OpenVINO: INFERENCE_PRECISION_HINT ("f32", "bf16", "f16"); "": the plugin's choice

    @property
    def label(self) -> str:
        """Its name: "default", or what it turns off or sets ("no-repack", "no-repack-no-mmap", "f32")."""
        words = ([] if self.repack else ["no-repack"]) + ([] if self.mmap else ["no-mmap"]) + [self.precision]
        return "-".join(w for w in words if w) or "default"


class Subject(msgspec.Struct, frozen=True):
    """One engine on one device, as a worker would run it: what a profile is measured for."""

    engine: str  # manifest name
    runtime: str  # a name in infersnap.runtimes.RUNTIMES
    device: str
    model_path: str
    threads: int
    context: int
    cpus: list[int] = []  # the worker's CPU affinity (measured there too); not in the key
    gpu_layers: int = 0
    options: EngineOptions = EngineOptions()  # the settings it runs with (probed)


def device_identity(machine: Machine, device: str) -> str:
    """What names the hardware a device's figures come from: the CPU (model and flags) always, since
    a GPU worker's host threads run there too, and the accelerator's ids, name and memory."""
    cpu = machine.cpu
    words = [cpu.architecture or "", cpu.model_name or "", " ".join(sorted(cpu.flags))]
    for accelerator in machine.accelerators:
        if accelerator.device == device:
            words += [f"{accelerator.vendor_id:04x}:{accelerator.device_id:04x}", accelerator.name or "",
                      str(accelerator.vram_bytes)]
    return "|".join(words)


def runtime_build(runtime: str) -> str:
    """The installed version of the runtime's package (its build: a new one may be faster or slower),
    read without importing it ("" if missing)."""
    try:
        return importlib.metadata.version(RUNTIMES[runtime].package if runtime in RUNTIMES else runtime)
    except importlib.metadata.PackageNotFoundError:
        return ""


def key(subject: Subject, machine: Machine) -> str:
    """A hash of what changes the figures: the machine, the model file (path, size, mtime), the engine
    and its build (and infersnap's, which drives it), threads and context. Not the slots: a profile
    measured up to N streams serves any slot count."""
    parts = [device_identity(machine, subject.device), subject.device, model_stamp(subject.model_path),
             subject.engine, subject.runtime, runtime_build(subject.runtime), __version__, subject.threads,
             subject.context, subject.gpu_layers, msgspec.to_builtins(subject.options)]
    return hashed(parts)


def model_stamp(path: str) -> list:
    """What names a model file's content cheaply: its path, size and mtime."""
    try:
        stat = os.stat(path)
        return [path, stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [path, None, None]


def hashed(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


# --- storage: <data>/profiles/<key>.json --------------------------------------------------------------


def profiles_dir() -> Path:
    return paths.data_dir() / "profiles"


def load(profile_key: str) -> Profile | None:
    """The stored profile of this key; None if there is none or it cannot be read (it is measured again)."""
    return read_stored(profiles_dir(), profile_key, Profile)


def save(profile: Profile) -> Path:
    return store(profiles_dir(), profile.key, profile)


def read_stored(folder: Path, name: str, kind: type):
    """The stored `kind` named `name` in the folder; None if there is none or it cannot be read."""
    try:
        return msgspec.json.decode((folder / f"{name}.json").read_bytes(), type=kind)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def store(folder: Path, name: str, value: msgspec.Struct) -> Path:
    """Store a value as `name`.json in the folder, atomically (a reader never sees half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(value)) + b"\n")
    os.replace(tmp, path)
    return path


def summary(profile: Profile) -> str:
    """One line: tokens/s at 1 stream and at the best level, prompt tokens/s, memory; or why it failed."""
    if profile.speed is None or not profile.speed.levels:
        return f"failed: {profile.error}"
    levels = profile.speed.levels
    best = max(levels, key=lambda lv: lv.tokens_per_second)
    parts = [f"{levels[0].tokens_per_second:.0f} tok/s x{levels[0].streams}"]
    if best is not levels[0]:
        parts.append(f"{best.tokens_per_second:.0f} x{best.streams}")
    longest = profile.speed.prompts[-1] if profile.speed.prompts else None
    if longest and longest.seconds > 0:
        parts.append(f"prompt {longest.tokens / longest.seconds:.0f} tok/s")
    parts.append(f"{profile.memory_bytes / 2**20:.0f} MiB")
    if profile.error:
        parts.append(f"(stopped: {profile.error})")
    if profile.contention > 0.1:
        parts.append(f"low: other processes took {profile.contention:.0%} of the cores")
    return ", ".join(parts)
