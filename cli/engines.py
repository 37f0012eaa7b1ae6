"""What `infersnap machine`, `engines`, `engine` and `use-engine` show and change."""

from __future__ import annotations

import msgspec

from infersnap import hwdetect, paths
from infersnap.config import Config
from infersnap.engines import (AUTO, Assignment, Verdict, manifests, parse_choice,
                               select, verdicts)
from infersnap.hwdetect import Machine
from infersnap.probes import Probe, crashed_lanes
from infersnap.planning import serving_assignments
from infersnap.profiles import Profile, summary


def active_engines(config: Config, machine: Machine, measured: Measured | None = None,
                   probed: Probed | None = None) -> set[str]:
    """The engines `serve` would start with this config on this machine, by the profiles and probes stored."""
    return {a.engine for a in serving_assignments(config, machine, measured, crashed_lanes(probed or {})).assignments}


def compat_word(verdict: Verdict) -> str:
    if not verdict.compatible:
        return "no"
    return "exptl" if verdict.experimental else "yes"


Measured = dict[Assignment, Profile]  # (engine, device) -> its stored profile
Probed = dict[Assignment, Probe]  # (engine, device) -> its stored probe: which settings run (infersnap/probes.py)


def _of(engine: str, measured: dict) -> list:
    return [found for lane, found in measured.items() if lane.engine == engine]


def engines_table(machine: Machine, active: set[str], measured: Measured | None = None,
                  probed: Probed | None = None) -> list[list[str]]:
    rows = [["engine", "vendor", "compat", "measured", "summary"]]
    for verdict in verdicts(machine):
        manifest = manifests()[verdict.engine]
        marked = verdict.engine + ("*" if verdict.engine in active else "")
        found = _of(verdict.engine, measured or {})
        crashes = [p for p in _of(verdict.engine, probed or {}) if p.crashed]
        shown = "; ".join([*((f"{p.device}: " if len(found) > 1 else "") + _short(p) for p in found),
                           *(f"{p.device}: crashes" for p in crashes)]) or "-"
        rows.append([marked, manifest.vendor, compat_word(verdict), shown, manifest.summary])
    return rows


def _short(profile: Profile) -> str:
    """A profile in the table: its figures, or why there are none, cut short."""
    text = summary(profile)
    return text if len(text) <= 60 else text[:57] + "..."


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows
    )


def engines_document(machine: Machine, active: set[str], measured: Measured | None = None,
                     probed: Probed | None = None) -> list[dict]:
    return [
        {
            "name": v.engine,
            "vendor": manifests()[v.engine].vendor,
            "summary": manifests()[v.engine].summary,
            "compat": compat_word(v),
            "active": v.engine in active,
            "score": v.score,
            "measured": [figures(p) for p in _of(v.engine, measured or {})],
            "settings": [settings_shown(p) for p in _of(v.engine, probed or {})],
        }
        for v in verdicts(machine)
    ]


def engine_document(name: str, machine: Machine, active: set[str], measured: Measured | None = None,
                    probed: Probed | None = None) -> dict:
    manifest = manifests()[name]
    verdict = next(v for v in verdicts(machine) if v.engine == name)
    return {
        **msgspec.to_builtins(manifest),
        "active": name in active,
        "compat": compat_word(verdict),
        "score": verdict.score,
        "devices-found": verdict.devices,
        "reasons": verdict.reasons,
        "measured": [figures(p) for p in _of(name, measured or {})],
        "settings": [settings_shown(p) for p in _of(name, probed or {})],
    }


def settings_shown(probe: Probe) -> dict:
    """What the probe found on a device: the settings that run, or that every one crashed, and how each
    variant tried crashed (signal, and where when known)."""
    shown: dict = {"device": probe.device, "probed-at": probe.probed_at}
    if probe.options is not None:
        shown["runs-with"] = probe.options.label
    else:
        shown["crashes"] = True
    crashed = {a.options.label: a.crash for a in probe.attempts if a.crash}
    if crashed:
        shown["crashed"] = crashed
    if probe.refused:
        shown["refused"] = probe.refused
    return shown


def use_engines(config: Config, machine: Machine, names: list[str]) -> str:
    """Check the named engines against the machine and persist the choice; the value stored."""
    value = ",".join(names) if names else AUTO
    select(machine, parse_choice(value))  # raises EngineChoiceError, before anything is written
    config.set_many({"engines": value})
    return value


def figures(profile: Profile) -> dict:
    """A profile for `infersnap engines --format json` and `infersnap engine`."""
    shown: dict = {"device": profile.device, "measured-at": profile.measured_at}
    if profile.error:
        shown["error"] = profile.error
    if profile.speed is not None:
        shown["tokens-per-second"] = {lv.streams: lv.tokens_per_second for lv in profile.speed.levels}
        shown["first-token-seconds"] = {lv.streams: lv.ttft_seconds for lv in profile.speed.levels}
        shown["prompt-tokens-per-second"] = {p.tokens: round(p.tokens / p.seconds, 1) if p.seconds else None
                                             for p in profile.speed.prompts}
    shown.update({"load-seconds": profile.load_seconds, "memory-mib": round(profile.memory_bytes / 2**20),
                  "threads": profile.threads, "context": profile.context})
    if profile.quick:
        shown["quick"] = True
    if profile.contention:
        shown["contention"] = profile.contention  # share of the cores other processes took meanwhile
    return shown


def detect(root: str) -> Machine:
    """The machine at `root`; on the live machine, free disk is that of the data folder (where models live)."""
    return hwdetect.detect(root, models_dir=str(paths.data_dir()) if root == "/" else "/")
