"""The runtimes: every inference library an engine runs on, and what the rest of infersnap needs to know of it.

This is the one list of runtimes. A manifest names one (infersnap/engines/manifests/), the catalog asks
which read a model file, verdicts ask whether one is ready here, profiles key on its package's version,
refusals name it, the broker reads its scheduling traits and a worker builds its engine class. Engine
classes are import strings, resolved in workers/ only, so that the CLI, the frontend and the broker can
read this module without importing a runtime.

Adding a runtime: an engine file in workers/, an entry here, a manifest.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from infersnap.engines.manifest import Manifest
    from infersnap.hwdetect import Machine

# What openvino-genai 2026's GGUF reader can build a model from: it has its own graph for these
# architectures only ("Unsupported model architecture" otherwise) and reads these tensor types (a
# K-quant file such as Gemma 3's Q4_K_M fails in gguf_tensor_to_f16). llama.cpp runs any GGUF it reads.
OPENVINO_GGUF_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3"})
OPENVINO_GGUF_QUANTIZATIONS = frozenset({"F16", "Q4_0", "Q4_1", "Q8_0"})


@dataclass(frozen=True)
class Runtime:
    name: str  # what manifests, plans and worker announcements call it
    display: str  # what users read: refusals, `infersnap engines`
    package: str  # the Python distribution that is its build: a profile's key holds its version
    module: str  # what must import for it to run here
    engines: dict[str, str]  # task ("generate", "embed") -> "module:Class" of its engine for that task
    formats: tuple[str, ...] = ("gguf",)  # model files it reads, by extension: the catalog finds them so
    architectures: frozenset[str] | None = None  # GGUF general.architecture values it reads; None: any
    quantizations: frozenset[str] | None = None  # GGUF file types it reads; None: any
    # EngineOptions fields of each settings variant a probe tries (infersnap/probes.py), in order: the
    # fastest first, then what works around the crashes seen (repack: AMX kernels; mmap: a file the kernel
    # cannot map; bf16: OpenVINO on AMX)
    variants: tuple[dict[str, object], ...] = ({},)
    spins: bool = False  # its threads spin at barriers: a lane beside it on one device loses cores while it computes
    # what else the installed software lacks for this engine here, past the module (see `problems`)
    checks: tuple[Callable[[Manifest, Machine, list[str]], str | None], ...] = field(default=())

    def reads(self, architecture: str, quantization: str) -> bool:
        """Whether it can load a model file of this GGUF architecture and file type."""
        return ((self.architectures is None or architecture in self.architectures)
                and (self.quantizations is None or quantization in self.quantizations))


def _ggml_backends() -> set[str]:
    """The ggml backends this llama-cpp-python build ships (its lib/libggml-<name>.so files)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return set()
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return {p.name.removeprefix("libggml-").split(".so")[0] for p in lib.glob("libggml-*.so*")}


def _has_backend(manifest: Manifest, machine: Machine, devices: list[str]) -> str | None:
    if manifest.backends and not _ggml_backends() & set(manifest.backends):
        return f"this llama-cpp-python build has no {' or '.join(manifest.backends)} backend"
    return None


def _openvino_sees(manifest: Manifest, machine: Machine, devices: list[str]) -> str | None:
    if manifest.device != "cpu" and machine.openvino is not None:
        missing = [d for d in devices if d not in {o.name for o in machine.openvino}]
        if missing:
            return f"OpenVINO does not see {', '.join(missing)} (is its driver installed?)"
    return None


RUNTIMES: dict[str, Runtime] = {r.name: r for r in [
    Runtime(
        name="llamacpp", display="llama.cpp", package="llama_cpp_python", module="llama_cpp",
        engines={"generate": "infersnap.workers.llamacpp_engine:LlamaCppEngine",
                 "embed": "infersnap.workers.llamacpp_embedder:LlamaCppEmbedder"},
        variants=({}, {"repack": False}, {"repack": False, "mmap": False}), spins=True, checks=(_has_backend,),
    ),
    Runtime(
        name="openvino", display="OpenVINO", package="openvino-genai", module="openvino_genai",
        engines={"generate": "infersnap.workers.openvino_engine:OpenVinoEngine"},
        architectures=OPENVINO_GGUF_ARCHITECTURES, quantizations=OPENVINO_GGUF_QUANTIZATIONS,
        variants=({}, {"precision": "f32"}), checks=(_openvino_sees,),
    ),
    Runtime(
        # the GGUF read by openvino-genai's reader (so only what it reads), run by its TextEmbeddingPipeline
        name="openvino-embed", display="OpenVINO text embedding", package="openvino-genai", module="openvino_genai",
        engines={"embed": "infersnap.workers.openvino_embedder:OpenVinoEmbedder"},
        architectures=OPENVINO_GGUF_ARCHITECTURES, quantizations=OPENVINO_GGUF_QUANTIZATIONS,
    ),
]}


def runtime(name: str) -> Runtime:
    """The runtime of this name; a KeyError names the known ones."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise KeyError(f"unknown runtime {name!r}; known runtimes: {', '.join(RUNTIMES)}") from None


def display(name: str) -> str:
    """A runtime's name as users read it (the name itself for one not listed)."""
    return RUNTIMES[name].display if name in RUNTIMES else name


def does(name: str, task: str) -> bool:
    """Whether the runtime has an engine for this task ("generate", "embed")."""
    return task in RUNTIMES[name].engines if name in RUNTIMES else False


def problems(manifest: Manifest, machine: Machine, devices: list[str]) -> list[str]:
    """What the installed software lacks to run this engine on these devices (its readiness check)."""
    found = runtime(manifest.runtime)
    if importlib.util.find_spec(found.module) is None:
        return [f"{found.package} is not installed"]
    return [problem for check in found.checks if (problem := check(manifest, machine, devices))]


def file_patterns() -> list[str]:
    """The globs of every model file some runtime reads ("*.gguf")."""
    return [f"*.{fmt}" for fmt in dict.fromkeys(f for r in RUNTIMES.values() for f in r.formats)]
