"""Containers -> their cgroup v2 directories and ids, and the identities of their stdio.

Where the kubelet and the runtimes put a container's cgroup (paths under the cgroup2 mount,
``<root>`` being a configured parent, "" by default, see ``kubepods_nodes``):

systemd driver
    ``<root>/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/<scope>``
    (guaranteed pods: ``<root>/kubepods.slice/kubepods-pod<uid>.slice/<scope>``), with
    ``-`` in the uid escaped to ``_`` and ``<scope>`` one of ``cri-containerd-<id>.scope``,
    ``crio-<id>.scope``, ``docker-<id>.scope``. crun (CRI-O's default runtime on many
    distributions) puts the processes in a ``container`` child of the scope: that child is
    preferred when it exists. CRI-O's conmon runs in ``crio-conmon-<id>.scope`` (or in the
    pod slice), never matched.
cgroupfs driver
    ``<root>/kubepods/<qos>/pod<uid>/<id>`` (guaranteed: ``<root>/kubepods/pod<uid>/<id>``);
    CRI-O names the leaf ``crio-<id>`` (conmon: ``crio-conmon-<id>``).

The cgroup id that ``bpf_get_current_cgroup_id()`` returns is the kernfs node id of the
task's cgroup, which is also the inode number of the cgroup's directory.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence

from agent.kube.model import ContainerMeta, FileIdent

__all__ = [
    "CgroupError",
    "candidate_paths",
    "cgroup_id",
    "container_id_from_path",
    "find_cgroup2_mount",
    "cgroup_pids",
    "init_pid",
    "kernel_dev",
    "kubepods_nodes",
    "own_cgroup",
    "pod_uid_from_path",
    "resolve",
    "scan_containers",
    "stream_idents",
]

QOS_CLASSES = ("guaranteed", "burstable", "besteffort")
_SCOPE_PREFIXES = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}
_RUNTIME_ALIASES = {"crio": "cri-o", "cri-containerd": "containerd"}
# crun's sub-cgroup of a systemd scope, where the container's processes live.
_CRUN_SUBGROUP = "container"
# Paths tried first when the mount table has several cgroup2 mounts.
_USUAL_MOUNTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
# Errors meaning "this cgroup or process is gone (or not there yet)".
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ESRCH)

_POD_DIR = re.compile(r"(?:[\w-]*-)?pod[0-9a-fA-F_-]+(?:\.slice)?")
_QOS_DIR = re.compile(r"(?:[\w-]*-)?(?:burstable|besteffort)(?:\.slice)?")
_SCOPE_DIR = re.compile(r"(?:cri-containerd|crio|docker)-(?!conmon-)(.+)\.scope")
_CGROUPFS_CONTAINER_DIR = re.compile(r"(?:crio-)?([0-9a-f]{64})")


class CgroupError(Exception):
    """The cgroup v2 hierarchy cannot be found or used."""


# --- the mount -----------------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup2_mount_points(mountinfo_path: str) -> list[str]:
    try:
        with open(mountinfo_path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CgroupError(f"cannot read {mountinfo_path}: {e}") from e
    points = []
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if sep and len(fields) >= 5 and after.split(maxsplit=1)[:1] == ["cgroup2"]:
            points.append(_unescape_mountinfo(fields[4]))
    return points


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _as_seen_here(mount_point: str, host_root: str) -> str:
    if _is_under(mount_point, host_root):
        return mount_point
    return os.path.join(host_root, mount_point.lstrip("/"))


def _mount_preference(mount_point: str, host_root: str) -> tuple[int, int]:
    """Sort key: mounts already under host_root first, then the usual locations."""
    in_here = _is_under(mount_point, host_root)
    if in_here:
        host_path = os.path.normpath("/" + os.path.relpath(mount_point, host_root))
    else:
        host_path = mount_point
    usual = _USUAL_MOUNTS.index(host_path) if host_path in _USUAL_MOUNTS else len(_USUAL_MOUNTS)
    return (0 if in_here else 1), usual


def find_cgroup2_mount(mountinfo_path: str = "/proc/self/mountinfo", host_root: str = "/") -> str:
    """Where the host's cgroup v2 hierarchy can be read from here.

    Pure v2 hosts mount it at ``/sys/fs/cgroup``, hybrid ones at ``/sys/fs/cgroup/unified``.

    ``host_root`` is the directory where the host's ``/`` appears to the agent: ``"/"``
    when running on the host, ``"/host"`` when the DaemonSet mounts the host's root (or
    its ``/sys``) under ``/host``. ``mountinfo_path`` is read as follows:

    - mount points at or under ``host_root`` are taken as they are: this is our own mount
      table (``/proc/self/mountinfo``) showing the host's cgroup fs mounted into the pod;
      they win over the others (the pod's own ``/sys/fs/cgroup`` may be a private
      cgroup-namespace view that does not show ``kubepods``);
    - other mount points are host paths, prefixed with ``host_root``: this is the host's
      mount table, e.g. ``/host/proc/1/mountinfo`` with the host's /proc under /host.

    Among candidates ``/sys/fs/cgroup`` comes before ``/sys/fs/cgroup/unified``; the first
    one holding ``cgroup.controllers`` (the mark of a cgroup2 directory) is returned.
    Raises CgroupError when there is none.
    """
    host_root = os.path.normpath(host_root)
    points = _cgroup2_mount_points(mountinfo_path)
    if not points:
        raise CgroupError(
            f"no cgroup2 mount in {mountinfo_path}: podtap needs cgroup v2 "
            "(unified or hybrid hierarchy)"
        )
    ordered = sorted(points, key=lambda p: _mount_preference(p, host_root))
    seen_here = [_as_seen_here(p, host_root) for p in ordered]
    for path in seen_here:
        if os.path.exists(os.path.join(path, "cgroup.controllers")):
            return path
    raise CgroupError(
        f"cgroup2 mounts {points} listed in {mountinfo_path} are not readable here as "
        f"{seen_here} (host_root={host_root!r}): mount the host's cgroup fs into the pod"
    )


# --- where a container's cgroup is -------------------------------------------------------


def _normalize_root(root: str) -> str:
    return root.strip("/")


def kubepods_nodes(root: str) -> tuple[tuple[str, str], str]:
    """The kubepods cgroups under one parent: ((systemd dir, slice name prefix), cgroupfs dir).

    A systemd slice name carries its parents' names: under ``kubelet.slice`` the kubelet's
    slice is ``kubelet.slice/kubelet-kubepods.slice`` and its children are named
    ``kubelet-kubepods-...``. Under a plain directory (or the mount's root), it is
    ``kubepods.slice`` with children ``kubepods-...``.
    """
    root = _normalize_root(root)
    last = os.path.basename(root)
    if last.endswith(".slice") and last != "-.slice":
        slice_prefix = f"{last[: -len('.slice')]}-kubepods"
    else:
        slice_prefix = "kubepods"
    systemd_dir = os.path.join(root, f"{slice_prefix}.slice")
    return (systemd_dir, slice_prefix), os.path.join(root, "kubepods")


def _qos_classes(meta: ContainerMeta) -> tuple[str, ...]:
    qos = meta.qos_class.lower()
    return (qos,) if qos in QOS_CLASSES else QOS_CLASSES


def _runtimes(meta: ContainerMeta) -> tuple[str, ...]:
    runtime = meta.runtime.lower()
    runtime = _RUNTIME_ALIASES.get(runtime, runtime)
    return (runtime,) if runtime in _SCOPE_PREFIXES else tuple(_SCOPE_PREFIXES)


def _systemd_pod_slice(kubepods: str, prefix: str, qos: str, uid: str) -> str:
    escaped_uid = uid.replace("-", "_")
    if qos == "guaranteed":
        return os.path.join(kubepods, f"{prefix}-pod{escaped_uid}.slice")
    qos_slice = os.path.join(kubepods, f"{prefix}-{qos}.slice")
    return os.path.join(qos_slice, f"{prefix}-{qos}-pod{escaped_uid}.slice")


def _cgroupfs_pod_dir(kubepods: str, qos: str, uid: str) -> str:
    if qos == "guaranteed":
        return os.path.join(kubepods, f"pod{uid}")
    return os.path.join(kubepods, qos, f"pod{uid}")


def _systemd_candidates(meta: ContainerMeta, root: str) -> Iterator[str]:
    (kubepods, prefix), _ = kubepods_nodes(root)
    for qos in _qos_classes(meta):
        pod = _systemd_pod_slice(kubepods, prefix, qos, meta.pod_uid)
        for runtime in _runtimes(meta):
            scope = os.path.join(pod, f"{_SCOPE_PREFIXES[runtime]}-{meta.container_id}.scope")
            yield os.path.join(scope, _CRUN_SUBGROUP)
            yield scope


def _cgroupfs_candidates(meta: ContainerMeta, root: str) -> Iterator[str]:
    _, kubepods = kubepods_nodes(root)
    leaves = []
    runtimes = _runtimes(meta)
    if any(r != "cri-o" for r in runtimes):
        leaves.append(meta.container_id)
    if "cri-o" in runtimes:
        leaves.append(f"crio-{meta.container_id}")
    for qos in _qos_classes(meta):
        pod = _cgroupfs_pod_dir(kubepods, qos, meta.pod_uid)
        for leaf in leaves:
            yield os.path.join(pod, leaf)


def candidate_paths(meta: ContainerMeta, roots: Sequence[str] = ("",)) -> list[str]:
    """Paths, relative to the cgroup2 mount, where this container's cgroup may be.

    For each parent in ``roots`` (kubelet ``--cgroup-root``-style prefixes, ``""`` for the
    mount's root): systemd driver first (crun's ``container`` child before its scope),
    then cgroupfs. An unknown QoS class or runtime expands to all of them. Never a pod's
    own cgroup, only a container's.
    """
    if not meta.container_id or not meta.pod_uid:
        return []
    paths: list[str] = []
    for root in roots:
        paths.extend(_systemd_candidates(meta, root))
        paths.extend(_cgroupfs_candidates(meta, root))
    return paths


def cgroup_id(path: str) -> int:
    """The cgroup v2 id of a cgroup directory: its inode number."""
    return os.stat(path).st_ino


def _existing_dir_id(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno in _GONE:
            return None
        raise
    return st.st_ino if stat.S_ISDIR(st.st_mode) else None


def resolve(
    meta: ContainerMeta,
    mount: str,
    roots: Sequence[str] = ("",),
    index: Mapping[str, tuple[str, int]] | None = None,
) -> tuple[str, int] | None:
    """(absolute cgroup directory, cgroup id) of the container, or None if not there (yet).

    With ``index`` (from ``scan_containers``) the container id is looked up there first, and
    the candidate paths are probed only on a miss. The runtime creates the cgroups (crun's
    ``container`` child included) before it hands the container id to the kubelet, so a
    container the kubelet reports with an id resolves to its final directory.
    """
    if index is not None and meta.container_id in index:
        return index[meta.container_id]
    for relative in candidate_paths(meta, roots):
        path = os.path.join(mount, relative)
        ident = _existing_dir_id(path)
        if ident is not None:
            return path, ident
    return None


# --- scanning all containers at once -----------------------------------------------------


def _subdirs(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError as e:
        if e.errno in _GONE:
            return []
        raise


def _pod_dirs(kubepods: str) -> Iterator[str]:
    for entry in _subdirs(kubepods):
        if _POD_DIR.fullmatch(entry.name):
            yield entry.path
        elif _QOS_DIR.fullmatch(entry.name):
            yield from (e.path for e in _subdirs(entry.path) if _POD_DIR.fullmatch(e.name))


def _container_in(entry: os.DirEntry[str]) -> tuple[str, str] | None:
    """(container id, cgroup directory) if this child of a pod cgroup is a container's."""
    scope = _SCOPE_DIR.fullmatch(entry.name)
    if scope:
        crun_child = os.path.join(entry.path, _CRUN_SUBGROUP)
        path = crun_child if os.path.isdir(crun_child) else entry.path
        return scope.group(1), path
    leaf = _CGROUPFS_CONTAINER_DIR.fullmatch(entry.name)
    if leaf:
        return leaf.group(1), entry.path
    return None


def scan_containers(mount: str, roots: Sequence[str] = ("",)) -> dict[str, tuple[str, int]]:
    """Container id -> (absolute cgroup directory, cgroup id) for every container cgroup
    under the kubepods trees (both drivers) of each root: one walk instead of probing the
    candidates of each container. Directories vanishing during the walk are skipped."""
    found: dict[str, tuple[str, int]] = {}
    for root in roots:
        (systemd_dir, _), cgroupfs_dir = kubepods_nodes(root)
        for kubepods in (systemd_dir, cgroupfs_dir):
            for pod in _pod_dirs(os.path.join(mount, kubepods)):
                for entry in _subdirs(pod):
                    container = _container_in(entry)
                    if container is None:
                        continue
                    ident = _existing_dir_id(container[1])
                    if ident is not None:
                        found.setdefault(container[0], (container[1], ident))
    return found


def container_id_from_path(path: str) -> str | None:
    """The container id a cgroup path names (a scope or a cgroupfs leaf, or crun's
    ``container`` child of a scope), or None for any other cgroup."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[-1] == _CRUN_SUBGROUP:
        parts.pop()
    if len(parts) < 2 or not _POD_DIR.fullmatch(parts[-2]):
        return None
    name = parts[-1]
    scope = _SCOPE_DIR.fullmatch(name)
    if scope:
        return scope.group(1)
    leaf = _CGROUPFS_CONTAINER_DIR.fullmatch(name)
    return leaf.group(1) if leaf else None


def pod_uid_from_path(path: str) -> str | None:
    """The pod uid a container's cgroup path names (its parent, ``pod<uid>`` or the
    systemd ``...-pod<uid_>.slice``), or None."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[-1] == _CRUN_SUBGROUP:
        parts.pop()
    if len(parts) < 2 or container_id_from_path(path) is None:
        return None
    pod = re.fullmatch(r"(?:[\w-]*-)?pod([0-9a-fA-F_-]+?)(?:\.slice)?", parts[-2])
    return pod.group(1).replace("_", "-") if pod else None


# --- processes ---------------------------------------------------------------------------


def cgroup_pids(cgroup_dir: str) -> list[int]:
    """The processes (thread group ids) in the cgroup, as numbered in our pid namespace:
    a process outside it reads as 0 and is left out. [] when the cgroup is gone."""
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), encoding="ascii") as f:
            pids = [int(line) for line in f.read().split()]
    except OSError as e:
        if e.errno in _GONE:
            return []
        raise
    return [pid for pid in pids if pid > 0]


def _parent_and_start(pid: int, proc_root: str) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) from /proc/<pid>/stat."""
    try:
        with open(os.path.join(proc_root, str(pid), "stat"), "rb") as f:
            text = f.read()
    except OSError:
        return None  # exited meanwhile
    # The command name (field 2) may hold spaces and parentheses: fields follow the last ")".
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[1]), int(fields[19])  # fields 4 (ppid) and 22 (starttime)
    except (IndexError, ValueError):
        return None


def init_pid(cgroup_dir: str, proc_root: str = "/proc") -> int | None:
    """The container's init: the process the runtime started, whose fds 1/2 are the
    container's stdout/stderr. None when the cgroup is empty or gone.

    Not the lowest pid: after pid wrap-around, or with a `kubectl exec` session, that
    process's fds may be anything. The runtime's processes are children of the shim, which
    is outside the cgroup; among them (an exec session is one too) the init started first.
    A process whose parent is in the cgroup is the workload's own child, never the init.
    When no parent can be read, the oldest process is taken.
    """
    pids = cgroup_pids(cgroup_dir)
    members = set(pids)
    started: list[tuple[bool, int, int]] = []  # (parent inside, start time, pid)
    for pid in pids:
        found = _parent_and_start(pid, proc_root)
        if found is not None:
            parent, start = found
            started.append((parent in members, start, pid))
    if not started:
        return min(pids) if pids else None
    return min(started)[2]


# The name `podtap tap` and older callers use; init_pid is the rule.


def _self_cgroup_path(proc_self_cgroup: str) -> str | None:
    """The ``0::/path`` of /proc/self/cgroup: relative to our cgroup namespace's root."""
    try:
        with open(proc_self_cgroup, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def own_cgroup(
    mount: str,
    roots: Sequence[str] = ("",),
    pid: int | None = None,
    proc_self_cgroup: str = "/proc/self/cgroup",
) -> tuple[str, int] | None:
    """(cgroup directory, cgroup id) of this process, whatever its namespaces; None if
    it is in no cgroup found under ``mount``.

    /proc/self/cgroup names it only when we share the host's cgroup namespace (a private
    one reads ``0::/``). What works in every case is cgroup.procs, which lists pids as
    numbered in the *reader's* pid namespace: the one container cgroup under the kubepods
    trees that lists our own pid is ours, with or without hostPID.
    """
    pid = os.getpid() if pid is None else pid
    path = _self_cgroup_path(proc_self_cgroup)
    if path and path != "/" and "/.." not in path:
        directory = os.path.join(mount, path.lstrip("/"))
        if pid in cgroup_pids(directory):
            return directory, cgroup_id(directory)
    for directory, ident in scan_containers(mount, roots).values():
        if pid in cgroup_pids(directory):
            return directory, ident
    return None


def kernel_dev(st_dev: int) -> int:
    """The kernel's internal dev_t (``MAJOR << 20 | MINOR``) of a userspace ``st_dev``."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def _fd_ident(pid: int, fd: int, proc_root: str) -> FileIdent | None:
    try:
        st = os.stat(os.path.join(proc_root, str(pid), "fd", str(fd)))
    except OSError:
        # Process gone, fd closed, or not ours to look at: no identity for that stream.
        return None
    return FileIdent(dev=kernel_dev(st.st_dev), ino=st.st_ino)


def stream_idents(pid: int, proc_root: str = "/proc") -> tuple[FileIdent | None, FileIdent | None]:
    """Identities of what the process's fd 1 and fd 2 point at (pipe, tty, file...)."""
    return _fd_ident(pid, 1, proc_root), _fd_ident(pid, 2, proc_root)
