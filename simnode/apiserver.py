"""A loopback Kubernetes API server: namespaces (list + watch) and nodes, over HTTPS.

Enough of kube-apiserver for the `kubernetes` Python client to list and watch namespaces
and read a node, with the real wire shapes:

    with FakeApiServer(token="t0") as api:
        api.add_namespace("shop", {"team": "a"})
        ...  # point a client at api.url, trusting api.ca_path
        api.label_namespace("shop", {"team": "b"})  # MODIFIED to open watches
        api.compact(); api.drop_watches()           # the next watch gets 410 Gone

What it copies from the real server:

* one global resourceVersion (etcd's revision), bumped by every write of any kind (a node
  write too, and `compact()` which stands for other resources' writes), stored as a string
  in `metadata.resourceVersion`;
* `GET /api/v1/namespaces`: a NamespaceList (`kind`, `apiVersion`, `metadata.resourceVersion`,
  `items` always a list; items carry no kind/apiVersion). `limit`/`continue`/selectors are
  ignored (the server returns everything, which the API allows for `limit`);
* `?watch=1` (or `true`): HTTP 200, `Content-Type: application/json`, chunked, one JSON
  event per line, `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}` with
  kind/apiVersion in the object. `resourceVersion` unset or "0": synthetic ADDED events for
  every namespace first, then changes; N: the events after N, then changes; N older than
  the history kept: one ERROR event whose object is a `Status` with code 410, reason
  "Expired", message "too old resource version: N (oldest)", then the end of the stream
  (as the watch cache does). `timeoutSeconds` ends the stream cleanly (default 1800 s);
  `allowWatchBookmarks=true` gets BOOKMARK events (object: kind, apiVersion and
  `metadata: {resourceVersion, creationTimestamp: null}` only) every `bookmark_interval_s`
  and on `send_bookmark()`;
* namespaces always carry the label `kubernetes.io/metadata.name` (set by the server since
  1.21); deleting one first marks it Terminating (MODIFIED with `deletionTimestamp`, phase
  Terminating), then DELETED;
* `GET /api/v1/nodes/{name}`: a Node; missing -> 404 `Status` NotFound;
* errors are `Status` objects (`kind`, `apiVersion`, `metadata: {}`, `status: "Failure"`,
  `message`, `reason`, `details`, `code`): 401 Unauthorized for a missing or wrong bearer
  token, 403 Forbidden with the RBAC message for a path made forbidden with `forbid()`,
  404 NotFound, 405 MethodNotAllowed, 400 BadRequest for malformed parameters.

Test controls: namespace/node writes, `compact()`, `drop_watches()` (abort open watch
connections), `down()`/`up()` (stop listening and close everything / listen again on the
same port), `forbid()`/`allow()`, counters and `wait_for_watches()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web

from simnode.loopback import LoopbackHttpsServer, bearer_matches
from simnode.tls import TLSFiles

DEFAULT_TOKEN: Final = "simnode-apiserver-token"
DEFAULT_NODE_NAME: Final = "simnode-1"
SERVICE_ACCOUNT_USER: Final = "system:serviceaccount:podtap:podtap"
SYSTEM_NAMESPACES: Final = ("default", "kube-node-lease", "kube-public", "kube-system")
NAME_LABEL: Final = "kubernetes.io/metadata.name"
DEFAULT_WATCH_TIMEOUT_S: Final = 1800
_HISTORY_LIMIT: Final = 10_000

_ABORT: Final = object()  # queue item: abort the connection
_END: Final = object()  # queue item: end the stream cleanly


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    """A metav1.Status failure, as the API server encodes it."""
    doc: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        doc["details"] = details
    doc["code"] = code
    return orjson.dumps(doc)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uid(kind: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"simnode-apiserver/{kind}/{name}/{time.time_ns()}"))


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Watcher:
    queue: asyncio.Queue[object]
    bookmarks: bool
    request: web.Request


@dataclass
class _State:
    rv: int = 1
    oldest_rv: int = 1  # a watch from rv < oldest_rv gets 410
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: deque[tuple[int, bytes]] = field(default_factory=deque)  # (rv, event line)


class FakeApiServer(LoopbackHttpsServer):
    """HTTPS kube-apiserver subset on 127.0.0.1 (ephemeral port). Thread-safe controls."""

    _display_name = "FakeApiServer"
    _thread_name = "fake-apiserver"
    _tls_name = "simnode-apiserver"

    def __init__(
        self,
        *,
        token: str | None = DEFAULT_TOKEN,
        tls: TLSFiles | None = None,
        node_name: str = DEFAULT_NODE_NAME,
        node_labels: dict[str, str] | None = None,
        system_namespaces: bool = True,
        bookmark_interval_s: float | None = None,
        history_limit: int = _HISTORY_LIMIT,
    ) -> None:
        super().__init__(token=token, tls=tls)
        self._bookmark_interval_s = bookmark_interval_s
        self._history_limit = history_limit
        self._state = _State()
        self._watchers: set[_Watcher] = set()
        self._forbidden: set[str] = set()
        self._down = False
        self._watch_established = threading.Condition(self._lock)
        self.request_count = 0
        self.list_count = 0
        self.watch_count = 0
        self.unauthorized_count = 0
        self.watch_resource_versions: list[str] = []  # resourceVersion of each watch request
        if system_namespaces:
            for name in SYSTEM_NAMESPACES:
                self.add_namespace(name)
        self.add_node(
            node_name,
            node_labels
            if node_labels is not None
            else {
                "kubernetes.io/hostname": node_name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": "zone-a",
            },
        )

    # -- lifecycle hooks (see LoopbackHttpsServer)

    def _starts_down(self) -> bool:
        return self._down

    def _before_stop(self) -> None:
        self._close_watches(abort=True)

    # -- namespaces

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Create a namespace (ADDED); returns a copy of the object."""
        with self._lock:
            if name in self._state.namespaces:
                raise ValueError(f"namespace {name} already exists")
            rv = self._bump()
            obj = {
                "kind": "Namespace",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "uid": _uid("Namespace", name),
                    "resourceVersion": str(rv),
                    "creationTimestamp": _now(),
                    "labels": {**(labels or {}), NAME_LABEL: name},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }
            self._state.namespaces[name] = obj
            self._emit(rv, "ADDED", obj)
            return copy.deepcopy(obj)

    def label_namespace(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """Replace a namespace's labels (MODIFIED); `kubernetes.io/metadata.name` stays."""
        with self._lock:
            obj = self._state.namespaces[name]
            rv = self._bump()
            obj["metadata"]["labels"] = {**labels, NAME_LABEL: name}
            obj["metadata"]["resourceVersion"] = str(rv)
            self._emit(rv, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete_namespace(self, name: str, *, graceful: bool = True) -> None:
        """Delete a namespace: Terminating (MODIFIED) first when graceful, then DELETED."""
        with self._lock:
            obj = self._state.namespaces[name]
            if graceful:
                rv = self._bump()
                obj["metadata"]["deletionTimestamp"] = _now()
                obj["metadata"]["resourceVersion"] = str(rv)
                obj["status"] = {"phase": "Terminating"}
                self._emit(rv, "MODIFIED", obj)
                obj["spec"] = {}  # the namespace controller removes the finalizer
            rv = self._bump()
            obj["metadata"]["resourceVersion"] = str(rv)
            del self._state.namespaces[name]
            self._emit(rv, "DELETED", obj)

    def namespaces(self) -> dict[str, dict[str, str]]:
        """{name: labels} as served."""
        with self._lock:
            return {n: dict(o["metadata"]["labels"]) for n, o in self._state.namespaces.items()}

    # -- nodes

    def add_node(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Create or replace a node (not watched here, but it bumps the resourceVersion)."""
        with self._lock:
            rv = self._bump()
            node = {
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "uid": _uid("Node", name),
                    "resourceVersion": str(rv),
                    "creationTimestamp": _now(),
                    "labels": dict(labels or {}),
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                },
                "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
                "status": {
                    "addresses": [
                        {"type": "InternalIP", "address": "192.0.2.10"},
                        {"type": "Hostname", "address": name},
                    ],
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": _now(),
                            "lastTransitionTime": _now(),
                        }
                    ],
                    "nodeInfo": {
                        "kubeletVersion": "v1.33.1",
                        "containerRuntimeVersion": "containerd://2.0.5",
                        "operatingSystem": "linux",
                        "architecture": "amd64",
                    },
                },
            }
            self._state.nodes[name] = node
            return copy.deepcopy(node)

    def remove_node(self, name: str) -> bool:
        with self._lock:
            self._bump()
            return self._state.nodes.pop(name, None) is not None

    # -- faults and controls

    def forbid(self, path: str) -> None:
        """Answer 403 (RBAC denial) for requests to `path` (e.g. "/api/v1/nodes/simnode-1")."""
        with self._lock:
            self._forbidden.add(path)

    def allow(self, path: str) -> None:
        with self._lock:
            self._forbidden.discard(path)

    @property
    def resource_version(self) -> int:
        with self._lock:
            return self._state.rv

    def compact(self) -> int:
        """Other resources are written and history compacted: the global resourceVersion
        moves on and every earlier one is too old, so a watch that resumes from any
        resourceVersion seen so far gets 410 Gone. Open watches go on. Returns the new rv."""
        with self._lock:
            rv = self._bump()
            self._state.history.clear()
            self._state.oldest_rv = rv
            return rv

    def send_bookmark(self) -> None:
        """A BOOKMARK at the current resourceVersion to watches that allowed bookmarks."""
        with self._lock:
            line = self._bookmark_line()
            for w in self._watchers:
                if w.bookmarks:
                    self._put(w, line)

    def drop_watches(self) -> int:
        """Abort every open watch connection (as a load balancer or a restart would)."""
        return self._close_watches(abort=True)

    def end_watches(self) -> int:
        """End every open watch cleanly, as its timeoutSeconds would."""
        return self._close_watches(abort=False)

    @property
    def is_down(self) -> bool:
        with self._lock:
            return self._down

    def down(self) -> None:
        """Stop listening and close every connection (open watches are aborted)."""
        with self._lock:
            if self._down:
                return
            self._down = True
        if self._loop is not None:
            self._close_watches(abort=True)
            self._call(self._close_listener())

    def up(self) -> None:
        """Listen again, on the same port."""
        with self._lock:
            if not self._down:
                return
            self._down = False
        if self._loop is not None:
            self._call(self._listen())

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._watchers)

    def wait_for_watches(self, count: int = 1, timeout: float = 60.0) -> bool:
        """Wait until `count` watches have been established in total (watch_count)."""
        deadline = time.monotonic() + timeout
        with self._watch_established:
            while self.watch_count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._watch_established.wait(left)
            return True

    # -- state internals (caller holds the lock)

    def _bump(self) -> int:
        self._state.rv += 1
        return self._state.rv

    def _emit(self, rv: int, kind: str, obj: dict[str, Any]) -> None:
        line = orjson.dumps({"type": kind, "object": obj}) + b"\n"
        history = self._state.history
        history.append((rv, line))
        while len(history) > self._history_limit:
            history.popleft()
            self._state.oldest_rv = history[0][0] - 1 if history else rv
        for w in self._watchers:
            self._put(w, line)

    def _put(self, w: _Watcher, item: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(w.queue.put_nowait, item)

    def _bookmark_line(self) -> bytes:
        obj = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._state.rv), "creationTimestamp": None},
        }
        return orjson.dumps({"type": "BOOKMARK", "object": obj}) + b"\n"

    def _close_watches(self, *, abort: bool) -> int:
        with self._lock:
            watchers = list(self._watchers)
            for w in watchers:
                self._put(w, _ABORT if abort else _END)
        return len(watchers)

    # -- server internals (server thread)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.request_count += 1
            expected = self._token
            forbidden = request.path in self._forbidden
            authenticated = bearer_matches(request.headers.get("Authorization"), expected)
            if not authenticated:
                self.unauthorized_count += 1
        if not authenticated:
            return _status(401, "Unauthorized", "Unauthorized")
        if request.method != "GET":
            return _status(405, "MethodNotAllowed", "the server does not allow this method")
        is_watch = request.query.get("watch", "") in ("1", "true")
        parts = request.path.strip("/").split("/")
        if parts[:3] != ["api", "v1", "namespaces"] and parts[:3] != ["api", "v1", "nodes"]:
            return _status(404, "NotFound", "the server could not find the requested resource")
        resource = parts[2]
        name = parts[3] if len(parts) == 4 else None
        if len(parts) > 4:
            return _status(404, "NotFound", "the server could not find the requested resource")
        if forbidden:
            verb = "watch" if is_watch else ("get" if name else "list")
            return _forbidden(verb, resource, name)
        if resource == "namespaces" and name is None:
            if is_watch:
                return await self._watch(request)
            return self._list()
        if resource == "nodes" and name is not None and not is_watch:
            return self._get_node(name)
        return _status(404, "NotFound", "the server could not find the requested resource")

    def _list(self) -> web.Response:
        with self._lock:
            self.list_count += 1
            items = []
            for obj in self._state.namespaces.values():
                item = copy.deepcopy(obj)
                del item["kind"], item["apiVersion"]
                items.append(item)
            doc = {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._state.rv)},
                "items": items,
            }
        return _json(200, orjson.dumps(doc))

    def _get_node(self, name: str) -> web.Response:
        with self._lock:
            node = self._state.nodes.get(name)
            body = orjson.dumps(node) if node is not None else None
        if body is None:
            details = {"name": name, "kind": "nodes"}
            return _status(404, "NotFound", f'nodes "{name}" not found', details)
        return _json(200, body)

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        rv_param = query.get("resourceVersion", "")
        try:
            timeout = int(query.get("timeoutSeconds", DEFAULT_WATCH_TIMEOUT_S))
            start_rv = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            return _status(400, "BadRequest", "invalid resourceVersion or timeoutSeconds")
        bookmarks = query.get("allowWatchBookmarks", "") in ("1", "true")
        watcher = _Watcher(asyncio.Queue(), bookmarks, request)
        first: list[bytes] = []
        with self._lock:
            self.watch_resource_versions.append(rv_param)
            state = self._state
            if start_rv is None:
                first = [
                    orjson.dumps({"type": "ADDED", "object": obj}) + b"\n"
                    for obj in state.namespaces.values()
                ]
            elif start_rv < state.oldest_rv:
                message = f"too old resource version: {start_rv} ({state.oldest_rv})"
                expired = {"type": "ERROR", "object": orjson.loads(status(410, "Expired", message))}
                first = [orjson.dumps(expired) + b"\n"]
                watcher.queue.put_nowait(_END)
            else:
                first = [line for rv, line in state.history if rv > start_rv]
            self._watchers.add(watcher)
            self.watch_count += 1
            self._watch_established.notify_all()
        try:
            return await self._stream(request, watcher, first, timeout)
        finally:
            with self._lock:
                self._watchers.discard(watcher)

    async def _stream(
        self, request: web.Request, watcher: _Watcher, first: list[bytes], timeout: int
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"},
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        # the client may go away at any time (it closes at once after an ERROR event)
        with contextlib.suppress(ConnectionResetError):
            await self._send_events(request, resp, watcher, first, timeout)
        return resp

    async def _send_events(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        watcher: _Watcher,
        first: list[bytes],
        timeout: int,
    ) -> None:
        for line in first:
            await resp.write(line)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = self._bookmark_interval_s if watcher.bookmarks else None
        next_bookmark = loop.time() + interval if interval else None
        while True:
            now = loop.time()
            until = deadline if next_bookmark is None else min(deadline, next_bookmark)
            if now >= deadline:
                break
            try:
                item = await asyncio.wait_for(watcher.queue.get(), until - now)
            except TimeoutError:
                if next_bookmark is not None and loop.time() >= next_bookmark:
                    with self._lock:
                        line = self._bookmark_line()
                    await resp.write(line)
                    next_bookmark = loop.time() + (interval or 0)
                continue
            if item is _END:
                break
            if item is _ABORT:
                if request.transport is not None:
                    request.transport.abort()
                return
            assert isinstance(item, bytes)
            await resp.write(item)
        await resp.write_eof()


def _json(code: int, body: bytes) -> web.Response:
    return web.Response(
        status=code,
        body=body,
        headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"},
    )


def _status(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> web.Response:
    return _json(code, status(code, reason, message, details))


def _forbidden(verb: str, resource: str, name: str | None) -> web.Response:
    subject = f'{resource} "{name}"' if name else resource
    message = (
        f'{subject} is forbidden: User "{SERVICE_ACCOUNT_USER}" cannot {verb} resource '
        f'"{resource}" in API group "" at the cluster scope'
    )
    details: dict[str, Any] = {"kind": resource}
    if name:
        details = {"name": name, "kind": resource}
    return _status(403, "Forbidden", message, details)
