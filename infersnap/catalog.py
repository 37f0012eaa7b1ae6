"""The catalog: every model infersnap can serve, found on disk, with what its GGUF header says.

Sources, in this order: `model.path`, the packaged default model, the models folder
(<data folder>/models, where `infersnap models add` puts links and copies) and each folder of
`models.dirs`. A file found twice (by its path, links followed) or an id taken already (ignoring
case, or one with the same slug) is listed once: the first wins, and an id clash is warned about.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

import msgspec

from infersnap import paths
from infersnap.config import KEYS, MODEL_SETTINGS, PER_MODEL, Config, ConfigView
from infersnap.models import (FILE_TYPES, ModelNotFound, default_model_path, gguf_metadata, gguf_problem, model_id,
                              model_shape)
from infersnap.runtimes import RUNTIMES, file_patterns

log = logging.getLogger(__name__)

class ModelEntry(msgspec.Struct, frozen=True):
    id: str  # what clients send as `model` (matched ignoring case)
    slug: str  # slug(id): its form in config keys
    path: str  # absolute path of the GGUF (a link in the models folder stays the link)
    source: str  # "model.path", "default" (the packaged model), "models folder", "models.dirs"
    size_bytes: int
    architecture: str  # GGUF general.architecture; "" if unknown
    quantization: str  # from general.file_type (e.g. "Q4_1", "Q4_K_M", "F16"); "" if unknown
    trained_context: int | None
    chat_template: bool  # the GGUF has tokenizer.chat_template, or a chat-template setting is set for it
    runtimes: list[str]  # the runtimes that can generate from it (infersnap.runtimes), in their order
    problem: str = ""  # why the file cannot be served (not a GGUF, unreadable); "" when fine


def slug(model_id: str) -> str:
    """A model id as a config key segment (config.SLUG_FORM, which snap option names allow too):
    lowercase, each run of other characters than a-z0-9 one dash, starting with a letter
    ("SmolLM2-135M-Instruct.Q4_1" -> "smollm2-135m-instruct-q4-1", "1b" -> "m-1b")."""
    text = re.sub(r"[^a-z0-9]+", "-", model_id.lower()).strip("-")
    return text if text[:1].isalpha() else f"m-{text}".rstrip("-")


def models_folder() -> Path:
    """Where `infersnap models add` puts its links and copies."""
    return paths.data_dir() / "models"


def _found(config: Config, warn: Callable[[str], None]) -> list[tuple[Path, str, str]]:
    """(file, id, source) of every model file, in the catalog's order; paths absolute, links kept."""
    found: list[tuple[Path, str, str]] = []
    if config.get("model.path"):
        # first: a model.path that is the packaged file, or has its id, keeps the name it was given
        path = Path(config.get("model.path")).expanduser().absolute()
        found.append((path, config.get("model.name") or model_id(path), "model.path"))
    try:
        default = default_model_path()
        found.append((default, model_id(default), "default"))
    except ModelNotFound:
        pass  # not installed: the catalog is what else there is
    folders = [(models_folder(), "models folder")]
    folders += [(Path(f.strip()).expanduser(), "models.dirs") for f in config.get("models.dirs").split(",") if f.strip()]
    for folder, source in folders:
        if source == "models.dirs" and not folder.is_dir():
            warn(f"models.dirs: {folder} is not a folder; no models from there")
            continue
        files = sorted({p for pattern in file_patterns() for p in folder.glob(pattern)}, key=lambda p: p.name.lower())
        found += [(path.absolute(), model_id(path), source) for path in files]
    return found


def signature(config: Config) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a model file is added, removed or replaced: no header is read, so that a running
    serve can look every few seconds."""
    marks = []
    for path, _, _ in _found(config, warn=lambda _: None):
        try:
            stat = path.stat()
            marks.append((str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size))
        except OSError:  # a dangling link: `models` lists it with its problem, `serve` leaves it out
            marks.append((str(path), 0, 0, 0))
    return tuple(marks)


def _entry(path: Path, model_id: str, source: str, config: Config) -> ModelEntry:
    model_slug = slug(model_id)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    problem = gguf_problem(path)
    meta = None if problem else gguf_metadata(path)
    if meta is None:
        problem = problem or "its GGUF header cannot be read (a truncated or damaged file?)"
        return ModelEntry(model_id, model_slug, str(path), source, size, "", "", None, False, [], problem)
    architecture = str(meta.get("general.architecture") or "")
    file_type = meta.get("general.file_type")
    quantization = FILE_TYPES.get(file_type, "") if isinstance(file_type, int) else ""
    template = bool(meta.get("tokenizer.chat_template")) or bool(config.get(f"{PER_MODEL}.{model_slug}.chat-template"))
    runtimes = [r.name for r in RUNTIMES.values() if "generate" in r.engines and r.reads(architecture, quantization)]
    return ModelEntry(model_id, model_slug, str(path), source, size, architecture, quantization,
                      model_shape(path).trained_context, template, runtimes)


def scan(config: Config, warn: Callable[[str], None] = log.warning) -> list[ModelEntry]:
    """Every model in the catalog, in its order. What is left out (an id clash, a models.dirs folder
    that is none) goes to `warn`; files that cannot be served are listed with their `problem`."""
    entries: list[ModelEntry] = []
    paths_seen: set[Path] = set()
    for path, model_id, source in _found(config, warn):
        resolved = path.resolve()
        if resolved in paths_seen:
            continue  # the same file again (a link to it, or model.path naming the packaged model)
        paths_seen.add(resolved)
        taken = next((e for e in entries if e.id.lower() == model_id.lower() or e.slug == slug(model_id)), None)
        if taken:
            clash = "the id" if taken.id.lower() == model_id.lower() else f"the slug {taken.slug!r} of"
            warn(f"{path} ({source}) is left out: {clash} {model_id!r} is {taken.id!r}'s ({taken.path}); rename one")
            continue
        entries.append(_entry(path, model_id, source, config))
    return entries


def find(entries: list[ModelEntry], name: str) -> ModelEntry:
    """The entry whose id is `name` (ignoring case) or whose slug is; ModelNotFound naming the known ids."""
    for entry in entries:
        if entry.id.lower() == name.lower() or entry.slug == name:
            return entry
    known = ", ".join(entry.id for entry in entries) or "none"
    raise ModelNotFound(f"unknown model {name!r}; known models: {known}")


def default_entry(config: Config, entries: list[ModelEntry]) -> ModelEntry:
    """The model served when a request names none: `model.default`, else the `model.path` model, else
    the packaged one. It may have a `problem`: whoever serves it decides."""
    if config.get("model.default"):
        return find(entries, config.get("model.default"))
    for source in ("model.path", "default"):
        for entry in entries:
            if entry.source == source:
                return entry
    try:
        default_model_path()  # it is there, yet was left out (e.g. a models.dirs file took its id first)
        why = "the packaged default model is not in the catalog"
    except ModelNotFound as exc:
        why = str(exc)
    known = ", ".join(entry.id for entry in entries) or "none"
    raise ModelNotFound(f"{why}; or set model.default to one of the models ({known})")


def model_config(config: Config, entry: ModelEntry) -> Config:
    """The config as one model's workers see it: `model.path` and `model.name` are the entry's, and
    each of its `model-settings.<slug>.*` keys that is set (and good) stands for the key it mirrors."""
    overrides: dict[str, object] = {"model.path": entry.path, "model.name": entry.id}
    for setting, key in MODEL_SETTINGS.items():
        name = f"{PER_MODEL}.{entry.slug}.{setting}"
        if key.name in KEYS and name in config.user and name not in config.bad_keys:
            overrides[key.name] = config.user[name]
    return ConfigView(config, overrides)
