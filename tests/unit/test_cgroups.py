"""Tests of agent.kube.cgroups.

The resolution tests build real cgroup v2 trees under a unique ``podtap-test-<random>``
directory of the live cgroup2 mount and move real child processes into them; they need
root and cgroup v2, are skipped without them, and fail instead when CI=true.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.kube.cgroups import (
    CgroupError,
    candidate_paths,
    find_cgroup2_mount,
    init_pid,
    kernel_dev,
    pod_uid_from_path,
    stream_idents,
)
from agent.kube.model import ContainerMeta, FileIdent

UID = "3f0c2b7e-1d2a-4c5b-9e8f-0a1b2c3d4e5f"
UID_ = UID.replace("-", "_")
CID = "4b8e2f1c" * 8
META = ContainerMeta(
    namespace="shop",
    pod_name="web-1",
    pod_uid=UID,
    container_name="app",
    container_id=CID,
    runtime="containerd",
    image="web:1",
    host="node-1",
    qos_class="burstable",
)
SCOPE_PREFIX = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}


# --- fixtures: real cgroups ----------------------------------------------------------------




def rmdir_when_empty(path: str) -> None:
    """rmdir a cgroup; a cgroup whose last task just died can be busy for a moment."""
    deadline = time.monotonic() + 60  # a bound for a loaded machine, not a wait
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def remove_cgroup_tree(path: str) -> None:
    """rmdir every cgroup under path, leaves first (interface files go with their dir)."""
    for dirpath, _, _ in os.walk(path, topdown=False):
        rmdir_when_empty(dirpath)






def move_into(cgroup_dir: str, pid: int) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(pid))


# --- layouts -------------------------------------------------------------------------------

QOS = ["guaranteed", "burstable", "besteffort"]
RUNTIMES = ["containerd", "cri-o", "docker"]


def systemd_layout(qos: str, runtime: str, slice_prefix: str = "kubepods") -> str:
    """Written out by hand, independently of candidate_paths."""
    if qos == "guaranteed":
        pod = f"{slice_prefix}.slice/{slice_prefix}-pod{UID_}.slice"
    else:
        pod = (
            f"{slice_prefix}.slice/{slice_prefix}-{qos}.slice/{slice_prefix}-{qos}-pod{UID_}.slice"
        )
    return f"{pod}/{SCOPE_PREFIX[runtime]}-{CID}.scope"


def cgroupfs_layout(qos: str, runtime: str) -> str:
    pod = f"kubepods/pod{UID}" if qos == "guaranteed" else f"kubepods/{qos}/pod{UID}"
    leaf = f"crio-{CID}" if runtime == "cri-o" else CID
    return f"{pod}/{leaf}"


def meta_for(qos: str, runtime: str) -> ContainerMeta:
    return replace(META, qos_class=qos, runtime=runtime)






def kernel_cgroup_id(path: str) -> int:
    """The id the kernel gives the cgroup: the payload of its kernfs file handle (what
    libbpf's selftests compare with bpf_get_current_cgroup_id())."""
    libc = ctypes.CDLL(None, use_errno=True)
    handle = ctypes.create_string_buffer(8 + 8)
    struct.pack_into("Ii", handle, 0, 8, 0)  # handle_bytes = 8, handle_type (out)
    mount_id = ctypes.c_int()
    at_fdcwd = -100
    if libc.name_to_handle_at(at_fdcwd, path.encode(), handle, ctypes.byref(mount_id), 0):
        raise OSError(ctypes.get_errno(), f"name_to_handle_at({path})")
    kernfs_id: int = struct.unpack_from("Q", handle, 8)[0]
    return kernfs_id






















# --- processes in a real cgroup ----------------------------------------------------------


def pipe_ident(fd: int) -> FileIdent:
    st = os.fstat(fd)
    return FileIdent(dev=kernel_dev(st.st_dev), ino=st.st_ino)




def wait_for_comm(pid: int, comm: str) -> None:
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"pid {pid} never became {comm}"
        time.sleep(0.01)


def test_stream_idents_of_a_closed_stdout(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    child = spawn(["sh", "-c", "exec 1>&-; exec sleep 30"], stderr=subprocess.PIPE)
    wait_for_comm(child.pid, "sleep")
    assert child.stderr is not None
    assert stream_idents(child.pid) == (None, pipe_ident(child.stderr.fileno()))


def test_first_pid_of_a_vanished_cgroup(tmp_path: Path) -> None:
    assert init_pid(str(tmp_path / "gone")) is None


def test_init_pid_without_readable_processes_is_the_lowest(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("4242\n17\n999\n")
    empty_proc = tmp_path / "proc"
    empty_proc.mkdir()
    assert init_pid(str(tmp_path), str(empty_proc)) == 17
    (tmp_path / "cgroup.procs").write_text("")
    assert init_pid(str(tmp_path), str(empty_proc)) is None


# --- which process is the container's init ------------------------------------------------

SHIM = 900  # the runtime's shim: outside the cgroup


def fake_proc(root: Path, procs: dict[int, tuple[str, int, int]]) -> str:
    """A /proc with a `stat` file per pid: pid -> (comm, parent pid, start time)."""
    for pid, (comm, ppid, start) in procs.items():
        (root / str(pid)).mkdir(parents=True)
        fields = ["S", str(ppid)] + ["0"] * 17 + [str(start)] + ["0"] * 30
        (root / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
    return str(root)


INIT_CASES = {
    # exec session (also a child of the shim) started later but with a lower pid: wrap-around
    "exec session with a lower pid": ({500: ("nginx", SHIM, 1000), 12: ("sh", SHIM, 5000)}, 500),
    # the workload's own child with a lower pid than the init (its parent is inside)
    "init's child with a lower pid": ({500: ("nginx", SHIM, 1000), 3: ("worker", 500, 1000)}, 500),
    "command names with spaces and parentheses": (
        {700: ("a) (b c", SHIM, 10), 20: ("x) 9 9 (y", SHIM, 20)},
        700,
    ),
    "only children of a gone init: the oldest": (
        {40: ("w", 1, 300), 30: ("w", 1, 400)},
        40,
    ),
}


@pytest.mark.parametrize("procs, expected", INIT_CASES.values(), ids=INIT_CASES.keys())
def test_init_pid_is_the_oldest_process_started_from_outside(
    tmp_path: Path, procs: dict[int, tuple[str, int, int]], expected: int
) -> None:
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    (cgroup / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in sorted(procs)))
    assert init_pid(str(cgroup), fake_proc(tmp_path / "proc", procs)) == expected


def test_init_pid_ignores_processes_outside_our_pid_namespace_and_gone_ones(
    tmp_path: Path,
) -> None:
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    # cgroup.procs shows 0 for a process our pid namespace cannot see; 8 has exited.
    (cgroup / "cgroup.procs").write_text("0\n8\n500\n0\n")
    proc = fake_proc(tmp_path / "proc", {500: ("app", SHIM, 100)})
    assert init_pid(str(cgroup), proc) == 500
    (cgroup / "cgroup.procs").write_text("0\n0\n")
    assert init_pid(str(cgroup), proc) is None


def wait_for_a_later_start_tick(pid: int) -> None:
    """Until a process started now has a later start time (clock ticks since boot) than
    `pid`: an exec session comes after the container's init."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat", "rb") as f:
        start = int(f.read().rsplit(b")", 1)[1].split()[19])
    deadline = time.monotonic() + 60
    while time.clock_gettime(time.CLOCK_BOOTTIME) * ticks < start + 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def spawn_below(
    spawn: Callable[..., subprocess.Popen[bytes]], below: int, argv: list[str], **kwargs: Any
) -> subprocess.Popen[bytes]:
    """Start a process whose pid is lower than `below`, as after a pid wrap-around: the
    kernel's next pid is set through ns_last_pid (root), retried when another fork wins."""
    for attempt in range(50):
        last = max(300, below - 2000 - 37 * attempt)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(last))
        child = spawn(argv, **kwargs)
        if child.pid < below:
            return child
        child.kill()
    raise AssertionError(f"could not get a pid below {below}")




# --- our own cgroup --------------------------------------------------------------------------


def self_cgroup_file(tmp_path: Path, path: str) -> str:
    f = tmp_path / "self-cgroup"
    f.write_text(f"0::{path}\n")
    return str(f)






def test_stream_idents_under_another_proc_root(tmp_path: Path) -> None:
    target = tmp_path / "log"
    target.write_text("")
    fd_dir = tmp_path / "proc" / "77" / "fd"
    fd_dir.mkdir(parents=True)
    (fd_dir / "2").symlink_to(target)
    st = target.stat()
    assert stream_idents(77, proc_root=str(tmp_path / "proc")) == (
        None,
        FileIdent(dev=kernel_dev(st.st_dev), ino=st.st_ino),
    )
    assert stream_idents(78, proc_root=str(tmp_path / "proc")) == (None, None)


@pytest.mark.parametrize(("major", "minor"), [(0, 13), (8, 1), (259, 0xFFFFF), (4095, 0)])
def test_kernel_dev_encoding(major: int, minor: int) -> None:
    assert kernel_dev(os.makedev(major, minor)) == (major << 20) | minor


# --- candidate paths (no cgroups needed) -------------------------------------------------


def test_candidates_systemd_then_cgroupfs() -> None:
    pod_slice = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
    assert candidate_paths(META) == [
        f"{pod_slice}/cri-containerd-{CID}.scope/container",
        f"{pod_slice}/cri-containerd-{CID}.scope",
        f"kubepods/burstable/pod{UID}/{CID}",
    ]


def test_candidates_for_every_root_in_order() -> None:
    paths = candidate_paths(META, roots=("", "kubelet.slice", "/custom/"))
    assert [p.split("/")[0] for p in paths] == [
        "kubepods.slice",
        "kubepods.slice",
        "kubepods",
        "kubelet.slice",
        "kubelet.slice",
        "kubelet.slice",
        "custom",
        "custom",
        "custom",
    ]
    assert paths[3].startswith("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.")
    assert paths[5] == f"kubelet.slice/kubepods/burstable/pod{UID}/{CID}"


def test_candidates_never_name_a_pod_cgroup() -> None:
    for qos in ["", *QOS]:
        for runtime in ["", *RUNTIMES]:
            for path in candidate_paths(replace(META, qos_class=qos, runtime=runtime)):
                assert CID in path
                assert path.endswith(("/container", ".scope", CID))


def test_candidates_need_ids() -> None:
    assert candidate_paths(replace(META, container_id="")) == []
    assert candidate_paths(replace(META, pod_uid="")) == []


# --- mountinfo -----------------------------------------------------------------------------

PURE_V2 = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate
"""

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw
"""

V1_ONLY = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
"""


def write_mountinfo(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(text)
    return str(path)


def make_cgroup2_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.controllers").write_text("cpu memory\n")
    return path


@pytest.mark.parametrize(
    ("text", "where"), [(PURE_V2, "sys/fs/cgroup"), (HYBRID, "sys/fs/cgroup/unified")]
)
def test_mountinfo_pure_and_hybrid(tmp_path: Path, text: str, where: str) -> None:
    host = tmp_path / "host"
    expected = make_cgroup2_dir(host / where)
    mountinfo = write_mountinfo(tmp_path, text)
    assert find_cgroup2_mount(mountinfo, host_root=str(host)) == str(expected)


def test_mountinfo_without_cgroup2(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="no cgroup2 mount"):
        find_cgroup2_mount(write_mountinfo(tmp_path, V1_ONLY))


def test_mountinfo_unreadable(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="cannot read"):
        find_cgroup2_mount(str(tmp_path / "missing"))


def test_mountinfo_cgroup2_not_visible_here(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="not readable here"):
        find_cgroup2_mount(write_mountinfo(tmp_path, PURE_V2), host_root=str(tmp_path / "x"))


def test_own_mountinfo_prefers_the_hosts_cgroup_fs_mounted_into_the_pod(tmp_path: Path) -> None:
    # In the pod: its own (cgroup-namespaced) /sys/fs/cgroup, and the host's under /host.
    host = tmp_path / "host"
    hosts = make_cgroup2_dir(host / "sys/fs/cgroup")
    text = (
        "26 25 0:23 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup ro\n"
        f"90 80 0:23 /../../.. {hosts} rw,relatime - cgroup2 cgroup2 rw\n"
    )
    assert find_cgroup2_mount(write_mountinfo(tmp_path, text), str(host)) == str(hosts)


def test_hosts_mountinfo_paths_are_prefixed_with_host_root(tmp_path: Path) -> None:
    # /host/proc/1/mountinfo lists host paths.
    host = tmp_path / "host"
    expected = make_cgroup2_dir(host / "sys/fs/cgroup")
    assert find_cgroup2_mount(write_mountinfo(tmp_path, PURE_V2), str(host)) == str(expected)


def test_usual_location_wins_over_other_cgroup2_mounts(tmp_path: Path) -> None:
    host = tmp_path / "host"
    make_cgroup2_dir(host / "run/other")
    expected = make_cgroup2_dir(host / "sys/fs/cgroup")
    text = "50 22 0:40 / /run/other rw - cgroup2 none rw\n" + PURE_V2
    assert find_cgroup2_mount(write_mountinfo(tmp_path, text), str(host)) == str(expected)


def test_mountinfo_escaped_mount_point(tmp_path: Path) -> None:
    host = tmp_path / "host"
    expected = make_cgroup2_dir(host / "mnt/my cgroup")
    text = "50 22 0:40 / /mnt/my\\040cgroup rw shared:3 - cgroup2 none rw\n"
    assert find_cgroup2_mount(write_mountinfo(tmp_path, text), str(host)) == str(expected)




# --- the pod a container cgroup belongs to ----------------------------------------------


@pytest.mark.parametrize("qos", QOS)
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_pod_uid_from_a_container_path(driver: str, qos: str, runtime: str) -> None:
    layout = systemd_layout if driver == "systemd" else cgroupfs_layout
    path = "/kubelet.slice/" + layout(qos, runtime)
    assert pod_uid_from_path(path) == UID
    assert pod_uid_from_path(path + "/container") == UID  # crun's child of the scope


@pytest.mark.parametrize(
    "path",
    [
        f"/kubepods/besteffort/pod{UID}",  # the pod itself
        f"/kubepods/besteffort/pod{UID}/not-a-container",
        f"/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope",
        f"/system.slice/cri-containerd-{CID}.scope",
        "/",
    ],
)
def test_pod_uid_only_from_container_paths(path: str) -> None:
    assert pod_uid_from_path(path) is None
