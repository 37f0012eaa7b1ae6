"""What `infersnap machine`, `engines`, `engine` and `use-engine` show and change."""

from __future__ import annotations

import msgspec

from infersnap import hwdetect, paths
from infersnap.config import Config
from infersnap.engines import AUTO, Assignment, EngineChoiceError, Verdict, manifests, parse_choice, select, verdicts
from infersnap.hwdetect import Machine


def serving_assignments(config: Config, machine: Machine) -> tuple[list[Assignment], str | None]:
    """The (engine, device) pairs `serve` runs: the configured engines; the automatic choice,
    with the reason, when they cannot run on this machine (the config itself is kept)."""
    try:
        return select(machine, parse_choice(config.get("engines"))), None
    except EngineChoiceError as exc:
        return select(machine), f"{exc}; serving with the automatic choice instead"


def active_engines(config: Config, machine: Machine) -> set[str]:
    """The engines `serve` would start with this config on this machine."""
    return {a.engine for a in serving_assignments(config, machine)[0]}


def compat_word(verdict: Verdict) -> str:
    if not verdict.compatible:
        return "no"
    return "exptl" if verdict.experimental else "yes"


def engines_table(machine: Machine, active: set[str]) -> list[list[str]]:
    rows = [["engine", "vendor", "compat", "summary"]]
    for verdict in verdicts(machine):
        manifest = manifests()[verdict.engine]
        marked = verdict.engine + ("*" if verdict.engine in active else "")
        rows.append([marked, manifest.vendor, compat_word(verdict), manifest.summary])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows
    )


def engines_document(machine: Machine, active: set[str]) -> list[dict]:
    return [
        {
            "name": v.engine,
            "vendor": manifests()[v.engine].vendor,
            "summary": manifests()[v.engine].summary,
            "compat": compat_word(v),
            "active": v.engine in active,
            "score": v.score,
        }
        for v in verdicts(machine)
    ]


def engine_document(name: str, machine: Machine, active: set[str]) -> dict:
    manifest = manifests()[name]
    verdict = next(v for v in verdicts(machine) if v.engine == name)
    return {
        **msgspec.to_builtins(manifest),
        "active": name in active,
        "compat": compat_word(verdict),
        "score": verdict.score,
        "devices-found": verdict.devices,
        "reasons": verdict.reasons,
    }


def use_engines(config: Config, machine: Machine, names: list[str]) -> str:
    """Check the named engines against the machine and persist the choice; the value stored."""
    value = ",".join(names) if names else AUTO
    select(machine, parse_choice(value))  # raises EngineChoiceError, before anything is written
    config.set_many({"engines": value})
    return value


def detect(root: str) -> Machine:
    """The machine at `root`; on the live machine, free disk is that of the data folder (where models live)."""
    return hwdetect.detect(root, models_dir=str(paths.data_dir()) if root == "/" else "/")
