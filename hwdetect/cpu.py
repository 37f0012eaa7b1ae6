"""The CPU: architecture, vendor, flags and topology, from /proc/cpuinfo and /sys/devices/system."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from infersnap.hwdetect._files import is_live, read_text, subdirs

# kernel names (uname -m, /proc/sys/kernel/arch) to the Debian/snap names that manifests use
ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "riscv64": "riscv64",
    "i386": "i386",
    "i686": "i386",
    "armv7l": "armhf",
    "armv8l": "armhf",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
}


class Cpu(msgspec.Struct):
    architecture: str | None  # "amd64" | "arm64" | "riscv64" | ...
    vendor: str | None  # "GenuineIntel", "AuthenticAMD", arm implementer "0x41", ...
    model_name: str | None
    flags: list[str]  # those every logical CPU has: x86 flags, arm Features, riscv ISA parts
    logical_cpus: int | None
    physical_cores: int | None
    threads_per_core: int | None  # the most logical CPUs on one core (hybrid CPUs mix 2 and 1)
    numa_nodes: int | None
    usable_cpus: list[int] | None  # live machine only: this process's affinity
    cpu_quota: float | None  # live machine only: cgroup v2 quota in CPUs; None = no quota
    part_number: str | None = None  # arm "CPU part", e.g. "0xd0b"


def _cpu_blocks(root: Path) -> list[dict[str, str]]:
    """One dict per "processor" stanza of /proc/cpuinfo (trailing board stanzas on arm are skipped)."""
    text = read_text(root / "proc/cpuinfo") or ""
    blocks = []
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" in fields:
            blocks.append(fields)
    return blocks


def _first(blocks: list[dict[str, str]], *keys: str) -> str | None:
    # not every stanza carries every key (a Raspberry Pi 5's last CPU lacks "CPU implementer")
    for key in keys:
        for block in blocks:
            if block.get(key):
                return block[key]
    return None


def _architecture(root: Path, blocks: list[dict[str, str]]) -> str | None:
    kernel = read_text(root / "proc/sys/kernel/arch")
    if kernel:
        return ARCHITECTURES.get(kernel, kernel)
    # no arch file: guess from what cpuinfo looks like
    if _first(blocks, "vendor_id"):
        return "amd64" if "lm" in (_first(blocks, "flags") or "").split() else "i386"
    if _first(blocks, "CPU implementer") and _first(blocks, "CPU architecture") == "8":
        return "arm64"
    isa = _first(blocks, "isa") or ""
    return "riscv64" if isa.startswith("rv64") else None


def _flag_list(block: dict[str, str]) -> list[str] | None:
    if "flags" in block:
        return block["flags"].split()
    if "Features" in block:
        return block["Features"].split()
    if "isa" in block:  # "rv64imafdcv_zicbom_..." -> base ISA, then one entry per extension
        return [part for part in block["isa"].split("_") if part]
    return None


def _common_flags(blocks: list[dict[str, str]]) -> list[str]:
    """Flags every CPU has, in the first CPU's order: a worker may be scheduled on any of them,
    and hybrid Intel CPUs differ (only some cores list intel_ppin)."""
    lists = [f for f in map(_flag_list, blocks) if f is not None]
    if not lists:
        return []
    common = set(lists[0]).intersection(*map(set, lists[1:]))
    return [flag for flag in dict.fromkeys(lists[0]) if flag in common]


def _sysfs_cores(root: Path) -> dict[tuple[str, str], list[int]]:
    """(package, core) -> logical CPUs, from /sys/devices/system/cpu/cpuN/topology."""
    cores: dict[tuple[str, str], list[int]] = {}
    for entry in subdirs(root / "sys/devices/system/cpu", "cpu[0-9]*"):
        if not entry.name[3:].isdigit():
            continue
        package = read_text(entry / "topology/physical_package_id")
        core = read_text(entry / "topology/core_id")
        if package is not None and core is not None:
            cores.setdefault((package, core), []).append(int(entry.name[3:]))
    return cores


def _cpuinfo_cores(blocks: list[dict[str, str]]) -> dict[tuple[str, str], list[int]]:
    """(physical id, core id) -> logical CPUs; empty unless every stanza has both (x86 does, arm/riscv don't)."""
    if not blocks or not all("physical id" in b and "core id" in b for b in blocks):
        return {}
    cores: dict[tuple[str, str], list[int]] = {}
    for index, block in enumerate(blocks):
        cores.setdefault((block["physical id"], block["core id"]), []).append(index)
    return cores


def _numa_nodes(root: Path) -> int | None:
    nodes = [p for p in subdirs(root / "sys/devices/system/node", "node[0-9]*") if p.name[4:].isdigit()]
    return len(nodes) or None


def _own_cgroup(root: Path) -> Path:
    """This process's cgroup v2 folder ("0::/user.slice/..." in /proc/self/cgroup)."""
    base = root / "sys/fs/cgroup"
    for line in (read_text(root / "proc/self/cgroup") or "").splitlines():
        if line.startswith("0::"):
            return base / line[3:].lstrip("/")
    return base


def cgroup_cpu_quota(root: str = "/") -> float | None:
    """The tightest cgroup v2 CPU quota on this process's cgroup and its parents, in CPUs; None = no quota."""
    base = Path(root) / "sys/fs/cgroup"
    folder = _own_cgroup(Path(root))
    quotas = []
    while True:
        parts = (read_text(folder / "cpu.max") or "").split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quota, period = int(parts[0]), int(parts[1])
                if quota > 0 and period > 0:
                    quotas.append(quota / period)
            except ValueError:
                pass
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    return min(quotas) if quotas else None


def detect_cpu(root: str = "/") -> Cpu:
    path = Path(root)
    blocks = _cpu_blocks(path)
    cores = _cpuinfo_cores(blocks) or _sysfs_cores(path)
    logical = len(blocks) or len([p for p in subdirs(path / "sys/devices/system/cpu", "cpu[0-9]*")
                                  if p.name[3:].isdigit()]) or None
    live = is_live(root)
    usable = sorted(os.sched_getaffinity(0)) if live and hasattr(os, "sched_getaffinity") else None
    return Cpu(
        architecture=_architecture(path, blocks),
        vendor=_first(blocks, "vendor_id", "CPU implementer"),
        model_name=_first(blocks, "model name"),
        flags=_common_flags(blocks),
        logical_cpus=logical,
        physical_cores=len(cores) or None,
        threads_per_core=max(map(len, cores.values())) if cores else None,
        numa_nodes=_numa_nodes(path),
        usable_cpus=usable,
        cpu_quota=cgroup_cpu_quota(root) if live else None,
        part_number=_first(blocks, "CPU part"),
    )


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
        package = read_text(entry / "topology/physical_package_id")
        core = read_text(entry / "topology/core_id")
        if package is None or core is None:
            seen[("?", str(cpu))] = cpu
        else:
            seen.setdefault((package, core), cpu)
    cores = sorted(seen.values())
    if not cores:
        cores = sorted(allowed) if allowed else list(range(os.cpu_count() or 1))
    return cores
