"""RAM and swap, from /proc/meminfo."""

from __future__ import annotations

from pathlib import Path

import msgspec

from infersnap.hwdetect._files import read_text

UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


class Memory(msgspec.Struct):
    total_bytes: int | None
    available_bytes: int | None
    swap_bytes: int | None


def _meminfo(root: Path) -> dict[str, int]:
    """meminfo in bytes. The kernel writes "kB"; some recorded machines hold plain byte counts with no unit."""
    found: dict[str, int] = {}
    for line in (read_text(root / "proc/meminfo") or "").splitlines():
        key, sep, value = line.partition(":")
        parts = value.split()
        if not sep or not parts or len(parts) > 2 or (len(parts) == 2 and parts[1].lower() not in UNITS):
            continue
        try:
            found[key.strip()] = int(parts[0]) * UNITS[parts[1].lower() if len(parts) == 2 else ""]
        except ValueError:
            continue
    return found


def detect_memory(root: str = "/") -> Memory:
    info = _meminfo(Path(root))
    return Memory(
        total_bytes=info.get("MemTotal"),
        available_bytes=info.get("MemAvailable"),
        swap_bytes=info.get("SwapTotal"),
    )
