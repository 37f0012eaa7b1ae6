"""The devices OpenVINO itself sees on the live machine (it needs the GPU/NPU drivers to see them)."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from infersnap.hwdetect._files import is_live
from infersnap.hwdetect.gpuinfo import normalize_slot


class OpenVinoDevice(msgspec.Struct):
    name: str  # "CPU", "GPU.0", "NPU", ...
    full_name: str | None
    type: str | None  # "INTEGRATED" | "DISCRETE"
    pci_slot: str | None = None  # from DEVICE_PCI_INFO, where the plugin reports it (GPU)


def _pci_slot(value: Any) -> str | None:
    """ov::device::pci_info as a PCI slot; the Python binding may give an object or its text."""
    fields = {}
    for key in ("domain", "bus", "device", "function"):
        attribute = getattr(value, key, None)
        if isinstance(attribute, int):
            fields[key] = attribute
        else:
            match = re.search(rf"{key}\D*?(\d+)", str(value))
            if match:
                fields[key] = int(match.group(1))
    if len(fields) != 4:
        return None
    return normalize_slot(f"{fields['domain']:x}:{fields['bus']:x}:{fields['device']:x}.{fields['function']:x}")


def _property(core: Any, device: str, name: str, supported: Any) -> Any:
    if supported is not None and name not in supported:
        return None
    try:
        return core.get_property(device, name)
    except Exception:  # noqa: BLE001 - a plugin may refuse any property
        return None


def openvino_devices(root: str = "/") -> list[OpenVinoDevice] | None:
    """OpenVINO's devices on the live machine; [] when OpenVINO is missing or fails; None (not asked)
    for a recorded machine."""
    if not is_live(root):
        return None
    try:
        import openvino  # lazy: heavy, optional

        core = openvino.Core()
        names = list(core.available_devices)
    except Exception:  # noqa: BLE001 - missing package, broken install, driver errors: all "none seen"
        return []
    found = []
    for name in names:
        supported = _property(core, name, "SUPPORTED_PROPERTIES", None)
        full_name = _property(core, name, "FULL_DEVICE_NAME", supported)
        kind = _property(core, name, "DEVICE_TYPE", supported)
        pci = _property(core, name, "DEVICE_PCI_INFO", supported)
        found.append(
            OpenVinoDevice(
                name=str(name),
                full_name=str(full_name) if full_name else None,
                type=str(kind).rpartition(".")[2] if kind is not None else None,  # Type.INTEGRATED -> INTEGRATED
                pci_slot=_pci_slot(pci) if pci is not None else None,
            )
        )
    return found
