"""Free and total disk space where models live."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from infersnap.hwdetect._files import is_live, read_json

# lscompute records this mount on every machine (snaps, hence infersnap's models, live under it)
SNAPS = "/var/lib/snapd/snaps"


class Disk(msgspec.Struct):
    path: str  # the folder measured (on a recorded machine: the recorded mount point used)
    total_bytes: int | None
    free_bytes: int | None  # space an unprivileged process may use (statvfs f_bavail)


def _statvfs(models_dir: str) -> Disk:
    # the data folder may not exist yet: measure the nearest existing parent, same filesystem
    path = Path(os.path.abspath(models_dir))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return Disk(models_dir, None, None)
    return Disk(models_dir, stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize)


def _recorded(root: str, models_dir: str) -> Disk:
    """From run/disk-stats.json ({"/": {"total", "avail"}, ...}): the mount point holding models_dir,
    else the snaps mount, else unknown."""
    stats = read_json(Path(root) / "run/disk-stats.json")
    if not isinstance(stats, dict):
        return Disk(models_dir, None, None)
    target = os.path.normpath(os.path.join("/", models_dir))
    mounts = [m for m in stats if isinstance(m, str) and (target == m or target.startswith(m.rstrip("/") + "/"))]
    mount = max(mounts, key=len) if mounts else (SNAPS if SNAPS in stats else None)
    entry = stats.get(mount) if mount else None
    if not isinstance(entry, dict):
        return Disk(models_dir, None, None)
    total, avail = entry.get("total"), entry.get("avail")
    return Disk(mount, total if isinstance(total, int) else None, avail if isinstance(avail, int) else None)


def detect_disk(root: str = "/", models_dir: str = "/") -> Disk:
    return _statvfs(models_dir) if is_live(root) else _recorded(root, models_dir)
