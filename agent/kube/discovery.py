"""Kubelet pods -> containers -> cgroup ids -> the kernel's containers map.

`Discovery` polls the kubelet (periodically, and at once — rate-limited — when
a new cgroup appears or an unknown container writes), resolves each container
to its cgroup v2 directory and id, decides what to capture, reads the
identities of its stdout/stderr from its first process, and keeps the kernel
map in sync through a `MapWriter`.  The metadata of a container that is gone
is kept for a grace period, so its late and final partial lines are still
enriched.  A cgroup's path is remembered from its creation (EV_CGROUP), so a
container that ran and exited between two polls is still identified.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.config import KubeConfig
from agent.kube.cgroups import (
    container_id_from_path,
    first_pid,
    resolve,
    scan_containers,
    stream_idents,
)
from agent.kube.filters import FilterConfig, decide
from agent.kube.kubelet import KubeletAuthError, KubeletClient, KubeletError
from agent.kube.model import ContainerMeta, FileIdent
from agent.kube.pods import running_containers

log = logging.getLogger("podtap.kube")


class MapWriter(Protocol):
    def watch(
        self,
        cgroup_id: int,
        stdout: FileIdent | None = None,
        stderr: FileIdent | None = None,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
    ) -> None: ...

    def unwatch(self, cgroup_id: int) -> None: ...


@dataclass(slots=True)
class Known:
    """A container resolved to its cgroup."""

    meta: ContainerMeta
    path: str
    capture_stdout: bool
    capture_stderr: bool
    stdout: FileIdent | None = None
    stderr: FileIdent | None = None
    in_map: bool = False
    gone_since: float | None = None  # monotonic time it left the kubelet's list or its cgroup

    @property
    def excluded(self) -> bool:
        return not (self.capture_stdout or self.capture_stderr)

    def map_entry(self) -> tuple[FileIdent | None, FileIdent | None, bool, bool]:
        return self.stdout, self.stderr, self.capture_stdout, self.capture_stderr


@dataclass(slots=True)
class DiscoveryStats:
    polls: int = 0
    poll_errors: int = 0
    malformed: int = 0
    watched: int = 0
    excluded: int = 0
    last_error: str = ""
    # cgroup created -> container in the kernel map, for cgroups seen being created
    watch_delay_count: int = 0
    watch_delay_sum_ms: float = 0.0
    watch_delay_max_ms: float = 0.0

    def watch_delay(self, ms: float) -> None:
        self.watch_delay_count += 1
        self.watch_delay_sum_ms += ms
        self.watch_delay_max_ms = max(self.watch_delay_max_ms, ms)


class Discovery:
    """Owns the containers map; the pipeline reads metadata through `lookup()`."""

    def __init__(
        self,
        cfg: KubeConfig,
        filters: FilterConfig,
        client: KubeletClient,
        writer: MapWriter,
        mount: str,
        host: str,
        pods_prefix: str,
    ) -> None:
        self.cfg = cfg
        self.filters = filters
        self.client = client
        self.writer = writer
        self.mount = mount
        self.host = host
        self.pods_prefix = pods_prefix.rstrip("/")  # "/kubepods.slice" as the mkdir path says
        self.known: dict[int, Known] = {}
        self.created: dict[int, tuple[str, int]] = {}  # cgroup id -> (container id, boot ns)
        self.stats = DiscoveryStats()
        self._no_idents: set[int] = set()  # watched by fd number until identities are read
        self._wake = asyncio.Event()
        self._last_poll = 0.0
        self._poll_lock = asyncio.Lock()
        self.on_forget: Callable[[int], None] = lambda _cgroup_id: None
        self.on_changed: Callable[[int], None] = lambda _cgroup_id: None
        self.namespace_labels: Callable[[str], dict[str, str]] = lambda _namespace: {}
        self.node_labels: dict[str, str] = {}
        self.wants_repoll: Callable[[], bool] = lambda: False

    # -- what the pipeline asks ---------------------------------------------

    def lookup(self, cgroup_id: int) -> Known | None:
        return self.known.get(cgroup_id)

    def on_cgroup_created(self, cgroup_id: int, path: str, ts_ns: int) -> None:
        """A cgroup appeared under the pods' subtree: remember which container it is."""
        if not path.startswith(self.pods_prefix + "/"):
            return
        container_id = container_id_from_path(path)
        if container_id is not None:
            self.created[cgroup_id] = (container_id, ts_ns)
            self.request_poll()

    def request_poll(self) -> None:
        self._wake.set()

    # -- polling -------------------------------------------------------------

    async def run(self) -> None:
        """Poll every poll_interval_s, and soon after request_poll() (rate-limited)."""
        min_gap = self.cfg.repoll_min_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.poll_interval_s)
            gap = time.monotonic() - self._last_poll
            if gap < min_gap:
                await asyncio.sleep(min_gap - gap)
            self._wake.clear()
            await self.poll()
            if self.wants_repoll():
                self._wake.set()

    async def poll(self) -> bool:
        """One kubelet round trip and map sync; False (logged, counted) on failure."""
        async with self._poll_lock:
            self._last_poll = time.monotonic()
            self.stats.polls += 1
            try:
                pods = await self.client.get_pods()
            except KubeletAuthError as e:
                self._poll_failed(str(e), logging.ERROR)
                return False
            except KubeletError as e:
                self._poll_failed(str(e), logging.WARNING)
                return False
            if self.stats.last_error:
                log.info("the kubelet answers again")
                self.stats.last_error = ""
            metas, malformed = running_containers(pods, self.host)
            self.stats.malformed += malformed
            self.sync(metas)
            return True

    def _poll_failed(self, message: str, level: int) -> None:
        self.stats.poll_errors += 1
        if message != self.stats.last_error:  # the same error is not logged at every poll
            log.log(level, "kubelet: %s (known containers stay captured)", message)
        self.stats.last_error = message

    # -- map sync ------------------------------------------------------------

    def sync(self, metas: list[ContainerMeta]) -> None:
        """Make the map and the metadata match the kubelet's containers."""
        now = time.monotonic()
        index = scan_containers(self.mount, self.cfg.cgroup_roots)
        by_created_id = {cid: cg for cg, (cid, _ts) in self.created.items()}
        seen: set[int] = set()
        for meta in metas:
            labels = self.namespace_labels(meta.namespace)
            if labels or self.node_labels:
                meta = dataclasses.replace(
                    meta, namespace_labels=labels, node_labels=self.node_labels
                )
            found = resolve(meta, self.mount, self.cfg.cgroup_roots, index)
            if found is None:
                cg = by_created_id.get(meta.container_id)
                if cg is None:
                    continue  # not created yet: the next poll (or its EV_CGROUP) finds it
                found = ("", cg)
            path, cg = found
            seen.add(cg)
            self._update(cg, path, meta)
        for cg, known in list(self.known.items()):
            if cg not in seen:
                if known.gone_since is None:
                    known.gone_since = now
                if known.in_map and not os.path.isdir(known.path):
                    self.writer.unwatch(cg)  # the cgroup is gone: its id never comes back
                    known.in_map = False
            if known.gone_since is not None and now - known.gone_since >= self.cfg.deleted_grace_s:
                self._forget(cg)
        self._prune_created()
        self.stats.watched = sum(1 for k in self.known.values() if k.in_map and not k.excluded)
        self.stats.excluded = sum(1 for k in self.known.values() if k.excluded)

    def _prune_created(self) -> None:
        """Forget creation records the kubelet never explained (pod sandboxes, failed
        creations) once no held line can still need them."""
        horizon_ns = int(max(self.cfg.deleted_grace_s, self.cfg.hold_timeout_s) * 1e9)
        now_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        for cg, (_cid, ts) in list(self.created.items()):
            if cg not in self.known and now_ns - ts > horizon_ns:
                del self.created[cg]

    def _update(self, cg: int, path: str, meta: ContainerMeta) -> None:
        capture_stdout, capture_stderr = decide(meta, self.filters)
        known = self.known.get(cg)
        before = None
        if known is None:
            known = Known(meta, path, capture_stdout, capture_stderr)
            self.known[cg] = known
        else:
            before = known.map_entry() if known.in_map else None
            changed = (known.meta, known.capture_stdout, known.capture_stderr) != (
                meta, capture_stdout, capture_stderr
            )
            known.meta, known.gone_since = meta, None
            known.capture_stdout, known.capture_stderr = capture_stdout, capture_stderr
            known.path = known.path or path
            if changed:
                self.on_changed(cg)  # labels, annotations or filters changed: re-encode
        if not known.excluded and (known.stdout is None or known.stderr is None):
            known.stdout, known.stderr = self._idents(known.path)
        if not known.path or not os.path.isdir(known.path):
            if known.in_map:
                self.writer.unwatch(cg)  # the cgroup is gone: its id never comes back
                known.in_map = False
            return
        if known.stdout is None and not known.excluded:
            self._no_idents.add(cg)
        else:
            self._no_idents.discard(cg)
        if before != known.map_entry():
            self.writer.watch(cg, *known.map_entry())
            if not known.in_map:
                self._log_watched(cg, known)
            known.in_map = True

    def relabel_namespace(self, namespace: str) -> list[int]:
        """Apply a namespace's new labels to its known containers; their cgroup ids."""
        labels = self.namespace_labels(namespace)
        changed = []
        for cg, known in self.known.items():
            if known.meta.namespace == namespace and known.meta.namespace_labels != labels:
                known.meta = dataclasses.replace(known.meta, namespace_labels=labels)
                changed.append(cg)
        return changed

    def refresh_idents(self) -> None:
        """Read the stream identities of watched containers that had no process yet
        (cheap: no kubelet call), so the fd-number fallback lasts as short as possible."""
        for cg in list(self._no_idents):
            known = self.known.get(cg)
            if known is None or not known.in_map:
                self._no_idents.discard(cg)
                continue
            out, err = self._idents(known.path)
            if out is not None:
                known.stdout, known.stderr = out, err
                self.writer.watch(cg, *known.map_entry())
                self._no_idents.discard(cg)

    def _log_watched(self, cg: int, known: Known) -> None:
        m = known.meta
        delay = ""
        if cg in self.created:
            delay_ms = (time.clock_gettime_ns(time.CLOCK_BOOTTIME) - self.created[cg][1]) / 1e6
            self.stats.watch_delay(delay_ms)
            delay = f", {delay_ms:.1f} ms after its cgroup was created"
        what = "excluded" if known.excluded else "watching"
        idents = "by pipe identity" if known.stdout is not None else "by fd number for now"
        log.info(
            "%s %s/%s/%s (cgroup %d, %s%s)",
            what, m.namespace, m.pod_name, m.container_name, cg, idents, delay,
        )

    def _idents(self, path: str) -> tuple[FileIdent | None, FileIdent | None]:
        """stdout/stderr identities from the container's first process (both or neither)."""
        if not path:
            return None, None
        pid = first_pid(path)
        if pid is None:
            return None, None
        out, err = stream_idents(pid, self.cfg.proc_root)
        if out is None or err is None:
            return None, None
        return out, err

    def _forget(self, cg: int) -> None:
        known = self.known.pop(cg)
        self._no_idents.discard(cg)
        if known.in_map:
            self.writer.unwatch(cg)
        self.created.pop(cg, None)
        self.on_forget(cg)
