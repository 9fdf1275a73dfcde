"""`podtap run`: the wiring, the only module that knows every stage.

    capture (probe, ring drain) -> lines (per pid/stream) -> enrich (pod metadata)
        -> sinks (each: encode, batch, buffer, deliver)
    kubelet -> discovery -> the kernel's containers map;  telemetry reads every stage

`podtap tap` (agent/tap.py) uses the same capture and line stages without the rest.

Start order: load the program, fill the containers map, start the
drain, attach (exits before enters).  Stop order: detach, drain what is left
in the ring, flush every partial line, report counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.capture.events import boot_to_realtime_offset_ns, boottime_ns
from agent.capture.probe import PodsRoot, Probe
from agent.capture.source import CaptureSource
from agent.config import Config, KubeConfig
from agent.enrich import Enricher
from agent.kube.cgroups import find_cgroup2_mount
from agent.kube.discovery import Discovery
from agent.kube.filters import Filters
from agent.kube.kubelet import KubeletClient, KubeletConfig
from agent.lifecycle import install_stop_signals, run_until_stopped, stop_if_drain_failed
from agent.lines import Line, LineStage
from agent.logs import flush_suppressed, log_counters
from agent.sinks.base import Enriched, Sink, SinkStats
from agent.sinks.factory import build_sinks
from agent.telemetry import Snapshot, TelemetryServer, readiness_reasons

if TYPE_CHECKING:
    from agent.kube.apiserver import NamespaceLabels

log = logging.getLogger("podtap")


def find_pods_cgroup(mount: str, cfg: KubeConfig) -> str | None:
    """The pods' subtree, relative to the cgroup v2 mount: configured, or the single
    configured root, or the kubepods(.slice) directory that exists."""
    if cfg.pods_cgroup:
        return cfg.pods_cgroup.strip("/")
    roots = [r.strip("/") for r in cfg.cgroup_roots]
    if len(roots) == 1 and roots[0]:
        return roots[0]
    for root in roots:
        for name in ("kubepods.slice", "kubepods"):
            rel = os.path.join(root, name)
            if os.path.isdir(os.path.join(mount, rel)):
                return rel
    return None


def node_name(cfg: KubeConfig) -> str:
    """kube.node_name, else $NODE_NAME (downward API); the host name only with a warning:
    in a pod it is the pod's name, and records would name the wrong node."""
    name = cfg.node_name or os.environ.get("NODE_NAME", "")
    if name:
        return name
    host = socket.gethostname()
    log.warning(
        "neither kube.node_name nor NODE_NAME is set: using the host name %r as the node "
        "name (set NODE_NAME from the downward API: fieldRef spec.nodeName)", host,
    )
    return host


class AgentPipeline:
    """`podtap run`: kubelet discovery, capture, lines, enrichment, sinks, telemetry."""

    HOUSEKEEPING_S = 0.1  # while lines wait for their container's metadata or identities
    STATS_EVERY_S = 60.0

    def __init__(self, cfg: Config, out: BinaryIO | None = None) -> None:
        self.cfg = cfg
        kube = cfg.kube
        self.mount = find_cgroup2_mount(host_root=kube.host_root)
        pods_rel = find_pods_cgroup(self.mount, kube)
        pods_root = None
        if pods_rel is None:
            log.warning(
                "no kubepods cgroup under %s: first lines of new containers are only "
                "captured once the kubelet reports them", self.mount,
            )
        else:
            pods_dir = os.path.join(self.mount, pods_rel)
            pods_root = PodsRoot(os.stat(pods_dir).st_ino, len(Path(pods_rel).parts))
        self.probe = Probe(cfg.capture, pods_root)
        self.client = KubeletClient(KubeletConfig.from_section(kube))
        self.sinks: list[Sink] = build_sinks(cfg, out if out is not None else sys.stdout.buffer)
        filters = Filters(cfg.filters)
        self.core_api: Any = None
        self.namespaces: NamespaceLabels | None = None
        if cfg.records.include_namespace_labels or cfg.records.include_node_labels:
            self._connect_apiserver()
        self.discovery = Discovery(
            kube, filters, self.client, self.probe, self.mount, node_name(kube),
            "/" + (pods_rel or ""),
            learned_idents=self.probe.learned_idents,
            on_forget=self._forget,
            on_changed=self._forget,  # rebuilt from the new metadata at the next line
            namespace_labels=self._namespace_labels,
        )
        self.lines = LineStage(cfg, on_cgroup=self.discovery.on_cgroup_created)
        self.enricher = Enricher(
            self.discovery.lookup,
            len(self.sinks),
            boot_to_realtime_offset_ns,
            kube.hold_max_bytes,
            int(kube.hold_timeout_s * 1e9),
            self.discovery.request_poll,
        )
        self.telemetry: TelemetryServer | None = None
        if cfg.telemetry.enabled:
            self.telemetry = TelemetryServer(cfg.telemetry, self.snapshot, self.readiness)
        self._attached = False
        self._stop = asyncio.Event()
        self._held = asyncio.Event()  # set by _consume when lines wait for metadata
        self._idle_housekeeping_s = min(cfg.lines.idle_flush_ms / 2000, 0.5)

    def _connect_apiserver(self) -> None:
        """Namespace labels (list+watch) and node labels, from the API server."""
        # Imported here: the kubernetes client costs memory on every node, and is off
        # by default.
        from agent.kube.apiserver import ApiServerConfigError, NamespaceLabels, make_core_api

        kube = self.cfg.kube
        try:
            self.core_api = make_core_api(
                kube.apiserver_url or None,
                kube.token_path,
                kube.apiserver_ca_path,
                insecure_skip_verify=kube.apiserver_insecure_skip_verify,
            )
        except ApiServerConfigError as e:
            log.warning("namespace and node labels are off: %s", e)
            return
        if self.cfg.records.include_namespace_labels:
            self.namespaces = NamespaceLabels(
                self.core_api, watch_timeout_s=kube.namespace_watch_timeout_s
            )

    def _namespace_labels(self, namespace: str) -> dict[str, str]:
        return self.namespaces.get(namespace) if self.namespaces is not None else {}

    def _forget(self, cgroup_id: int) -> None:
        self.enricher.forget(cgroup_id)

    def _namespace_changed(self, namespace: str) -> None:
        for cg in self.discovery.relabel_namespace(namespace):
            self.enricher.forget(cg)  # the next line rebuilds its encoder

    def _put(self, enriched: list[Enriched]) -> None:
        if enriched:
            for sink in self.sinks:
                sink.put(enriched)

    def _ship(self, lines: list[Line]) -> None:
        out: list[Enriched] = []
        self.enricher.process(lines, out)
        self._put(out)

    def _release(self, final: bool = False) -> None:
        out: list[Enriched] = []
        self.enricher.release(boottime_ns(), out, final)
        self._put(out)

    async def _consume(self, source: CaptureSource) -> None:
        held = self._held
        async for records in source.batches():
            self._ship(self.lines.process(records))
            if self.enricher.holding:
                held.set()

    async def _housekeeping(self, source: CaptureSource) -> None:
        next_stats = time.monotonic() + self.STATS_EVERY_S
        while not stop_if_drain_failed(source, self._stop):
            await self._until_housekeeping()
            self._ship(self.lines.flush_idle())
            self.discovery.refresh_idents()
            self._release()
            flush_suppressed()
            if time.monotonic() >= next_stats:
                next_stats += self.STATS_EVERY_S
                log_counters(log, "stats", self.stats())

    async def _until_housekeeping(self) -> None:
        """0.1 s while lines are held for their container's metadata or containers wait
        for their pipe identities; otherwise half the idle flush time (at most 0.5 s), or
        until `_consume` holds lines. An idle agent wakes twice a second instead of ten
        times: on a virtual machine one wake-up can cost up to a millisecond of CPU."""
        if self.enricher.holding or self.discovery.awaiting_idents:
            await asyncio.sleep(self.HOUSEKEEPING_S)
            return
        self._held.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._idle_housekeeping_s):
                await self._held.wait()

    async def _preflight(self) -> None:
        """Say at start which sink cannot be reached (bad URL, certificate): the agent
        still starts and buffers, since a backend may come back."""
        for sink in self.sinks:
            check = getattr(sink, "preflight", None)
            if check is None:
                continue
            problem = await check()
            if problem:
                log.error("sink %s: %s", sink.name, problem, extra={"sink": sink.name})

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        install_stop_signals(loop, self._stop)
        source = CaptureSource(self.probe, self.cfg.capture.queue_bytes)
        failed: list[str] = []
        try:
            if self.telemetry is not None:
                await self.telemetry.start()
            await loop.run_in_executor(None, self.probe.load)
            if self.cfg.records.include_node_labels and self.core_api is not None:
                from agent.kube.apiserver import node_labels

                self.discovery.node_labels = await asyncio.to_thread(
                    node_labels, self.core_api, self.discovery.host
                )
            if self.namespaces is not None:
                namespaces = self.namespaces

                def namespace_changed(ns: str) -> None:  # on the watcher's thread
                    loop.call_soon_threadsafe(self._namespace_changed, ns)

                namespaces.on_change = namespace_changed
                namespaces.start()
                await asyncio.to_thread(namespaces.wait_synced, self.cfg.kube.namespace_sync_wait_s)
            await self._preflight()
            # Known containers go in the map (with their stream identities) before
            # the probes are attached; a kubelet that is down is not fatal.
            await self.discovery.poll()
            source.start()
            self.probe.attach()
            self._attached = True
            log.info("capturing: %d containers known", len(self.discovery.known))
            helpers = {
                "agent-discovery": self.discovery.run(),
                "agent-housekeeping": self._housekeeping(source),
                **{f"sink-{sink.name}": sink.run() for sink in self.sinks},
            }
            failed = await run_until_stopped(source, self._stop, self._consume(source), helpers)
            await self._final_flush()
            await self._close_sinks()
        finally:
            counters = self.probe.counters() if self.probe.loaded else {}
            source.close()
            await self.client.close()
            if self.namespaces is not None:
                await asyncio.to_thread(self.namespaces.stop)
            if self.core_api is not None:
                self.core_api.api_client.close()
            if self.telemetry is not None:
                await self.telemetry.stop()
        flush_suppressed(final=True)
        log_counters(log, "stopped", self.stats(counters))
        if source.drain_error is not None or failed:
            return 1
        return 0

    async def _final_flush(self) -> None:
        self._ship(self.lines.flush_all())
        if self.enricher.holding:
            await self.discovery.poll()
        self._release(final=True)

    async def _close_sinks(self) -> None:
        """Deliver what the sinks hold within agent.shutdown_grace_s (all sinks at once);
        each then persists what is left to its disk buffer."""
        grace = self.cfg.agent.shutdown_grace_s
        results = await asyncio.gather(
            *(sink.close(grace) for sink in self.sinks), return_exceptions=True
        )
        for sink, result in zip(self.sinks, results, strict=True):
            if isinstance(result, BaseException):
                log.error("sink %s failed to close: %s", sink.name, result)

    def readiness(self) -> list[str]:
        return readiness_reasons(
            attached=self._attached,
            kubelet_answered=self.discovery.stats.polls > self.discovery.stats.poll_errors,
            sinks={sink.name: sink.stats for sink in self.sinks},
            max_failing_s=self.cfg.telemetry.sink_failing_s,
        )

    def snapshot(self) -> Snapshot:
        e, d = self.enricher.stats, self.discovery.stats
        return Snapshot(
            kernel=self.probe.counters() if self.probe.loaded else {},
            lines=self.lines.lines,
            partial_lines=self.lines.partial,
            records=e.records,
            held_lines=e.held_lines,
            released_lines=e.released_lines,
            dropped_from_hold={
                "hold_full": e.dropped_hold_full,
                "unresolved": e.dropped_unresolved,
                "excluded": e.excluded_lines,
            },
            kubelet_polls=d.polls,
            kubelet_errors=d.poll_errors,
            containers_watched=d.watched,
            containers_excluded=d.excluded,
            sinks={sink.name: sink.stats for sink in self.sinks},
        )

    def stats(self, counters: dict[str, int] | None = None) -> dict[str, object]:
        counters = counters if counters is not None else self.probe.counters()
        e, d = self.enricher.stats, self.discovery.stats
        return {
            **{f"kernel_{k}": v for k, v in counters.items()},
            "lines": self.lines.lines,
            "records": e.records,
            "held_lines": e.held_lines,
            "released_lines": e.released_lines,
            "dropped_hold_full": e.dropped_hold_full,
            "dropped_unresolved": e.dropped_unresolved,
            "excluded_lines": e.excluded_lines,
            "kubelet_polls": d.polls,
            "kubelet_errors": d.poll_errors,
            "containers_watched": d.watched,
            "containers_excluded": d.excluded,
            "watch_delay_ms_avg": round(d.watch_delay_sum_ms / d.watch_delay_count, 2)
            if d.watch_delay_count
            else None,
            "watch_delay_ms_max": round(d.watch_delay_max_ms, 2),
            **self._namespace_stats(),
            **{f"sink_{sink.name}": sink_summary(sink.stats) for sink in self.sinks},
        }

    def _namespace_stats(self) -> dict[str, object]:
        if self.namespaces is None:
            return {}
        return {f"namespace_{k}": v for k, v in dataclasses.asdict(self.namespaces.stats).items()}


def sink_summary(stats: SinkStats) -> dict[str, object]:
    return {
        "records_in": stats.records_in,
        "records_sent": stats.records_sent,
        "bytes_sent": stats.bytes_sent,
        "batches_sent": stats.batches_sent,
        "retries": stats.retries,
        "failures": dict(stats.failures),
        "dead_records": stats.dead_records,
        "dropped_records": stats.dropped_records,
        "memory_bytes": stats.memory_bytes_now,
        "disk_bytes": stats.disk_bytes_now,
    }
