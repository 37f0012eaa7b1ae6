"""PCI devices, from /sys/bus/pci/devices/<slot>/{vendor,device,class,subsystem_*}."""

from __future__ import annotations

from pathlib import Path

import msgspec

from infersnap.hwdetect._files import read_int, subdirs


class PciDevice(msgspec.Struct):
    slot: str  # "0000:00:02.0"
    vendor_id: int
    device_id: int
    class_id: int  # the 16-bit class code (base class, subclass): 0x0300 VGA, 0x0302 3D, 0x1200 accelerator
    subsystem_vendor_id: int | None
    subsystem_device_id: int | None


def read_pci(root: str = "/") -> list[PciDevice]:
    """Every PCI function whose vendor, device and class are readable, in slot order."""
    found = []
    for entry in subdirs(Path(root) / "sys/bus/pci/devices"):
        vendor, device, klass = (read_int(entry / name, 16) for name in ("vendor", "device", "class"))
        if vendor is None or device is None or klass is None:
            continue
        found.append(
            PciDevice(
                slot=entry.name.lower(),
                vendor_id=vendor,
                device_id=device,
                class_id=klass >> 8,  # sysfs class is 24 bits: class, subclass, programming interface
                subsystem_vendor_id=read_int(entry / "subsystem_vendor", 16),
                subsystem_device_id=read_int(entry / "subsystem_device", 16),
            )
        )
    return found
