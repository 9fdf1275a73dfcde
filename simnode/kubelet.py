"""A loopback kubelet: `GET /pods` over HTTPS on 127.0.0.1, in the shape the real one sends.

The server runs on its own thread with its own event loop, so the same object serves
synchronous tests, asyncio tests (whose loop it never blocks for long) and the demo:

    with FakeKubelet(token="t0") as kubelet:
        kubelet.add_pod("default", "web-0", containers=[("web", "nginx:1.27", CID)])
        ...  # point a client at kubelet.url, trusting kubelet.ca_path
        kubelet.mode = "500"  # faults: see MODES

What it copies from the kubelet (pkg/kubelet/server/server.go): the body is a v1.PodList
(`kind`, `apiVersion`, `metadata: {}`, `items`, with `items: null` when there are no pods,
as Go encodes a nil slice); a missing or wrong bearer token gets 401 with the plain-text body
"Unauthorized"; a denied SubjectAccessReview gets 403 "Forbidden (user=..., verb=get,
resource=nodes, subresource(s)=[pods proxy])"; other paths get 404; other verbs 405.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web

from simnode.loopback import LoopbackHttpsServer, bearer_matches
from simnode.tls import TLSFiles

MODES: Final = frozenset(
    {"ok", "401", "403", "429", "500", "malformed", "not_podlist", "slow", "down"}
)
DEFAULT_NODE_NAME: Final = "simnode-1"
DEFAULT_HOST_IP: Final = "192.0.2.10"  # TEST-NET-1: appears in pod data only, never dialled
DEFAULT_TOKEN: Final = "simnode-token"
FORBIDDEN_USER: Final = "system:serviceaccount:podtap:podtap"

# (name, image, containerID or None) or (name, image, containerID or None, state) where
# state is "running", "terminated" or "waiting" (with an id: crash-looping).
ContainerArg = tuple[str, str, str | None] | tuple[str, str, str | None, str]

_QOS_RESOURCES: Final[dict[str, dict[str, dict[str, str]]]] = {
    "Guaranteed": {
        "limits": {"cpu": "100m", "memory": "128Mi"},
        "requests": {"cpu": "100m", "memory": "128Mi"},
    },
    "Burstable": {"requests": {"cpu": "50m", "memory": "64Mi"}},
    "BestEffort": {},
}
_OWNER_API_VERSIONS: Final = {
    "ReplicaSet": "apps/v1",
    "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1",
    "Job": "batch/v1",
    "Node": "v1",
}


# ---------------------------------------------------------------- pod builder


def build_pod(
    namespace: str,
    name: str,
    *,
    uid: str | None = None,
    containers: Sequence[ContainerArg] = (),
    init_containers: Sequence[ContainerArg] = (),
    ephemeral_containers: Sequence[ContainerArg] = (),
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    qos: str = "BestEffort",
    owner: tuple[str, str] | None = None,
    node_name: str = DEFAULT_NODE_NAME,
    host_ip: str = DEFAULT_HOST_IP,
    phase: str | None = None,
) -> dict[str, Any]:
    """One pod as it appears in the kubelet's `/pods` items (no per-item kind/apiVersion).

    A container with a containerID is running (init containers: terminated/Completed) unless
    a state is given; one without is waiting in ContainerCreating.
    """
    if qos not in _QOS_RESOURCES:
        raise ValueError(f"qos must be one of {sorted(_QOS_RESOURCES)}, got {qos!r}")
    uid = uid or _stable_uid(f"{namespace}/Pod/{name}")
    now = _timestamp()
    app = [_container_status(c, "running", now) for c in containers]
    init = [_container_status(c, "terminated", now) for c in init_containers]
    ephemeral = [_container_status(c, "running", now) for c in ephemeral_containers]
    resources = _QOS_RESOURCES[qos]
    status: dict[str, Any] = {
        "phase": phase or _phase(app),
        "conditions": _conditions(app, now),
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": _pod_ip(uid),
        "podIPs": [{"ip": _pod_ip(uid)}],
        "startTime": now,
        "containerStatuses": app,
        "qosClass": qos,
    }
    if init:
        status["initContainerStatuses"] = init
    if ephemeral:
        status["ephemeralContainerStatuses"] = ephemeral
    spec: dict[str, Any] = {
        "containers": [_container_spec(c, resources) for c in containers],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "nodeName": node_name,
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    if init_containers:
        spec["initContainers"] = [_container_spec(c, resources) for c in init_containers]
    if ephemeral_containers:
        spec["ephemeralContainers"] = [_container_spec(c, {}) for c in ephemeral_containers]
    return {
        "metadata": _metadata(namespace, name, uid, labels, annotations, owner, now),
        "spec": spec,
        "status": status,
    }


def _metadata(
    namespace: str,
    name: str,
    uid: str,
    labels: dict[str, str] | None,
    annotations: dict[str, str] | None,
    owner: tuple[str, str] | None,
    now: str,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "resourceVersion": str(int(hashlib.sha256(uid.encode()).hexdigest()[:6], 16)),
        "creationTimestamp": now,
    }
    if labels:
        metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    if owner is not None:
        kind, owner_name = owner
        metadata["ownerReferences"] = [
            {
                "apiVersion": _OWNER_API_VERSIONS.get(kind, "apps/v1"),
                "kind": kind,
                "name": owner_name,
                "uid": _stable_uid(f"{namespace}/{kind}/{owner_name}"),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return metadata


def _stable_uid(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"simnode/{key}"))


def _container_spec(arg: ContainerArg, resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": arg[0],
        "image": arg[1],
        "resources": copy.deepcopy(resources),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }


def _container_status(arg: ContainerArg, default_state: str, now: str) -> dict[str, Any]:
    name, image, container_id = arg[0], arg[1], arg[2]
    if container_id is None:
        return {
            "name": name,
            "state": {"waiting": {"reason": "ContainerCreating"}},
            "lastState": {},
            "ready": False,
            "restartCount": 0,
            "image": image,
            "imageID": "",
            "started": False,
        }
    state = arg[3] if len(arg) == 4 else default_state
    repo = _runtime_image(image)
    entry: dict[str, Any] = {
        "name": name,
        "state": {},
        "lastState": {},
        "ready": state == "running",
        "restartCount": 0,
        "image": repo,
        "imageID": f"{repo.rsplit(':', 1)[0]}@sha256:{hashlib.sha256(repo.encode()).hexdigest()}",
        "containerID": container_id,
        "started": state == "running",
    }
    if state == "running":
        entry["state"] = {"running": {"startedAt": now}}
    elif state == "terminated":
        entry["state"] = {"terminated": _terminated(container_id, now)}
        entry["ready"] = True  # a completed init container is reported ready
    elif state == "waiting":
        message = f"back-off 40s restarting failed container={name}"
        entry["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        entry["lastState"] = {"terminated": {**_terminated(container_id, now), "exitCode": 1}}
        entry["restartCount"] = 3
    else:
        raise ValueError(f"unknown container state {state!r}")
    return entry


def _terminated(container_id: str, now: str) -> dict[str, Any]:
    return {
        "exitCode": 0,
        "reason": "Completed",
        "startedAt": now,
        "finishedAt": now,
        "containerID": container_id,
    }


def _runtime_image(image: str) -> str:
    """The fully qualified reference containerd reports: nginx:1 -> docker.io/library/nginx:1."""
    first, _, rest = image.partition("/")
    if not rest:
        image = f"docker.io/library/{image}"
    elif "." not in first and ":" not in first and first != "localhost":
        image = f"docker.io/{image}"
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last or "@" in last else f"{image}:latest"


def _phase(app_statuses: list[dict[str, Any]]) -> str:
    running = any("running" in s["state"] for s in app_statuses)
    return "Running" if running or not app_statuses else "Pending"


def _conditions(app_statuses: list[dict[str, Any]], now: str) -> list[dict[str, Any]]:
    ready = "True" if app_statuses and all(s["ready"] for s in app_statuses) else "False"
    kinds = [
        ("PodReadyToStartContainers", "True"),
        ("Initialized", "True"),
        ("Ready", ready),
        ("ContainersReady", ready),
        ("PodScheduled", "True"),
    ]
    return [
        {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": now}
        for kind, value in kinds
    ]


def _pod_ip(uid: str) -> str:
    digest = hashlib.sha256(uid.encode()).digest()
    return f"10.244.{digest[0]}.{max(digest[1], 2)}"


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_list(items: Iterable[Any]) -> dict[str, Any]:
    """A v1.PodList document as the kubelet encodes it (`items: null` when empty)."""
    listed = list(items)
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": listed or None}


# ---------------------------------------------------------------- server


class FakeKubelet(LoopbackHttpsServer):
    """HTTPS `/pods` on 127.0.0.1 with an ephemeral port, checked bearer token, and faults.

    Thread-safe: pods, token, mode and counters may be changed from any thread while it
    serves. `mode` is one of MODES: "ok"; "401"/"403"/"429"/"500" answer that status;
    "malformed" sends truncated JSON; "not_podlist" a valid JSON Status object; "slow"
    waits `slow_delay_s` before answering normally; "down" closes the listener and every
    open connection (set another mode to listen again on the same port).
    """

    _display_name = "FakeKubelet"
    _thread_name = "fake-kubelet"

    def __init__(
        self,
        *,
        token: str | None = DEFAULT_TOKEN,
        node_name: str = DEFAULT_NODE_NAME,
        tls: TLSFiles | None = None,
        slow_delay_s: float = 2.0,
        retry_after_s: int = 1,
    ) -> None:
        super().__init__(token=token, tls=tls)
        self.node_name = node_name
        self._mode = "ok"
        self._slow_delay_s = slow_delay_s
        self._retry_after_s = retry_after_s
        self._one_shot: deque[str] = deque()
        self._fault_body: str | None = None
        self._pods: dict[tuple[str, str], Any] = {}
        self._request_count = 0
        self._unauthorized_count = 0

    # -- lifecycle hooks (see LoopbackHttpsServer)

    def _starts_down(self) -> bool:
        return self.mode == "down"

    # -- behaviour

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.set_mode(value)

    def set_mode(
        self,
        mode: str,
        *,
        slow_delay_s: float | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        """`slow_delay_s`: how long "slow" waits; `retry_after_s`: the Retry-After of "429"."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        with self._lock:
            previous, self._mode = self._mode, mode
            if slow_delay_s is not None:
                self._slow_delay_s = slow_delay_s
            if retry_after_s is not None:
                self._retry_after_s = retry_after_s
        if self._loop is None or previous == mode:
            return
        if mode == "down":
            self._call(self._close_listener())
        elif previous == "down":
            self._call(self._listen())

    def fail_next(self, count: int, mode: str = "500") -> None:
        """Answer the next `count` requests as in `mode` (not "down"), then as before."""
        if mode not in MODES - {"down"}:
            raise ValueError(f"one-shot mode must be in {sorted(MODES - {'down'})}")
        with self._lock:
            self._one_shot.extend([mode] * count)

    @property
    def fault_body(self) -> str | None:
        """A body to send instead of the kubelet's own text for 401/403/429/500 faults."""
        with self._lock:
            return self._fault_body

    @fault_body.setter
    def fault_body(self, value: str | None) -> None:
        with self._lock:
            self._fault_body = value

    @property
    def request_count(self) -> int:
        """Requests that reached the server (any path, any outcome)."""
        with self._lock:
            return self._request_count

    @property
    def unauthorized_count(self) -> int:
        """Requests answered 401 because of a missing or wrong token."""
        with self._lock:
            return self._unauthorized_count

    def reset_counts(self) -> None:
        with self._lock:
            self._request_count = self._unauthorized_count = 0

    # -- pods

    def add_pod(
        self,
        namespace: str,
        name: str,
        *,
        uid: str | None = None,
        containers: Sequence[ContainerArg] = (),
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        qos: str = "BestEffort",
        owner: tuple[str, str] | None = None,
        init_containers: Sequence[ContainerArg] = (),
        ephemeral_containers: Sequence[ContainerArg] = (),
    ) -> dict[str, Any]:
        """Build a pod (see build_pod) on this node, serve it, and return a copy of it."""
        pod = build_pod(
            namespace,
            name,
            uid=uid,
            containers=containers,
            labels=labels,
            annotations=annotations,
            qos=qos,
            owner=owner,
            init_containers=init_containers,
            ephemeral_containers=ephemeral_containers,
            node_name=self.node_name,
        )
        self.put_raw_pod(namespace, name, pod)
        return copy.deepcopy(pod)

    def put_raw_pod(self, namespace: str, name: str, pod: Any) -> None:
        """Serve any JSON value as the item keyed (namespace, name): for malformed input."""
        with self._lock:
            self._pods[(namespace, name)] = copy.deepcopy(pod)

    def remove_pod(self, namespace: str, name: str) -> bool:
        with self._lock:
            return self._pods.pop((namespace, name), None) is not None

    def clear_pods(self) -> None:
        with self._lock:
            self._pods.clear()

    def pods(self) -> list[Any]:
        with self._lock:
            return copy.deepcopy(list(self._pods.values()))

    # -- server internals (run on the server's thread)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._request_count += 1
            mode = self._one_shot.popleft() if self._one_shot else self._mode
            expected, delay, fault_body = self._token, self._slow_delay_s, self._fault_body
            retry_after = self._retry_after_s
            authenticated = bearer_matches(request.headers.get("Authorization"), expected)
            if not authenticated:
                self._unauthorized_count += 1
        if not authenticated or mode == "401":
            return _text(401, fault_body or "Unauthorized")
        if mode == "403":
            return _text(403, fault_body or _forbidden_text())
        if request.path != "/pods":
            return _text(404, "404 page not found\n")
        if request.method != "GET":
            return _text(405, "Method Not Allowed", headers={"Allow": "GET"})
        return await self._answer_pods(mode, delay, fault_body, retry_after)

    async def _answer_pods(
        self, mode: str, delay: float, fault_body: str | None, retry_after: int
    ) -> web.StreamResponse:
        if mode == "429":
            headers = {"Retry-After": str(retry_after)}
            return _text(429, fault_body or "Too Many Requests", headers=headers)
        if mode == "500":
            return _text(500, fault_body or "Internal Error: failed to list pods\n")
        if mode == "malformed":
            body = self._pod_list_bytes()
            return _json(body[: len(body) // 2])
        if mode == "not_podlist":
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 200}
            return _json(orjson.dumps(status))
        if mode == "slow":
            await asyncio.sleep(delay)
        return _json(self._pod_list_bytes())

    def _pod_list_bytes(self) -> bytes:
        with self._lock:
            return orjson.dumps(pod_list(self._pods.values()))


def _forbidden_text() -> str:
    return (
        f"Forbidden (user={FORBIDDEN_USER}, verb=get, resource=nodes, "
        "subresource(s)=[pods proxy])\n"
    )


def _text(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=body.encode(),
        content_type="text/plain",
        charset="utf-8",
        headers=headers,
    )


def _json(body: bytes) -> web.Response:
    return web.Response(status=200, body=body, content_type="application/json")
