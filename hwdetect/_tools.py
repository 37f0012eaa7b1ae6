"""Running a vendor tool on the live machine: absent, slow or failing tools mean "unknown"."""

from __future__ import annotations

import shutil
import subprocess

TIMEOUT_S = 5.0


def run_tool(*argv: str, timeout: float = TIMEOUT_S) -> str | None:
    """The tool's stdout, or None when it is not installed, fails or hangs (a wedged GPU driver can)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None
