"""Compute accelerators (GPUs, NPUs) derived from the PCI devices, with what vendor tools tell about them.

Only Intel, NVIDIA and AMD display controllers count as GPUs: other display chips (ASPEED 0x1a03 and
Matrox 0x102b on servers) cannot run models and stay in the PCI list only. NPUs are PCI class 0x1200
(processing accelerator) from any vendor, plus co-processors (0x0b40) from known AI vendors: the Hailo-8
is a 0x0b40. Non-Intel NPUs get vendor "other" so that engine manifests asking for Intel skip them.
"""

from __future__ import annotations

import msgspec

from infersnap.hwdetect.clinfo import opencl_gpus
from infersnap.hwdetect.gpuinfo import GpuInfo
from infersnap.hwdetect.kfd import amd_gpus
from infersnap.hwdetect.nvidia import nvidia_gpus
from infersnap.hwdetect.openvino_devices import OpenVinoDevice
from infersnap.hwdetect.pci import PciDevice

INTEL, NVIDIA, AMD = 0x8086, 0x10DE, 0x1002
GPU_VENDORS = {INTEL: "intel", NVIDIA: "nvidia", AMD: "amd"}
DISPLAY_BASE_CLASS = 0x03
PROCESSING_ACCELERATOR = 0x1200
CO_PROCESSOR = 0x0B40  # also Intel QuickAssist (crypto), hence the vendor list
AI_CO_PROCESSOR_VENDORS = {0x1E60}  # Hailo


class Accelerator(msgspec.Struct):
    kind: str  # "gpu" | "npu"
    vendor: str  # "intel" | "nvidia" | "amd" | "other"
    vendor_id: int
    device_id: int
    slot: str
    name: str | None  # from clinfo / nvidia-smi / kfd / OpenVINO when known
    vram_bytes: int | None  # None when nothing tells it (often so for integrated GPUs)
    compute_capability: str | None  # NVIDIA only, "6.1"
    device: str  # what a worker targets: "GPU.0", "NPU", "cuda:0", "amd:0"; "pci:<slot>" for others
    architecture: str | None = None  # AMD gfx target, "gfx1032"


def _kind(device: PciDevice) -> str | None:
    if device.class_id >> 8 == DISPLAY_BASE_CLASS and device.vendor_id in GPU_VENDORS:
        return "gpu"
    if device.class_id == PROCESSING_ACCELERATOR:
        return "npu"
    if device.class_id == CO_PROCESSOR and device.vendor_id in AI_CO_PROCESSOR_VENDORS:
        return "npu"
    return None


def _target(kind: str, vendor: str, index: int, slot: str) -> str:
    """The device string a worker targets; index counts this vendor's devices of this kind in PCI order."""
    if kind == "npu":
        return ("NPU" if index == 0 else f"NPU.{index}") if vendor == "intel" else f"pci:{slot}"
    # OpenVINO numbers Intel GPUs integrated first, which PCI order matches (the iGPU is 00:02.0);
    # CUDA numbers in PCI order only with CUDA_DEVICE_ORDER=PCI_BUS_ID (its default is fastest first)
    return {"intel": f"GPU.{index}", "nvidia": f"cuda:{index}", "amd": f"amd:{index}"}.get(vendor, f"pci:{slot}")


def _merge(*infos: GpuInfo | None) -> GpuInfo:
    """Field by field, the first source that knows it."""
    known = [i for i in infos if i is not None]
    fields = GpuInfo.__struct_fields__
    return GpuInfo(**{f: next((getattr(i, f) for i in known if getattr(i, f) is not None), None) for f in fields})


def _openvino_names(intel_gpus: list[Accelerator], openvino: list[OpenVinoDevice]) -> None:
    """Use OpenVINO's own GPU names where we can tell which is which: by PCI slot, or when there is one of
    each. Once OpenVINO has placed its GPUs, an Intel GPU it does not see (too old for its driver, say the
    Ivy Bridge iGPU beside an Arc) gets "pci:<slot>" so that no two devices share a name."""
    seen = [d for d in openvino if d.name.split(".")[0] == "GPU"]
    by_slot = {d.pci_slot: d for d in seen if d.pci_slot}
    if len(seen) == 1 and len(intel_gpus) == 1 and not by_slot:
        by_slot = {intel_gpus[0].slot: seen[0]}
    if not by_slot:
        return  # no way to tell: keep PCI order
    for gpu in intel_gpus:
        match = by_slot.get(gpu.slot)
        gpu.device = match.name if match else f"pci:{gpu.slot}"
        gpu.name = gpu.name or (match.full_name if match else None)


def detect_accelerators(
    root: str, pci: list[PciDevice], openvino: list[OpenVinoDevice] | None = None
) -> list[Accelerator]:
    candidates = [(d, kind) for d in pci if (kind := _kind(d))]
    gpu_vendors = {d.vendor_id for d, kind in candidates if kind == "gpu"}
    # ask each source only when a device of its vendor is there (live, each may run a tool)
    nvidia = nvidia_gpus(root) if NVIDIA in gpu_vendors else {}
    amd_slots = [d.slot for d, kind in candidates if kind == "gpu" and d.vendor_id == AMD]
    amd = amd_gpus(root, amd_slots) if amd_slots else {}
    opencl = opencl_gpus(root) if gpu_vendors else {}
    counters: dict[str, int] = {}
    found = []
    for device, kind in candidates:
        vendor = GPU_VENDORS.get(device.vendor_id, "other")
        info = _merge(nvidia.get(device.slot), amd.get(device.slot), opencl.get(device.slot))
        key = f"{vendor}-{kind}"
        index = counters.get(key, 0)
        counters[key] = index + 1
        target = _target(kind, vendor, index, device.slot)
        found.append(
            Accelerator(
                kind=kind,
                vendor=vendor,
                vendor_id=device.vendor_id,
                device_id=device.device_id,
                slot=device.slot,
                name=info.name,
                vram_bytes=info.vram_bytes,
                compute_capability=info.compute_capability,
                device=target,
                architecture=info.architecture,
            )
        )
    if openvino:
        _openvino_names([a for a in found if a.vendor == "intel" and a.kind == "gpu"], openvino)
        npus = [d for d in openvino if d.name.split(".")[0] == "NPU"]
        for accelerator in (a for a in found if a.vendor == "intel" and a.kind == "npu"):
            match = next((d for d in npus if d.name == accelerator.device), None)
            accelerator.name = accelerator.name or (match.full_name if match else None)
    return found
