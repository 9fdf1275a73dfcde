"""Tests of cgroups that need root and real cgroups
(moved from tests/unit/test_cgroups.py: kernel tests fail, not skip, with CI=true)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.kube.cgroups import (
    cgroup_id,
    init_pid,
    own_cgroup,
    resolve,
    scan_containers,
    stream_idents,
)
from tests.unit.test_cgroups import (  # noqa: F401
    CID,
    HYBRID,
    INIT_CASES,
    META,
    PURE_V2,
    QOS,
    RUNTIMES,
    SCOPE_PREFIX,
    SHIM,
    UID,
    UID_,
    V1_ONLY,
    cgroupfs_layout,
    fake_proc,
    kernel_cgroup_id,
    make_cgroup2_dir,
    meta_for,
    move_into,
    pipe_ident,
    remove_cgroup_tree,
    rmdir_when_empty,
    self_cgroup_file,
    spawn_below,
    systemd_layout,
    wait_for_a_later_start_tick,
    wait_for_comm,
    write_mountinfo,
)


@pytest.fixture
def test_root(mount: str) -> Iterator[str]:
    """A fresh top-level cgroup, relative to the mount; removed with all it holds."""
    name = f"podtap-test-{secrets.token_hex(6)}"
    os.mkdir(os.path.join(mount, name))
    try:
        yield name
    finally:
        remove_cgroup_tree(os.path.join(mount, name))


@pytest.fixture
def make_cgroup(mount: str, test_root: str) -> Callable[[str], str]:
    """Creates a cgroup (and its parents) under the test root; returns its absolute path."""

    def make(relative: str) -> str:
        path = os.path.join(mount, test_root, relative)
        os.makedirs(path, exist_ok=True)
        return path

    return make


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("qos", QOS)
@pytest.mark.parametrize("driver", ["systemd", "cgroupfs"])
def test_resolve_every_driver_qos_and_runtime(
    mount: str,
    test_root: str,
    make_cgroup: Callable[[str], str],
    driver: str,
    qos: str,
    runtime: str,
) -> None:
    layout = systemd_layout(qos, runtime) if driver == "systemd" else cgroupfs_layout(qos, runtime)
    path = make_cgroup(layout)
    meta = meta_for(qos, runtime)

    resolved = resolve(meta, mount, roots=(test_root,))

    assert resolved == (path, os.stat(path).st_ino)
    assert scan_containers(mount, roots=(test_root,)) == {CID: resolved}
    assert resolve(meta, mount, roots=(test_root,), index={CID: resolved}) == resolved


@pytest.mark.parametrize("qos", QOS)
def test_kubelet_reports_capitalized_qos(
    mount: str, test_root: str, make_cgroup: Callable[[str], str], qos: str
) -> None:
    path = make_cgroup(systemd_layout(qos, "containerd"))
    reported = {"guaranteed": "Guaranteed", "burstable": "Burstable", "besteffort": "BestEffort"}
    meta = replace(META, qos_class=reported[qos])
    assert resolve(meta, mount, roots=(test_root,)) == (path, cgroup_id(path))


def test_cgroup_id_is_the_kernels_cgroup_id(make_cgroup: Callable[[str], str]) -> None:
    path = make_cgroup(cgroupfs_layout("besteffort", "containerd"))
    assert cgroup_id(path) == os.stat(path).st_ino == kernel_cgroup_id(path)
    assert cgroup_id(path) != cgroup_id(os.path.dirname(path))


def test_crun_container_child_is_preferred(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    scope = make_cgroup(systemd_layout("burstable", "cri-o"))
    child = make_cgroup(systemd_layout("burstable", "cri-o") + "/container")
    meta = meta_for("burstable", "cri-o")

    expected = (child, os.stat(child).st_ino)
    assert resolve(meta, mount, roots=(test_root,)) == expected
    assert scan_containers(mount, roots=(test_root,)) == {CID: expected}
    assert expected[1] != os.stat(scope).st_ino


def test_pod_cgroup_alone_does_not_resolve(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    for runtime in RUNTIMES:
        meta = meta_for("burstable", runtime)
        make_cgroup(os.path.dirname(systemd_layout("burstable", runtime)))
        make_cgroup(os.path.dirname(cgroupfs_layout("burstable", runtime)))
        assert resolve(meta, mount, roots=(test_root,)) is None
    assert scan_containers(mount, roots=(test_root,)) == {}


def test_conmon_cgroups_are_not_containers(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    pod_slice = os.path.dirname(systemd_layout("burstable", "cri-o"))
    pod_dir = os.path.dirname(cgroupfs_layout("besteffort", "cri-o"))
    make_cgroup(f"{pod_slice}/crio-conmon-{CID}.scope")
    make_cgroup(f"{pod_dir}/crio-conmon-{CID}")
    assert resolve(meta_for("burstable", "cri-o"), mount, roots=(test_root,)) is None
    assert resolve(meta_for("besteffort", "cri-o"), mount, roots=(test_root,)) is None
    assert scan_containers(mount, roots=(test_root,)) == {}


def test_unknown_qos_and_runtime_still_resolve(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    path = make_cgroup(systemd_layout("besteffort", "cri-o"))
    meta = replace(META, qos_class="", runtime="some-future-runtime")
    assert resolve(meta, mount, roots=(test_root,)) == (path, cgroup_id(path))


def test_nested_systemd_cgroup_root(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    # kubelet --cgroup-root=/kubelet.slice: slice names carry their parents' names.
    layout = systemd_layout("burstable", "containerd", slice_prefix="kubelet-kubepods")
    path = make_cgroup(f"kubelet.slice/{layout}")
    roots = (test_root, f"{test_root}/kubelet.slice")

    assert resolve(META, mount, roots=roots) == (path, cgroup_id(path))
    assert scan_containers(mount, roots=roots) == {CID: (path, cgroup_id(path))}
    assert resolve(META, mount, roots=(test_root,)) is None


def test_nested_cgroupfs_cgroup_root(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    path = make_cgroup(f"node/{cgroupfs_layout('guaranteed', 'docker')}")
    meta = meta_for("guaranteed", "docker")
    assert resolve(meta, mount, roots=(f"/{test_root}/node/",)) == (path, cgroup_id(path))


def test_scan_finds_many_containers_of_both_drivers(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    expected = {}
    for i, (qos, runtime) in enumerate((q, r) for q in QOS for r in RUNTIMES):
        cid = f"{i:02x}" * 32
        uid = f"{i:08x}-0000-0000-0000-000000000000"
        meta = replace(META, pod_uid=uid, container_id=cid, qos_class=qos, runtime=runtime)
        systemd = i % 2 == 0
        scope = f"{SCOPE_PREFIX[runtime]}-{cid}.scope"
        leaf = f"crio-{cid}" if runtime == "cri-o" else cid
        if systemd and qos == "guaranteed":
            layout = f"kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/{scope}"
        elif systemd:
            layout = (
                f"kubepods.slice/kubepods-{qos}.slice/"
                f"kubepods-{qos}-pod{uid.replace('-', '_')}.slice/{scope}"
            )
        elif qos == "guaranteed":
            layout = f"kubepods/pod{uid}/{leaf}"
        else:
            layout = f"kubepods/{qos}/pod{uid}/{leaf}"
        path = make_cgroup(layout)
        expected[cid] = (path, cgroup_id(path))
        assert resolve(meta, mount, roots=(test_root,)) == expected[cid]
    make_cgroup("kubepods.slice/kubepods-burstable.slice/not-a-pod.slice/" + "f" * 64)
    make_cgroup("kubepods/burstable/podzz/" + "e" * 64)  # not a pod uid

    assert scan_containers(mount, roots=(test_root,)) == expected


def test_scan_of_missing_roots_is_empty(mount: str, test_root: str) -> None:
    assert scan_containers(mount, roots=(test_root, f"{test_root}/nope")) == {}


def test_resolve_falls_back_to_probing_on_index_miss(
    mount: str, test_root: str, make_cgroup: Callable[[str], str]
) -> None:
    path = make_cgroup(cgroupfs_layout("burstable", "containerd"))
    assert resolve(META, mount, roots=(test_root,), index={}) == (path, cgroup_id(path))


def test_first_pid_and_stream_idents_of_a_real_process(
    make_cgroup: Callable[[str], str], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    leaf = make_cgroup(cgroupfs_layout("besteffort", "containerd"))
    assert init_pid(leaf) is None  # empty cgroup

    first = spawn(["sleep", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = spawn(["sleep", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    move_into(leaf, second.pid)
    move_into(leaf, first.pid)
    assert init_pid(leaf) == first.pid  # both started from outside: the older one

    assert first.stdout is not None and first.stderr is not None
    stdout, stderr = stream_idents(first.pid)
    # A pipe's two ends share one inode: fstat of our read end names the child's write end.
    assert stdout == pipe_ident(first.stdout.fileno())
    assert stderr == pipe_ident(first.stderr.fileno())
    assert stdout != stderr
    assert stdout is not None and os.major(os.fstat(first.stdout.fileno()).st_dev) == 0
    assert stdout.dev == os.minor(os.fstat(first.stdout.fileno()).st_dev)  # pipefs: 0:N

    for child in (first, second):
        child.kill()
        child.wait()
    assert init_pid(leaf) is None
    assert stream_idents(first.pid) == (None, None)


def test_init_pid_of_a_container_with_an_exec_session(
    make_cgroup: Callable[[str], str], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """A `kubectl exec` session in the container: started later, with a lower pid (wrap),
    its stdout another pipe. The container's streams are the init's, not the session's."""
    leaf = make_cgroup(cgroupfs_layout("besteffort", "containerd"))
    init = spawn(["sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    move_into(leaf, init.pid)
    wait_for_a_later_start_tick(init.pid)
    session = spawn_below(
        spawn, init.pid, ["sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    move_into(leaf, session.pid)
    assert session.pid < init.pid
    assert init.stdout is not None and init.stderr is not None
    assert init_pid(leaf) == init.pid
    assert stream_idents(init_pid(leaf) or 0) == (
        pipe_ident(init.stdout.fileno()),
        pipe_ident(init.stderr.fileno()),
    )


@pytest.mark.parametrize("layout", ["cgroupfs", "systemd"])
def test_own_cgroup_in_a_private_cgroup_namespace(
    mount: str,
    test_root: str,
    make_cgroup: Callable[[str], str],
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    layout: str,
) -> None:
    """/proc/self/cgroup reads `0::/`: the container whose cgroup.procs lists us is ours."""
    relative = (
        cgroupfs_layout("burstable", "containerd")
        if layout == "cgroupfs"
        else systemd_layout("burstable", "containerd")
    )
    leaf = make_cgroup(relative)
    make_cgroup(cgroupfs_layout("besteffort", "docker").replace(CID, "e" * 64))
    agent = spawn(["sleep", "60"])
    move_into(leaf, agent.pid)
    found = own_cgroup(
        mount, (test_root,), pid=agent.pid, proc_self_cgroup=self_cgroup_file(tmp_path, "/")
    )
    assert found == (leaf, cgroup_id(leaf))


def test_own_cgroup_from_proc_self_cgroup_outside_the_pods(
    mount: str,
    test_root: str,
    make_cgroup: Callable[[str], str],
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    elsewhere = make_cgroup("system.slice/podtap.service")
    agent = spawn(["sleep", "60"])
    move_into(elsewhere, agent.pid)
    path = "/" + os.path.relpath(elsewhere, mount)
    self_file = self_cgroup_file(tmp_path, path)
    assert own_cgroup(mount, (test_root,), agent.pid, self_file) == (
        elsewhere,
        cgroup_id(elsewhere),
    )
    # A stale or foreign path (we are not in it) is not believed; nor is any pod's cgroup.
    other = spawn(["sleep", "60"])
    leaf = make_cgroup(cgroupfs_layout("burstable", "containerd"))
    move_into(leaf, other.pid)
    assert own_cgroup(mount, (test_root,), other.pid + 10**6, self_file) is None
    assert own_cgroup(mount, (test_root,), other.pid, self_file) == (leaf, cgroup_id(leaf))


def test_real_mount_is_a_cgroup2_root(mount: str) -> None:
    assert os.path.exists(os.path.join(mount, "cgroup.controllers"))
