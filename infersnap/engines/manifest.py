"""Engine manifests: what an engine is, what hardware it needs, how it runs.

Each engine is one YAML file in manifests/ shipped with the package. The
requirement vocabulary follows inference snaps' manifests: `devices` with
`allof` (every entry must be met) and `anyof` (at least one must be).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from infersnap.runtimes import RUNTIMES

MANIFESTS = Path(__file__).parent / "manifests"

DeviceType = Literal["cpu", "gpu", "npu"]


class DeviceRequirement(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    type: DeviceType
    architecture: str | None = None  # cpu: "amd64", "arm64", ...
    manufacturer_id: str | None = None  # cpu: "GenuineIntel", "AuthenticAMD"
    flags: list[str] = []  # cpu: every flag must be present
    vendor_id: str | None = None  # gpu/npu: PCI vendor, "0x8086"
    device_ids: list[str] = []  # gpu/npu: PCI device ids, any of them
    min_vram: str | None = None  # gpu: "4G"; unknown VRAM passes


class Devices(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    allof: list[DeviceRequirement] = []
    anyof: list[DeviceRequirement] = []


class Settings(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, frozen=True, omit_defaults=True):
    gpu_layers: int = 0  # llama.cpp layers offloaded to the GPU
    host_threads: int = 0  # CPU threads a GPU/NPU worker needs, kept off the CPU worker's cores


class Manifest(msgspec.Struct, rename="kebab", forbid_unknown_fields=True, frozen=True):
    name: str
    summary: str
    vendor: str
    runtime: str  # a name in infersnap.runtimes.RUNTIMES
    device: DeviceType  # the kind of device its workers run on
    devices: Devices
    backends: list[str] = []  # llama.cpp: the build needs one of these ggml backends
    experimental: bool = False
    memory: str | None = None  # RAM needed, "2G"
    disk: str | None = None  # free disk needed where models live
    settings: Settings = Settings()

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; known runtimes: {', '.join(RUNTIMES)}")


def parse_size(text: str) -> int:
    """'2G', '512M', '1.5T' or plain bytes, as bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


@cache
def manifests() -> dict[str, Manifest]:
    """Every shipped engine, by name."""
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        manifest = msgspec.convert(yaml.safe_load(path.read_text()), Manifest)
        found[manifest.name] = manifest
    return found
