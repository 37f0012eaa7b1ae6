"""NVIDIA GPUs: VRAM, compute capability and name from nvidia-smi (recorded under run/nvidia-smi/<slot>/)."""

from __future__ import annotations

from pathlib import Path

from infersnap.hwdetect._files import is_live, read_text, subdirs
from infersnap.hwdetect._tools import run_tool
from infersnap.hwdetect.gpuinfo import GpuInfo, normalize_slot, parse_mib

QUERY = ["nvidia-smi", "--query-gpu=pci.bus_id,name,memory.total,compute_cap", "--format=csv,noheader"]


def _recorded(root: Path) -> dict[str, GpuInfo]:
    found = {}
    for entry in subdirs(root / "run/nvidia-smi"):
        slot = normalize_slot(entry.name)
        if slot:
            found[slot] = GpuInfo(
                name=read_text(entry / "name") or None,
                vram_bytes=parse_mib(read_text(entry / "memory.total")),
                compute_capability=read_text(entry / "compute_cap") or None,
            )
    return found


def parse_query(text: str) -> dict[str, GpuInfo]:
    """nvidia-smi CSV lines: "00000000:01:00.0, NVIDIA GeForce GTX 1080 Ti, 11264 MiB, 6.1"."""
    found = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        slot = normalize_slot(fields[0])
        if slot:
            unknown = {"", "[N/A]", "N/A"}
            found[slot] = GpuInfo(
                name=fields[1] if fields[1] not in unknown else None,
                vram_bytes=parse_mib(fields[2]),
                compute_capability=fields[3] if fields[3] not in unknown else None,
            )
    return found


def nvidia_gpus(root: str = "/") -> dict[str, GpuInfo]:
    if is_live(root):
        return parse_query(run_tool(*QUERY) or "")
    return _recorded(Path(root))
