"""CPU topology: which logical CPUs are distinct physical cores."""

from __future__ import annotations

import os
from pathlib import Path


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def physical_core_cpus(root: str = "/", allowed: set[int] | None = None) -> list[int]:
    """One logical CPU per physical core (the first hyperthread of each), among those allowed.

    `allowed` defaults to this process's affinity when reading the live machine.
    Unknown topology falls back to every allowed CPU.
    """
    if allowed is None:
        allowed = set(os.sched_getaffinity(0)) if root == "/" and hasattr(os, "sched_getaffinity") else None
    cpu_dir = Path(root) / "sys/devices/system/cpu"
    seen: dict[tuple[str, str], int] = {}
    for entry in sorted(cpu_dir.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        cpu = int(entry.name[3:])
        if allowed is not None and cpu not in allowed:
            continue
        package = _read(entry / "topology/physical_package_id")
        core = _read(entry / "topology/core_id")
        if package is None or core is None:
            seen[("?", str(cpu))] = cpu
        else:
            seen.setdefault((package, core), cpu)
    cores = sorted(seen.values())
    if not cores:
        cores = sorted(allowed) if allowed else list(range(os.cpu_count() or 1))
    return cores
