"""Data types shared by the kube stage: what the kubelet says, resolved to cgroups."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class FileIdent:
    """Identity of an open file as the kernel sees it: (superblock dev, inode number).

    `dev` is in the kernel's internal encoding (MAJOR << 20 | MINOR), the value of
    `inode->i_sb->s_dev`, not the userspace st_dev encoding.
    """

    dev: int
    ino: int


@dataclass(frozen=True, slots=True)
class ContainerMeta:
    """Pod and container metadata of one running container, as the kubelet reports it."""

    namespace: str
    pod_name: str
    pod_uid: str
    container_name: str
    container_id: str  # bare id, without the "containerd://" scheme
    runtime: str  # "containerd", "cri-o", "docker", ... (the scheme of containerID)
    image: str
    host: str
    qos_class: str  # "guaranteed", "burstable", "besteffort"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    owner_kind: str | None = None
    owner_name: str | None = None
    namespace_labels: dict[str, str] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)  # of the node it runs on
    pid: int | None = None  # not in the kubelet answer; filled from the cgroup's cgroup.procs
