"""What one vendor tool or kernel interface tells about a GPU, keyed by its PCI slot."""

from __future__ import annotations

import msgspec


class GpuInfo(msgspec.Struct):
    name: str | None = None
    vram_bytes: int | None = None
    compute_capability: str | None = None  # NVIDIA
    architecture: str | None = None  # AMD gfx target, e.g. "gfx1032"


def normalize_slot(text: str) -> str | None:
    """ "00000000:01:00.0" (nvidia-smi), "0000:03:00.0" or "03:00.0" -> "0000:03:00.0" as sysfs names it."""
    parts = text.strip().lower().split(":")
    if len(parts) == 2:
        parts.insert(0, "0")
    try:
        domain, bus, devfn = parts
        device, function = devfn.split(".")
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16):x}"
    except ValueError:
        return None


def parse_mib(text: str | None) -> int | None:
    """ "11264 MiB" (nvidia-smi) -> bytes."""
    if not text:
        return None
    parts = text.split()
    try:
        value = float(parts[0])
    except (ValueError, IndexError):
        return None
    unit = parts[1].lower() if len(parts) > 1 else "mib"
    scale = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30}.get(unit)
    return int(value * scale) if scale else None
