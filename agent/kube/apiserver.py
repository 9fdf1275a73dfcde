"""What the kubelet's `/pods` cannot tell: namespace and node labels, from the API server.

Uses the synchronous `kubernetes` client, on a daemon thread, so nothing here blocks the
agent's event loop:

* `NamespaceLabels` keeps `{namespace: labels}` current with list + watch of namespaces
  (`GET /api/v1/namespaces`, then `?watch=1&resourceVersion=<from the list>`). A watch that
  ends (its `timeoutSeconds`, or a dropped connection) resumes from the last resourceVersion
  seen (events and bookmarks advance it), as client-go's reflector does; only a 410 Gone
  ("too old resource version": the history was compacted) makes it list again. Errors are
  counted, logged once per distinct message, and retried with exponential backoff; the
  labels already known are kept meanwhile. `get()` never raises.
* `node_labels()` reads the node's labels once (`GET /api/v1/nodes/{name}`).
* `make_core_api()` builds the client: in-cluster defaults (KUBERNETES_SERVICE_HOST/PORT,
  the service-account token and CA) or an explicit URL/token/CA. TLS is verified unless
  told otherwise; the token file is re-read when it rotates; the token is never logged.

RBAC the agent's service account needs (ClusterRole, apiGroups [""]):
`namespaces: [list, watch]` for NamespaceLabels, `nodes: [get]` for node_labels.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import urllib3
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from agent.kube.token import TokenFile, url_host

log = logging.getLogger("podtap.kube")

SA_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TOKEN_PATH: Final = f"{SA_DIR}/token"
DEFAULT_CA_PATH: Final = f"{SA_DIR}/ca.crt"

_REDACTED: Final = "<redacted>"
_MESSAGE_CHARS: Final = 300
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>:?\s*")  # "<HTTPSConnection ... at 0x..>"
_NAMESPACES_RBAC: Final = (
    'RBAC ClusterRole rule: apiGroups [""], resources ["namespaces"], verbs ["list", "watch"]'
)
_NODES_RBAC: Final = (
    'RBAC ClusterRole rule `get nodes`: apiGroups [""], resources ["nodes"], verbs ["get"]'
)


class ApiServerConfigError(Exception):
    """The API server client cannot be built (not in a cluster, files missing, bad URL)."""


# --------------------------------------------------------------------------- the client


def in_cluster_url(environ: Mapping[str, str] | None = None) -> str:
    """`https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` (IPv6 bracketed)."""
    env = os.environ if environ is None else environ
    host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = env.get("KUBERNETES_SERVICE_PORT", "").strip()
    if not host or not port:
        raise ApiServerConfigError(
            "KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set: not running in a "
            "pod, or the API server URL must be given explicitly"
        )
    return f"https://{url_host(host)}:{port}"


def make_core_api(
    url: str | None = None,
    token_path: str | None = DEFAULT_TOKEN_PATH,
    ca_path: str | None = DEFAULT_CA_PATH,
    *,
    insecure_skip_verify: bool = False,
    environ: Mapping[str, str] | None = None,
) -> client.CoreV1Api:
    """A CoreV1Api for the API server at `url` (None: in-cluster, from the environment).

    `token_path` None sends no token; `ca_path` None trusts the system store. Proxy
    environment variables are ignored (as for the kubelet): the agent talks to the
    cluster's service address directly. Requests are not retried by urllib3; the callers
    here retry with their own backoff. Close with `api.api_client.close()`.
    """
    url = (url or in_cluster_url(environ)).rstrip("/")
    if not url.startswith("https://"):
        raise ApiServerConfigError(f"API server url must be https://host[:port], got {url!r}")
    if ca_path is not None and not insecure_skip_verify and not os.path.isfile(ca_path):
        raise ApiServerConfigError(f"API server CA bundle {ca_path} does not exist")
    cfg = client.Configuration()
    cfg.host = url
    cfg.proxy = None  # the setter also stops the client from taking it from the environment
    cfg.verify_ssl = not insecure_skip_verify
    cfg.ssl_ca_cert = None if insecure_skip_verify else ca_path
    cfg.retries = 0
    if insecure_skip_verify:
        log.warning(
            "TLS verification of the API server at %s is disabled (insecure_skip_verify): "
            "the agent's token is sent to whatever answers at that address",
            url,
        )
    token = TokenFile(token_path, ApiServerConfigError) if token_path else None
    if token is not None:
        # Read now, to fail with a clear message if the file is unusable; the hook re-reads
        # it (when it changed) before each request.
        cfg.api_key["BearerToken"] = token.current()
        cfg.api_key_prefix["BearerToken"] = "Bearer"

        def refresh(c: client.Configuration) -> None:
            c.api_key["BearerToken"] = token.current()

        cfg.refresh_api_key_hook = refresh  # type: ignore[assignment]  # typed as None
    return client.CoreV1Api(client.ApiClient(cfg))


def _scrubber(api: client.CoreV1Api) -> Callable[[str], str]:
    """Removes the token `api` sends from a text (error bodies could echo it)."""
    cfg = api.api_client.configuration

    def scrub(text: str) -> str:
        token = cfg.api_key.get("BearerToken")
        if isinstance(token, str) and token:
            text = text.replace(token, _REDACTED)
        return text

    return scrub


# --------------------------------------------------------------------------- error texts


def _status_message(body: str | bytes | None) -> str:
    """`message` of a metav1.Status body, else the body's start."""
    if not body:
        return ""
    try:
        doc = json.loads(body)
    except (ValueError, TypeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return str(doc["message"])
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return " ".join(text.split())


def describe_error(exc: BaseException, scrub: Callable[[str], str] = lambda s: s) -> str:
    """One stable line for an error: no object addresses, no query strings, no token."""
    if isinstance(exc, ApiException):
        text = _status_message(exc.body) or str(exc.reason or "")
        what = f"HTTP {exc.status}" if exc.status else "API error"
        message = f"{what}: {text}" if text else what
    elif isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return describe_error(exc.reason, scrub)
    elif isinstance(exc, urllib3.exceptions.SSLError):
        message = f"TLS error: {exc}"
    elif isinstance(exc, urllib3.exceptions.NewConnectionError):
        message = f"cannot connect: {exc}"
    elif isinstance(exc, urllib3.exceptions.TimeoutError):
        message = f"timed out: {exc}"
    elif isinstance(exc, urllib3.exceptions.ProtocolError):
        message = f"connection broken: {exc}"
    else:
        message = f"{type(exc).__name__}: {exc}"
    message = _OBJECT_REPR.sub("", scrub(" ".join(message.split())))
    return message if len(message) <= _MESSAGE_CHARS else message[:_MESSAGE_CHARS] + "..."


def _rbac_hint(exc: BaseException, rule: str) -> str:
    if isinstance(exc, ApiException) and exc.status == 403:
        return f" (the agent's service account needs an {rule}, bound with a ClusterRoleBinding)"
    if isinstance(exc, ApiException) and exc.status == 401:
        return " (the API server rejected the service-account token)"
    return ""


# --------------------------------------------------------------------------- node labels


def node_labels(api: client.CoreV1Api, node_name: str, timeout_s: float = 10.0) -> dict[str, str]:
    """The labels of node `node_name`, or {} (with a warning) when they cannot be read."""
    if not node_name:
        log.warning("node labels: no node name (set NODE_NAME from spec.nodeName)")
        return {}
    try:
        resp: Any = api.read_node(node_name, _preload_content=False, _request_timeout=timeout_s)
        try:
            doc = json.loads(resp.data)
        finally:
            resp.release_conn()
    except ApiException as exc:
        if exc.status == 403:
            log.warning(
                "node labels: reading node %s is forbidden (403): the agent's service account "
                "needs an %s, bound with a ClusterRoleBinding; records go without node labels",
                node_name,
                _NODES_RBAC,
            )
        elif exc.status == 404:
            log.warning("node labels: node %s not found (404); is NODE_NAME right?", node_name)
        else:
            log.warning(
                "node labels: cannot read node %s: %s%s",
                node_name,
                describe_error(exc, _scrubber(api)),
                _rbac_hint(exc, _NODES_RBAC),
            )
        return {}
    except Exception as exc:  # never fatal: the agent runs without node labels
        log.warning(
            "node labels: cannot read node %s: %s", node_name, describe_error(exc, _scrubber(api))
        )
        return {}
    labels = _labels_of(doc)
    if labels is None:
        log.warning("node labels: the API server's answer for node %s is not a Node", node_name)
        return {}
    return labels


def _labels_of(obj: Any) -> dict[str, str] | None:
    """metadata.labels of an object as str -> str (None if the object has no metadata)."""
    if not isinstance(obj, dict):
        return None
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return None
    labels = metadata.get("labels") or {}
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items() if isinstance(v, str)}


def _name_and_rv(obj: Any) -> tuple[str | None, str | None]:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(metadata, dict):
        return None, None
    name, rv = metadata.get("name"), metadata.get("resourceVersion")
    return (
        name if isinstance(name, str) and name else None,
        rv if isinstance(rv, str) and rv else None,
    )


# --------------------------------------------------------------------------- namespaces


@dataclass(slots=True)
class NamespaceStats:
    lists: int = 0  # successful lists (the first, and one after each 410 Gone)
    watches: int = 0  # watch requests made
    watch_events: int = 0  # ADDED/MODIFIED/DELETED/BOOKMARK events received
    bookmarks: int = 0
    expired: int = 0  # 410 Gone: resourceVersion too old, listed again
    watch_drops: int = 0  # established watches whose connection broke (resumed)
    malformed: int = 0  # events that could not be used
    errors: int = 0  # failed requests (retried with backoff)
    changes: int = 0  # namespaces whose labels changed (on_change calls)
    hook_errors: int = 0  # on_change calls that raised
    namespaces: int = 0
    synced: bool = False  # a list has succeeded
    last_error: str = ""


class _Expired(Exception):
    pass


class NamespaceLabels:
    """`{namespace: labels}` kept current by list + watch on a daemon thread.

    `get()` is thread-safe and never raises ({} for a namespace not known). `on_change(name)`
    is called *on the watcher thread* whenever what `get(name)` returns changes (a namespace
    added with labels, relabelled, deleted, or different after a re-list); hand it to the
    event loop with `loop.call_soon_threadsafe`. Exceptions from it are logged, not raised.
    """

    def __init__(
        self,
        api: client.CoreV1Api,
        *,
        on_change: Callable[[str], None] | None = None,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        if watch_timeout_s < 1:
            raise ValueError("watch_timeout_s must be >= 1")
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        self.api = api
        self.on_change: Callable[[str], None] = on_change or (lambda _name: None)
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._labels: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._stats = NamespaceStats()
        self._rv: str | None = None
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None  # the kubernetes.watch.Watch in progress
        self._established = False
        self._logged_error = ""
        self._logged_hook_error = ""
        self._scrub = _scrubber(api)
        self._random = random.Random()

    # -- what the agent asks (any thread) -------------------------------------------------

    def get(self, namespace: str) -> dict[str, str]:
        """The labels of `namespace` (a copy), {} if unknown."""
        with self._lock:
            labels = self._labels.get(namespace)
            return dict(labels) if labels else {}

    def snapshot(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {name: dict(labels) for name, labels in self._labels.items()}

    @property
    def stats(self) -> NamespaceStats:
        """A copy of the counters."""
        with self._lock:
            return replace(self._stats)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait for the first successful list; False on timeout (the agent goes on anyway)."""
        return self._synced.wait(timeout)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("NamespaceLabels already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="podtap-namespaces", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the watcher thread; True if it ended within `timeout` (it is a daemon anyway)."""
        self._stopping.set()
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            current = self._watch
            if current is not None:
                current.stop()  # shuts the socket down: the blocked read returns at once
            thread.join(0.05)
        if thread.is_alive():
            return False  # stuck in a request (request_timeout_s bounds it); start() refuses
        self._thread = None
        return True

    # -- the loop (watcher thread) -----------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        expired_in_a_row = 0
        idle_in_a_row = 0
        while not self._stopping.is_set():
            try:
                if self._rv is None:
                    self._list()
                    self._recovered()
                started = time.monotonic()
                delivered = self._watch_once()
                failures = 0
                if delivered:
                    expired_in_a_row = idle_in_a_row = 0
                elif time.monotonic() - started < 1.0:
                    # A watch that ends at once with nothing (a proxy closing it, a tiny
                    # timeout) must not become a busy loop of requests.
                    idle_in_a_row += 1
                    self._sleep(self._backoff(idle_in_a_row))
            except _Expired:
                self._count("expired")
                self._rv = None
                expired_in_a_row += 1
                log.info("namespaces: watch expired (410 Gone: history compacted); listing again")
                if expired_in_a_row > 1:
                    self._sleep(self._backoff(expired_in_a_row - 1))
            except Exception as exc:  # the watcher thread must never die
                if self._stopping.is_set():
                    break
                failures += 1
                self._failed(exc)
                self._sleep(self._backoff(failures))
        log.debug("namespaces: watcher stopped")

    def _list(self) -> None:
        resp: Any = self.api.list_namespace(
            _preload_content=False, _request_timeout=self.request_timeout_s
        )
        try:
            doc = json.loads(resp.data)
        finally:
            resp.release_conn()
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or not isinstance(items or [], list):
            raise ValueError("the answer to the namespaces list is not a NamespaceList")
        metadata = doc.get("metadata")
        rv = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(rv, str) or not rv:
            raise ValueError("the NamespaceList has no metadata.resourceVersion")
        fresh: dict[str, dict[str, str]] = {}
        for item in items or []:
            name, _ = _name_and_rv(item)
            labels = _labels_of(item)
            if name is None or labels is None:
                self._count("malformed")
                continue
            fresh[name] = labels
        with self._lock:
            old, self._labels = self._labels, fresh
            self._stats.lists += 1
            self._stats.namespaces = len(fresh)
            self._stats.synced = True
        self._rv = rv
        changed = sorted(n for n in old.keys() | fresh.keys() if old.get(n) != fresh.get(n))
        self._notify(changed)
        if not self._synced.is_set():
            log.info("namespaces: %d listed (resourceVersion %s), watching", len(fresh), rv)
        self._synced.set()

    def _open_watch(self, **kwargs: Any) -> Any:
        """list_namespace(watch=True) for Watch.stream; marks the watch as established."""
        self._count("watches")
        resp = self.api.list_namespace(**kwargs)
        self._established = True
        return resp

    def _watch_once(self) -> bool:
        """One watch from self._rv until it ends; True if it delivered any event.

        Raises _Expired on 410 Gone; other errors propagate, except a connection that
        breaks once the watch is established (counted as a drop, resumed from self._rv).
        """
        # return_type "object": events carry the raw dicts, no model is built.
        w: Any = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]
        self._watch = w
        self._established = False
        delivered = False
        if self._stopping.is_set():  # stop() may have missed this watch
            return False
        try:
            events: Iterator[dict[str, Any]] = w.stream(
                self._open_watch,
                resource_version=self._rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout_s,
                _request_timeout=(self.request_timeout_s, self.watch_timeout_s + 15),
            )
            for event in events:
                if self._stopping.is_set():
                    break
                delivered = True
                self._event(event)
                self._recovered()
        except ApiException as exc:
            if exc.status == 410:
                raise _Expired() from None
            raise
        except Exception as exc:
            if self._stopping.is_set() or not self._established:
                raise
            self._count("watch_drops")
            log.debug("namespaces: watch connection broke (%s); resuming", describe_error(exc))
        finally:
            self._watch = None
        return delivered

    def _event(self, event: Any) -> None:
        if not isinstance(event, dict):
            self._count("malformed")
            return
        kind, obj = event.get("type"), event.get("raw_object", event.get("object"))
        name, rv = _name_and_rv(obj)
        if kind == "BOOKMARK":
            with self._lock:
                self._stats.watch_events += 1
                self._stats.bookmarks += 1
            if rv is not None:
                self._rv = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED") or name is None or rv is None:
            self._count("malformed")
            return
        labels = None if kind == "DELETED" else _labels_of(obj)
        with self._lock:
            self._stats.watch_events += 1
            before = self._labels.get(name)
            if labels is None:
                self._labels.pop(name, None)
            else:
                self._labels[name] = labels
            self._stats.namespaces = len(self._labels)
        self._rv = rv
        if (before or {}) != (labels or {}):
            self._notify([name])

    def _notify(self, names: list[str]) -> None:
        if not names:
            return
        with self._lock:
            self._stats.changes += len(names)
        for name in names:
            try:
                self.on_change(name)
            except Exception as exc:  # a faulty hook must not stop the watch
                self._count("hook_errors")
                message = f"{type(exc).__name__}: {exc}"
                if message != self._logged_hook_error:  # not once per namespace and event
                    log.exception("namespaces: on_change(%r) failed", name)
                    self._logged_hook_error = message

    # -- errors and backoff --------------------------------------------------------------

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + 1)

    def _failed(self, exc: BaseException) -> None:
        message = describe_error(exc, self._scrub) + _rbac_hint(exc, _NAMESPACES_RBAC)
        with self._lock:
            self._stats.errors += 1
            self._stats.last_error = message
        if message != self._logged_error:  # once per distinct message, until it recovers
            level = (
                logging.ERROR
                if isinstance(exc, ApiException) and exc.status in (401, 403)
                else logging.WARNING
            )
            log.log(level, "namespaces: %s (labels known so far are kept; retrying)", message)
            self._logged_error = message

    def _recovered(self) -> None:
        if self._logged_error:
            log.info("namespaces: API server reachable again")
            self._logged_error = ""

    def _backoff(self, failures: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(failures - 1, 30))
        return self._random.uniform(delay / 2, delay)

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)
