"""SimNode: real containerd/runc and systemd-layout containers, the FakeKubelet, cleanup.

Needs root, containerd, runc and busybox-static: skipped without them, failed when CI=true.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube.cgroups import resolve
from agent.kube.kubelet import KubeletClient
from agent.kube.pods import running_containers
from simnode import node as node_module
from simnode.node import (
    SimContainer,
    SimContainerSpec,
    SimNode,
    SimPod,
    cgroup_mount_points,
    process_alive,
    simnode_unavailable_reason,
)
from tests.kernel import unavailable

SEQ = b"".join(b"%d\n" % i for i in range(1, 101))
WARNINGS = b"warn-1\nwarn-2\n"
PARTIAL = b"no newline at the end"
# The v2 line of /proc/self/cgroup, with shell builtins only.
PRINT_V2_CGROUP = (
    'while read -r l; do case "$l" in 0::*) echo "$l";; esac; done < /proc/self/cgroup'
)


def _require_simnode() -> None:
    reason = simnode_unavailable_reason()
    if reason is not None:
        unavailable(reason)


@pytest.fixture(scope="session")
def rootfs_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "simnode-rootfs"


@pytest.fixture
def node(rootfs_cache: Path) -> Iterator[SimNode]:
    _require_simnode()
    with SimNode(rootfs=rootfs_cache) as sim:
        yield sim


def fetch_pods(node: SimNode) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        async with KubeletClient(node.kubelet_config()) as client:
            return await client.get_pods()

    return asyncio.run(fetch())


def listed(node: SimNode, pod: SimPod) -> dict[str, Any] | None:
    for item in fetch_pods(node):
        if item["metadata"]["uid"] == pod.uid:
            return item
    return None


def statuses(item: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in item["status"]["containerStatuses"]}


def expected_relpath(node: SimNode, pod: SimPod, container: SimContainer) -> str:
    """Written out independently of node.py: the kubelet's two layouts."""
    qos, uid, cid = pod.qos, pod.uid, container.id
    if pod.driver == "containerd":
        level = "" if qos == "guaranteed" else f"{qos}/"
        return f"{node.prefix}/kubepods/{level}pod{uid}/{cid}"
    u = uid.replace("-", "_")
    pod_slice = (
        f"kubepods-pod{u}.slice"
        if qos == "guaranteed"
        else f"kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"
    )
    return f"{node.prefix}/kubepods.slice/{pod_slice}/cri-containerd-{cid}.scope"


def gate(node: SimNode, driver: str) -> tuple[str, Path]:
    """A new file the script waits for: (its path as the script sees it, its path here)."""
    name = f"gate-{secrets.token_hex(4)}"
    host = node.rootfs / "tmp" / name
    return ("/tmp/" + name if driver == "containerd" else str(host)), host


def wait_for_stdout(container: SimContainer, size: int, timeout: float = 10.0) -> None:
    """Until the container wrote `size` bytes to stdout (or exited)."""
    deadline = time.monotonic() + timeout
    while len(container.output_so_far()[0]) < size and time.monotonic() < deadline:
        if not container.running:
            break
        time.sleep(0.005)
    assert len(container.output_so_far()[0]) >= size, container.output_so_far()


def leftovers(prefix_glob: str) -> list[Path]:
    return [p for mount in cgroup_mount_points() for p in mount.glob(prefix_glob)]


@pytest.mark.parametrize(
    ("driver", "qos"),
    [
        ("containerd", "besteffort"),
        ("containerd", "guaranteed"),
        ("systemd", "besteffort"),
        ("systemd", "guaranteed"),
    ],
)
def test_pod_outputs_kubelet_and_cgroups(node: SimNode, driver: str, qos: str) -> None:
    gate_in_script, gate_here = gate(node, driver)
    talker_script = (
        f"{PRINT_V2_CGROUP}; seq 1 100; echo warn-1 >&2; echo warn-2 >&2; "
        f"i=0; while [ ! -e {gate_in_script} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done"
    )
    pod = node.run_pod(
        "shop",
        f"cart-{driver}-{qos}",
        [
            SimContainerSpec("talker", talker_script, image="registry.example/talker:1"),
            SimContainerSpec("partial", f"printf '{PARTIAL.decode()}'; exit 3"),
        ],
        labels={"app": "cart"},
        annotations={"note": "sim"},
        qos=qos,
        driver=driver,
        owner=("ReplicaSet", "cart-7d9f"),
    )
    talker, partial = pod.container("talker"), pod.container("partial")
    relpath = expected_relpath(node, pod, talker)
    assert talker.cgroup_relpath == relpath
    assert talker.cgroup_path == Path(node.cgroup_mount) / relpath

    # While the talker runs: its cgroup, its pid, what the kubelet says, what resolve finds.
    cgroup_line = f"0::/{relpath}\n".encode()
    wait_for_stdout(talker, len(cgroup_line) + len(SEQ))
    assert talker.running and talker.pid is not None
    assert f"0::/{relpath}\n" in Path(f"/proc/{talker.pid}/cgroup").read_text()
    assert partial.wait(10) == 3
    assert partial.output() == (PARTIAL, b"")

    item = listed(node, pod)
    assert item is not None
    assert item["metadata"]["labels"] == {"app": "cart"}
    assert item["metadata"]["ownerReferences"][0]["name"] == "cart-7d9f"
    assert item["status"]["qosClass"].lower() == qos
    by_name = statuses(item)
    assert by_name["talker"]["containerID"] == f"containerd://{talker.id}"
    assert by_name["partial"]["containerID"] == f"containerd://{partial.id}"
    assert "running" in by_name["talker"]["state"]
    assert by_name["partial"]["state"]["terminated"]["exitCode"] == 3

    metas, skipped = running_containers(fetch_pods(node), node.node_name)
    meta = next(m for m in metas if m.container_id == talker.id)
    assert skipped == 0 and meta.pod_uid == pod.uid
    found = resolve(meta, node.cgroup_mount, roots=node.roots)
    assert found == (str(talker.cgroup_path), talker.cgroup_path.stat().st_ino)

    gate_here.touch()
    assert talker.wait(15) == 0
    gate_here.unlink()
    assert talker.output() == (cgroup_line + SEQ, WARNINGS)
    item = listed(node, pod)
    assert item is not None  # still listed until deleted, as with a real kubelet
    assert statuses(item)["talker"]["state"]["terminated"]["exitCode"] == 0
    assert item["status"]["phase"] == "Failed"

    node.delete_pod(pod)
    assert listed(node, pod) is None
    assert leftovers(pod.cgroup_relpath) == []


def test_registration_modes(node: SimNode) -> None:
    quick = [SimContainerSpec("c", "echo done")]
    late = node.run_pod("default", "late", quick, register="after")
    unlisted = node.run_pod("default", "unlisted", quick, register="never")
    item = listed(node, late)
    assert item is not None
    assert statuses(item)["c"]["containerID"] == late.containers[0].container_id_uri
    assert listed(node, unlisted) is None
    assert late.wait(10) == {"c": 0} and unlisted.wait(10) == {"c": 0}
    assert late.containers[0].output() == (b"done\n", b"")


@pytest.mark.parametrize("driver", ["containerd", "systemd"])
def test_delete_pod_kills_and_unlists(node: SimNode, driver: str) -> None:
    pod = node.run_pod(
        "default", f"doomed-{driver}", [SimContainerSpec("c", "echo up; sleep 60")], driver=driver
    )
    container = pod.containers[0]
    wait_for_stdout(container, 3)
    node.delete_pod(pod)
    assert container.wait(5) == 137
    assert container.output() == (b"up\n", b"")
    assert listed(node, pod) is None
    assert leftovers(pod.cgroup_relpath) == []


def cgroup_procs(container: SimContainer, count: int, timeout: float = 10.0) -> list[int]:
    """Host pids in the container's cgroup, once there are `count` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(p) for p in (container.cgroup_path / "cgroup.procs").read_text().split()]
        if len(pids) >= count:
            return pids
        time.sleep(0.005)
    raise AssertionError(f"fewer than {count} processes in {container.cgroup_path}")


def test_stop_removes_everything(rootfs_cache: Path) -> None:
    _require_simnode()
    node = SimNode(rootfs=rootfs_cache).start()
    try:
        temp_dir = node.temp_dir
        in_containers: list[int] = []
        for driver in ("containerd", "systemd"):
            # A background child the runtime does not know about, and a long-running init.
            script = "sleep 60 & sleep 60"
            pod = node.run_pod(
                "default", f"busy-{driver}", [SimContainerSpec("c", script)], driver=driver
            )
            in_containers += cgroup_procs(pod.containers[0], 2)
        started = node.started_pids()
        # containerd + (ctr, init, shim) of the containerd pod + the systemd pod's shell
        assert len(started) == 5
    finally:
        node.stop()
    node.stop()  # a second stop does nothing

    assert leftovers(node.prefix) == []  # only its own: other nodes may run beside it
    assert not temp_dir.exists()
    assert [pid for pid in started + in_containers if process_alive(pid)] == []


def test_stop_after_failed_start(rootfs_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _require_simnode()

    def broken_kubelet(self: SimNode) -> None:
        raise RuntimeError("kubelet failed to start")

    monkeypatch.setattr(node_module.SimNode, "_start_kubelet", broken_kubelet)
    node = SimNode(rootfs=rootfs_cache)
    with pytest.raises(RuntimeError, match="kubelet failed"):
        node.start()
    assert leftovers(node.prefix) == []
    assert not node.temp_dir.exists()
    assert [pid for pid in node.started_pids() if process_alive(pid)] == []
    node.stop()
