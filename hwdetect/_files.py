"""Reading files under a machine root: every missing or unreadable file is None, never an exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except (OSError, ValueError):
        return None


def read_int(path: Path, base: int = 10) -> int | None:
    """An integer file; base 16 accepts sysfs's "0x8086" form."""
    return parse_int(read_text(path), base)


def parse_int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), base)
    except ValueError:
        return None


def read_json(path: Path) -> Any:
    text = read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def read_properties(path: Path) -> dict[str, int]:
    """A kfd-style properties file: one "key value" pair per line, integer values."""
    found: dict[str, int] = {}
    for line in (read_text(path) or "").splitlines():
        key, _, value = line.partition(" ")
        number = parse_int(value)
        if key and number is not None:
            found[key] = number
    return found


def subdirs(path: Path, pattern: str = "*") -> list[Path]:
    """Entries matching pattern (links to folders included, as under /sys), sorted by name."""
    try:
        return sorted((p for p in path.glob(pattern) if p.is_dir()), key=lambda p: p.name)
    except OSError:
        return []


def is_live(root: str) -> bool:
    """Whether root is this running machine (and not a recorded copy): only then may we ask the kernel or run tools."""
    return root == "/"
