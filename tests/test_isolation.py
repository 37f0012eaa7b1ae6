"""The broker's ZeroMQ sockets are private to the server's user, and nothing but HTTP listens on TCP.

The sockets are ipc:// files in a runtime folder of mode 0700, so another user
cannot even reach them; the only TCP port the server's processes listen on is
the HTTP API's.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli, data_env, process_tree

NOBODY = 65534
pytestmark = pytest.mark.one_engine  # the sockets are the broker's, whatever the runtime: the shared server's


def connect_as(path: Path, uid: int | None = None) -> str:
    """A plain AF_UNIX connect to `path` from a forked child, as `uid` (and its group) when given:
    "connected", "EACCES", or the error. Forked so no interpreter or file of root's must be reachable."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        outcome = "child failed"
        try:
            os.close(read)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    outcome = "connected"
                except PermissionError:
                    outcome = "EACCES"
                except OSError as exc:
                    outcome = repr(exc)
        finally:
            os.write(write, outcome.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def runtime_dir(server) -> Path:
    """The server's runtime folder, as infersnap computes it for the server's data folder."""
    code = "from infersnap import paths; print(paths.runtime_dir())"
    out = subprocess.run([sys.executable, "-c", code], env=server.env, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def socket_inodes(pids: list[int]) -> set[int]:
    """The inodes of every socket the processes hold open."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except (FileNotFoundError, ProcessLookupError):
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:["):-1]))
    return inodes


def listening_tcp_ports(inodes: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket (state 0A) among `inodes`, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "0A" and inode in inodes:
                address, port = local.split(":")
                found.add((address, int(port, 16)))
    return found


def bound_udp_ports(inodes: set[int]) -> set[tuple[str, int]]:
    found = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[9]) in inodes:
                address, port = fields[1].split(":")
                found.add((address, int(port, 16)))
    return found


def unix_socket_paths(inodes: set[int]) -> set[str]:
    """The file names of the named (non-abstract) unix sockets among `inodes`."""
    found = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[6]) in inodes and not fields[7].startswith("@"):
            found.add(fields[7])
    return found


def test_the_runtime_folder_is_private_and_holds_the_sockets(server):
    runtime = runtime_dir(server)
    info = runtime.lstat()
    assert stat.S_ISDIR(info.st_mode), f"{runtime} is not a plain folder"
    assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
    assert info.st_uid == process_uid(server.process.pid) == os.getuid()
    sockets = sorted(p.name for p in runtime.iterdir() if stat.S_ISSOCK(p.lstat().st_mode))
    assert {"clients.sock", "workers.sock"} <= set(sockets), sockets
    # every named unix socket the server's processes hold lies in that folder
    named = unix_socket_paths(socket_inodes(process_tree(server.process.pid)))
    assert named, "no unix socket found in the server's processes"
    assert all(Path(p).parent == runtime for p in named), named


def test_another_user_cannot_connect_to_the_sockets(server):
    if os.getuid() != 0:
        # CI runs as root and so runs this; a run as another user cannot switch to a second one
        pytest.skip("this run is not root: only root can connect as a second user (nobody) to check the refusal")
    runtime = runtime_dir(server)

    for name in ("clients.sock", "workers.sock"):
        path = runtime / name
        assert connect_as(path) == "connected"  # the control: the socket is live and its owner gets in
        assert connect_as(path, NOBODY) == "EACCES"


def test_only_the_http_port_listens_on_tcp(server):
    tree = process_tree(server.process.pid)
    assert len(tree) >= 4, f"expected supervisor, broker, worker and frontend, found {tree}"
    inodes = socket_inodes(tree)
    listening = listening_tcp_ports(inodes)
    assert listening, "the HTTP port was not found listening"
    assert {port for _, port in listening} == {server.port}, listening
    assert bound_udp_ports(inodes) == set()


def test_serve_refuses_a_runtime_folder_planted_by_someone_else(tmp_path):
    """The runtime folder's name is predictable and the temp dir is shared: what another user put
    there first (a symlink to a folder of ours, a folder of their own) is refused, never followed."""
    env = {**data_env(tmp_path / "data"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    code = "from infersnap import paths; print(paths.runtime_dir())"
    runtime = Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip())

    victim = tmp_path / "victim"  # a folder of the server's user, open to all, that a symlink points at
    victim.mkdir()
    victim.chmod(0o755)
    runtime.symlink_to(victim)
    refused = cli(env, "serve", check=False, timeout=60)
    assert refused.returncode != 0 and str(runtime) in refused.stderr and "symlink" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755 and not any(victim.iterdir())

    if os.getuid() == 0:
        runtime.unlink()
        runtime.mkdir(mode=0o777)
        os.chown(runtime, NOBODY, NOBODY)
        refused = cli(env, "serve", check=False, timeout=60)
        assert refused.returncode != 0 and "another user" in refused.stderr, refused.stderr
        assert runtime.stat().st_uid == NOBODY and not any(runtime.iterdir())
