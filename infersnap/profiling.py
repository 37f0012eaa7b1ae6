"""Probing and measuring lanes, each in a subprocess (`python -m infersnap.workers.probe` and `.profile`):
neither the CLI nor the planner imports an engine, and a runtime that crashes at load (a GPU driver's
SIGSEGV) takes only that process. Which lanes need it is infersnap/planning.py's to say.

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
from infersnap.config import Config, engine_settings
from infersnap.engines import Assignment
from infersnap.hwdetect import Machine
from infersnap.probes import Probe
from infersnap.profiles import Profile, Subject, summary

MEASURE_TIMEOUT = {False: 900, True: 180}  # seconds, full and quick: a hung runtime is given up on

Say = Callable[[str], None]


def to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def probe_all(found: Iterable[Subject], machine: Machine, config: Config, say: Say = to_stderr, run: bool = True,
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
                    say: Say = to_stderr) -> dict[Assignment, Profile]:
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


