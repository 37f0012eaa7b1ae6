"""Hardware detection against recorded real machines, checked with lscompute's reading of each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgspec
import pytest

from infersnap.hwdetect import Machine, OpenVinoDevice, detect, physical_core_cpus, to_builtins
from infersnap.hwdetect.accelerators import detect_accelerators
from infersnap.hwdetect.cpu import cgroup_cpu_quota
from infersnap.hwdetect.nvidia import parse_query
from infersnap.hwdetect.pci import read_pci

MACHINES = Path(__file__).parent / "machines"
RECORDED = sorted(p.name for p in MACHINES.iterdir() if (p / "lscompute.json").exists())
SNAPS = "/var/lib/snapd/snaps"
MiB = 2**20


def root(name: str) -> str:
    return str(MACHINES / name / "machine-root")


def answer(name: str) -> dict:
    return json.loads((MACHINES / name / "lscompute.json").read_text())


def by_slot(machine: Machine) -> dict:
    return {a.slot: a for a in machine.accelerators}


def kinds(machine: Machine, kind: str, vendor: str) -> list:
    return [a for a in machine.accelerators if a.kind == kind and a.vendor == vendor]


def test_every_recorded_machine_is_copied():
    assert len(RECORDED) >= 20


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_machine_matches_lscompute(name):
    machine, key = detect(root(name)), answer(name)
    cpus = key["cpus"]
    assert machine.cpu.architecture == cpus[0]["architecture"]
    vendor = cpus[0].get("manufacturer-id") or cpus[0].get("implementer-id")
    assert (machine.cpu.vendor or "").lower() == (vendor or "").lower()
    # lscompute lists one entry per distinct flag set (hybrid CPUs); ours are those every CPU has
    flag_sets = [set(c.get("flags") or c.get("features") or c.get("isa") or []) for c in cpus]
    assert set(machine.cpu.flags) == set.intersection(*flag_sets)
    assert machine.cpu.logical_cpus and machine.cpu.logical_cpus >= 1

    pci = {d.slot: d for d in machine.pci}
    expected = [d for d in key["devices"] if d["bus"] == "pci"]
    assert set(pci) == {d["slot"] for d in expected}
    for device in expected:
        ours = pci[device["slot"]]
        assert (ours.vendor_id, ours.device_id, ours.class_id) == (
            int(device["vendor-id"], 16), int(device["device-id"], 16), int(device["device-class"], 16))
        if "subvendor-id" in device:
            assert ours.subsystem_vendor_id == int(device["subvendor-id"], 16)
            assert ours.subsystem_device_id == int(device["subdevice-id"], 16)
        extra = device.get("additional-properties", {})
        accelerator = by_slot(machine).get(device["slot"])
        if "vram" in extra:
            assert accelerator.vram_bytes == int(extra["vram"])
        if "compute-capability" in extra:
            assert accelerator.compute_capability == extra["compute-capability"]
        if "microarchitecture" in extra:
            assert accelerator.architecture == extra["microarchitecture"]

    # MemTotal is exactly lscompute's total-ram (kB * 1024, or bytes where the recording has no unit)
    assert machine.memory.total_bytes == key["memory"]["total-ram"]
    assert (machine.memory.swap_bytes or 0) == key["memory"]["total-swap"]

    # the snaps mount where lscompute read it; else (a machine without snapd) the root, read a moment apart
    mount = SNAPS if SNAPS in key["disk"] else "/"
    disk = detect(root(name), models_dir=mount.rstrip("/") + "/infersnap/models").disk
    assert (disk.path, disk.total_bytes) == (mount, key["disk"][mount]["total"])
    assert disk.free_bytes == key["disk"][mount]["avail"] or (
        mount == "/" and abs(disk.free_bytes - key["disk"][mount]["avail"]) < 2**20)
    assert machine.disk.free_bytes is not None and machine.disk.free_bytes <= machine.disk.total_bytes
    assert machine.openvino is None  # not asked of a recorded machine
    json.dumps(to_builtins(machine))


def test_lunar_lake_has_an_intel_gpu_and_npu():
    machine = detect(root("intel-core-ultra-7-256v"))
    [gpu] = kinds(machine, "gpu", "intel")
    [npu] = kinds(machine, "npu", "intel")
    assert (gpu.device, gpu.slot, gpu.vendor_id) == ("GPU.0", "0000:00:02.0", 0x8086)
    assert (npu.device, npu.slot, npu.device_id) == ("NPU", "0000:00:0b.0", 0x643E)
    assert machine.cpu.physical_cores == 8 and machine.cpu.threads_per_core == 1
    assert "avx2" in machine.cpu.flags and "intel_ppin" not in machine.cpu.flags  # only some cores list it


def test_arc_and_gtx_1080_ti():
    machine = detect(root("i5-3570k+arc-a580+gtx1080ti"))
    intel = kinds(machine, "gpu", "intel")
    assert [(g.slot, g.device) for g in intel] == [("0000:00:02.0", "GPU.0"), ("0000:04:00.0", "GPU.1")]
    assert intel[1].device_id == 0x56A2  # Arc A580
    # its clinfo.json names bus 03:00.0, where this machine has no device: nothing is guessed
    assert intel[1].name is None and intel[1].vram_bytes is None
    [nvidia] = kinds(machine, "gpu", "nvidia")
    assert nvidia.vram_bytes == 11264 * MiB and nvidia.compute_capability == "6.1"
    assert (nvidia.device, nvidia.slot) == ("cuda:0", "0000:01:00.0")
    assert "avx2" not in machine.cpu.flags and "avx" in machine.cpu.flags


def test_old_cpu_with_a_discrete_arc():
    machine = detect(root("i7-2600k+arc-a580"))
    assert "avx2" not in machine.cpu.flags
    [gpu] = kinds(machine, "gpu", "intel")
    assert (gpu.device, gpu.name, gpu.vram_bytes) == ("GPU.0", "Intel(R) Arc(TM) A580 Graphics", 8096681984)


def test_radeon_vram_comes_from_kfd(tmp_path):
    name = "hp-zbook-i712850HX+RadeonPROW6600M"
    [gpu] = kinds(detect(root(name)), "gpu", "amd")
    assert (gpu.slot, gpu.device, gpu.vram_bytes, gpu.architecture) == ("0000:03:00.0", "amd:0", 8573157376, "gfx1032")
    # without amdgpu's mem_info_vram_total, kfd's framebuffer heap (node 1, location_id 0x300) tells the same
    copy = tmp_path / "root"
    shutil.copytree(root(name), copy)
    (copy / "sys/bus/pci/devices/0000:03:00.0/mem_info_vram_total").unlink()
    [gpu] = kinds(detect(str(copy)), "gpu", "amd")
    assert gpu.vram_bytes == 8573157376 and gpu.name == "dimgrey_cavefish"


def test_amd_laptop():
    machine = detect(root("lenovo-thinkpad-p16s"))
    assert machine.cpu.vendor == "AuthenticAMD" and "avx2" in machine.cpu.flags
    [gpu] = kinds(machine, "gpu", "amd")
    # an APU: the carve-out (8 GiB), not kfd's heap (half the RAM, shared)
    assert (gpu.device, gpu.vram_bytes, gpu.architecture) == ("amd:0", 8 * 2**30, "gfx1152")
    assert not kinds(machine, "gpu", "intel") and not kinds(machine, "npu", "intel")


@pytest.mark.parametrize("name", ["raspberry-pi-5", "raspberry-pi-5+hailo-8"])
def test_raspberry_pi(name):
    machine = detect(root(name))
    assert machine.cpu.architecture == "arm64" and "asimd" in machine.cpu.flags
    assert machine.cpu.vendor == "0x41" and machine.cpu.part_number == "0xd0b" and machine.cpu.model_name is None
    assert machine.cpu.logical_cpus == 4 and machine.cpu.physical_cores is None  # no topology recorded
    assert not [a for a in machine.accelerators if a.vendor != "other"]


def test_hailo_is_an_accelerator_of_another_vendor():
    [hailo] = detect(root("raspberry-pi-5+hailo-8")).accelerators
    assert (hailo.kind, hailo.vendor, hailo.vendor_id, hailo.slot) == ("npu", "other", 0x1E60, "0001:01:00.0")
    assert hailo.device == "pci:0001:01:00.0"


def test_riscv():
    machine = detect(root("orange-pi-rv2"))
    assert machine.cpu.architecture == "riscv64" and machine.cpu.vendor is None
    assert machine.cpu.flags[0] == "rv64imafdcv" and "zvfh" in machine.cpu.flags
    # its disk-stats.json has no "/" entry: the snaps mount is the best guess
    assert machine.disk.path == SNAPS and machine.disk.free_bytes == 48009973760


@pytest.mark.parametrize("name", [n for n in RECORDED if n.startswith(("ampere-one", "hp-proliant"))])
def test_arm_servers_have_no_compute_gpu(name):
    machine = detect(root(name))
    assert machine.cpu.architecture == "arm64" and machine.cpu.logical_cpus >= 128
    assert machine.accelerators == []
    displays = [d for d in machine.pci if d.class_id >> 8 == 0x03]
    assert all(d.vendor_id in (0x1A03, 0x102B) for d in displays)  # ASPEED, Matrox: display chips


def test_hybrid_cpu_topology():
    cpu = detect(root("hp-zbook-i712850HX+RadeonPROW6600M")).cpu
    assert (cpu.logical_cpus, cpu.physical_cores, cpu.threads_per_core) == (24, 16, 2)


def test_empty_root_is_all_unknown(tmp_path):
    machine = detect(str(tmp_path))
    assert machine.cpu == machine.cpu.__class__(None, None, None, [], None, None, None, None, None, None)
    assert (machine.memory.total_bytes, machine.memory.available_bytes, machine.memory.swap_bytes) == (None,) * 3
    assert (machine.disk.total_bytes, machine.disk.free_bytes) == (None, None)
    assert machine.accelerators == [] and machine.pci == [] and machine.openvino is None


def test_broken_files_are_unknown(tmp_path):
    (tmp_path / "proc/cpuinfo").mkdir(parents=True)  # a folder where a file should be
    (tmp_path / "proc/meminfo").write_bytes(b"MemTotal: lots kB\n\xff\xfe")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/disk-stats.json").write_text("{not json")
    (tmp_path / "run/clinfo.json").write_text('{"devices": [{"online": [{"CL_DEVICE_PCI_BUS_INFO_KHR": 7}]}]}')
    device = tmp_path / "sys/bus/pci/devices/0000:00:02.0"
    device.mkdir(parents=True)
    for field, value in [("vendor", "0x8086"), ("device", "0x64a0"), ("class", "0x030000"), ("subsystem_vendor", "?")]:
        (device / field).write_text(value + "\n")
    (tmp_path / "sys/bus/pci/devices/0000:00:03.0").mkdir()  # no files at all: skipped
    machine = detect(str(tmp_path))
    assert machine.cpu.logical_cpus is None and machine.memory.total_bytes is None
    assert [(d.slot, d.class_id, d.subsystem_vendor_id) for d in machine.pci] == [("0000:00:02.0", 0x0300, None)]
    [gpu] = machine.accelerators
    assert (gpu.device, gpu.name, gpu.vram_bytes) == ("GPU.0", None, None)


def test_meminfo_in_kilobytes_or_bytes(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 2 kB\nMemAvailable: 1 kB\nSwapTotal: 4096\nHugePages_Total: 0\n")
    memory = detect(str(tmp_path)).memory
    assert (memory.total_bytes, memory.available_bytes, memory.swap_bytes) == (2048, 1024, 4096)


def test_live_machine():
    machine = detect("/")
    assert machine.cpu.logical_cpus >= 1 and machine.cpu.architecture
    assert machine.cpu.usable_cpus and set(machine.cpu.usable_cpus) <= set(range(1024))
    assert machine.memory.total_bytes and machine.disk.total_bytes
    assert isinstance(machine.openvino, list)
    assert set(physical_core_cpus("/")) <= set(machine.cpu.usable_cpus)
    json.dumps(to_builtins(machine))


def test_live_disk_measures_the_nearest_existing_folder(tmp_path):
    disk = detect("/", models_dir=str(tmp_path / "not/yet/created")).disk
    assert disk.path.endswith("not/yet/created") and disk.total_bytes and disk.free_bytes is not None


def test_cgroup_quota(tmp_path):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/app.slice/worker\n")
    (tmp_path / "sys/fs/cgroup/app.slice/worker").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) is None
    (tmp_path / "sys/fs/cgroup/app.slice/cpu.max").write_text("250000 100000\n")
    (tmp_path / "sys/fs/cgroup/app.slice/worker/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) == 2.5


def test_nvidia_smi_output():
    found = parse_query("00000000:01:00.0, NVIDIA GeForce GTX 1080 Ti, 11264 MiB, 6.1\nbogus line\n")
    assert list(found) == ["0000:01:00.0"]
    assert (found["0000:01:00.0"].vram_bytes, found["0000:01:00.0"].compute_capability) == (11264 * MiB, "6.1")


def test_openvino_names_the_intel_gpus_it_sees():
    name = "i7-2600k+arc-a580"
    seen = [OpenVinoDevice("CPU", "Intel Core i7", "INTEGRATED"), OpenVinoDevice("GPU", "Intel Arc A580", "DISCRETE")]
    [gpu] = detect_accelerators(root(name), read_pci(root(name)), seen)
    assert gpu.device == "GPU"
    # with PCI info it maps by slot, whatever the order
    name = "i5-3570k+arc-a580+gtx1080ti"
    seen = [OpenVinoDevice("GPU.0", "Intel Arc A580", "DISCRETE", "0000:04:00.0")]
    found = {a.slot: a for a in detect_accelerators(root(name), read_pci(root(name)), seen)}
    assert (found["0000:04:00.0"].device, found["0000:04:00.0"].name) == ("GPU.0", "Intel Arc A580")
    assert found["0000:00:02.0"].device == "pci:0000:00:02.0"  # the Ivy Bridge iGPU OpenVINO cannot use


def test_to_builtins_shows_pci_ids_in_hex():
    shown = to_builtins(detect(root("intel-core-ultra-7-256v")))
    npu = next(a for a in shown["accelerators"] if a["kind"] == "npu")
    assert (npu["vendor_id"], npu["device_id"], npu["device"]) == ("0x8086", "0x643e", "NPU")
    assert next(d for d in shown["pci"] if d["slot"] == "0000:00:02.0")["class_id"] == "0x0300"
    assert shown["memory"]["total_bytes"] == 16251994112
    assert msgspec.json.decode(msgspec.json.encode(shown))["cpu"]["architecture"] == "amd64"
