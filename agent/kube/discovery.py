"""Kubelet pods -> containers -> cgroup ids -> the kernel's containers map.

`Discovery` polls the kubelet (periodically, and soon — rate-limited, backing off
per cgroup — when a new cgroup appears or an unknown container writes), resolves
each container to its cgroup v2 directory and id, decides what to capture, takes
the identities of its stdout/stderr (those the kernel learned at the container's
first exec, else those of its init process), and keeps the kernel map in sync
through a `MapWriter`.  podtap's own container and every pod of a podtap agent
(a label selector) are put in the map as excluded: never copied by the kernel.
The metadata of a container that is gone is kept for a grace period, so its late
and final partial lines are still enriched.  A cgroup's path is remembered from
its creation (EV_CGROUP), so a container that ran and exited between two polls is
still identified.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.config import KubeConfig
from agent.kube.cgroups import (
    container_id_from_path,
    init_pid,
    own_cgroup,
    pod_uid_from_path,
    resolve,
    scan_containers,
    stream_idents,
)
from agent.kube.filters import Filters, Selector, decide, parse_selector
from agent.kube.kubelet import KubeletAuthError, KubeletClient, KubeletError
from agent.kube.model import ContainerMeta, FileIdent
from agent.kube.pods import pod_labels, running_containers

log = logging.getLogger("podtap.kube")

# Pods of podtap agents (this one, and another one during a rolling update): never captured.
Idents = tuple[FileIdent, FileIdent]
MapEntry = tuple[FileIdent | None, FileIdent | None, bool, bool]  # stdout, stderr, captures
OwnCgroupFinder = Callable[[str, Sequence[str]], tuple[str, int] | None]  # (mount, roots)


def _ignore(_cgroup_id: int) -> None:
    return None


def _no_labels(_namespace: str) -> dict[str, str]:
    return {}


def _nothing_learned(_cgroup_id: int) -> Idents | None:
    return None


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

    def map_entry(self) -> MapEntry:
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


@dataclass(slots=True)
class _Repoll:
    due: float | None  # monotonic time of this cgroup's next poll; None: the periodic poll's job
    delay: float  # after the next poll
    last_request: float


class RepollSchedule:
    """Re-polls for cgroups the kubelet does not list (yet), per cgroup id: at once, then
    after `first_s`, doubling, until the delay passes `max_s` (the periodic poll interval,
    which then covers it). A cgroup asked about again while it backs off changes nothing,
    so a writer the kubelet never lists costs a handful of polls, not five a second."""

    def __init__(self, first_s: float, max_s: float, forget_after_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.forget_after_s = forget_after_s
        self._entries: dict[int, _Repoll] = {}

    def request(self, cgroup_id: int, now: float) -> bool:
        """Note a cgroup that needs the kubelet; True if a poll is due for it now."""
        entry = self._entries.get(cgroup_id)
        if entry is not None:
            entry.last_request = now
            return False
        self._entries[cgroup_id] = _Repoll(now, self.first_s, now)
        return True

    def polled(self, at: float, resolved: Container[int]) -> None:
        """A poll started at `at`: forget resolved cgroups, schedule the others' next."""
        for cgroup_id, entry in list(self._entries.items()):
            if cgroup_id in resolved:
                del self._entries[cgroup_id]
            elif entry.due is not None and entry.due <= at:
                entry.due = at + entry.delay if entry.delay <= self.max_s else None
                entry.delay *= 2
            elif entry.due is None and at - entry.last_request > self.forget_after_s:
                del self._entries[cgroup_id]

    def next_due(self) -> float | None:
        return min((e.due for e in self._entries.values() if e.due is not None), default=None)

    def __len__(self) -> int:
        return len(self._entries)


class Discovery:
    """Owns the containers map; the pipeline reads metadata through `lookup()`.

    `learned_idents(cgroup_id)` gives the stream identities the kernel learned at the
    first exec in a cgroup (authoritative: the runtime's exec of the entrypoint); without
    them those of the container's init process are read from /proc. `find_own_cgroup`
    finds the agent's own container cgroup (`cgroups.own_cgroup`; None: don't) at the first
    poll. `clock` (monotonic seconds) times the grace period of gone containers.
    """

    def __init__(
        self,
        cfg: KubeConfig,
        filters: Filters,
        client: KubeletClient,
        writer: MapWriter,
        mount: str,
        host: str,
        pods_prefix: str,
        *,
        learned_idents: Callable[[int], Idents | None] = _nothing_learned,
        find_own_cgroup: OwnCgroupFinder | None = own_cgroup,
        clock: Callable[[], float] = time.monotonic,
        on_forget: Callable[[int], None] = _ignore,
        on_changed: Callable[[int], None] = _ignore,
        namespace_labels: Callable[[str], dict[str, str]] = _no_labels,
    ) -> None:
        """`on_forget(cgroup_id)`: a gone container's metadata is dropped; `on_changed`:
        its metadata changed (what was built from it must be rebuilt); `namespace_labels`:
        the labels of a namespace (from the API server, when that is on)."""
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
        self.on_forget = on_forget
        self.on_changed = on_changed
        self.namespace_labels = namespace_labels
        self.node_labels: dict[str, str] = {}
        self.learned_idents = learned_idents
        self._clock = clock  # for the grace period of gone containers
        self.repolls = RepollSchedule(
            cfg.repoll_min_interval_ms / 1000,
            cfg.poll_interval_s,
            2 * cfg.hold_timeout_s + cfg.deleted_grace_s,
        )
        self.agent_pods: Selector = parse_selector(cfg.agent_pod_selector)
        self._find_own = find_own_cgroup
        self.own: tuple[str, int] | None = None  # our own container's cgroup (dir, id)
        self._own_in_map = False
        self.agent_pod_uids: set[str] = set()  # ours and other agents', from the last poll
        self._early_excluded: dict[int, str] = {}  # agents' cgroups excluded at creation

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
            if pod_uid_from_path(path) in self.agent_pod_uids:
                self._exclude_early(cgroup_id, path)
            self.request_poll(cgroup_id)

    def _exclude_early(self, cgroup_id: int, path: str) -> None:
        """A new container of an agent's pod (a rolling update's new podtap, a sidecar of
        ours): excluded in the kernel map before its first write, not after a poll."""
        if cgroup_id in self.known:
            return
        self.writer.watch(cgroup_id, None, None, False, False)
        self._early_excluded[cgroup_id] = os.path.join(self.mount, path.lstrip("/"))

    def request_poll(self, cgroup_id: int | None = None) -> None:
        """Poll soon: for `cgroup_id` (a new or unknown writer's cgroup) on its backoff
        schedule, without one at once (still rate-limited)."""
        if cgroup_id is None or self.repolls.request(cgroup_id, time.monotonic()):
            self._wake.set()

    # -- polling -------------------------------------------------------------

    async def run(self) -> None:
        """Poll every poll_interval_s, soon after request_poll(), and when a cgroup's
        re-poll is due; never faster than repoll_min_interval_ms."""
        min_gap = self.cfg.repoll_min_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._until_next_poll())
            gap = time.monotonic() - self._last_poll
            if gap < min_gap:
                await asyncio.sleep(min_gap - gap)
            self._wake.clear()
            await self.poll()

    def _until_next_poll(self) -> float:
        due = self.repolls.next_due()
        if due is None:
            return self.cfg.poll_interval_s
        return min(max(0.0, due - time.monotonic()), self.cfg.poll_interval_s)

    async def poll(self) -> bool:
        """One kubelet round trip and map sync; False (logged, counted) on failure."""
        async with self._poll_lock:
            started = self._last_poll = time.monotonic()
            self.stats.polls += 1
            try:
                return await self._poll_once()
            finally:
                self.repolls.polled(started, self.known)

    async def _poll_once(self) -> bool:
        if self._find_own is not None:
            self._exclude_own_cgroup(self._find_own)
            self._find_own = None
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
        agents = self.agent_pods
        if agents:
            labels = pod_labels(pods)
            self.agent_pod_uids = {uid for uid, lv in labels.items() if agents.matches(lv)}
        self.sync(metas)
        return True

    def _exclude_own_cgroup(self, find: OwnCgroupFinder) -> None:
        """Find our own container and put it in the map as excluded at once, before the
        kubelet is asked (it may be down): our writes are never copied, whatever the pid
        namespace. Only needed under the pods' subtree: the kernel ignores the rest."""
        self.own = find(self.mount, self.cfg.cgroup_roots)
        if self.own is None:
            log.info("own cgroup not found under the pods' cgroups: not running in a pod")
            return
        path, cg = self.own
        log.info("own cgroup %s (id %d): excluded", path, cg)
        pods_dir = os.path.join(self.mount, self.pods_prefix.lstrip("/"))
        if path.startswith(pods_dir.rstrip("/") + "/"):
            self.writer.watch(cg, None, None, False, False)
            self._own_in_map = True

    def _poll_failed(self, message: str, level: int) -> None:
        self.stats.poll_errors += 1
        if message != self.stats.last_error:  # the same error is not logged at every poll
            log.log(level, "kubelet: %s (known containers stay captured)", message)
        self.stats.last_error = message

    # -- map sync ------------------------------------------------------------

    def sync(self, metas: list[ContainerMeta]) -> None:
        """Make the map and the metadata match the kubelet's containers."""
        now = self._clock()
        index = scan_containers(self.mount, self.cfg.cgroup_roots)
        by_created_id = {cid: cg for cg, (cid, _ts) in self.created.items()}
        agent_pods = self._agent_pod_uids_of(metas)
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
            self._update(cg, path, meta, agent=meta.pod_uid in agent_pods)
        self._drop_early_excluded()
        for cg, known in list(self.known.items()):
            if cg not in seen and not (self._own_in_map and self.own and cg == self.own[1]):
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

    def _agent_pod_uids_of(self, metas: list[ContainerMeta]) -> set[str]:
        """Pods never captured: ours (all its containers) and those of other agents."""
        own_id = container_id_from_path(self.own[0]) if self.own is not None else None
        agents = self.agent_pods
        uids = {
            m.pod_uid
            for m in metas
            if m.container_id == own_id or (agents and agents.matches(m.labels))
        }
        self.agent_pod_uids |= uids
        return uids

    def _drop_early_excluded(self) -> None:
        """Early exclusions now known to the kubelet are ordinary entries; those whose
        cgroup is gone without ever being listed leave the map."""
        for cg, path in list(self._early_excluded.items()):
            if cg in self.known or not os.path.isdir(path):
                if cg not in self.known:
                    self.writer.unwatch(cg)
                del self._early_excluded[cg]

    def _update(self, cg: int, path: str, meta: ContainerMeta, agent: bool = False) -> None:
        own = self.own is not None and cg == self.own[1]
        if agent or own:
            capture_stdout, capture_stderr = False, False
        else:
            capture_stdout, capture_stderr = decide(meta, self.filters)
        known = self.known.get(cg)
        before: MapEntry | None = None
        if known is None:
            known = Known(meta, path, capture_stdout, capture_stderr)
            self.known[cg] = known
            if cg in self._early_excluded:
                known.in_map, before = True, (None, None, False, False)
                self._log_watched(cg, known)
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
            known.stdout, known.stderr = self._idents(cg, known.path)
        if not known.path or not os.path.isdir(known.path):
            if known.in_map:
                self.writer.unwatch(cg)  # the cgroup is gone: its id never comes back
                known.in_map = False
            return
        if known.stdout is None and not known.excluded:
            self._no_idents.add(cg)
        else:
            self._no_idents.discard(cg)
        if own and self._own_in_map and not known.in_map:
            known.in_map = True  # already in the map, excluded, since the first poll
            before = known.map_entry()
            self._log_watched(cg, known)
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

    @property
    def awaiting_idents(self) -> bool:
        """Some watched container is captured by fd number until its identities are read."""
        return bool(self._no_idents)

    def refresh_idents(self) -> None:
        """Read the stream identities of watched containers that had no process yet
        (cheap: no kubelet call), so the fd-number fallback lasts as short as possible."""
        for cg in list(self._no_idents):
            known = self.known.get(cg)
            if known is None or not known.in_map:
                self._no_idents.discard(cg)
                continue
            out, err = self._idents(cg, known.path)
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

    def _idents(self, cg: int, path: str) -> tuple[FileIdent | None, FileIdent | None]:
        """stdout/stderr identities (both or neither): those the kernel learned at the
        container's first exec, else those of its init process."""
        learned = self.learned_idents(cg)
        if learned is not None:
            return learned
        if not path:
            return None, None
        pid = init_pid(path, self.cfg.proc_root)
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
