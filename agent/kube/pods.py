"""The kubelet's PodList turned into the ContainerMeta of every container that has a runtime id.

Input is whatever the kubelet sent: every field is optional and of unchecked type. A pod or
container status that cannot be used is skipped and counted, never raised on.

Which containers: every entry of `status.initContainerStatuses`, `status.containerStatuses`
and `status.ephemeralContainerStatuses` that carries a `containerID`. That covers running
containers, terminated ones whose last lines may still be in flight (completed init
containers, pods shutting down), containers created but not yet started (shown as waiting,
already with their id, about to write their first line) and crash-looping ones (waiting,
with the id of the instance that just died). Waiting containers without an id are not
created yet and are skipped without being counted as malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from agent.kube.model import ContainerMeta

STATUS_LISTS: Final = ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses")
SPEC_LISTS: Final = ("initContainers", "containers", "ephemeralContainers")
DEFAULT_QOS_CLASS: Final = "besteffort"  # kubelet reports "Guaranteed" | "Burstable" | "BestEffort"

# "<runtime>://<id>", e.g. containerd://<64 hex>, cri-o://<64 hex>, docker://<64 hex>
_CONTAINER_ID = re.compile(r"([a-z0-9][a-z0-9.+-]*)://([A-Za-z0-9][A-Za-z0-9._-]*)")


class _Malformed(Exception):
    """An entry of the PodList that cannot be turned into metadata."""


@dataclass(frozen=True, slots=True)
class _PodInfo:
    """What every container of one pod shares."""

    namespace: str
    name: str
    uid: str
    labels: dict[str, str]
    annotations: dict[str, str]
    owner_kind: str | None
    owner_name: str | None
    qos_class: str
    spec_images: dict[str, str]


def running_containers(pods: list[dict[str, Any]], host: str) -> tuple[list[ContainerMeta], int]:
    """ContainerMeta of every container with a containerID, and how many entries were skipped.

    `host` is the node name recorded in each ContainerMeta. A container id seen twice is
    reported once.
    """
    metas: list[ContainerMeta] = []
    seen_ids: set[str] = set()
    skipped = 0
    for pod in pods:
        try:
            info = _pod_info(pod)
            statuses, bad_lists = _status_entries(pod)
        except _Malformed:
            skipped += 1
            continue
        skipped += bad_lists
        for entry in statuses:
            try:
                meta = _container_meta(entry, info, host)
            except _Malformed:
                skipped += 1
                continue
            if meta is not None and meta.container_id not in seen_ids:
                seen_ids.add(meta.container_id)
                metas.append(meta)
    return metas, skipped


def pod_labels(pods: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Pod uid -> labels of every well-formed pod, whether its containers exist yet or not
    (a pod is listed from its admission on, before the runtime creates any cgroup)."""
    labels: dict[str, dict[str, str]] = {}
    for pod in pods:
        try:
            info = _pod_info(pod)
        except _Malformed:
            continue
        labels[info.uid] = info.labels
    return labels


def _pod_info(pod: object) -> _PodInfo:
    if not isinstance(pod, dict):
        raise _Malformed
    metadata = _object(pod.get("metadata"))
    status = pod.get("status")
    owner_kind, owner_name = _controller_owner(metadata.get("ownerReferences"))
    return _PodInfo(
        namespace=_required_str(metadata.get("namespace")),
        name=_required_str(metadata.get("name")),
        uid=_required_str(metadata.get("uid")),
        labels=_string_map(metadata.get("labels")),
        annotations=_string_map(metadata.get("annotations")),
        owner_kind=owner_kind,
        owner_name=owner_name,
        qos_class=_qos_class(status.get("qosClass") if isinstance(status, dict) else None),
        spec_images=_spec_images(pod.get("spec")),
    )


def _status_entries(pod: dict[str, Any]) -> tuple[list[object], int]:
    """The entries of the three container status lists, and how many lists were not lists.

    A pod without status (not started yet) has no entries.
    """
    status = pod.get("status")
    if status is None:
        return [], 0
    if not isinstance(status, dict):
        raise _Malformed
    entries: list[object] = []
    bad_lists = 0
    for key in STATUS_LISTS:
        value = status.get(key)
        if isinstance(value, list):
            entries.extend(value)
        elif value is not None:
            bad_lists += 1
    return entries, bad_lists


def _container_meta(entry: object, pod: _PodInfo, host: str) -> ContainerMeta | None:
    """Metadata of one container status; None if the container has no runtime id yet."""
    if not isinstance(entry, dict):
        raise _Malformed
    name = _required_str(entry.get("name"))
    raw_id = entry.get("containerID")
    if raw_id is None or raw_id == "":
        return None
    runtime, container_id = _split_container_id(raw_id)
    return ContainerMeta(
        namespace=pod.namespace,
        pod_name=pod.name,
        pod_uid=pod.uid,
        container_name=name,
        container_id=container_id,
        runtime=runtime,
        image=_image(entry.get("image"), pod.spec_images.get(name)),
        host=host,
        qos_class=pod.qos_class,
        labels=dict(pod.labels),
        annotations=dict(pod.annotations),
        owner_kind=pod.owner_kind,
        owner_name=pod.owner_name,
    )


def _split_container_id(raw: object) -> tuple[str, str]:
    """("containerd", "<id>") from "containerd://<id>"."""
    if not isinstance(raw, str):
        raise _Malformed
    match = _CONTAINER_ID.fullmatch(raw)
    if match is None:
        raise _Malformed
    return match.group(1), match.group(2)


def _image(status_image: object, spec_image: str | None) -> str:
    """The runtime's image reference, unless it is only a digest and the spec names one."""
    if not isinstance(status_image, str) or not status_image:
        return spec_image or ""
    if status_image.startswith("sha256:") and spec_image:
        return spec_image
    return status_image


def _spec_images(spec: object) -> dict[str, str]:
    """Container name -> image, over the spec's init, app and ephemeral containers."""
    if not isinstance(spec, dict):
        return {}
    images: dict[str, str] = {}
    for key in SPEC_LISTS:
        containers = spec.get(key)
        if not isinstance(containers, list):
            continue
        for container in containers:
            if isinstance(container, dict):
                name, image = container.get("name"), container.get("image")
                if isinstance(name, str) and isinstance(image, str):
                    images.setdefault(name, image)
    return images


def _controller_owner(refs: object) -> tuple[str | None, str | None]:
    """(kind, name) of the ownerReference with controller: true, else of the first one."""
    if not isinstance(refs, list):
        return None, None
    valid = [
        ref
        for ref in refs
        if isinstance(ref, dict)
        and isinstance(ref.get("kind"), str)
        and isinstance(ref.get("name"), str)
    ]
    if not valid:
        return None, None
    owner = next((ref for ref in valid if ref.get("controller") is True), valid[0])
    return owner["kind"], owner["name"]


def _qos_class(value: object) -> str:
    if isinstance(value, str) and value:
        return value.lower()
    return DEFAULT_QOS_CLASS


def _string_map(value: object) -> dict[str, str]:
    """A labels/annotations map with non-string keys or values dropped (None -> {})."""
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def _object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed
    return value


def _required_str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Malformed
    return value
