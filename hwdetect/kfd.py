"""AMD GPUs: VRAM and gfx target from amdgpu's sysfs and the ROCm kernel driver's topology (kfd).

Each kfd node (sys/class/kfd/kfd/topology/nodes/N) is a CPU (simd_count 0) or a GPU. A GPU node's
`properties` give its PCI address as domain and location_id = bus << 8 | device << 3 | function
(0x300 is 0000:03:00.0), and gfx_target_version as major*10000 + minor*100 + stepping (100302 is gfx1032).
Its mem_banks hold the VRAM heaps (heap_type 1 public, 2 private framebuffer).
"""

from __future__ import annotations

from pathlib import Path

from infersnap.hwdetect._files import read_int, read_properties, read_text, subdirs
from infersnap.hwdetect.gpuinfo import GpuInfo

FRAMEBUFFER_HEAPS = {1, 2}
# kfd names newer GPUs after the driver's discovery mechanism rather than the chip
GENERIC_NAMES = {"", "ip discovery"}


def gfx_target(version: int) -> str | None:
    if version <= 0:
        return None
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    return f"gfx{major}{minor:x}{stepping:x}"


def _kfd_nodes(root: Path) -> dict[str, GpuInfo]:
    found = {}
    for node in subdirs(root / "sys/class/kfd/kfd/topology/nodes"):
        props = read_properties(node / "properties")
        if not props.get("simd_count") or "location_id" not in props:
            continue  # a CPU node
        location, domain = props["location_id"], props.get("domain", 0)
        slot = f"{domain:04x}:{location >> 8:02x}:{(location >> 3) & 0x1F:02x}.{location & 0x7:x}"
        heaps = [read_properties(bank / "properties") for bank in subdirs(node / "mem_banks")]
        vram = sum(h.get("size_in_bytes", 0) for h in heaps if h.get("heap_type") in FRAMEBUFFER_HEAPS)
        name = read_text(node / "name")
        found[slot] = GpuInfo(
            name=name if name and name.lower() not in GENERIC_NAMES else None,
            vram_bytes=vram or None,
            architecture=gfx_target(props.get("gfx_target_version", 0)),
        )
    return found


def amd_gpus(root: str, slots: list[str]) -> dict[str, GpuInfo]:
    """Info for the given AMD GPU slots. VRAM: amdgpu's mem_info_vram_total first (on an APU kfd's
    framebuffer heap is the GTT share of RAM, half of it, while mem_info_vram_total is the carve-out),
    else kfd's framebuffer heaps."""
    path = Path(root)
    kfd = _kfd_nodes(path)
    found = {}
    for slot in slots:
        info = kfd.get(slot, GpuInfo())
        vram = read_int(path / "sys/bus/pci/devices" / slot / "mem_info_vram_total")
        found[slot] = GpuInfo(
            name=info.name, vram_bytes=vram or info.vram_bytes, architecture=info.architecture
        )
    return found
