"""Which settings of an engine run on this machine, found by letting a throwaway process crash.

A runtime's native code can crash on some machines: llama.cpp 0.3.36 built natively on an Intel Xeon
of the Sapphire Rapids family dies of SIGSEGV in ggml's AMX kernels at its first batch of more than
one row, unless weights are not repacked; OpenVINO dies reading a GGUF cut short. So before an engine
first runs a model on a device (a worker, a profile's measuring process, an in-process test engine),
`find` runs a probe (`python -m infersnap.workers.probe`: load, a batch of two sequences, a few tokens,
an embedding batch where the runtime embeds) with each settings variant of its runtime in order, each
in its own process, until one runs. llama.cpp: the defaults, then no repacking, then no mmap either;
OpenVINO: its defaults, then f32 inference. cpu, cpu-avx2 and cpu-avx512 are one llama.cpp build, so
the fallback is over settings, not engines.

A variant that crashed is a measurement: an engine none of whose variants runs is never planned
(infersnap.engines.choose_lanes). The answer is stored in <data>/probes/<key>.json, keyed like a
profile (the machine, the model file, the engine and its runtime's build, and the variants tried:
settings the user fixed, `engine-settings.<engine>.*`, narrow them), so later starts run nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import msgspec

from infersnap import __version__, paths, profiles, wire
from infersnap.profiles import EngineOptions, Subject
from infersnap.runtimes import RUNTIMES

if TYPE_CHECKING:
    from infersnap.engines import Assignment
    from infersnap.hwdetect import Machine

PROBE_TIMEOUT = 120  # seconds: a variant whose probe hangs this long counts as not running

Say = Callable[[str], None]


class Attempt(msgspec.Struct, frozen=True):
    options: EngineOptions
    crash: str = ""  # how its process died (signal, and where when known); "": it ran


class Probe(msgspec.Struct, kw_only=True):
    """What one engine did on one device with one model, variant by variant."""

    engine: str
    device: str
    key: str
    probed_at: str
    attempts: list[Attempt]  # in the order tried: each crashed but perhaps the last
    refused: str = ""  # the engine refused the model with an error (not a crash): any settings would
    seconds: float = 0.0  # what probing took

    @property
    def options(self) -> EngineOptions | None:
        """The settings that ran (the first variant when the engine refused the model); None when every
        variant crashed."""
        ran = [a.options for a in self.attempts if not a.crash]
        return ran[0] if ran else None

    @property
    def crashed(self) -> str:
        """Why the engine cannot run here: every variant's crash; "" when one ran."""
        if self.options is not None:
            return ""
        return "every setting crashed: " + "; ".join(f"{a.options.label}: {a.crash}" for a in self.attempts)

    @property
    def note(self) -> str:
        """Its settings and why, for status and the engines view: "no-repack (default: killed by SIGSEGV ...)"."""
        if self.options is None:
            return self.crashed
        crashes = [f"{a.options.label}: {a.crash}" for a in self.attempts if a.crash]
        return self.options.label + (f" ({'; '.join(crashes)})" if crashes else "")


def crashed_lanes(probed: dict[Assignment, Probe]) -> dict[Assignment, str]:
    """The lanes none of whose settings ran, and why."""
    return {lane: probe.crashed for lane, probe in probed.items() if probe.crashed}


def variants(runtime: str, fixed: dict[str, object] | None = None) -> list[EngineOptions]:
    """The runtime's settings variants in order (infersnap/runtimes.py), each with the settings the user
    fixed; no two alike."""
    found: list[EngineOptions] = []
    for settings in RUNTIMES[runtime].variants if runtime in RUNTIMES else ({},):
        variant = EngineOptions(**{**settings, **(fixed or {})})
        if variant not in found:
            found.append(variant)
    return found


def fixed_settings(values: dict[str, str]) -> dict[str, object]:
    """`engine-settings.<engine>.*` as EngineOptions fields: {"repack": "off"} -> {"repack": False}; auto left out."""
    fixed: dict[str, object] = {}
    for name, value in values.items():
        if value in ("on", "off"):
            fixed[name] = value == "on"
        elif value != "auto":
            fixed[name] = value
    return fixed


def key(subject: Subject, machine: Machine, tried: list[EngineOptions]) -> str:
    """What a probe's answer depends on: the machine and device, the model file, the engine and its
    runtime's build, infersnap's version, and the variants tried."""
    parts = [profiles.device_identity(machine, subject.device), subject.device,
             profiles.model_stamp(subject.model_path), subject.engine, subject.runtime,
             profiles.runtime_build(subject.runtime), __version__, subject.gpu_layers,
             [msgspec.to_builtins(v) for v in tried]]
    return profiles.hashed(parts)


def probes_dir() -> Path:
    return paths.data_dir() / "probes"


def load(probe_key: str) -> Probe | None:
    return profiles.read_stored(probes_dir(), probe_key, Probe)


def save(probe: Probe) -> Path:
    return profiles.store(probes_dir(), probe.key, probe)


def stored(subject: Subject, machine: Machine, fixed: dict[str, object] | None = None) -> Probe | None:
    """The stored answer for this subject, if it was probed; never runs anything."""
    return load(key(subject, machine, variants(subject.runtime, fixed)))


def find(subject: Subject, machine: Machine, fixed: dict[str, object] | None = None, say: Say | None = None) -> Probe:
    """The settings this subject runs with: stored, or probed now (variant by variant, each in its own
    process, until one runs) and stored. `say` hears of each variant that crashed."""
    tried = variants(subject.runtime, fixed)
    probe_key = key(subject, machine, tried)
    found = load(probe_key)
    if found is not None:
        return found
    start = time.monotonic()
    attempts, refused = [], ""
    for options in tried:
        crash, refused = run(subject, options)
        attempts.append(Attempt(options, crash))
        if not crash:
            break
        if say is not None:
            say(f"  {subject.engine} on {subject.device} crashed with settings {options.label}: {crash}")
    probe = Probe(engine=subject.engine, device=subject.device, key=probe_key, probed_at=profiles.now(),
                  attempts=attempts, refused=refused, seconds=round(time.monotonic() - start, 2))
    try:
        save(probe)
    except OSError:  # a data folder this user may not write: probed again next time
        pass
    return probe


def run(subject: Subject, options: EngineOptions) -> tuple[str, str]:
    """One probe process: (how it crashed or "", why the engine refused the model or "")."""
    argv = [sys.executable, "-m", "infersnap.workers.probe", "--engine", subject.engine, "--device", subject.device,
            "--model", subject.model_path, "--threads", str(subject.threads),
            "--cpus", ",".join(map(str, subject.cpus)), "--options", msgspec.json.encode(options).decode()]
    # cwd "/": from a source checkout, `-m infersnap...` would otherwise import the checkout's folder
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    ended = finish(process, PROBE_TIMEOUT)
    if ended is None:
        return f"it hung (stopped after {PROBE_TIMEOUT} s)", ""
    out, err = ended
    lines = out.decode(errors="replace").strip().splitlines()
    if process.returncode == 0 and lines:
        try:
            answer = msgspec.json.decode(lines[-1], type=dict)
            return "", str(answer.get("refused", ""))
        except msgspec.DecodeError:
            pass
    return wire.exit_words(process.returncode) + crash_site(err.decode(errors="replace")), ""


def finish(process: subprocess.Popen, timeout: float) -> tuple[bytes, bytes] | None:
    """A child's (stdout, stderr) once it ends; None when it ran past `timeout` and was killed. Ctrl-C
    here kills it too."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return None
    except BaseException:
        process.kill()
        process.wait()
        raise


def crash_site(stderr: str) -> str:
    """Where faulthandler saw the crash: the innermost Python frame of the thread that crashed ("" if none)."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("Current thread", "Stack (most recent call first)")):
            frame = lines[i + 1].strip() if i + 1 < len(lines) else ""
            where = frame.split('"')  # File "/…/llamacpp_engine.py", line 312 in step
            if frame.startswith("File ") and len(where) >= 3:
                return f" in {Path(where[1]).name}{where[2].replace(', line ', ':').replace(' in ', ' ', 1)}"
    return ""
