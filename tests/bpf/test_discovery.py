"""Tests of agent.kube.discovery.Discovery against real cgroups and a real (loopback) kubelet.

Each test builds container cgroups under a fresh ``podtap-test-disc-<hex>`` directory of the
live cgroup2 mount (the configured cgroup root), serves pods from a FakeKubelet over HTTPS,
and records what Discovery writes to the kernel map. Needs root and cgroup v2: skipped
without them, failed instead when CI=true. Processes are killed by pid and cgroups removed
leaf-first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import KubeConfig
from agent.kube.cgroups import own_cgroup
from agent.kube.discovery import Discovery, Known
from agent.kube.filters import Filters
from agent.kube.kubelet import KubeletClient, KubeletConfig
from agent.kube.model import FileIdent
from simnode.containers import remove_tree
from simnode.kubelet import FakeKubelet
from simnode.tls import TLSFiles

TOKEN = "disc-token-0123456789"
HOST = "simnode-1"
GRACE_S = 0.3
SCOPE = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}
QOS_NAMES = {"besteffort": "BestEffort", "burstable": "Burstable", "guaranteed": "Guaranteed"}
Entry = tuple[FileIdent | None, FileIdent | None, bool, bool]



# --- fixtures ------------------------------------------------------------------------------



@pytest.fixture
def kubelet(tls: TLSFiles) -> Iterator[FakeKubelet]:
    with FakeKubelet(token=TOKEN, tls=tls, node_name=HOST) as fake:
        yield fake


@pytest.fixture
def token_path(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    stdout: FileIdent
    stderr: FileIdent


class CgroupTree:
    """Cgroups under a private root of the cgroup2 mount, and processes in them."""

    def __init__(self, mount: str) -> None:
        self.mount = mount
        self.name = f"podtap-test-disc-{secrets.token_hex(4)}"
        self.roots = [self.name]
        os.mkdir(os.path.join(mount, self.name))
        self.procs: list[subprocess.Popen[bytes]] = []

    def other_root(self) -> str:
        """A sibling root that the Discovery under test is not configured with."""
        name = f"{self.name}-other"
        os.mkdir(os.path.join(self.mount, name))
        self.roots.append(name)
        return name

    def make(self, relative: str, root: str | None = None) -> tuple[str, int]:
        """Create a cgroup (and its parents); (absolute path, cgroup id = inode)."""
        path = os.path.join(self.mount, root or self.name, relative)
        os.makedirs(path)
        return path, os.stat(path).st_ino

    def spawn(self, cgroup_dir: str) -> Proc:
        """A `sleep` with pipes as stdout/stderr, moved into the cgroup."""
        popen = subprocess.Popen(
            ["sleep", "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(popen)
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(popen.pid))
        assert str(popen.pid) in Path(cgroup_dir, "cgroup.procs").read_text().split()
        assert popen.stdout is not None and popen.stderr is not None
        return Proc(popen, pipe_ident(popen.stdout.fileno()), pipe_ident(popen.stderr.fileno()))

    def kill(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(60)

    def rmdir(self, path: str) -> None:
        """Remove one cgroup (its processes must be gone), retrying while it is busy."""
        remove_tree(Path(path))

    def cleanup(self) -> None:
        for popen in self.procs:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGKILL)
            popen.wait(60)
            for pipe in (popen.stdout, popen.stderr):
                if pipe is not None:
                    pipe.close()
        for root in self.roots:
            remove_tree(Path(self.mount, root))


@pytest.fixture
def tree(mount: str) -> Iterator[CgroupTree]:
    t = CgroupTree(mount)
    try:
        yield t
    finally:
        t.cleanup()


def pipe_ident(fd: int) -> FileIdent:
    """(kernel dev, inode) of an fd: the kernel's dev_t is MAJOR << 20 | MINOR."""
    st = os.fstat(fd)
    return FileIdent((os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino)


class RecordingWriter:
    """A MapWriter that keeps the map as a dict and logs every call."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.calls: list[tuple[str, int]] = []

    def watch(
        self,
        cgroup_id: int,
        stdout: FileIdent | None = None,
        stderr: FileIdent | None = None,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
    ) -> None:
        self.calls.append(("watch", cgroup_id))
        self.entries[cgroup_id] = (stdout, stderr, capture_stdout, capture_stderr)

    def unwatch(self, cgroup_id: int) -> None:
        assert cgroup_id in self.entries, f"unwatch of {cgroup_id}, which is not in the map"
        self.calls.append(("unwatch", cgroup_id))
        del self.entries[cgroup_id]

    def count(self, what: str, cgroup_id: int) -> int:
        return self.calls.count((what, cgroup_id))


class ManualClock:
    """The grace-period clock of a Discovery under test: time passes when the test says so,
    however slow the machine is."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Node:
    """A Discovery wired to the fake kubelet, the cgroup tree and a recording writer."""

    kubelet: FakeKubelet
    tree: CgroupTree
    token_path: str
    filters: Filters = field(default_factory=Filters.of)
    kube: dict[str, Any] = field(default_factory=dict)
    client_opts: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # Discovery's keyword arguments
    forgotten: list[int] = field(default_factory=list)
    kube_class: type[KubeConfig] = KubeConfig
    clock: ManualClock = field(default_factory=ManualClock)

    def __post_init__(self) -> None:
        settings: dict[str, Any] = {
            "cgroup_roots": (self.tree.name,),
            "deleted_grace_s": GRACE_S,
            "poll_interval_s": 30.0,
            "repoll_min_interval_ms": 200,
        }
        settings.update(self.kube)
        self.cfg = self.kube_class(**settings)
        client_settings: dict[str, Any] = {
            "url": self.kubelet.url,
            "token_path": self.token_path,
            "ca_path": self.kubelet.ca_path,
            "timeout_s": 30.0,  # a loaded CI machine; the fault tests set their own
            "retries": 0,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.02,
        }
        client_settings.update(self.client_opts)
        self.client = KubeletClient(KubeletConfig(**client_settings))
        self.writer = RecordingWriter()
        self.discovery = Discovery(
            self.cfg,
            self.filters,
            self.client,
            self.writer,
            self.tree.mount,
            HOST,
            "/" + self.tree.name,
            **{"clock": self.clock, **self.options},
        )
        self.discovery.on_forget = self.forgotten.append

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            try:
                await scenario()
            finally:
                await self.client.close()

        asyncio.run(main())

    async def poll(self) -> bool:
        return await self.discovery.poll()


@pytest.fixture
def node(kubelet: FakeKubelet, tree: CgroupTree, token_path: str) -> Node:
    return Node(kubelet, tree, token_path)


# --- layouts -------------------------------------------------------------------------------


def new_ids() -> tuple[str, str]:
    """(pod uid, 64-hex container id)."""
    return str(uuid.uuid4()), secrets.token_hex(32)


def container_dir(driver: str, qos: str, runtime: str, uid: str, cid: str) -> str:
    """Where the kubelet and the runtime put a container's cgroup (relative to the root)."""
    if driver == "cgroupfs":
        pod = f"kubepods/pod{uid}" if qos == "guaranteed" else f"kubepods/{qos}/pod{uid}"
        leaf = f"crio-{cid}" if runtime == "cri-o" else cid
        return f"{pod}/{leaf}"
    u = uid.replace("-", "_")
    if qos == "guaranteed":
        pod = f"kubepods.slice/kubepods-pod{u}.slice"
    else:
        pod = f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"
    return f"{pod}/{SCOPE[runtime]}-{cid}.scope"


def add_pod(
    kubelet: FakeKubelet,
    uid: str,
    cid: str,
    *,
    namespace: str = "shop",
    name: str = "web-0",
    container: str = "app",
    runtime: str = "containerd",
    qos: str = "besteffort",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> None:
    kubelet.add_pod(
        namespace,
        name,
        uid=uid,
        containers=[(container, "nginx:1.27", f"{runtime}://{cid}")],
        qos=QOS_NAMES[qos],
        labels=labels,
        annotations=annotations,
    )


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# --- running containers --------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["containerd", "cri-o", "docker"])
@pytest.mark.parametrize("qos", ["besteffort", "burstable", "guaranteed"])
@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_running_container_is_watched(node: Node, driver: str, qos: str, runtime: str) -> None:
    uid, cid = new_ids()
    path, cg = node.tree.make(container_dir(driver, qos, runtime, uid, cid))
    add_pod(node.kubelet, uid, cid, runtime=runtime, qos=qos, labels={"app": "web"})

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries == {cg: (None, None, True, True)}  # no process yet
        known = node.discovery.lookup(cg)
        assert isinstance(known, Known)
        assert known.path == path
        m = known.meta
        assert (m.namespace, m.pod_name, m.pod_uid, m.container_name) == (
            "shop",
            "web-0",
            uid,
            "app",
        )
        assert (m.container_id, m.runtime, m.qos_class, m.host) == (cid, runtime, qos, HOST)
        assert m.labels == {"app": "web"}
        assert (known.capture_stdout, known.capture_stderr) == (True, True)
        stats = node.discovery.stats
        assert (stats.polls, stats.poll_errors, stats.watched, stats.excluded) == (1, 0, 1, 0)
        # Nothing changed: a second poll writes nothing.
        assert await node.poll()
        assert node.writer.calls == [("watch", cg)]

    node.run(scenario)


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_map_entry_carries_the_pipes_of_the_first_process(node: Node, driver: str) -> None:
    uid, cid = new_ids()
    path, cg = node.tree.make(container_dir(driver, "burstable", "containerd", uid, cid))
    proc = node.tree.spawn(path)
    add_pod(node.kubelet, uid, cid, qos="burstable")

    async def scenario() -> None:
        assert await node.poll()
        stdout, stderr, cap_out, cap_err = node.writer.entries[cg]
        assert (stdout, stderr) == (proc.stdout, proc.stderr)
        assert stdout != stderr
        assert (cap_out, cap_err) == (True, True)
        known = node.discovery.lookup(cg)
        assert known is not None and (known.stdout, known.stderr) == (proc.stdout, proc.stderr)

    node.run(scenario)


def test_process_that_joins_later_is_picked_up_at_the_next_poll(node: Node) -> None:
    uid, cid = new_ids()
    path, cg = node.tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries[cg] == (None, None, True, True)
        proc = node.tree.spawn(path)
        assert await node.poll()
        assert node.writer.entries[cg] == (proc.stdout, proc.stderr, True, True)
        assert node.writer.count("watch", cg) == 2
        assert node.writer.count("unwatch", cg) == 0

    node.run(scenario)


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


def spawn_with_pid_below(tree: CgroupTree, cgroup_dir: str, below: int) -> Proc:
    """A process in the cgroup with a lower pid than `below` (as after a pid wrap-around),
    on pipes of its own: ns_last_pid (root) sets the next pid; retried if another fork wins."""
    for attempt in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(max(300, below - 2000 - 37 * attempt)))
        proc = tree.spawn(cgroup_dir)
        if proc.popen.pid < below:
            return proc
        tree.kill(proc)
    raise AssertionError(f"no pid below {below}")


@pytest.mark.parametrize("session_pid", ["lower", "higher"])
def test_exec_session_does_not_take_the_containers_streams(node: Node, session_pid: str) -> None:
    """A `kubectl exec` session in the container (started later, its stdout another pipe,
    with a lower pid after a wrap-around or a higher one): the map keeps the init's pipes."""
    uid, cid = new_ids()
    path, cg = node.tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    init = node.tree.spawn(path)
    wait_for_a_later_start_tick(init.popen.pid)
    if session_pid == "lower":
        session = spawn_with_pid_below(node.tree, path, init.popen.pid)
        assert session.popen.pid < init.popen.pid
    else:
        session = node.tree.spawn(path)
    assert session.stdout != init.stdout
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries[cg] == (init.stdout, init.stderr, True, True)

    node.run(scenario)


def test_kernel_learned_identities_are_authoritative(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str
) -> None:
    """The identities the kernel took at the container's first exec win over /proc."""
    learned: dict[int, tuple[FileIdent, FileIdent]] = {}
    node = Node(kubelet, tree, token_path, options={"learned_idents": learned.get})
    uid, cid = new_ids()
    path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    uid2, cid2 = new_ids()
    path2, cg2 = tree.make(container_dir("systemd", "besteffort", "containerd", uid2, cid2))
    proc = tree.spawn(path)  # its pipes are not the container's: the kernel knows better
    runtime_out, runtime_err = FileIdent(0x15, 4242), FileIdent(0x15, 4243)
    learned[cg] = (runtime_out, runtime_err)
    add_pod(kubelet, uid, cid)
    add_pod(kubelet, uid2, cid2, name="web-1")

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries[cg] == (runtime_out, runtime_err, True, True)
        assert proc.stdout != runtime_out
        # No process and nothing learned yet: by fd number; learned later: written then.
        assert node.writer.entries[cg2] == (None, None, True, True)
        learned[cg2] = (FileIdent(0x15, 1), FileIdent(0x15, 2))
        node.discovery.refresh_idents()
        assert node.writer.entries[cg2] == (FileIdent(0x15, 1), FileIdent(0x15, 2), True, True)
        assert path2

    node.run(scenario)


def test_several_pods_and_containers(node: Node) -> None:
    expected: dict[int, tuple[str, str, Entry]] = {}
    for i, driver in enumerate(["cgroupfs", "systemd", "cgroupfs", "systemd"]):
        uid, cid = new_ids()
        path, cg = node.tree.make(container_dir(driver, "besteffort", "containerd", uid, cid))
        entry: Entry = (None, None, True, True)
        if i % 2:
            proc = node.tree.spawn(path)
            entry = (proc.stdout, proc.stderr, True, True)
        add_pod(node.kubelet, uid, cid, name=f"pod-{i}", container=f"c{i}")
        expected[cg] = (f"pod-{i}", cid, entry)
    # A pod whose container has no cgroup yet (not created): not in the map, not known.
    uid, cid = new_ids()
    add_pod(node.kubelet, uid, cid, name="later")

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries == {cg: e for cg, (_, _, e) in expected.items()}
        for cg, (pod, cid, _) in expected.items():
            known = node.discovery.lookup(cg)
            assert known is not None
            assert (known.meta.pod_name, known.meta.container_id) == (pod, cid)
        assert len(node.discovery.known) == 4
        assert node.discovery.stats.watched == 4

    node.run(scenario)


def test_container_outside_the_configured_roots_is_ignored(node: Node) -> None:
    uid, cid = new_ids()
    other = node.tree.other_root()
    path, cg = node.tree.make(
        container_dir("cgroupfs", "besteffort", "containerd", uid, cid), root=other
    )
    node.tree.spawn(path)
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.calls == []
        assert node.discovery.lookup(cg) is None
        assert node.discovery.known == {}

    node.run(scenario)


# --- exclusion -----------------------------------------------------------------------------

EXCLUSIONS: list[Any] = [
    pytest.param({"annotations": {"podtap.io/exclude": "true"}}, Filters.of(), id="annotation"),
    pytest.param(
        {"annotations": {"podtap.io/exclude": "TRUE"}}, Filters.of(), id="annotation-case"
    ),
    pytest.param(
        {"annotations": {"podtap.io/exclude-app": "true"}},
        Filters.of(),
        id="container-annotation",
    ),
    pytest.param({}, Filters.of(exclude_namespaces=("sh*",)), id="exclude-namespace"),
    pytest.param({}, Filters.of(include_namespaces=("kube-system",)), id="include-namespace"),
    pytest.param(
        {"labels": {"app": "web"}},
        Filters.of(exclude_pod_labels="app in (web,db)"),
        id="exclude-labels",
    ),
    pytest.param(
        {"labels": {"app": "web"}}, Filters.of(include_pod_labels="app=api"), id="include-labels"
    ),
    pytest.param({}, Filters.of(include_pod_labels="team"), id="include-labels-missing"),
    pytest.param({}, Filters.of(stdout=False, stderr=False), id="both-streams-off"),
]


@pytest.mark.parametrize(("pod", "filters"), EXCLUSIONS)
def test_excluded_container_is_in_the_map_with_capture_off(
    kubelet: FakeKubelet,
    tree: CgroupTree,
    token_path: str,
    pod: dict[str, Any],
    filters: Filters,
) -> None:
    node = Node(kubelet, tree, token_path, filters=filters)
    uid, cid = new_ids()
    path, cg = tree.make(container_dir("systemd", "besteffort", "containerd", uid, cid))
    tree.spawn(path)
    add_pod(kubelet, uid, cid, **pod)

    async def scenario() -> None:
        assert await node.poll()
        stdout, stderr, cap_out, cap_err = node.writer.entries[cg]
        assert (cap_out, cap_err) == (False, False)
        known = node.discovery.lookup(cg)
        assert known is not None and known.excluded
        assert known.meta.container_id == cid  # the metadata is still known
        stats = node.discovery.stats
        assert (stats.watched, stats.excluded) == (0, 1)
        assert await node.poll()
        assert node.writer.calls == [("watch", cg)]

    node.run(scenario)


@pytest.mark.parametrize(
    ("annotations", "filters", "flags"),
    [
        ({"podtap.io/exclude-stdout": "true"}, Filters.of(), (False, True)),
        ({"podtap.io/exclude-stderr": "true"}, Filters.of(), (True, False)),
        ({}, Filters.of(stdout=False), (False, True)),
        ({}, Filters.of(stderr=False), (True, False)),
        ({"podtap.io/exclude": "false"}, Filters.of(), (True, True)),
        ({"podtap.io/exclude-other": "true"}, Filters.of(), (True, True)),
    ],
)
def test_stream_flags_reach_the_map(
    kubelet: FakeKubelet,
    tree: CgroupTree,
    token_path: str,
    annotations: dict[str, str],
    filters: Filters,
    flags: tuple[bool, bool],
) -> None:
    node = Node(kubelet, tree, token_path, filters=filters)
    uid, cid = new_ids()
    path, cg = tree.make(container_dir("cgroupfs", "burstable", "cri-o", uid, cid))
    proc = tree.spawn(path)
    add_pod(kubelet, uid, cid, runtime="cri-o", qos="burstable", annotations=annotations)

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries[cg] == (proc.stdout, proc.stderr, *flags)
        assert node.discovery.stats.watched == 1

    node.run(scenario)


@pytest.mark.parametrize(
    ("first", "then", "process"),
    [
        pytest.param({}, {"podtap.io/exclude": "true"}, True, id="excluded-later"),
        pytest.param({}, {"podtap.io/exclude": "true"}, False, id="excluded-later-no-process"),
        pytest.param({"podtap.io/exclude": "true"}, {}, False, id="included-later-no-process"),
        pytest.param({}, {"podtap.io/exclude-stderr": "true"}, True, id="stream-off-later"),
        pytest.param({"podtap.io/exclude-stdout": "true"}, {}, True, id="stream-on-later"),
    ],
)
def test_changed_capture_flags_update_the_map(
    node: Node, first: dict[str, str], then: dict[str, str], process: bool
) -> None:
    uid, cid = new_ids()
    path, cg = node.tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    if process:
        node.tree.spawn(path)
    add_pod(node.kubelet, uid, cid, annotations=first)

    async def scenario() -> None:
        assert await node.poll()
        add_pod(node.kubelet, uid, cid, annotations=then)
        assert await node.poll()
        known = node.discovery.lookup(cg)
        assert known is not None
        assert node.writer.entries[cg][2:] == (known.capture_stdout, known.capture_stderr)

    node.run(scenario)


# --- podtap's own pods ---------------------------------------------------------------------


AGENT_LABELS = {"app.kubernetes.io/name": "podtap", "app.kubernetes.io/instance": "podtap"}


def add_pod_with(kubelet: FakeKubelet, uid: str, name: str, containers: dict[str, str],
                 labels: dict[str, str] | None = None) -> None:
    kubelet.add_pod(
        "podtap",
        name,
        uid=uid,
        containers=[(n, "podtap:1", f"containerd://{cid}") for n, cid in containers.items()],
        qos="BestEffort",
        labels=labels,
    )


def finder_for(pid: int, tmp_path: Path) -> Callable[[str, Any], tuple[str, int] | None]:
    """own_cgroup as the agent runs it in a private cgroup namespace, for another pid."""
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/\n")
    return lambda mount, roots: own_cgroup(mount, roots, pid, str(self_cgroup))


def test_own_container_is_excluded_before_the_kubelet_answers(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str, tmp_path: Path
) -> None:
    """Found by its cgroup (our pid in its cgroup.procs), put in the map as excluded at the
    first poll even with the kubelet down; then the whole pod (a sidecar too) is excluded."""
    uid, own_cid = new_ids()
    sidecar_cid = secrets.token_hex(32)
    own_path, own_cg = tree.make(
        container_dir("cgroupfs", "besteffort", "containerd", uid, own_cid)
    )
    side_path, side_cg = tree.make(
        container_dir("cgroupfs", "besteffort", "containerd", uid, sidecar_cid)
    )
    agent = tree.spawn(own_path)
    tree.spawn(side_path)
    other_uid, other_cid = new_ids()
    other_path, other_cg = tree.make(
        container_dir("systemd", "besteffort", "containerd", other_uid, other_cid)
    )
    other = tree.spawn(other_path)
    node = Node(
        kubelet,
        tree,
        token_path,
        options={"find_own_cgroup": finder_for(agent.popen.pid, tmp_path)},
        client_opts={"timeout_s": 2.0},
    )

    async def scenario() -> None:
        kubelet.set_mode("down")
        assert not await node.poll()
        assert node.writer.entries == {own_cg: (None, None, False, False)}
        assert node.discovery.own == (own_path, own_cg)
        kubelet.set_mode("ok")
        add_pod_with(kubelet, uid, "podtap-x1", {"agent": own_cid, "sidecar": sidecar_cid})
        add_pod(kubelet, other_uid, other_cid)
        assert await node.poll()
        assert node.writer.entries == {
            own_cg: (None, None, False, False),
            side_cg: (None, None, False, False),
            other_cg: (other.stdout, other.stderr, True, True),
        }
        assert node.writer.count("watch", own_cg) == 1  # never watched, never unwatched
        own = node.discovery.lookup(own_cg)
        assert own is not None and own.excluded and own.meta.pod_name == "podtap-x1"
        # Unlisted (our own pod terminating): still excluded, never forgotten.
        kubelet.remove_pod("podtap", "podtap-x1")
        assert await node.poll()
        node.clock.advance(GRACE_S + 0.05)
        assert await node.poll()
        assert node.writer.entries[own_cg] == (None, None, False, False)
        assert side_cg not in node.writer.entries

    node.run(scenario)


def test_own_cgroup_outside_the_pods_is_not_put_in_the_map(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str, tmp_path: Path
) -> None:
    other_root = tree.other_root()
    path, cg = tree.make("system.slice/podtap.service", root=other_root)
    agent = tree.spawn(path)
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/" + os.path.relpath(path, tree.mount) + "\n")
    node = Node(
        kubelet,
        tree,
        token_path,
        options={
            "find_own_cgroup": lambda m, r: own_cgroup(m, r, agent.popen.pid, str(self_cgroup))
        },
    )

    async def scenario() -> None:
        assert await node.poll()
        assert node.discovery.own == (path, cg)
        assert node.writer.entries == {}  # the kernel ignores it anyway

    node.run(scenario)


def test_new_container_of_an_agent_pod_is_excluded_at_its_cgroups_creation(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str
) -> None:
    """A rolling update: the kubelet lists the new podtap pod from its admission on; its
    container's cgroup is excluded in the kernel as it is created, before any poll."""
    node = Node(kubelet, tree, token_path, options={"find_own_cgroup": None})
    uid, cid = new_ids()
    app_uid, app_cid = new_ids()
    kubelet.add_pod("podtap", "podtap-new", uid=uid, containers=[("agent", "podtap:2", None)],
                    labels=AGENT_LABELS)
    add_pod(kubelet, app_uid, secrets.token_hex(32))  # listed, its container not created yet
    agent_rel = container_dir("systemd", "besteffort", "containerd", uid, cid)
    app_rel = container_dir("systemd", "besteffort", "containerd", app_uid, app_cid)
    gone_rel = container_dir("cgroupfs", "besteffort", "containerd", uid, secrets.token_hex(32))

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries == {}
        polls = node.discovery.stats.polls
        agent_path, agent_cg = node.tree.make(agent_rel)
        _app_path, app_cg = node.tree.make(app_rel)
        gone_path, gone_cg = node.tree.make(gone_rel)
        for rel, cg in ((agent_rel, agent_cg), (app_rel, app_cg), (gone_rel, gone_cg)):
            node.discovery.on_cgroup_created(cg, f"/{node.tree.name}/{rel}", boot_ns())
        assert node.discovery.stats.polls == polls  # no poll needed
        assert node.writer.entries == {
            agent_cg: (None, None, False, False),
            gone_cg: (None, None, False, False),
        }
        # Listed with its id now: the same entry, known, never rewritten.
        kubelet.add_pod("podtap", "podtap-new", uid=uid,
                        containers=[("agent", "podtap:2", f"containerd://{cid}")],
                        labels=AGENT_LABELS)
        node.tree.rmdir(gone_path)  # a creation that failed: never listed, cgroup gone
        assert await node.poll()
        known = node.discovery.lookup(agent_cg)
        assert known is not None and known.excluded and known.in_map
        assert node.discovery.stats.excluded == 1
        assert node.writer.entries == {agent_cg: (None, None, False, False)}
        assert node.writer.count("watch", agent_cg) == 1
        assert node.writer.count("unwatch", gone_cg) == 1
        assert agent_path

    node.run(scenario)


@dataclass(frozen=True)
class KubeConfigWithSelector(KubeConfig):
    """KubeConfig with the agent selector key, as the lead adds it to agent/config.py."""

    agent_pod_selector: str = "app.kubernetes.io/name=podtap"


@pytest.mark.parametrize(
    ("kube_class", "selector", "labels", "excluded"),
    [
        pytest.param(KubeConfig, None, AGENT_LABELS, True, id="default-selector"),
        pytest.param(KubeConfig, None, {"app.kubernetes.io/name": "fluent-bit"}, False,
                     id="default-selector-other-app"),
        pytest.param(KubeConfigWithSelector, "app=logs,tier in (agent)",
                     {"app": "logs", "tier": "agent"}, True, id="custom-selector"),
        pytest.param(KubeConfigWithSelector, "app=logs,tier in (agent)", AGENT_LABELS, False,
                     id="custom-selector-replaces-default"),
        pytest.param(KubeConfigWithSelector, "", AGENT_LABELS, False, id="selector-off"),
    ],
)
def test_pods_of_other_agents_are_excluded_by_label(
    kubelet: FakeKubelet,
    tree: CgroupTree,
    token_path: str,
    kube_class: type[KubeConfig],
    selector: str | None,
    labels: dict[str, str],
    excluded: bool,
) -> None:
    """Another podtap (a rolling update's new pod): every container of it, in any pid
    namespace, is in the map with capture off."""
    kube = {} if selector is None else {"agent_pod_selector": selector}
    node = Node(kubelet, tree, token_path, kube=kube, kube_class=kube_class,
                options={"find_own_cgroup": None})
    uid, cid = new_ids()
    cid2 = secrets.token_hex(32)
    path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    path2, cg2 = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid2))
    first, second = tree.spawn(path), tree.spawn(path2)
    add_pod_with(kubelet, uid, "podtap-new", {"agent": cid, "reloader": cid2}, labels)

    async def scenario() -> None:
        assert await node.poll()
        if excluded:
            assert node.writer.entries == {
                cg: (None, None, False, False),
                cg2: (None, None, False, False),
            }
            assert node.discovery.stats.excluded == 2
        else:
            assert node.writer.entries == {
                cg: (first.stdout, first.stderr, True, True),
                cg2: (second.stdout, second.stderr, True, True),
            }

    node.run(scenario)


# --- containers that go away ---------------------------------------------------------------


def test_removed_pod_is_kept_for_the_grace_period_then_forgotten(node: Node) -> None:
    uid, cid = new_ids()
    path, cg = node.tree.make(container_dir("systemd", "besteffort", "containerd", uid, cid))
    proc = node.tree.spawn(path)
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        assert cg in node.writer.entries
        node.kubelet.remove_pod("shop", "web-0")
        assert await node.poll()
        # Within the grace period: metadata and map entry stay (late lines still enriched).
        known = node.discovery.lookup(cg)
        assert known is not None and known.meta.container_id == cid
        assert node.writer.entries[cg] == (proc.stdout, proc.stderr, True, True)
        assert node.forgotten == []
        node.clock.advance(GRACE_S * 0.9)
        assert await node.poll()
        assert node.discovery.lookup(cg) is not None
        assert node.forgotten == []
        node.clock.advance(GRACE_S * 0.1 + 0.01)
        assert await node.poll()
        assert node.discovery.lookup(cg) is None
        assert cg not in node.writer.entries
        assert node.writer.count("unwatch", cg) == 1
        assert node.forgotten == [cg]
        assert node.discovery.stats.watched == 0
        assert await node.poll()  # nothing more happens
        assert node.forgotten == [cg]
        assert node.writer.count("unwatch", cg) == 1

    node.run(scenario)


def test_pod_back_within_the_grace_period_is_not_forgotten(node: Node) -> None:
    uid, cid = new_ids()
    _path, cg = node.tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        node.kubelet.remove_pod("shop", "web-0")
        assert await node.poll()
        add_pod(node.kubelet, uid, cid)
        assert await node.poll()
        node.clock.advance(GRACE_S + 0.05)
        assert await node.poll()
        assert node.discovery.lookup(cg) is not None
        assert node.forgotten == []
        assert cg in node.writer.entries

    node.run(scenario)


def test_zero_grace_forgets_at_the_next_poll(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str
) -> None:
    node = Node(kubelet, tree, token_path, kube={"deleted_grace_s": 0.0})
    uid, cid = new_ids()
    _path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    add_pod(kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        kubelet.remove_pod("shop", "web-0")
        assert await node.poll()
        assert node.discovery.lookup(cg) is None
        assert node.forgotten == [cg]
        assert node.writer.entries == {}

    node.run(scenario)


@pytest.mark.parametrize(
    ("registered", "still_listed"),
    [
        pytest.param(True, True, id="created-event-pod-listed"),
        pytest.param(False, True, id="no-created-event-pod-listed"),
        pytest.param(True, False, id="created-event-pod-removed"),
        pytest.param(False, False, id="no-created-event-pod-removed"),
    ],
)
def test_vanished_cgroup_is_unwatched_but_metadata_stays(
    node: Node, registered: bool, still_listed: bool
) -> None:
    uid, cid = new_ids()
    relative = container_dir("cgroupfs", "besteffort", "containerd", uid, cid)
    path, cg = node.tree.make(relative)
    proc = node.tree.spawn(path)
    add_pod(node.kubelet, uid, cid)
    if registered:
        node.discovery.on_cgroup_created(cg, f"/{node.tree.name}/{relative}", boot_ns())

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries[cg] == (proc.stdout, proc.stderr, True, True)
        node.tree.kill(proc)
        node.tree.rmdir(path)
        if not still_listed:
            node.kubelet.remove_pod("shop", "web-0")
        assert await node.poll()
        # The cgroup is gone: its map entry goes at once; its metadata stays for late lines.
        assert cg not in node.writer.entries
        known = node.discovery.lookup(cg)
        assert known is not None and known.meta.container_id == cid
        assert node.forgotten == []

    node.run(scenario)


def test_vanished_cgroup_metadata_goes_after_the_grace_period(node: Node) -> None:
    uid, cid = new_ids()
    path, cg = node.tree.make(container_dir("systemd", "burstable", "containerd", uid, cid))
    add_pod(node.kubelet, uid, cid, qos="burstable")

    async def scenario() -> None:
        assert await node.poll()
        node.tree.rmdir(path)
        node.kubelet.remove_pod("shop", "web-0")
        assert await node.poll()
        assert node.discovery.lookup(cg) is not None
        node.clock.advance(GRACE_S + 0.05)
        assert await node.poll()
        assert node.discovery.lookup(cg) is None
        assert node.forgotten == [cg]
        assert node.writer.entries == {}

    node.run(scenario)


# --- cgroups seen being created ------------------------------------------------------------

CREATED_PATHS = [
    pytest.param("kubepods/besteffort/pod{uid}/{cid}", "containerd", id="cgroupfs"),
    pytest.param("kubepods/pod{uid}/{cid}", "containerd", id="cgroupfs-guaranteed"),
    pytest.param("kubepods/burstable/pod{uid}/crio-{cid}", "cri-o", id="cgroupfs-crio"),
    pytest.param(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/"
        "cri-containerd-{cid}.scope",
        "containerd",
        id="systemd-containerd",
    ),
    pytest.param(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/"
        "crio-{cid}.scope/container",
        "cri-o",
        id="systemd-crun-child",
    ),
    pytest.param(
        "kubepods.slice/kubepods-pod{uid_}.slice/docker-{cid}.scope",
        "docker",
        id="systemd-docker-guaranteed",
    ),
]


@pytest.mark.parametrize(("template", "runtime"), CREATED_PATHS)
def test_created_cgroup_is_identified_after_its_directory_is_gone(
    node: Node, template: str, runtime: str
) -> None:
    """A container that ran and exited between two polls: its cgroup id is known from the
    creation event, its directory is gone by the time the kubelet reports it."""
    uid, cid = new_ids()
    relative = template.format(uid=uid, uid_=uid.replace("-", "_"), cid=cid)
    path, cg = node.tree.make(relative)
    # The container's cgroup goes (with its scope, for crun's "container" child).
    node.tree.rmdir(os.path.dirname(path) if path.endswith("/container") else path)
    assert not os.path.exists(path)
    node.discovery.on_cgroup_created(cg, f"/{node.tree.name}/{relative}", boot_ns())
    qos = (
        "guaranteed"
        if "kubepods/pod" in relative or "kubepods-pod" in relative
        else ("burstable" if "burstable" in relative else "besteffort")
    )
    add_pod(node.kubelet, uid, cid, runtime=runtime, qos=qos)

    async def scenario() -> None:
        assert await node.poll()
        known = node.discovery.lookup(cg)
        assert known is not None
        assert (known.meta.container_id, known.meta.pod_uid, known.meta.pod_name) == (
            cid,
            uid,
            "web-0",
        )
        assert (known.capture_stdout, known.capture_stderr) == (True, True)
        assert cg not in node.writer.entries  # its id will never write again
        # Still known while the kubelet lists it.
        assert await node.poll()
        assert node.discovery.lookup(cg) is not None
        # Forgotten after the grace period once the kubelet no longer lists it.
        node.kubelet.remove_pod("shop", "web-0")
        assert await node.poll()
        assert node.discovery.lookup(cg) is not None
        node.clock.advance(GRACE_S + 0.05)
        assert await node.poll()
        assert node.discovery.lookup(cg) is None
        assert node.forgotten == [cg]

    node.run(scenario)


def test_created_cgroup_that_still_exists_is_watched(node: Node) -> None:
    uid, cid = new_ids()
    relative = container_dir("cgroupfs", "besteffort", "containerd", uid, cid)
    path, cg = node.tree.make(relative)
    proc = node.tree.spawn(path)
    node.discovery.on_cgroup_created(cg, f"/{node.tree.name}/{relative}", boot_ns())
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        assert node.writer.entries == {cg: (proc.stdout, proc.stderr, True, True)}
        assert node.discovery.stats.watch_delay_count == 1

    node.run(scenario)


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda root, rel: f"/{root}-other/{rel}", id="sibling-root"),
        pytest.param(lambda root, rel: f"/{root}x/{rel}", id="name-prefix-only"),
        pytest.param(lambda root, rel: f"/{rel}", id="mount-root"),
        pytest.param(lambda root, rel: f"/system.slice/{rel}", id="system-slice"),
        pytest.param(lambda root, rel: f"{root}/{rel}", id="relative"),
        pytest.param(lambda root, rel: f"/{root}", id="the-prefix-itself"),
        pytest.param(lambda root, rel: f"/{root}/{rel.rsplit('/', 1)[0]}", id="pod-cgroup"),
        pytest.param(
            lambda root, rel: f"/{root}/{rel.rsplit('/', 1)[0]}/crio-conmon-{rel[-64:]}.scope",
            id="conmon-scope",
        ),
    ],
)
def test_created_paths_outside_the_pods_prefix_or_not_containers_are_ignored(
    node: Node, make_path: Callable[[str, str], str]
) -> None:
    uid, cid = new_ids()
    relative = container_dir("cgroupfs", "besteffort", "containerd", uid, cid)
    cg = 987_654_321  # no such cgroup: only the event can identify it
    node.discovery.on_cgroup_created(cg, make_path(node.tree.name, relative), boot_ns())
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        assert node.discovery.lookup(cg) is None
        assert node.discovery.known == {}
        assert node.writer.calls == []

    node.run(scenario)


def test_created_cgroups_never_reported_are_not_kept_forever(node: Node) -> None:
    uid, _cid = new_ids()
    sandbox = secrets.token_hex(32)  # the pause container: never in containerStatuses
    relative = f"kubepods/besteffort/pod{uid}/{sandbox}"
    path, cg = node.tree.make(relative)
    node.discovery.on_cgroup_created(cg, f"/{node.tree.name}/{relative}", boot_ns())
    node.tree.rmdir(path)
    # Kept while a held line could still need it: the grace period and the hold timeout.
    node.discovery.cfg = dataclasses.replace(node.discovery.cfg, hold_timeout_s=GRACE_S)

    async def scenario() -> None:
        assert await node.poll()
        await asyncio.sleep(GRACE_S + 0.05)
        assert await node.poll()
        assert await node.poll()
        assert cg not in node.discovery.created

    node.run(scenario)


# --- kubelet faults ------------------------------------------------------------------------

FAULTS = ["401", "403", "429", "500", "malformed", "not_podlist", "down", "slow"]


@pytest.mark.parametrize("mode", FAULTS)
def test_kubelet_fault_keeps_known_containers(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str, mode: str
) -> None:
    node = Node(kubelet, tree, token_path, client_opts={"timeout_s": 2.0})
    uid, cid = new_ids()
    path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    proc = tree.spawn(path)
    add_pod(kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        entry = node.writer.entries[cg]
        assert entry == (proc.stdout, proc.stderr, True, True)
        kubelet.set_mode(mode, slow_delay_s=120.0)  # outlasts any client timeout
        for i in range(1, 3):
            assert await node.poll() is False
            stats = node.discovery.stats
            assert (stats.polls, stats.poll_errors) == (1 + i, i)
            assert stats.last_error
            assert node.writer.calls == [("watch", cg)]  # no unwatch, no rewrite
            known = node.discovery.lookup(cg)
            assert known is not None and known.meta.container_id == cid
        # Even past the grace period: a failed poll says nothing about the containers.
        node.clock.advance(GRACE_S + 0.05)
        assert await node.poll() is False
        assert node.discovery.lookup(cg) is not None
        assert node.forgotten == []
        kubelet.set_mode("ok")
        assert await node.poll() is True
        assert node.writer.entries == {cg: entry}
        assert node.writer.calls == [("watch", cg)]
        assert node.discovery.stats.poll_errors == 3

    node.run(scenario)


@pytest.mark.parametrize(
    ("mode", "level"),
    [
        ("401", logging.ERROR),
        ("403", logging.ERROR),
        ("500", logging.WARNING),
        ("malformed", logging.WARNING),
        ("down", logging.WARNING),
    ],
)
def test_poll_errors_are_logged_once_while_they_last(
    node: Node, caplog: pytest.LogCaptureFixture, mode: str, level: int
) -> None:
    caplog.set_level(logging.INFO, logger="podtap.kube")

    def kubelet_logs() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "podtap.kube" and "kubelet:" in r.message]

    async def scenario() -> None:
        node.kubelet.set_mode(mode)
        for _ in range(3):
            assert await node.poll() is False
        [record] = kubelet_logs()
        assert record.levelno == level
        assert TOKEN not in record.message
        assert node.discovery.stats.poll_errors == 3

    node.run(scenario)


def test_a_new_outage_is_logged_again(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="podtap.kube")

    async def scenario() -> None:
        node.kubelet.set_mode("500")
        assert await node.poll() is False
        node.kubelet.set_mode("ok")
        assert await node.poll() is True
        node.kubelet.set_mode("500")
        assert await node.poll() is False
        logged = [r for r in caplog.records if r.name == "podtap.kube" and "kubelet:" in r.message]
        assert len(logged) == 2

    node.run(scenario)


def test_unreadable_token_is_a_failed_poll(node: Node) -> None:
    uid, cid = new_ids()
    _path, cg = node.tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        assert await node.poll()
        os.unlink(node.token_path)
        assert await node.poll() is False
        assert node.discovery.stats.poll_errors == 1
        assert "token" in node.discovery.stats.last_error
        assert TOKEN not in node.discovery.stats.last_error
        assert node.discovery.lookup(cg) is not None

    node.run(scenario)


def test_malformed_pods_are_counted_and_the_others_kept(node: Node) -> None:
    uid, cid = new_ids()
    _path, cg = node.tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    add_pod(node.kubelet, uid, cid)
    node.kubelet.put_raw_pod("junk", "a", "not a pod")
    node.kubelet.put_raw_pod("junk", "b", {"metadata": {"name": 5}})

    async def scenario() -> None:
        assert await node.poll() is True
        assert node.discovery.stats.malformed == 2
        assert node.discovery.stats.poll_errors == 0
        assert set(node.writer.entries) == {cg}

    node.run(scenario)


# --- the polling loop ----------------------------------------------------------------------


class PollClock:
    """Records when Discovery.poll starts (wrapping the instance's method)."""

    def __init__(self, discovery: Discovery) -> None:
        self.times: list[float] = []
        self.done = 0
        original = discovery.poll

        async def poll() -> bool:
            self.times.append(time.monotonic())
            try:
                return await original()
            finally:
                self.done += 1

        discovery.poll = poll  # type: ignore[method-assign]

    async def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` polls have started and finished."""
        deadline = time.monotonic() + timeout
        while self.done < count:
            assert time.monotonic() < deadline, f"only {len(self.times)} polls, wanted {count}"
            await asyncio.sleep(0.005)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


EPS = 0.005  # timer slack of the event loop
# Polls can only come later than asked on a loaded machine, never earlier: lower bounds are
# exact, upper bounds only say "not the next periodic poll" (the interval is long).
LATE = 5.0


@pytest.mark.parametrize("min_interval_ms", [100, 300])
def test_requested_polls_are_prompt_and_rate_limited(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str, min_interval_ms: int
) -> None:
    node = Node(
        kubelet,
        tree,
        token_path,
        kube={"poll_interval_s": 60.0, "repoll_min_interval_ms": min_interval_ms},
    )
    gap = min_interval_ms / 1000
    uid, cid = new_ids()
    _path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    add_pod(kubelet, uid, cid)

    async def scenario() -> None:
        clock = PollClock(node.discovery)
        task = asyncio.create_task(node.discovery.run())
        try:
            await asyncio.sleep(0.05)
            assert clock.times == []  # no request, long interval: no poll yet
            t0 = time.monotonic()
            node.discovery.request_poll()
            await clock.wait_for(1)
            assert clock.times[0] - t0 < LATE  # served at once, not at the periodic poll
            assert node.discovery.lookup(cg) is not None
            # Two quick requests: served by one poll, at least the minimum interval later.
            node.discovery.request_poll()
            node.discovery.request_poll()
            await clock.wait_for(2)
            assert gap - EPS <= clock.times[1] - clock.times[0] < gap + LATE
            await asyncio.sleep(gap + 0.1)
            assert len(clock.times) == 2  # nothing pending: no third poll
            # A burst of requests never polls faster than the minimum interval.
            burst_start = time.monotonic()
            for _ in range(20):
                node.discovery.request_poll()
                await asyncio.sleep(gap / 10)
            await clock.wait_for(3)
            burst = time.monotonic() - burst_start
            intervals = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
            assert all(i >= gap - EPS for i in intervals), intervals
            assert len(clock.times) <= 2 + 1 + burst / gap
        finally:
            await stop(task)

    node.run(scenario)


def test_created_cgroup_triggers_a_poll(node: Node) -> None:
    uid, cid = new_ids()
    relative = container_dir("systemd", "besteffort", "containerd", uid, cid)
    path, cg = node.tree.make(relative)
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        clock = PollClock(node.discovery)
        task = asyncio.create_task(node.discovery.run())
        try:
            await asyncio.sleep(0.02)
            node.discovery.on_cgroup_created(cg, f"/{node.tree.name}/{relative}", boot_ns())
            await clock.wait_for(1)
            assert cg in node.writer.entries
            # A path outside the pods' subtree asks for nothing.
            node.discovery.on_cgroup_created(cg + 1, f"/elsewhere/{relative}", boot_ns())
            await asyncio.sleep(node.cfg.repoll_min_interval_ms / 1000 + 0.1)
            assert len(clock.times) == 1
        finally:
            await stop(task)

    node.run(scenario)


def test_run_polls_every_interval_on_its_own(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str
) -> None:
    interval = 0.15
    node = Node(
        kubelet,
        tree,
        token_path,
        kube={"poll_interval_s": interval, "repoll_min_interval_ms": 10},
    )
    uid, cid = new_ids()
    _path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))

    async def scenario() -> None:
        clock = PollClock(node.discovery)
        task = asyncio.create_task(node.discovery.run())
        try:
            t0 = time.monotonic()
            await clock.wait_for(1)
            assert clock.times[0] - t0 >= interval - EPS
            add_pod(kubelet, uid, cid)  # found by the next periodic poll, unasked
            await clock.wait_for(4)
            intervals = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
            assert all(interval - EPS <= i < interval + LATE for i in intervals), intervals
            assert node.discovery.lookup(cg) is not None
        finally:
            await stop(task)

    node.run(scenario)


def test_unlisted_writer_does_not_storm_the_kubelet(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str
) -> None:
    """A writer under the pods' cgroup that the kubelet never lists, its lines held: the
    enricher asks again and again, the polls back off to the periodic interval."""
    interval = 1.0
    node = Node(
        kubelet,
        tree,
        token_path,
        kube={"poll_interval_s": interval, "repoll_min_interval_ms": 100},
    )
    uid, cid = new_ids()
    _path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))

    async def scenario() -> None:
        task = asyncio.create_task(node.discovery.run())
        try:
            kubelet.reset_counts()
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.0:
                node.discovery.request_poll(cg)  # every held line of it asks
                await asyncio.sleep(0.02)
            elapsed = time.monotonic() - t0
            # Backoff: 1 + 0.1, 0.2, 0.4, 0.8 (then the periodic 1 s) ~ 5 + elapsed/interval.
            # Re-polling at the 100 ms minimum would be ~40.
            assert kubelet.request_count <= 6 + elapsed / interval, kubelet.request_count
            assert kubelet.request_count >= 1
        finally:
            await stop(task)

    node.run(scenario)


def test_new_container_is_found_by_the_early_repolls(
    kubelet: FakeKubelet, tree: CgroupTree, token_path: str
) -> None:
    """The kubelet lists a new container a few polls late: the backoff polls find it
    long before the periodic poll (600 s) would."""
    node = Node(kubelet, tree, token_path, kube={"poll_interval_s": 600.0})
    uid, cid = new_ids()
    _path, cg = tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))

    async def scenario() -> None:
        clock = PollClock(node.discovery)
        task = asyncio.create_task(node.discovery.run())
        try:
            node.discovery.request_poll(cg)
            await clock.wait_for(2)
            add_pod(kubelet, uid, cid)  # listed only now
            deadline = time.monotonic() + 60.0
            while node.discovery.lookup(cg) is None:
                assert time.monotonic() < deadline, "not found by a re-poll"
                await asyncio.sleep(0.01)
            assert cg in node.writer.entries
            # Found: no more re-polls for it.
            assert node.discovery.repolls.next_due() is None
        finally:
            await stop(task)

    node.run(scenario)


def test_run_survives_kubelet_faults(node: Node) -> None:
    uid, cid = new_ids()
    _path, cg = node.tree.make(container_dir("cgroupfs", "besteffort", "containerd", uid, cid))
    add_pod(node.kubelet, uid, cid)

    async def scenario() -> None:
        clock = PollClock(node.discovery)
        task = asyncio.create_task(node.discovery.run())
        try:
            for n, mode in enumerate(["down", "500", "malformed", "401", "ok"], start=1):
                node.kubelet.set_mode(mode)
                node.discovery.request_poll()
                await clock.wait_for(n)
                assert not task.done()
            assert node.discovery.stats.poll_errors == 4
            assert node.discovery.lookup(cg) is not None
            assert cg in node.writer.entries
        finally:
            await stop(task)

    node.run(scenario)
