"""Who may use the HTTP API: the API keys and CORS origins `serve` puts into its plan."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


class KeysFileError(Exception):
    """The configured API keys file cannot be read."""


def split_list(value: str) -> list[str]:
    """A comma-separated setting's items, stripped, empty ones dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def read_keys_file(name: str) -> list[str]:
    """The keys in `name`: one a line; blank lines and `#` comments (at the start of a line
    or after a space) are skipped, so a key may itself contain `#`."""
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise KeysFileError(f"cannot read the API keys file {path} (http.api-keys-file): {reason}") from None
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def api_keys(keys: str, keys_file: str) -> list[str]:
    """The keys from `http.api-keys` and `http.api-keys-file`, each once, in order."""
    found = split_list(keys) + (read_keys_file(keys_file) if keys_file.strip() else [])
    return list(dict.fromkeys(found))


def cors_origins(value: str) -> list[str]:
    """Origins as browsers send them: no trailing slash, lower case (scheme and host are case-blind)."""
    return [origin.rstrip("/").lower() for origin in split_list(value)]


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_network_warning(host: str, port: int, keys: list[str]) -> str | None:
    """A warning when the API listens beyond this machine and anyone reaching it may use it."""
    if keys or is_loopback(host):
        return None
    return (
        f"serving on {host} to the network with no API key; anyone who can reach port {port} can use it. "
        "Set one with `infersnap set http.api-keys=...`"
    )
