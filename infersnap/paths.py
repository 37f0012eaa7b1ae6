"""Where infersnap keeps its state: the data folder and the private runtime folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def data_dir() -> Path:
    """The data folder: $INFERSNAP_DATA, else $SNAP_DATA inside a snap, else ~/.local/share/infersnap."""
    for var in ("INFERSNAP_DATA", "SNAP_DATA"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser().absolute()
    return Path.home() / ".local" / "share" / "infersnap"


def config_file() -> Path:
    return data_dir() / "config.json"


def runtime_dir(create: bool = False) -> Path:
    """The folder that holds the ipc:// sockets, mode 0700.

    Unix socket paths are limited to about 100 bytes, so the folder lives in
    $XDG_RUNTIME_DIR (or the temp dir) under a short name derived from the
    data folder: every data folder gets its own server and sockets.
    """
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    digest = hashlib.sha1(str(data_dir()).encode()).hexdigest()[:12]
    path = base / f"infersnap-{os.getuid()}-{digest}"
    if create:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.stat()
        if info.st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to another user")
        os.chmod(path, 0o700)
    return path


def socket_file(name: str) -> Path:
    """The file of one of the broker's sockets ("clients" or "workers")."""
    return runtime_dir() / f"{name}.sock"


def socket_address(name: str) -> str:
    return f"ipc://{socket_file(name)}"
