"""A simulated Kubernetes node: real containers in kubelet-style cgroups plus a loopback kubelet.

    with SimNode() as node:
        pod = node.run_pod("default", "web-0", [SimContainerSpec("web", "seq 1 3")])
        pod.containers[0].wait(10)
        out, err = pod.containers[0].output()   # the ground truth of what it wrote

What runs (all private to the node: a temp dir and the cgroup prefix ``podtap-sim-<8 hex>``
directly under the cgroup v2 mount, so an agent is configured with ``roots=(node.prefix,)``):

- containerd (config ``version = 2``, root/state/socket under the temp dir, CRI plugin off)
  with runc through ``containerd-shim-runc-v2``. A ``driver="containerd"`` container is
  ``ctr run --rm --cgroup /<prefix>/kubepods/<qos>/pod<uid>/<id> --rootfs ROOTFS <id>
  /bin/sh -c SCRIPT``: the cgroupfs-driver layout of a kubelet node. ``ctr`` relays the
  shim's stdout/stderr pipes to its own stdout/stderr, which are pipes drained here.
- ``driver="systemd"``: nothing here can drive systemd, so the node makes the systemd-named
  scope ``<prefix>/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/
  cri-containerd-<id>.scope`` itself and starts the busybox shell of the rootfs (PATH = the
  rootfs's bin, so a script behaves as in the containerd driver) after joining it.
- A FakeKubelet on 127.0.0.1 with a generated CA and a token file, listing the pods as a
  kubelet does: running containers with ``containerd://<id>``, turned to terminated (with
  the exit code) when their process exits; a pod stays listed until ``delete_pod``.

``stop()`` kills every process the node started by pid (never by name), stops containerd,
removes every cgroup it created leaf-first in every hierarchy (in hybrid mode runc also
creates the path under each v1 hierarchy) and the temp dir. It is idempotent and safe after
a failed start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from agent.kube.cgroups import find_cgroup2_mount
from agent.kube.kubelet import KubeletConfig
from simnode.containers import LogReader, remove_tree
from simnode.kubelet import FakeKubelet, build_pod
from simnode.rootfs import BusyboxMissingError, ensure_rootfs, find_static_busybox
from simnode.tls import generate_tls

DEFAULT_NODE_NAME: Final = "sim-node-1"
DEFAULT_IMAGE: Final = "busybox:sim"
PREFIX_STEM: Final = "podtap-sim-"
DRIVERS: Final = ("containerd", "systemd")
REGISTER_MODES: Final = ("before", "after", "never")
QOS_CLASSES: Final = {
    "guaranteed": "Guaranteed",
    "burstable": "Burstable",
    "besteffort": "BestEffort",
}
# Debian package of each executable the node runs.
TOOLS: Final = {
    "containerd": "containerd",
    "ctr": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "runc": "runc",
    "tee": "coreutils",
}
CTR_NAMESPACE: Final = "default"
_TOOL_DIRS: Final = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_CONTAINERD_START_TIMEOUT_S: Final = 120.0  # bounds, not waits: CI machines are loaded
_CONTAINER_START_TIMEOUT_S: Final = 120.0
_KILL_TIMEOUT_S: Final = 60.0
_MAX_SOCKET_PATH: Final = 107  # sun_path is 108 bytes with the NUL
# The systemd-driver wrapper: join the scope, then exec the script's shell. As in
# containers.JOIN_AND_EXEC the pid is written by tee (outside the cgroup, not on fd 1), but
# by the host's tee named by path: the wrapper's PATH is already the rootfs's bin.
_JOIN_AND_EXEC: Final = 'echo $$ | {tee} "$0" > /dev/null && exec "$@"'
# containerd 1.6 puts shim sockets here whatever its config says.
_SHIM_SOCKET_DIRS: Final = (Path("/run/containerd/s"), Path("/run/containerd"))


class SimNodeUnavailableError(RuntimeError):
    """This machine cannot run a SimNode (not root, tools or cgroup v2 missing)."""


class SimNodeCleanupError(RuntimeError):
    """stop() could not remove everything; the message lists what is left."""


def simnode_unavailable_reason() -> str | None:
    """Why a SimNode cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "SimNode needs root (cgroups, containerd, runc)"
    missing = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if _which(tool) is None]
    if missing:
        return f"SimNode needs {', '.join(missing)}: run scripts/install-deps.sh"
    try:
        find_static_busybox()
        find_cgroup2_mount()
    except Exception as e:  # BusyboxMissingError, CgroupError
        return f"SimNode unavailable: {e}"
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_search_path())


def _search_path() -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + list(_TOOL_DIRS)
    return os.pathsep.join(dict.fromkeys(d for d in dirs if d))


def _tool(tool: str) -> str:
    path = _which(tool)
    if path is None:
        raise SimNodeUnavailableError(f"{tool} not found: apt-get install {TOOLS[tool]}")
    return path


# ---------------------------------------------------------------- containers


@dataclass(frozen=True)
class SimContainerSpec:
    """One container of a pod: a shell script run by busybox sh."""

    name: str
    script: str
    image: str = DEFAULT_IMAGE


class _Streams:
    """The stdout and stderr pipes of one container and the reader threads draining them."""

    def __init__(self, label: str) -> None:
        out_r, self.stdout_w = os.pipe()
        err_r, self.stderr_w = os.pipe()
        self._readers = (
            LogReader(out_r, f"{label}-stdout"),
            LogReader(err_r, f"{label}-stderr"),
        )
        for reader in self._readers:
            reader.start()
        self._write_open = True

    def close_write_ends(self) -> None:
        """Drop the node's copies, so the readers see EOF when the writers are done."""
        if self._write_open:
            os.close(self.stdout_w)
            os.close(self.stderr_w)
            self._write_open = False

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in self._readers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            reader.join(left)
        return not any(r.is_alive() for r in self._readers)

    def snapshot(self) -> tuple[bytes, bytes]:
        return bytes(self._readers[0].data), bytes(self._readers[1].data)


class SimContainer:
    """One running (or finished) container: its id, cgroup, process and captured output."""

    def __init__(
        self,
        spec: SimContainerSpec,
        container_id: str,
        driver: str,
        cgroup_relpath: str,
        mount: str,
    ) -> None:
        self.spec = spec
        self.driver = driver
        self.name = spec.name
        self.image = spec.image
        self.id = container_id
        self.cgroup_relpath = cgroup_relpath
        self.cgroup_path = Path(mount) / cgroup_relpath
        self.process: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.exit_code: int | None = None
        self.started_at = ""
        self.finished_at = ""
        self._streams = _Streams(container_id[:12])
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"SimContainer({self.name!r}, id={self.id[:12]}, exit_code={self.exit_code})"

    @property
    def container_id_uri(self) -> str:
        return f"containerd://{self.id}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The container's first process (host pid namespace) while it runs, else None."""
        return self.init_pid if self.running else None

    def wait(self, timeout: float = 120.0) -> int:
        """Wait until the process exited and its output is read to the end; the exit code."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"container {self.name} ({self.id[:12]}) still running")
        assert self.exit_code is not None
        return self.exit_code

    def output(self) -> tuple[bytes, bytes]:
        """(stdout, stderr) exactly as written, once the container has exited."""
        if not self._done.is_set():
            raise RuntimeError(f"container {self.name} has not exited: wait() first")
        return self._streams.snapshot()

    def output_so_far(self) -> tuple[bytes, bytes]:
        """What the readers got until now (the container may still be writing)."""
        return self._streams.snapshot()

    # -- used by SimNode

    def _launch(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None) -> None:
        self.started_at = _timestamp()
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._streams.stdout_w,
            stderr=self._streams.stderr_w,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self._streams.close_write_ends()

    def _watch(self, on_exit: Callable[[SimContainer], None]) -> None:
        self._watcher = threading.Thread(
            target=self._wait_for_exit, args=(on_exit,), name=f"sim-{self.id[:12]}", daemon=True
        )
        self._watcher.start()

    def _wait_for_exit(self, on_exit: Callable[[SimContainer], None]) -> None:
        assert self.process is not None
        code = self.process.wait()
        self.exit_code = 128 - code if code < 0 else code  # killed by signal N: 128 + N
        self.finished_at = _timestamp()
        try:
            on_exit(self)
        finally:
            self._streams.join()
            self._done.set()

    def _abandon(self) -> None:
        """Never launched: close the pipes so the readers end."""
        self._streams.close_write_ends()
        self._streams.join(5)
        self._done.set()

    def _join_watcher(self, timeout: float) -> None:
        if self._watcher is not None:
            self._watcher.join(timeout)


# ---------------------------------------------------------------- pods


@dataclass(eq=False)
class SimPod:
    """A pod on the node: its identity, layout, containers and kubelet registration."""

    uid: str
    namespace: str
    name: str
    qos: str
    driver: str
    cgroup_relpath: str  # the pod's cgroup, relative to the cgroup2 mount
    containers: list[SimContainer]
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    owner: tuple[str, str] | None = None
    registered: bool = False
    deleted: bool = False
    document: dict[str, Any] | None = None  # what the kubelet serves, once registered

    def container(self, name: str) -> SimContainer:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    def wait(self, timeout: float = 120.0) -> dict[str, int]:
        """Wait for every container to exit; name -> exit code."""
        deadline = time.monotonic() + timeout
        return {c.name: c.wait(max(0.0, deadline - time.monotonic())) for c in self.containers}


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cgroupfs_pod_relpath(prefix: str, qos: str, uid: str) -> str:
    """``<prefix>/kubepods/<qos>/pod<uid>`` (guaranteed: no qos level)."""
    if qos == "guaranteed":
        return f"{prefix}/kubepods/pod{uid}"
    return f"{prefix}/kubepods/{qos}/pod{uid}"


def systemd_pod_relpath(prefix: str, qos: str, uid: str) -> str:
    """``<prefix>/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice``."""
    escaped = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"{prefix}/kubepods.slice/kubepods-pod{escaped}.slice"
    return f"{prefix}/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{escaped}.slice"


def container_relpath(pod_relpath: str, driver: str, container_id: str) -> str:
    if driver == "systemd":
        return f"{pod_relpath}/cri-containerd-{container_id}.scope"
    return f"{pod_relpath}/{container_id}"


# ---------------------------------------------------------------- kubelet documents


def _pod_document(pod: SimPod, node_name: str) -> dict[str, Any]:
    containers = [(c.name, c.image, c.container_id_uri, "running") for c in pod.containers]
    document = build_pod(
        pod.namespace,
        pod.name,
        uid=pod.uid,
        containers=containers,
        labels=pod.labels,
        annotations=pod.annotations,
        qos=QOS_CLASSES[pod.qos],
        owner=pod.owner,
        node_name=node_name,
    )
    document["spec"]["restartPolicy"] = "Never"  # nothing here restarts a container
    return document


def _mark_terminated(document: dict[str, Any], container: SimContainer) -> None:
    """Turn the container's status to terminated with its exit code (idempotent)."""
    assert container.exit_code is not None
    for entry in document["status"]["containerStatuses"]:
        if entry["name"] != container.name:
            continue
        running = entry["state"].get("running") or {}
        entry["state"] = {
            "terminated": {
                "exitCode": container.exit_code,
                "reason": "Completed" if container.exit_code == 0 else "Error",
                "startedAt": running.get("startedAt", container.started_at),
                "finishedAt": container.finished_at,
                "containerID": container.container_id_uri,
            }
        }
        entry["ready"] = entry["started"] = False


def _update_pod_phase(document: dict[str, Any]) -> None:
    statuses = document["status"]["containerStatuses"]
    terminated = [s["state"]["terminated"] for s in statuses if "terminated" in s["state"]]
    if len(terminated) == len(statuses):
        failed = any(t["exitCode"] != 0 for t in terminated)
        document["status"]["phase"] = "Failed" if failed else "Succeeded"
    ready = "True" if all(s["ready"] for s in statuses) else "False"
    for condition in document["status"]["conditions"]:
        if condition["type"] in ("Ready", "ContainersReady"):
            condition["status"] = ready


# ---------------------------------------------------------------- processes and cgroups


def process_alive(pid: int) -> bool:
    """True if the pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _cgroup_pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill_cgroup_procs(path: Path, timeout: float = 30.0) -> None:
    """SIGKILL every process in one cgroup, by pid, until it is empty."""
    deadline = time.monotonic() + timeout
    while (pids := _cgroup_pids(path)) and time.monotonic() < deadline:
        for pid in pids:
            _kill_pid(pid)
        time.sleep(0.01)


def _cgroup_dirs(top: Path) -> Iterator[Path]:
    """top and every directory below it, deepest first."""
    if not top.is_dir():
        return
    below = [Path(d) for d, _, _ in os.walk(top)]
    yield from sorted(below, key=lambda p: len(p.parts), reverse=True)


def cgroup_mount_points(mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    """Every cgroup (v1) and cgroup2 mount point."""
    points = []
    for line in Path(mountinfo).read_text().splitlines():
        before, _, after = line.partition(" - ")
        fstype = after.split(maxsplit=1)[:1]
        if fstype in (["cgroup"], ["cgroup2"]):
            points.append(Path(before.split()[4]))
    return points


def _mounts_under(directory: Path, mountinfo: str = "/proc/self/mountinfo") -> list[Path]:
    inside = str(directory).rstrip("/") + "/"
    points = [Path(line.split()[4]) for line in Path(mountinfo).read_text().splitlines()]
    return [p for p in points if str(p).startswith(inside)]


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _is_shim_of(pid: int, containerd_address: str) -> bool:
    """True if the pid is a containerd-shim started by the containerd at this socket."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    program = os.path.basename(cmdline.split(b"\0", 1)[0])
    return program.startswith(b"containerd-shim") and (
        f"-address\0{containerd_address}\0".encode() in cmdline
    )


def _shim_pids_for(containerd_address: str) -> list[int]:
    """Pids of the shims started by the containerd at this socket."""
    pids = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    return [pid for pid in pids if _is_shim_of(pid, containerd_address)]


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Signal a child by pid, wait; SIGKILL if it outlives the timeout; always reap."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_pid(proc.pid)
        proc.wait(timeout)


# ---------------------------------------------------------------- the node


class SimNode:
    """containerd + runc + a FakeKubelet + a private cgroup prefix, for e2e tests and demos."""

    def __init__(
        self,
        *,
        node_name: str = DEFAULT_NODE_NAME,
        rootfs: Path | None = None,
        base_dir: str | None = None,
    ) -> None:
        """`rootfs`: a directory to build (once) and reuse across nodes, e.g. a session
        temp dir; by default the rootfs is built in the node's own temp dir."""
        self.node_name = node_name
        self.prefix = f"{PREFIX_STEM}{secrets.token_hex(4)}"
        self.token = secrets.token_urlsafe(32)
        self.timings: dict[str, float] = {}
        self.pods: list[SimPod] = []
        self._rootfs_request = rootfs
        self._base_dir = base_dir
        self._lock = threading.Lock()
        self._state = "new"  # new -> started | stopped
        self._temp_dir: Path | None = None
        self._mount: str | None = None
        self._rootfs: Path | None = None
        self._kubelet: FakeKubelet | None = None
        self._containerd: subprocess.Popen[bytes] | None = None
        self._containerd_env: dict[str, str] = {}
        self._started_pids: list[int] = []
        self._created_shim_dirs: list[Path] = []
        self._ctr_container_ids: list[str] = []

    # -- lifecycle

    def start(self) -> SimNode:
        if self._state != "new":
            raise RuntimeError(f"SimNode is {self._state}: a node starts once")
        self._state = "started"
        try:
            self._make_temp_dir()
            self._make_prefix()
            self._prepare_rootfs()
            self._start_containerd()
            self._start_kubelet()
        except BaseException:
            with contextlib.suppress(SimNodeCleanupError):
                self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill everything, remove every cgroup and file; raise SimNodeCleanupError after
        doing all it can if something is left. A second call does nothing."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        errors: list[str] = []
        for step in (
            self._kill_all_containers,
            self._stop_kubelet,
            self._kill_cgroup_leftovers,
            self._stop_containerd,
            self._kill_leftover_shims,
            self._remove_cgroups,
            self._remove_temp_dir,
            self._remove_shim_sockets,
            self._remove_created_shim_dirs,
        ):
            try:
                step()
            except Exception as e:  # keep cleaning; report everything at the end
                errors.append(f"{step.__name__}: {e!r}")
        if errors:
            raise SimNodeCleanupError("; ".join(errors))

    def __enter__(self) -> SimNode:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where things are

    @property
    def kubelet(self) -> FakeKubelet:
        if self._kubelet is None:
            raise RuntimeError("SimNode not started")
        return self._kubelet

    @property
    def kubelet_url(self) -> str:
        return self.kubelet.url

    @property
    def ca_path(self) -> str:
        return self.kubelet.ca_path

    @property
    def token_path(self) -> str:
        return str(self.temp_dir / "token")

    @property
    def temp_dir(self) -> Path:
        if self._temp_dir is None:
            raise RuntimeError("SimNode not started")
        return self._temp_dir

    @property
    def cgroup_mount(self) -> str:
        """The cgroup v2 mount (e.g. /sys/fs/cgroup/unified in hybrid mode)."""
        if self._mount is None:
            raise RuntimeError("SimNode not started")
        return self._mount

    @property
    def roots(self) -> tuple[str]:
        """The agent's cgroup `roots` for this node's pods."""
        return (self.prefix,)

    @property
    def pods_cgroup(self) -> Path:
        """The node's cgroup subtree (absolute): every pod is below it."""
        return Path(self.cgroup_mount) / self.prefix

    @property
    def rootfs(self) -> Path:
        if self._rootfs is None:
            raise RuntimeError("SimNode not started")
        return self._rootfs

    @property
    def containerd_address(self) -> str:
        return str(self.temp_dir / "containerd.sock")

    def kubelet_config(self, **overrides: Any) -> KubeletConfig:
        """A KubeletConfig for this node's kubelet (token file, CA)."""
        return KubeletConfig(self.kubelet_url, self.token_path, self.ca_path, **overrides)

    def started_pids(self) -> list[int]:
        """Every process the node started or learnt of: containerd, shims, ctr, containers."""
        # A shim is learnt as the parent of its container's init, but just after the start
        # that parent can still be runc: the live shims of this containerd are added here.
        if self._containerd is not None:
            for shim in _shim_pids_for(self.containerd_address):
                self._note_pid(shim)
        with self._lock:
            return list(self._started_pids)

    # -- pods

    def run_pod(
        self,
        namespace: str,
        name: str,
        containers: list[SimContainerSpec],
        *,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        qos: str = "besteffort",
        driver: str = "containerd",
        register: str = "before",
        owner: tuple[str, str] | None = None,
    ) -> SimPod:
        """Start a pod's containers; return once each one's first process is in its cgroup
        (or it already exited).

        `register`: "before" lists the pod in the kubelet before starting its containers,
        "after" once they run (an agent learns of them late), "never" not at all.
        """
        self._check_pod_args(namespace, name, containers, qos, driver, register)
        pod = self._new_pod(namespace, name, containers, qos, driver, labels, annotations, owner)
        with self._lock:
            self.pods.append(pod)
        if register == "before":
            self._register(pod)
        for container in pod.containers:
            self._start_container(pod, container)
        for container in pod.containers:
            self._wait_started(container)
        if register == "after":
            self._register(pod)
        return pod

    def exec_in(
        self, container: SimContainer, script: str, *, below_pid: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process in a running containerd container as `kubectl exec` does
        (`ctr task exec`: a child of the shim, its stdout/stderr ctr's pipes, not the
        container's). `below_pid`: make its pid lower than that, as after a pid wrap-around
        (the next pids are set through ns_last_pid; root)."""
        if container.driver != "containerd":
            raise ValueError("exec_in needs a containerd container")
        if below_pid is not None:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(max(300, below_pid - 5000)))
        argv = self._ctr(
            "task", "exec", "--exec-id", f"exec-{secrets.token_hex(4)}",
            container.id, "/bin/sh", "-c", script,
        )
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._containerd_env,
        )
        return proc  # ends with the container; the caller reaps it

    def unregister_pod(self, pod: SimPod) -> None:
        """Unlist the pod from the kubelet while its containers go on running, as when a
        pod is deleted and its containers are still in their termination grace period."""
        with self._lock:
            pod.deleted = True
            if pod.registered:
                self.kubelet.remove_pod(pod.namespace, pod.name)

    def delete_pod(self, pod: SimPod, timeout: float = _KILL_TIMEOUT_S) -> None:
        """Kill the pod's containers, unlist it from the kubelet, remove its cgroups."""
        for container in pod.containers:
            self._kill_container(container, timeout)
        with self._lock:
            pod.deleted = True
            if pod.registered:
                self.kubelet.remove_pod(pod.namespace, pod.name)
            if pod in self.pods:
                self.pods.remove(pod)
        for container in pod.containers:
            container._join_watcher(timeout)
        self._remove_in_every_hierarchy(pod.cgroup_relpath)

    # -- starting

    def _make_temp_dir(self) -> None:
        self._temp_dir = Path(tempfile.mkdtemp(prefix=PREFIX_STEM, dir=self._base_dir))
        if len(f"{self.containerd_address}.ttrpc") > _MAX_SOCKET_PATH:
            raise SimNodeUnavailableError(
                f"{self._temp_dir} is too long for containerd's unix sockets: pass base_dir"
            )
        for sub in ("root", "state", "fifo", "runc", "opt"):
            (self._temp_dir / sub).mkdir()

    def _make_prefix(self) -> None:
        self._mount = find_cgroup2_mount()
        self.pods_cgroup.mkdir()

    def _prepare_rootfs(self) -> None:
        t0 = time.monotonic()
        try:
            self._rootfs = ensure_rootfs(self._rootfs_request or self.temp_dir / "rootfs")
        except BusyboxMissingError as e:
            raise SimNodeUnavailableError(str(e)) from e
        self.timings["rootfs_s"] = time.monotonic() - t0

    def _containerd_config(self) -> str:
        tmp = self.temp_dir
        return (
            "version = 2\n"
            f'root = "{tmp}/root"\n'
            f'state = "{tmp}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.containerd_address}"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{tmp}/opt"\n'
        )

    def _start_containerd(self) -> None:
        tool_dirs = {str(Path(_tool(t)).parent) for t in TOOLS}
        path = os.pathsep.join([*sorted(tool_dirs), _search_path()])
        self._containerd_env = {**os.environ, "PATH": path}
        self._remember_shim_dirs_to_create()
        config = self.temp_dir / "containerd.toml"
        config.write_text(self._containerd_config())
        t0 = time.monotonic()
        with (self.temp_dir / "containerd.log").open("wb") as log:
            self._containerd = subprocess.Popen(
                [_tool("containerd"), "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._containerd_env,
                start_new_session=True,
            )
        self._note_pid(self._containerd.pid)
        self._wait_containerd_ready()
        self.timings["containerd_start_s"] = time.monotonic() - t0

    def _remember_shim_dirs_to_create(self) -> None:
        self._created_shim_dirs = [d for d in _SHIM_SOCKET_DIRS if not d.exists()]

    def _wait_containerd_ready(self) -> None:
        assert self._containerd is not None
        deadline = time.monotonic() + _CONTAINERD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._containerd.poll() is not None:
                raise RuntimeError(
                    f"containerd exited ({self._containerd.returncode}): {self._log_tail()}"
                )
            if Path(self.containerd_address).exists() and self._ctr_ok("version"):
                return
            time.sleep(0.01)
        raise TimeoutError(
            f"containerd not ready in {_CONTAINERD_START_TIMEOUT_S}s: {self._log_tail()}"
        )

    def _log_tail(self, chars: int = 1500) -> str:
        try:
            return (self.temp_dir / "containerd.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def _ctr(self, *args: str) -> list[str]:
        return [_tool("ctr"), "--address", self.containerd_address, *args]

    def _ctr_ok(self, *args: str, timeout: float = 30.0) -> bool:
        try:
            done = subprocess.run(
                self._ctr(*args), capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def _start_kubelet(self) -> None:
        tls = generate_tls(self.temp_dir / "tls", name="podtap-simnode")
        token_path = Path(self.token_path)
        token_path.write_text(self.token)
        token_path.chmod(0o600)
        self._kubelet = FakeKubelet(token=self.token, node_name=self.node_name, tls=tls).start()

    def _note_pid(self, pid: int) -> None:
        with self._lock:
            if pid not in self._started_pids:
                self._started_pids.append(pid)

    # -- pods, internals

    def _check_pod_args(
        self,
        namespace: str,
        name: str,
        containers: list[SimContainerSpec],
        qos: str,
        driver: str,
        register: str,
    ) -> None:
        if self._state != "started":
            raise RuntimeError(f"SimNode is {self._state}")
        if qos not in QOS_CLASSES:
            raise ValueError(f"qos must be one of {sorted(QOS_CLASSES)}, got {qos!r}")
        if driver not in DRIVERS:
            raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
        if register not in REGISTER_MODES:
            raise ValueError(f"register must be one of {REGISTER_MODES}, got {register!r}")
        with self._lock:
            live = {(p.namespace, p.name) for p in self.pods}
        if (namespace, name) in live:
            raise ValueError(f"pod {namespace}/{name} already runs on this node")
        names = [c.name for c in containers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a pod needs containers with distinct names, got {names}")

    def _new_pod(
        self,
        namespace: str,
        name: str,
        specs: list[SimContainerSpec],
        qos: str,
        driver: str,
        labels: dict[str, str] | None,
        annotations: dict[str, str] | None,
        owner: tuple[str, str] | None,
    ) -> SimPod:
        uid = str(uuid.uuid4())
        layout = systemd_pod_relpath if driver == "systemd" else cgroupfs_pod_relpath
        pod_relpath = layout(self.prefix, qos, uid)
        containers = []
        for spec in specs:
            cid = secrets.token_hex(32)
            relpath = container_relpath(pod_relpath, driver, cid)
            containers.append(SimContainer(spec, cid, driver, relpath, self.cgroup_mount))
        return SimPod(
            uid=uid,
            namespace=namespace,
            name=name,
            qos=qos,
            driver=driver,
            cgroup_relpath=pod_relpath,
            containers=containers,
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            owner=owner,
        )

    def _start_container(self, pod: SimPod, container: SimContainer) -> None:
        try:
            if pod.driver == "systemd":
                self._launch_in_scope(container)
            else:
                self._launch_with_ctr(container)
        except BaseException:
            container._abandon()
            raise
        assert container.process is not None
        self._note_pid(container.process.pid)
        container._watch(lambda c: self._container_exited(pod, c))

    def _launch_with_ctr(self, container: SimContainer) -> None:
        self._ctr_container_ids.append(container.id)
        argv = self._ctr(
            "run",
            "--rm",
            "--fifo-dir",
            str(self.temp_dir / "fifo"),
            "--runc-root",
            str(self.temp_dir / "runc"),
            "--cgroup",
            f"/{container.cgroup_relpath}",
            "--rootfs",
            str(self.rootfs),
            container.id,
            "/bin/sh",
            "-c",
            container.spec.script,
        )
        container._launch(argv, self._containerd_env)

    def _launch_in_scope(self, container: SimContainer) -> None:
        container.cgroup_path.mkdir(parents=True)
        procs = container.cgroup_path / "cgroup.procs"
        shell = str(self.rootfs / "bin" / "sh")
        join = _JOIN_AND_EXEC.format(tee=shlex.quote(_tool("tee")))
        argv = ["/bin/sh", "-c", join, str(procs), shell, "-c", container.spec.script]
        env = {"PATH": str(self.rootfs / "bin"), "HOME": "/", "HOSTNAME": container.id[:12]}
        container._launch(argv, env, cwd=str(self.rootfs))

    def _task_dir(self, container: SimContainer) -> Path:
        return (
            self.temp_dir / "state" / "io.containerd.runtime.v2.task" / CTR_NAMESPACE / container.id
        )

    def _wait_started(self, container: SimContainer) -> None:
        """Until the container's first process is known (or the container already ended)."""
        t0 = time.monotonic()
        deadline = t0 + _CONTAINER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            pid = self._find_init_pid(container)
            if pid is not None:
                container.init_pid = pid
                self._note_pid(pid)
                return
            if not container.running:
                return
            time.sleep(0.005)
        raise TimeoutError(f"container {container.name} did not start: {self._log_tail()}")

    def _find_init_pid(self, container: SimContainer) -> int | None:
        assert container.process is not None
        if container.driver == "systemd":  # our own shell, joined before exec
            joined = container.process.pid in _cgroup_pids(container.cgroup_path)
            return container.process.pid if joined else None
        try:
            pid = int((self._task_dir(container) / "init.pid").read_text())
        except (OSError, ValueError):
            return None
        if pid not in _cgroup_pids(container.cgroup_path):
            return None
        shim = _parent_pid(pid)  # the shim is the init's subreaper
        if shim is not None and _is_shim_of(shim, self.containerd_address):
            self._note_pid(shim)
        return pid

    def _register(self, pod: SimPod) -> None:
        with self._lock:
            if pod.deleted:
                return
            pod.registered = True
            pod.document = _pod_document(pod, self.node_name)
            self._publish_locked(pod)

    def _container_exited(self, pod: SimPod, container: SimContainer) -> None:
        with self._lock:
            self._publish_locked(pod)

    def _publish_locked(self, pod: SimPod) -> None:
        if not pod.registered or pod.deleted or pod.document is None:
            return
        for container in pod.containers:
            if container.exit_code is not None:
                _mark_terminated(pod.document, container)
        _update_pod_phase(pod.document)
        self.kubelet.put_raw_pod(pod.namespace, pod.name, pod.document)

    # -- stopping

    def _kill_container(self, container: SimContainer, timeout: float) -> None:
        process = container.process
        if process is None or process.poll() is not None:
            return
        if container.driver == "containerd":
            self._ctr_ok("task", "kill", "-s", "KILL", container.id, timeout=timeout)
        else:
            _kill_pid(process.pid)
        _kill_cgroup_procs(container.cgroup_path)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_pid(process.pid)  # ctr that lost containerd; the shim is handled in stop()
            process.wait(timeout)

    def _kill_all_containers(self) -> None:
        with self._lock:
            pods = list(self.pods)
        for pod in pods:
            for container in pod.containers:
                self._kill_container(container, _KILL_TIMEOUT_S)
        for pod in pods:
            for container in pod.containers:
                container._join_watcher(_KILL_TIMEOUT_S)

    def _stop_kubelet(self) -> None:
        if self._kubelet is not None:
            self._kubelet.stop()

    def _kill_cgroup_leftovers(self) -> None:
        """Processes still in the node's cgroups (a script's orphans): SIGKILL by pid."""
        if self._mount is None:
            return
        for directory in _cgroup_dirs(self.pods_cgroup):
            _kill_cgroup_procs(directory)

    def _stop_containerd(self) -> None:
        if self._containerd is not None:
            stop_process(self._containerd, signal.SIGTERM, _KILL_TIMEOUT_S)

    def _shim_pids(self) -> list[int]:
        """Pids of the shims of this node's containerd (their command line has its socket)."""
        if self._temp_dir is None:
            return []
        return _shim_pids_for(self.containerd_address)

    def _kill_leftover_shims(self) -> None:
        """Shims outlive containerd by design: kill this node's, by pid."""
        for pid in self._shim_pids():
            _kill_pid(pid)

    def _remove_in_every_hierarchy(self, relpath: str) -> None:
        for mount_point in cgroup_mount_points():
            remove_tree(mount_point / relpath)

    def _remove_cgroups(self) -> None:
        if self._mount is not None:
            self._remove_in_every_hierarchy(self.prefix)

    def _remove_temp_dir(self) -> None:
        if self._temp_dir is None or not self._temp_dir.exists():
            return
        for mount_point in sorted(_mounts_under(self._temp_dir), reverse=True):
            subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
        left = _mounts_under(self._temp_dir)
        if left:  # never rmtree through a mount
            raise RuntimeError(f"mounts left under {self._temp_dir}: {left}")
        shutil.rmtree(self._temp_dir)

    def _remove_shim_sockets(self) -> None:
        """A killed shim leaves its socket: /run/containerd/s/sha256(<address>/<ns>/<id>)."""
        if self._temp_dir is None:
            return
        for container_id in self._ctr_container_ids:
            key = os.path.join(self.containerd_address, CTR_NAMESPACE, container_id)
            socket = _SHIM_SOCKET_DIRS[0] / hashlib.sha256(key.encode()).hexdigest()
            with contextlib.suppress(FileNotFoundError):
                socket.unlink()

    def _remove_created_shim_dirs(self) -> None:
        for directory in self._created_shim_dirs:  # deepest first; only if empty
            with contextlib.suppress(OSError):
                directory.rmdir()
