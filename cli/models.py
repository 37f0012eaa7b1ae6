"""What `infersnap models`, `models add`, `models remove` and `use-model` show and change."""

from __future__ import annotations

import os
import time
import shutil
from pathlib import Path

import msgspec

from infersnap import wire
from infersnap.catalog import ModelEntry, default_entry, find, models_folder, slug
from infersnap.cli.engines import format_table
from infersnap.config import PER_MODEL, Config
from infersnap.models import ModelNotFound, gguf_problem, model_id

# a running serve looks at the models folders every CATALOG_LOOK_SECONDS (cli/supervisor.py)
SERVED_SOON = "a running `infersnap serve` serves it within seconds"
UNSERVED_SOON = "a running `infersnap serve` stops serving it within seconds, once its requests have ended"
# each source's remedy: models that are not the models folder's are removed where they come from
NOT_REMOVABLE = {
    "default": "it is the packaged default model; `infersnap use-model` another to serve that one instead",
    "model.path": "it is model.path; `infersnap unset model.path` (or set it to another file) instead",
}


class Refused(Exception):
    """A models command that changes nothing, and why."""


def default_of(config: Config, entries: list[ModelEntry]) -> ModelEntry | None:
    """The default model, or None where model.default names none in the catalog (or there is none)."""
    try:
        return default_entry(config, entries)
    except ModelNotFound:
        return None


def server_models(status: wire.Status | None) -> dict[str, wire.ModelState] | None:
    """What the running server says of each model, by lowercase id; None when no server runs."""
    if status is None:
        return None
    return {m.name.lower(): m for m in getattr(status, "models", [])}  # servers before issue 14 say nothing


def state(entry: ModelEntry, served: dict[str, wire.ModelState] | None) -> tuple[str, str]:
    """The model's state and, for a failed one, why."""
    if served is None:
        return "not serving", ""
    known = served.get(entry.id.lower())
    return (known.state, known.error) if known else ("unloaded", "")


def size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def models_table(entries: list[ModelEntry], default: ModelEntry | None,
                 served: dict[str, wire.ModelState] | None) -> list[list[str]]:
    rows = [["model", "slug", "size", "arch", "quant", "trained", "template", "runtimes", "source", "state", "file"]]
    for entry in entries:
        shown, error = state(entry, served)
        if entry.problem:
            shown, error = "cannot serve", entry.problem
        if error:
            shown = f"{shown}: {error}" if len(error) <= 50 else f"{shown}: {error[:47]}..."
        rows.append([
            entry.id + ("*" if entry == default else ""), entry.slug, size(entry.size_bytes),
            entry.architecture or "-", entry.quantization or "-", str(entry.trained_context or "-"),
            "yes" if entry.chat_template else "no", ",".join(entry.runtimes) or "-", entry.source, shown, entry.path,
        ])
    return rows


def models_document(entries: list[ModelEntry], default: ModelEntry | None,
                    served: dict[str, wire.ModelState] | None) -> list[dict]:
    documents = []
    for entry in entries:
        shown, error = state(entry, served)
        documents.append({**msgspec.to_builtins(entry), "default": entry == default, "state": shown,
                          **({"error": error} if error else {})})
    return documents


def format_models(entries: list[ModelEntry], default: ModelEntry | None,
                  served: dict[str, wire.ModelState] | None) -> str:
    return format_table(models_table(entries, default, served)) + "\n* the default model (model.default)"


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be a model id, which is also the file name in the models folder."""
    if not name.strip():
        return "it is empty"
    if "/" in name or "\0" in name:
        return "it holds a slash or a NUL"
    if name.startswith("."):
        return "it starts with a dot (a hidden file)"
    if name != name.strip():
        return "it starts or ends with a space"
    if not any(c.isascii() and c.isalnum() for c in name):
        return "it holds no letter or digit"
    if len(f"{name}.gguf".encode()) > 255:
        return "it is too long for a file name"
    return None


def add(entries: list[ModelEntry], source: str, name: str | None, copy: bool) -> list[str]:
    """Put a GGUF into the models folder as `<name>.gguf`: a link, or a copy; the lines to print."""
    path = Path(source).expanduser().absolute()
    problem = gguf_problem(path)
    if problem:
        raise Refused(f"{path}: {problem}")
    new_id = model_id(path) if name is None else name
    problem = _name_problem(new_id)
    if problem:
        raise Refused(f"cannot name a model {new_id!r}: {problem}; choose another with --name")
    for entry in entries:
        if not copy and Path(entry.path).resolve() == path.resolve():  # the catalog would list it once
            raise Refused(f"{path} is in the catalog already, as {entry.id} ({entry.source})")
    for entry in entries:
        if entry.id.lower() == new_id.lower() or entry.slug == slug(new_id):
            clash = "is taken by" if entry.id.lower() == new_id.lower() else f"has the slug ({entry.slug}) of"
            raise Refused(f"the id {new_id!r} {clash} {entry.id} ({entry.source}: {entry.path}); "
                          "choose another with --name")
    folder = models_folder()
    target = folder / f"{new_id}.gguf"
    if os.path.lexists(target):
        raise Refused(f"{target} is there already (and is no model in the catalog); remove it first")
    partial = folder / f".{new_id}.gguf.partial"  # no *.gguf: the catalog never sees half a copy
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copyfile(path, partial)
            partial.rename(target)
        else:
            target.symlink_to(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        hint = " (try with sudo)" if isinstance(exc, PermissionError) else ""
        raise Refused(f"cannot write into the models folder {folder}: {exc.strerror or exc}{hint}") from None
    if copy:
        how = (f"copied {path} to {target} ({size(target.stat().st_size)}): the original may now move or go")
    else:
        how = (f"linked {target} to {path}: the file stays where it is (GGUFs are large); "
               "add it with --copy instead if it will move or be deleted, or if a confined snap cannot read it")
    return [f"added {new_id}", how, f"its settings: {PER_MODEL}.{slug(new_id)}.<setting>", SERVED_SOON]


def remove(config: Config, entries: list[ModelEntry], name: str) -> list[str]:
    """Take a model's link or copy out of the models folder (never a linked-to file); the lines to print."""
    entry = find(entries, name)
    if entry.source in NOT_REMOVABLE:
        raise Refused(f"cannot remove {entry.id}: {NOT_REMOVABLE[entry.source]}")
    if entry.source == "models.dirs":
        raise Refused(f"cannot remove {entry.id}: it is in {Path(entry.path).parent}, a folder of models.dirs; "
                      "take the folder out of models.dirs, or the file out of the folder")
    if entry == default_of(config, entries):
        raise Refused(f"cannot remove {entry.id}: it is model.default; `infersnap use-model` another first")
    path = Path(entry.path)
    how = f"the link to {path.readlink()} (that file is kept)" if path.is_symlink() else "its copy"
    try:
        path.unlink()
    except OSError as exc:
        hint = " (try with sudo)" if isinstance(exc, PermissionError) else ""
        raise Refused(f"cannot remove {path}: {exc.strerror or exc}{hint}") from None
    lines = [f"removed {entry.id}: {path}, {how}"]
    kept = config.values(f"{PER_MODEL}.{entry.slug}")
    if kept:
        lines.append(f"its settings are kept (`infersnap unset {' '.join(kept)}` if they are not wanted)")
    return [*lines, UNSERVED_SOON]


def use_model(config: Config, entries: list[ModelEntry], name: str) -> str:
    """Set model.default to a model of the catalog; the line to print."""
    entry = find(entries, name)
    if entry.problem:
        raise Refused(f"{entry.id} cannot be served: {entry.problem}")
    config.set_many({"model.default": entry.id})
    return f"model.default: {entry.id} (a running `infersnap serve` serves it after a restart)"


LOAD_TIMEOUT = 600.0  # seconds `models load` waits for the model to be loaded (a big model on a slow disk)


def control(config: Config, model: str, load: bool, keep_alive: str | None = None) -> str:
    """`models load` / `models unload`: ask the running server (POST /v1/models/load or /unload, the routes
    any client has) and, for a load, wait until the model is loaded or failed. Refused says why not."""
    import httpx

    from infersnap.cli.chat import first_api_key
    from infersnap.cli.status import NotRunning, query_status

    try:
        base = query_status(timeout=2).endpoints["openai"].rstrip("/")
    except NotRunning as exc:
        raise Refused(f"{exc}; start it with `infersnap serve`") from None
    key = first_api_key(config)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: dict[str, object] = {"model": model, **({"keep_alive": keep_alive} if keep_alive is not None else {})}

    def card(reply: httpx.Response) -> dict:
        if reply.status_code != 200:
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = reply.text
            raise Refused(f"{model}: {message} (HTTP {reply.status_code})")
        return reply.json()

    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        found = card(http.post("/models/load" if load else "/models/unload", json=body))
        deadline = time.monotonic() + LOAD_TIMEOUT
        done = ("loaded", "failed") if load else ("unloaded", "failed")
        while found["state"] not in done and time.monotonic() < deadline:
            time.sleep(0.2)
            found = card(http.get(f"/models/{found['id']}"))
    if found["state"] == "failed":
        raise Refused(f"{found['id']} failed to load: {found.get('error')}")
    if found["state"] not in done:  # an unload waits for the requests running on it
        return f"{found['id']}: {found['state']} (it goes on after this)"
    return f"{found['id']}: {found['state']}"
