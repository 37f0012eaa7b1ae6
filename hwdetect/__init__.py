"""Hardware detection: what compute devices a machine has, read from a root folder.

`detect("/")` reads this machine; `detect(path)` reads a recorded one whose files lie under path
as they would under / (proc/cpuinfo, sys/bus/pci/devices, run/disk-stats.json, ...).
"""

from infersnap.hwdetect.accelerators import Accelerator
from infersnap.hwdetect.cpu import Cpu, physical_core_cpus
from infersnap.hwdetect.disk import Disk
from infersnap.hwdetect.machine import Machine, detect, to_builtins
from infersnap.hwdetect.memory import Memory
from infersnap.hwdetect.openvino_devices import OpenVinoDevice
from infersnap.hwdetect.pci import PciDevice

__all__ = [
    "Accelerator",
    "Cpu",
    "Disk",
    "Machine",
    "Memory",
    "OpenVinoDevice",
    "PciDevice",
    "detect",
    "physical_core_cpus",
    "to_builtins",
]
