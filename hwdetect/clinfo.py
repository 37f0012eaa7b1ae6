"""GPU names and memory from OpenCL (clinfo --json; recorded as run/clinfo.json), matched to PCI slots.

clinfo's JSON: {"platforms": [...], "devices": [{"online": [{CL_DEVICE_NAME, CL_DEVICE_GLOBAL_MEM_SIZE,
CL_DEVICE_PCI_BUS_INFO_KHR: "PCI-E, 0000:03:00.0", CL_DEVICE_TYPE: {"type": ["CL_DEVICE_TYPE_GPU"]}, ...}]}]},
one "devices" entry per platform. A device without PCI bus info cannot be placed and is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infersnap.hwdetect._files import is_live, read_json
from infersnap.hwdetect._tools import run_tool
from infersnap.hwdetect.gpuinfo import GpuInfo, normalize_slot


def parse_clinfo(document: Any) -> dict[str, GpuInfo]:
    found: dict[str, GpuInfo] = {}
    platforms = document.get("devices") if isinstance(document, dict) else None
    for platform in platforms if isinstance(platforms, list) else []:
        online = platform.get("online") if isinstance(platform, dict) else None
        for device in online if isinstance(online, list) else []:
            if not isinstance(device, dict):
                continue
            bus_info = device.get("CL_DEVICE_PCI_BUS_INFO_KHR")
            slot = normalize_slot(bus_info.split(",")[-1]) if isinstance(bus_info, str) else None
            if slot is None or slot in found:
                continue
            name, memory = device.get("CL_DEVICE_NAME"), device.get("CL_DEVICE_GLOBAL_MEM_SIZE")
            found[slot] = GpuInfo(
                name=name.strip() if isinstance(name, str) and name.strip() else None,
                vram_bytes=memory if isinstance(memory, int) and memory > 0 else None,
            )
    return found


def opencl_gpus(root: str = "/") -> dict[str, GpuInfo]:
    if is_live(root):
        text = run_tool("clinfo", "--json", timeout=10.0)
        try:
            return parse_clinfo(json.loads(text)) if text else {}
        except ValueError:
            return {}
    return parse_clinfo(read_json(Path(root) / "run/clinfo.json"))
