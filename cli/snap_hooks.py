"""The snap's hooks: `install` picks the engines, `configure` applies `snap set` values.

`snap set infersnap KEY=VALUE` and `infersnap set KEY=VALUE` take the same keys: infersnap's
keys are already what snapd allows (lowercase letters, digits and dashes, dotted for nesting),
so `http.port` is `http.port` in both, and a per-model key's slug is made to fit too
(`model-settings.smollm2-135m-instruct-q4-1.context`). config.json in the data folder
($SNAP_DATA) is what the server reads; the snap's config is a view of it:

- configure applies what changed in the snap's config since the hooks last saw it (set or
  unset) through `Config.set_many` / `Config.unset`, the code behind `infersnap set` and
  `infersnap unset`: a bad value fails the hook, so `snap set` fails with the same message and
  nothing changes;
- then it copies config.json back into the snap's config (`mirror`), so a key changed with
  `infersnap set` meanwhile shows in `snap get` too.

What the hooks last left in the snap's config is kept in snap-config.json beside config.json:
snapctl only shows the new values, and without the old ones a key that `snap set` did not touch
could not be told from one it changed.

Run as `python3 -m infersnap.cli.snap_hooks install|configure` (snap/hooks/*).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from infersnap import paths
from infersnap.cli import engines as engine_views
from infersnap.config import KEYS, NAMESPACES, Config, ConfigError, known, lookup, parse_value
from infersnap.engines import select

RECORD_NAME = "snap-config.json"
FALLBACK_ENGINES = "cpu"


class SnapctlError(RuntimeError):
    """snapctl failed (or is not there: not inside a snap)."""


def snapctl(*args: str) -> str:
    """Run snapctl and return what it printed; the one place that runs it (tests put a fake on PATH)."""
    try:
        done = subprocess.run(["snapctl", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SnapctlError(f"snapctl {args[0]}: {exc}") from None
    if done.returncode != 0:
        raise SnapctlError(f"snapctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """{"http": {"port": 9090}} -> {"http.port": 9090}; null values count as unset."""
    if not isinstance(document, dict):
        return {} if document is None else {prefix: document}
    flat: dict[str, Any] = {}
    for name, value in document.items():
        flat.update(flatten(value, f"{prefix}.{name}" if prefix else name))
    return flat


def snap_values() -> dict[str, Any]:
    """The snap's config under infersnap's key groups, flattened to dotted names.

    snapctl cannot list every key, so keys outside the groups (e.g. `snap set infersnap foo=1`)
    are not seen; unknown keys inside them (`http.prot`) are, and are refused."""
    groups = sorted({name.split(".")[0] for name in KEYS} | set(NAMESPACES))
    text = snapctl("get", "-d", *groups).strip()
    return flatten(json.loads(text) if text else {})


def as_text(value: Any) -> str:
    """A snap config value (JSON) as the text `infersnap set` would be given."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, (str, int, float, bool)) for item in value):
        return ",".join(as_text(item) for item in value)  # ["a", "b"] for a comma-separated key
    return json.dumps(value)


def _same(name: str, snap_value: Any, stored: Any) -> bool:
    try:
        return parse_value(lookup(name), as_text(snap_value)) == stored
    except ConfigError:
        return False


def _record_file() -> Path:
    return paths.data_dir() / RECORD_NAME


def read_record() -> dict[str, Any]:
    """What the hooks last left in the snap's config; {} when unknown (every key then counts as new)."""
    try:
        record = json.loads(_record_file().read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(values: dict[str, Any]) -> None:
    path = _record_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def mirror(config: Config, current: dict[str, Any]) -> dict[str, Any]:
    """Make the snap's config show the keys config.json holds; returns the snap's config after."""
    sets = {
        name: value
        for name, value in config.user.items()
        if known(name) and not (name in current and _same(name, current[name], value))
    }
    unsets = sorted(name for name in current if name not in config.user)
    if sets:
        snapctl("set", "-t", *(f"{name}={json.dumps(value)}" for name, value in sorted(sets.items())))
    if unsets:
        snapctl("unset", *unsets)
    after = {name: value for name, value in current.items() if name not in unsets}
    after.update(sets)
    return after


def sync_to_snap() -> None:
    """Copy config.json into the snap's config now (for `infersnap set` run as root inside the snap)."""
    config = Config()
    if config.problem is None:
        _write_record(mirror(config, snap_values()))


def configure() -> list[str]:
    """Apply what `snap set` / `snap unset` changed; raise ConfigError (nothing changed) on a bad value.

    Returns warnings worth printing."""
    config = Config()
    current = snap_values()
    record = read_record()
    changed = {name: as_text(value) for name, value in current.items() if name not in record or record[name] != value}
    removed = [name for name in record if name not in current]
    if changed:
        config.set_many(changed)  # checks every value before writing any: a bad one changes nothing
    if removed:
        config.unset(removed)
    if config.problem:
        # Nothing asked to change it (e.g. a refresh): don't fail the hook over it, and don't copy
        # a damaged file into the snap's config.
        return [f"{config.problem}; to fix: {config.remedy}"]
    _write_record(mirror(config, current))
    return []


def install(root: str = "/") -> str:
    """Pick the engines for this machine as `infersnap use-engine --auto` does; the value stored.

    At install time hardware-observe may not be connected yet: if the machine cannot be read,
    store `cpu`, which runs anywhere."""
    config = Config()
    try:
        machine = engine_views.detect(root)
        observed = machine.cpu.architecture is not None
    except Exception as exc:  # noqa: BLE001 - whatever detection hit, the install must not fail over it
        print(f"infersnap: cannot read this machine's hardware ({exc})", file=sys.stderr)
        observed = False
    if observed:
        value = engine_views.use_engines(config, machine, [])
        chosen = ", ".join(f"{a.engine} on {a.device}" for a in select(machine))
        print(f"infersnap: engines: {value} ({chosen or 'none found'})")
    else:
        value = FALLBACK_ENGINES
        config.set_many({"engines": value})
        print(
            f"infersnap: engines: {value} (hardware not observable; connect hardware-observe, then run "
            "`sudo infersnap use-engine --auto`)",
            file=sys.stderr,
        )
    _write_record(mirror(config, snap_values()))
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m infersnap.cli.snap_hooks", description=__doc__.splitlines()[0])
    hooks = parser.add_subparsers(dest="hook", required=True)
    hooks.add_parser("configure", help="apply `snap set` values (the configure hook)")
    install_hook = hooks.add_parser("install", help="pick the engines (the install hook)")
    install_hook.add_argument("--root", default="/", help="read the machine from this folder instead")
    args = parser.parse_args(argv)
    try:
        if args.hook == "install":
            install(args.root)
        else:
            for warning in configure():
                print(f"infersnap: warning: {warning}", file=sys.stderr)
    except ConfigError as exc:
        print(f"infersnap: {exc} (nothing was changed)", file=sys.stderr)
        return 1
    except SnapctlError as exc:
        print(f"infersnap: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
