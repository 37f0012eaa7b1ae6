"""Matching an engine's manifest against a detected machine: compatible or not, why, and how well.

The score ranks compatible engines: accelerators above the CPU, and among
engines for the same device the more specific one (more requirements met,
e.g. AVX-512 over AVX2 over any CPU) above the more general one.
"""

from __future__ import annotations

import msgspec

from infersnap import runtimes
from infersnap.engines.manifest import DeviceRequirement, Manifest, parse_size
from infersnap.hwdetect import Accelerator, Machine

DEVICE_WEIGHT = {"gpu": 300, "npu": 200, "cpu": 100}
LIVE_ROOT = "/"


class Verdict(msgspec.Struct):
    engine: str
    compatible: bool
    experimental: bool
    score: int
    devices: list[str]  # the device strings its workers would run on
    reasons: list[str]  # what was checked, in words; the failures when incompatible


def _hex(text: str) -> int:
    return int(text, 16)


def _cpu_meets(req: DeviceRequirement, machine: Machine) -> tuple[bool, str, int]:
    cpu = machine.cpu
    if req.architecture and cpu.architecture != req.architecture:
        return False, f"needs a {req.architecture} CPU, this one is {cpu.architecture or 'unknown'}", 0
    if req.manufacturer_id and cpu.vendor != req.manufacturer_id:
        return False, f"needs a {req.manufacturer_id} CPU, this one is {cpu.vendor or 'unknown'}", 0
    missing = [flag for flag in req.flags if flag not in cpu.flags]
    if missing:
        return False, f"the CPU lacks {', '.join(missing)}", 0
    met = [f"{cpu.architecture or 'any'} CPU"] + ([f"flags {' '.join(req.flags)}"] if req.flags else [])
    specificity = 10 * bool(req.architecture) + 10 * bool(req.manufacturer_id) + 2 * len(req.flags)
    return True, "; ".join(met), specificity


def _accelerator_meets(req: DeviceRequirement, device: Accelerator) -> str | None:
    """Why this accelerator does not meet the requirement, or None when it does."""
    if device.kind != req.type:
        return f"{device.slot} is a {device.kind}, not a {req.type}"
    if req.vendor_id and device.vendor_id != _hex(req.vendor_id):
        return f"{device.slot} is not from vendor {req.vendor_id}"
    if req.device_ids and device.device_id not in {_hex(d) for d in req.device_ids}:
        return f"{device.slot} ({device.device_id:#06x}) is not a listed device"
    if req.min_vram and device.vram_bytes is not None and device.vram_bytes < parse_size(req.min_vram):
        return f"{device.slot} has {device.vram_bytes // 2**20} MiB of VRAM, needs {req.min_vram}"
    return None


def _requirement(req: DeviceRequirement, machine: Machine) -> tuple[bool, str, int, list[str]]:
    """(met, words, specificity, device strings) for one device requirement."""
    if req.type == "cpu":
        met, words, specificity = _cpu_meets(req, machine)
        return met, words, specificity, ["cpu"] if met else []
    matches = [a for a in machine.accelerators if _accelerator_meets(req, a) is None]
    wanted = f"{req.type}" + (f" from vendor {req.vendor_id}" if req.vendor_id else "")
    if not matches:
        return False, f"no {wanted} found", 0, []
    names = ", ".join(f"{a.device} ({a.name or a.slot})" for a in matches)
    specificity = 10 * bool(req.vendor_id) + 10 * bool(req.device_ids) + 5 * bool(req.min_vram)
    return True, f"{wanted}: {names}", specificity, [a.device for a in matches]


def _runtime_problems(manifest: Manifest, machine: Machine, devices: list[str]) -> list[str]:
    """What the installed software lacks to run this engine; asked of the live machine only."""
    if machine.root != LIVE_ROOT:
        return []  # a recorded machine is judged on its hardware alone
    return runtimes.problems(manifest, machine, devices)


def evaluate(manifest: Manifest, machine: Machine) -> Verdict:
    reasons: list[str] = []
    failures: list[str] = []
    score = DEVICE_WEIGHT[manifest.device]
    devices: list[str] = []
    for req in manifest.devices.allof:
        met, words, specificity, found = _requirement(req, machine)
        (reasons if met else failures).append(words)
        score += specificity
        devices += [d for d in found if req.type == manifest.device]
    if manifest.devices.anyof:
        results = [_requirement(req, machine) for req in manifest.devices.anyof]
        met_any = [r for r in results if r[0]]
        if met_any:
            reasons += [r[1] for r in met_any]
            score += max(r[2] for r in met_any)
            devices += [d for r in met_any for d in r[3]]
        else:
            failures.append(" or ".join(r[1] for r in results))
    if manifest.memory and machine.memory.total_bytes is not None:
        if machine.memory.total_bytes < parse_size(manifest.memory):
            failures.append(f"needs {manifest.memory} of RAM, the machine has {machine.memory.total_bytes // 2**20} MiB")
    if manifest.disk and machine.disk.free_bytes is not None:
        if machine.disk.free_bytes < parse_size(manifest.disk):
            failures.append(f"needs {manifest.disk} of free disk")
    devices = list(dict.fromkeys(devices))
    if not failures:
        failures = _runtime_problems(manifest, machine, devices)
    compatible = not failures
    return Verdict(
        engine=manifest.name,
        compatible=compatible,
        experimental=manifest.experimental,
        score=score if compatible else 0,
        devices=devices if compatible else [],
        reasons=reasons if compatible else failures,
    )
