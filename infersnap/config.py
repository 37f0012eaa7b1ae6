"""The user's configuration: known keys, their types and bounds, and the file they persist in.

Only keys the user set are stored (config.json in the data folder); every
other key reads as its default. `set` validates every value before it writes
anything, and writes atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from infersnap import paths
from infersnap.engines import EngineChoiceError, parse_choice, parse_embedding_choice


class ConfigError(ValueError):
    """A key or value the user gave is not acceptable, or the file is unreadable."""


@dataclass(frozen=True)
class Key:
    name: str
    kind: type
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda value: None


def _between(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: int) -> str | None:
        if not low <= value <= high:
            return f"must be between {low} and {high}"
        return None

    return check


def _zero_or(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def zero_or(value: int) -> str | None:
        problem = None if value == 0 else check(value)
        return f"{problem} (or 0)" if problem else None

    return zero_or


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _absolute_folders(value: str) -> str | None:
    # absolute: the server runs in another folder than the shell that set the key
    relative = [f for f in (part.strip() for part in value.split(",")) if f and not Path(f).expanduser().is_absolute()]
    return f"each folder must be an absolute path (not {', '.join(relative)})" if relative else None


def _engine_names(value: str) -> str | None:
    try:
        parse_choice(value)
    except EngineChoiceError as exc:
        return str(exc)
    return None


def _embedding_engine_name(value: str) -> str | None:
    try:
        parse_embedding_choice(value)
    except EngineChoiceError as exc:
        return str(exc)
    return None


KEYS: dict[str, Key] = {
    key.name: key
    for key in (
        Key("http.host", str, "127.0.0.1", "address the HTTP API listens on (0.0.0.0 for the LAN)", _non_empty),
        Key("http.port", int, 8328, "TCP port of the HTTP API", _between(1, 65535)),
        Key("http.max-body-bytes", int, 8 * 1024 * 1024, "largest request body accepted", _between(1024, 1 << 30)),
        Key("http.api-keys", str, "", "API keys clients must send as `Authorization: Bearer KEY`, comma-separated; empty: none needed"),
        Key("http.api-keys-file", str, "", "file with more API keys, one per line (# starts a comment)"),
        Key("http.send-timeout", int, 30, "seconds a client may leave a streamed answer unread before it is dropped and its generation stopped", _between(1, 3600)),
        Key("http.cors-origins", str, "", "browser origins allowed to call the API, comma-separated, * for any; empty: none"),
        Key("webui.enabled", bool, True, "serve the web chat at / (on the API's port); the API itself is unaffected"),
        Key("limits.max-tokens", int, 32768, "largest max_tokens a request may ask for", _between(1, 1 << 24)),
        Key("limits.max-n", int, 8, "most choices a request may ask for (n, times the prompts of a list)", _between(1, 128)),
        Key("model.path", str, "", "a GGUF file to serve, first in the catalog and the default unless model.default says otherwise; empty: none"),
        Key("model.name", str, "", "model id clients use; empty means the file name without .gguf"),
        Key("model.default", str, "", "id of the model served when a request names none (see `infersnap models`); empty: the model.path model if set, else the packaged default"),
        Key("models.dirs", str, "", "more folders to find GGUF files in, comma-separated", _absolute_folders),
        Key("models.keep-alive", int, 300, "seconds a model stays loaded after its last request; 0: unloaded after each request, -1: never unloaded", _between(-1, 30 * 86_400)),
        Key("models.max-loaded", int, 3, "most models loaded at once on each device", _between(1, 64)),
        Key("models.memory-budget", int, 0, "MiB the loaded models' weights and KV caches may take on each device; 0: 80% of its memory available at start", _between(0, 1 << 30)),
        Key("engines", str, "auto", "engines that serve, comma-separated (see `infersnap engines`); auto: the best per device", _engine_names),
        Key("engines-measure", bool, True, "measure each engine's speed on this machine (once) and choose by it; false: by the static score"),
        Key("worker.slots", int, 8, "sequences a worker generates at once (continuous batching)", _between(1, 256)),
        Key("worker.context", int, 0, "context length in tokens of each sequence (capped at the model's); 0: the model's own, as memory allows", _zero_or(_between(128, 1 << 20))),
        Key("worker.embeddings", bool, True, "run an embedding worker (the model in embedding mode, on the CPU) for /v1/embeddings"),
        Key("worker.embedding-engine", str, "auto", "engine of the embedding worker (see `infersnap engines`); auto: the best llama.cpp engine for the CPU", _embedding_engine_name),
        Key("worker.embedding-slots", int, 1, "embeddings requests the embedding worker runs at once (their inputs share each batch)", _between(1, 256)),
        Key("worker.threads", int, 0, "CPU threads of the CPU worker; 0 means one per physical core", _between(0, 1024)),
        Key("queue.max-waiting", int, 64, "requests that may wait per worker beyond its slots; more get 503", _between(0, 100_000)),
        Key("queue.request-timeout", int, 600, "seconds a request may take, waiting included, before it is stopped with 504; 0: no limit", _between(0, 86_400)),
        Key("queue.drain-timeout", int, 30, "seconds running requests may take to finish after SIGTERM before they are stopped", _between(0, 3600)),
        Key("queue.drain-linger", int, 2, "seconds the port stays open after SIGTERM, answering 503, so a router's health checks move clients away first (docs/cluster.md)", _between(0, 600)),
        Key("verbose", bool, False, "log more"),
    )
}


# Per-model keys, `model-settings.<slug>.<setting>`: each setting mirrors a global key (same type,
# default and check) for one model. The namespace holds nothing else, so no slug can collide with a
# key's own name; any slug of the right form is accepted, since the model may be added later.
PER_MODEL = "model-settings"
SLUG_FORM = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")  # what catalog.slug makes, and a snap option name allows
MODEL_SETTINGS: dict[str, Key] = {
    "context": KEYS["worker.context"],
    "slots": KEYS["worker.slots"],
    "engines": KEYS["engines"],
    "keep-alive": KEYS["models.keep-alive"],
    "chat-template": Key("chat-template", str, "", "a file holding a Jinja chat template, used instead of the GGUF's; empty: the GGUF's"),
}
PER_MODEL_FORM = (
    f"{PER_MODEL}.<slug>.<setting>, where <slug> is the model's id in lowercase letters, digits and single dashes, "
    f"starting with a letter (`infersnap models` shows it) and <setting> one of {', '.join(MODEL_SETTINGS)}"
)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


# Per-engine keys, `engine-settings.<engine>.<setting>`: runtime settings the probe otherwise finds
# (infersnap/probes.py); one set by hand is the only one tried (llama-server's --no-repack, --no-mmap).
PER_ENGINE = "engine-settings"
ENGINE_SETTINGS: dict[str, Key] = {
    "repack": Key("repack", str, "auto", "llama.cpp: repack weights for the CPU's own kernels (AMX, ...); auto: as the probe finds", _one_of(("auto", "on", "off"))),
    "mmap": Key("mmap", str, "auto", "llama.cpp: map the weights from the file; auto: as the probe finds", _one_of(("auto", "on", "off"))),
    "precision": Key("precision", str, "auto", "OpenVINO: inference precision; auto: the plugin's, else f32 where that crashes", _one_of(("auto", "f32", "bf16", "f16"))),
}
PER_ENGINE_FORM = f"{PER_ENGINE}.<engine>.<setting>, where <engine> is one of `infersnap engines` and <setting> one of {', '.join(ENGINE_SETTINGS)}"
NAMESPACES = (PER_MODEL, PER_ENGINE)  # groups of keys named after a model or an engine


def engine_settings(config: "Config", engine: str) -> dict[str, str]:
    """The `engine-settings.<engine>.*` values a user set, by setting."""
    return {setting: config.get(f"{PER_ENGINE}.{engine}.{setting}") for setting in ENGINE_SETTINGS
            if f"{PER_ENGINE}.{engine}.{setting}" in config.user}


def parse_value(key: Key, text: str) -> Any:
    """Turn the text a user typed into the key's type, or raise ConfigError naming the problem."""
    if key.kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "on", "1"):
            value: Any = True
        elif lowered in ("false", "no", "off", "0"):
            value = False
        else:
            raise ConfigError(f"{key.name}: expected true or false, got {text!r}")
    elif key.kind is int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ConfigError(f"{key.name}: expected a whole number, got {text!r}") from None
    else:
        value = text
    problem = key.check(value)
    if problem:
        raise ConfigError(f"{key.name}: {problem}, got {text!r}")
    return value


def _per_model_key(name: str) -> Key:
    """The Key of `model-settings.<slug>.<setting>`, or ConfigError saying the form."""
    _, _, rest = name.partition(".")
    model, _, setting = rest.rpartition(".")
    if not SLUG_FORM.fullmatch(model) or setting not in MODEL_SETTINGS:
        raise ConfigError(f"unknown key {name!r}; per-model keys are {PER_MODEL_FORM}")
    return replace(MODEL_SETTINGS[setting], name=name)


def _per_engine_key(name: str) -> Key:
    """The Key of `engine-settings.<engine>.<setting>`, or ConfigError saying the form."""
    from infersnap.engines import manifests

    _, _, rest = name.partition(".")
    engine, _, setting = rest.rpartition(".")
    if engine not in manifests() or setting not in ENGINE_SETTINGS:
        raise ConfigError(f"unknown key {name!r}; per-engine keys are {PER_ENGINE_FORM}")
    return replace(ENGINE_SETTINGS[setting], name=name)


def lookup(name: str) -> Key:
    if name.startswith(PER_MODEL + "."):
        return _per_model_key(name)
    if name.startswith(PER_ENGINE + "."):
        return _per_engine_key(name)
    try:
        return KEYS[name]
    except KeyError:
        raise ConfigError(f"unknown key {name!r}; known keys: {', '.join(KEYS)}, {PER_MODEL_FORM}, "
                          f"and {PER_ENGINE_FORM}") from None


def known(name: str) -> bool:
    """Whether `name` is a key (a fixed one, or a per-model one of the right form)."""
    try:
        lookup(name)
    except ConfigError:
        return False
    return True


def stored_problem(key: Key, value: Any) -> str | None:
    """What is wrong with a value read from the file for `key`, or None if it is good."""
    if key.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"expected a whole number, got {value!r}"
    if key.kind is bool and not isinstance(value, bool):
        return f"expected true or false, got {value!r}"
    if key.kind is str and not isinstance(value, str):
        return f"expected a string, got {value!r}"
    problem = key.check(value)
    return f"{problem}, got {value!r}" if problem else None


class Config:
    """The keys a user set, on top of the defaults.

    A damaged file never stops the constructor: `problem` says what is wrong with
    it (the whole file when it cannot be read as a JSON object, or the keys holding
    bad values), and every key it cannot supply reads as its default. Whoever
    acts on the values decides: `check()` refuses, `set_many` and `unset` refuse to
    write over a file they could not read, or to leave bad values behind.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or paths.config_file()
        self.unreadable: str | None = None  # why the whole file could not be used
        self.bad_keys: dict[str, str] = {}  # known key -> what is wrong with its stored value
        self.user: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            self.unreadable = f"cannot be read ({exc})"
            return {}
        try:
            stored = json.loads(text)
        except ValueError as exc:
            self.unreadable = f"is not valid JSON ({exc})"
            return {}
        if not isinstance(stored, dict):
            self.unreadable = f"must hold a JSON object, not {type(stored).__name__}"
            return {}
        for name, value in stored.items():
            if known(name):
                problem = stored_problem(lookup(name), value)
                if problem:
                    self.bad_keys[name] = problem
        return stored

    @property
    def problem(self) -> str | None:
        """What is wrong with the file, naming it; None when it is good (or absent)."""
        if self.unreadable:
            return f"config file {self.path} {self.unreadable}"
        if self.bad_keys:
            shown = "; ".join(f"{name}: {problem}" for name, problem in self.bad_keys.items())
            return f"config file {self.path} holds bad values ({shown})"
        return None

    @property
    def remedy(self) -> str:
        if self.unreadable:
            return "fix or remove the file"
        return f"fix the file, or `infersnap set` or `infersnap unset` {' '.join(self.bad_keys)}"

    def check(self) -> None:
        """Raise ConfigError naming the file and what is wrong with it, if anything is."""
        if self.problem:
            raise ConfigError(f"{self.problem}; {self.remedy}")

    def get(self, name: str) -> Any:
        key = lookup(name)
        if name in self.bad_keys:
            return key.default
        return self.user.get(name, key.default)

    def values(self, prefix: str = "") -> dict[str, Any]:
        """Every known key whose name is `prefix` or starts with `prefix.`, with its value; of the
        per-model keys, those set (and `prefix` itself when it is one)."""

        def under(name: str) -> bool:
            return not prefix or name == prefix or name.startswith(prefix + ".")

        names = [n for n in KEYS if under(n)]
        names += sorted(n for n in self.user if n.split(".")[0] in NAMESPACES and under(n) and known(n))
        if prefix.split(".")[0] in NAMESPACES and prefix not in names and known(prefix):
            names.append(prefix)
        # a per-model or per-engine prefix (`model-settings`, `model-settings.<slug>`) with nothing set under it is still good
        group, _, rest = prefix.partition(".")
        named_prefix = group in NAMESPACES and (not rest or "." not in rest) and (
            not rest or (SLUG_FORM.fullmatch(rest) if group == PER_MODEL else known(f"{prefix}.repack")))
        if not names and not named_prefix:
            lookup(prefix)  # raises, saying what the keys are
        return {n: self.get(n) for n in names}

    def set_many(self, assignments: dict[str, str]) -> None:
        """Validate every KEY=VALUE first; write only if all are good."""
        parsed = {name: parse_value(lookup(name), text) for name, text in assignments.items()}
        self._refuse_to_write(fixed=set(parsed))
        self.user.update(parsed)
        self._write()
        for name in parsed:
            self.bad_keys.pop(name, None)

    def unset(self, names: list[str]) -> None:
        for name in names:
            lookup(name)
        self._refuse_to_write(fixed=set(names))
        for name in names:
            self.user.pop(name, None)
            self.bad_keys.pop(name, None)
        self._write()

    def _refuse_to_write(self, fixed: set[str]) -> None:
        """A file that could not be read is never written over: what the user had would be lost.
        Bad values must go in the same command (set or unset them), not stay behind."""
        if self.unreadable:
            raise ConfigError(f"{self.problem}; not writing over it: {self.remedy} first")
        left = [name for name in self.bad_keys if name not in fixed]
        if left:
            raise ConfigError(f"{self.problem}; set or unset {' '.join(left)} too, or fix the file")

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.user, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:  # e.g. a snap's $SNAP_DATA, which only root may write
            hint = " (try with sudo)" if isinstance(exc, PermissionError) else ""
            raise ConfigError(f"cannot write the config file {self.path}: {exc.strerror or exc}{hint}") from None


class ConfigView(Config):
    """A read-only Config whose get() answers some keys otherwise: one model's view of the config
    (catalog.model_config). The overridden keys count as set (`user`), as a user's would."""

    def __init__(self, base: Config, overrides: dict[str, Any]) -> None:
        for name in overrides:
            lookup(name)
        self.path, self.unreadable, self.bad_keys = base.path, base.unreadable, dict(base.bad_keys)
        self.overrides = dict(overrides)
        self.user = {**base.user, **self.overrides}

    def get(self, name: str) -> Any:
        return self.overrides[name] if name in self.overrides else super().get(name)

    def set_many(self, assignments: dict[str, str]) -> None:
        raise ConfigError("a model's view of the config is read-only")

    def unset(self, names: list[str]) -> None:
        raise ConfigError("a model's view of the config is read-only")
