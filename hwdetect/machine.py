"""The whole machine, read from a root folder: "/" for this one, or a recorded machine's copy."""

from __future__ import annotations

from typing import Any

import msgspec

from infersnap.hwdetect.accelerators import Accelerator, detect_accelerators
from infersnap.hwdetect.cpu import Cpu, detect_cpu
from infersnap.hwdetect.disk import Disk, detect_disk
from infersnap.hwdetect.memory import Memory, detect_memory
from infersnap.hwdetect.openvino_devices import OpenVinoDevice, openvino_devices
from infersnap.hwdetect.pci import PciDevice, read_pci

# ints that are PCI ids: shown as "0x8086" to people, like lspci and the manifests write them
HEX_FIELDS = {"vendor_id", "device_id", "class_id", "subsystem_vendor_id", "subsystem_device_id"}


class Machine(msgspec.Struct):
    root: str
    cpu: Cpu
    memory: Memory
    disk: Disk
    accelerators: list[Accelerator]
    pci: list[PciDevice]
    openvino: list[OpenVinoDevice] | None  # None: not asked (a recorded machine)


def detect(root: str = "/", models_dir: str = "/") -> Machine:
    """Read the machine under root. Anything missing or unreadable is None or empty, never an error.

    Only for root "/" does it ask the running system: CPU affinity, cgroup quota, statvfs of
    models_dir, nvidia-smi, clinfo and OpenVINO. A recorded root is read from files alone.
    """
    pci = read_pci(root)
    openvino = openvino_devices(root)
    return Machine(
        root=root,
        cpu=detect_cpu(root),
        memory=detect_memory(root),
        disk=detect_disk(root, models_dir),
        accelerators=detect_accelerators(root, pci, openvino),
        pci=pci,
        openvino=openvino,
    )


def _hex_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: f"{v:#06x}" if k in HEX_FIELDS and isinstance(v, int) else _hex_ids(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex_ids(v) for v in value]
    return value


def to_builtins(machine: Machine) -> dict[str, Any]:
    """JSON/YAML-ready: sizes as ints, PCI ids as "0x8086"-style strings."""
    return _hex_ids(msgspec.to_builtins(machine))
