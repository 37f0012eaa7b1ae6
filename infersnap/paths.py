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


def runtime_base() -> Path:
    """Where runtime folders go: $XDG_RUNTIME_DIR, else the temp dir; absolute, whatever the cwd."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()).absolute()


def runtime_dir(create: bool = False) -> Path:
    """The folder that holds the ipc:// sockets, mode 0700.

    Unix socket paths are limited to about 100 bytes, so the folder lives in
    $XDG_RUNTIME_DIR (or the temp dir) under a short name derived from the
    data folder: every data folder gets its own server and sockets.
    """
    base = runtime_base()
    digest = hashlib.sha1(str(data_dir()).encode()).hexdigest()[:12]
    path = base / f"infersnap-{os.getuid()}-{digest}"
    if create:
        _make_private(path)
    return path


def _make_private(path: Path) -> None:
    """Create `path` as a folder of mode 0700, or take the one there if it is this user's own folder.

    The temp dir is shared by every user, so what is already at `path` may be another
    user's plant: a symlink is never followed (root following one would chmod and fill
    the folder it points to) and a folder of another user is refused. The checks and the
    chmod go through one file descriptor, so nothing can be swapped in between them.
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: some other file
        raise PermissionError(f"{path} is not a folder (a symlink or another file); remove it ({exc.strerror})") from None
    try:
        if os.fstat(fd).st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to another user; remove it")
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def socket_file(name: str) -> Path:
    """The file of one of the broker's sockets ("clients" or "workers")."""
    return runtime_dir() / f"{name}.sock"


def socket_address(name: str) -> str:
    return f"ipc://{socket_file(name)}"
