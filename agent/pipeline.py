"""Wiring and lifecycle: the only module that knows every stage.

    capture (probe, ring drain) -> lines (per pid/stream) -> records (JSON bytes) -> output

`TapPipeline` is `podtap tap`: containers named on the command line, lines to
stdout.  `AgentPipeline` is `podtap run`: containers discovered from the
kubelet, lines enriched with pod metadata, records to a sink.

Start order: load the program, fill the containers map, start the
drain, attach (exits before enters).  Stop order: detach, drain what is left
in the ring, flush every partial line, report counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.capture.events import (
    EV_CGROUP,
    Record,
    boot_to_realtime_offset_ns,
    boottime_ns,
    comm_str,
)
from agent.capture.probe import PodsRoot, Probe
from agent.capture.source import CaptureSource
from agent.config import Config, KubeConfig
from agent.enrich import Enricher
from agent.kube.cgroups import find_cgroup2_mount, first_pid, stream_idents
from agent.kube.discovery import Discovery
from agent.kube.filters import FilterConfig
from agent.kube.kubelet import KubeletClient, KubeletConfig
from agent.kube.model import FileIdent
from agent.lines import Line, LineAssembler
from agent.logs import flush_suppressed, log_counters
from agent.records import encode_tap_line
from agent.sinks.base import Enriched, Sink, SinkStats
from agent.sinks.factory import build_sinks
from agent.sinks.stdout import TapOutput
from agent.telemetry import Snapshot, TelemetryServer, readiness_reasons

if TYPE_CHECKING:
    from agent.kube.apiserver import NamespaceLabels

log = logging.getLogger("podtap")

STREAM_NAMES = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True, slots=True)
class TapTarget:
    """A container to tap: its cgroup v2 directory, and a pid whose fds 1/2 are its streams."""

    cgroup_dir: str
    cgroup_id: int
    ident_pid: int | None = None  # None: the lowest pid of the cgroup, once there is one


def cgroup_of_pid(pid: int, mount: str, proc_root: str = "/proc") -> str:
    """The cgroup v2 directory of a process (the `0::/path` line of /proc/<pid>/cgroup)."""
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return os.path.join(mount, line[3:].strip().lstrip("/"))
    except OSError as e:
        raise ValueError(f"cannot read the cgroup of pid {pid}: {e.strerror}") from e
    raise ValueError(f"pid {pid} has no cgroup v2 membership")


def resolve_targets(
    cgroups: list[str], pids: list[int], mount: str | None = None
) -> list[TapTarget]:
    mount = mount or find_cgroup2_mount()
    targets: dict[int, TapTarget] = {}
    for pid in pids:
        directory = cgroup_of_pid(pid, mount)
        cgid = os.stat(directory).st_ino
        targets.setdefault(cgid, TapTarget(directory, cgid, pid))
    for path in cgroups:
        directory = path if os.path.isabs(path) else os.path.join(mount, path)
        if not os.path.isfile(os.path.join(directory, "cgroup.procs")):
            raise ValueError(f"{path} is not a cgroup v2 directory (under {mount})")
        if os.path.realpath(directory) == os.path.realpath(mount):
            raise ValueError("refusing to tap the root cgroup (every process of the machine)")
        cgid = os.stat(directory).st_ino
        targets.setdefault(cgid, TapTarget(directory, cgid))
    return list(targets.values())


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set `stop`.

    Not loop.add_signal_handler: asyncio passes signals as bytes through its
    self-pipe, which call_soon_threadsafe (one per drained batch) also writes
    to; a signal arriving while that pipe is full is lost.  A Python-level
    handler runs from the interpreter's own pending-signal flag instead.
    """

    def on_signal(_signum: int, _frame: object) -> None:
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def stop_if_drain_failed(source: CaptureSource, stop: asyncio.Event) -> bool:
    """A dead ring-buffer drain thread would leave the pipeline waiting forever."""
    if source.drain_error is None:
        return False
    log.error("the ring buffer drain failed: %s; stopping", source.drain_error)
    stop.set()
    return True


async def run_until_stopped(
    source: CaptureSource,
    stop: asyncio.Event,
    consume: Coroutine[Any, Any, None],
    helpers: dict[str, Coroutine[Any, Any, None]],
) -> list[str]:
    """Run the consumer and the named helper tasks until `stop` is set (or one of them
    ends); cancel the helpers, then stop the capture — detach, hand over what is left in
    the ring — and let the consumer finish with it. Returns the names of the helpers
    that failed (the agent then exits non-zero)."""
    consumer = asyncio.create_task(consume, name="consume")
    tasks = [asyncio.create_task(coro, name=name) for name, coro in helpers.items()]
    stopped = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait({consumer, stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    for task in (*tasks, stopped):
        task.cancel()
    await asyncio.gather(*tasks, stopped, return_exceptions=True)
    failed = []
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.get_name())
            log.error("task %s failed: %s; stopping", task.get_name(), task.exception(),
                      exc_info=task.exception())
    source.stop()
    await consumer
    return failed


class TextFormatter:
    """`HH:MM:SS.mmm <pid> <comm> <stream>: <line>` (local time)."""

    def __init__(self, offset_ns: Callable[[], int]) -> None:
        self.offset_ns = offset_ns

    def __call__(self, lines: list[Line]) -> bytes:
        parts = []
        offset = self.offset_ns()
        for ts, pid, stream, tag, message, _partial in lines:
            ns = ts + offset
            clock = time.strftime("%H:%M:%S", time.localtime(ns // 1_000_000_000))
            comm = comm_str(tag[1])  # type: ignore[index]
            millis = ns // 1_000_000 % 1000
            head = f"{clock}.{millis:03d} {pid} {comm} {STREAM_NAMES[stream]}: "
            parts.append(head.encode() + message + b"\n")
        return b"".join(parts)


class JsonFormatter:
    """One JSON object per line (`encode_tap_line`)."""

    def __init__(self, offset_ns: Callable[[], int], invalid_utf8: str = "replace") -> None:
        self.offset_ns = offset_ns
        self.invalid_utf8 = invalid_utf8

    def __call__(self, lines: list[Line]) -> bytes:
        offset = self.offset_ns()
        enc, invalid = encode_tap_line, self.invalid_utf8
        return b"".join(
            [
                enc(ts + offset, stream, pid, tag[1], tag[0], message, partial, invalid)  # type: ignore[index, arg-type]
                + b"\n"
                for ts, pid, stream, tag, message, partial in lines
            ]
        )


class LineStage:
    """Records -> lines (`LineAssembler.process`), counted; cgroup records to discovery."""

    def __init__(
        self, cfg: Config, on_cgroup: Callable[[int, str, int], None] | None = None
    ) -> None:
        self.on_cgroup = on_cgroup
        self.assembler = LineAssembler(
            max_line=cfg.lines.max_line,
            idle_timeout_ns=cfg.lines.idle_flush_ms * 1_000_000,
            max_streams=cfg.lines.max_streams,
            max_pending_bytes=cfg.lines.max_pending_bytes,
        )
        self.lines = 0
        self.partial = 0

    def process(self, records: list[Record]) -> list[Line]:
        out: list[Line] = []
        self.assembler.process(records, out, self._other)
        return self._counted(out)

    def _other(self, rec: Record) -> None:
        if rec[4] == EV_CGROUP and self.on_cgroup is not None:
            self.on_cgroup(rec[1], rec[8].decode("utf-8", "replace"), rec[0])

    def flush_idle(self) -> list[Line]:
        out: list[Line] = []
        self.assembler.flush_idle(boottime_ns(), out)
        return self._counted(out)

    def flush_all(self) -> list[Line]:
        out: list[Line] = []
        self.assembler.flush_all(out)
        return self._counted(out)

    def _counted(self, out: list[Line]) -> list[Line]:
        self.lines += len(out)
        self.partial += sum(1 for line in out if line[5])
        return out


class TapPipeline:
    """`podtap tap`: capture the given containers and print their lines."""

    def __init__(
        self,
        cfg: Config,
        targets: list[TapTarget],
        stdout: bool,
        stderr: bool,
        fmt: str,
        out: BinaryIO,
        err: BinaryIO | None = None,
    ) -> None:
        self.cfg = cfg
        self.targets = targets
        self.capture_stdout = stdout
        self.capture_stderr = stderr
        self.out = out
        self.err = err if err is not None else sys.stderr.buffer
        self.probe = Probe(cfg.capture)
        self.lines = LineStage(cfg)
        offset = boot_to_realtime_offset_ns  # read per batch: follows clock steps
        self.format: Callable[[list[Line]], bytes] = (
            JsonFormatter(offset, cfg.records.invalid_utf8)
            if fmt == "json"
            else TextFormatter(offset)
        )
        self._idents: dict[int, tuple[FileIdent, FileIdent] | None] = {}
        self._stop = asyncio.Event()
        self.sink = TapOutput(out)

    def _say(self, text: str) -> None:
        self.err.write(f"podtap: {text}\n".encode())
        self.err.flush()

    def _target_idents(self, target: TapTarget) -> tuple[FileIdent, FileIdent] | None:
        pid = target.ident_pid or first_pid(target.cgroup_dir)
        if pid is None:
            return None
        out, err = stream_idents(pid)
        if out is None or err is None:
            return None
        return out, err

    def _watch_targets(self) -> None:
        """(Re)write the map entry of each target whose stream identities became known."""
        for target in self.targets:
            if self._idents.get(target.cgroup_id) is not None:
                continue
            idents = self._target_idents(target)
            if target.cgroup_id in self._idents and idents is None:
                continue
            self._idents[target.cgroup_id] = idents
            out, err = idents if idents else (None, None)
            self.probe.watch(target.cgroup_id, out, err, self.capture_stdout, self.capture_stderr)

    def _write(self, lines: list[Line]) -> None:
        if not lines or self.sink.broken:
            return
        self.sink.write(self.format(lines))
        if self.sink.broken:
            self._stop.set()

    async def _housekeeping(self, source: CaptureSource) -> None:
        """Idle flushes, and identities of targets that had no process at start."""
        period = min(self.cfg.lines.idle_flush_ms / 2000, 0.5)
        while not stop_if_drain_failed(source, self._stop):
            await asyncio.sleep(period)
            self._write(self.lines.flush_idle())
            self._watch_targets()

    async def _consume(self, source: CaptureSource) -> None:
        async for records in source.batches():
            self._write(self.lines.process(records))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        install_stop_signals(loop, self._stop)
        await loop.run_in_executor(None, self.probe.load)
        source = CaptureSource(self.probe, self.cfg.capture.queue_bytes)
        try:
            self._watch_targets()
            source.start()
            self.probe.attach()
            names = ", ".join(f"{t.cgroup_dir} (id {t.cgroup_id})" for t in self.targets)
            self._say(f"tapping {names}")
            await run_until_stopped(
                source,
                self._stop,
                self._consume(source),
                {"tap-housekeeping": self._housekeeping(source)},
            )
            self._write(self.lines.flush_all())
        finally:
            counters = self.probe.counters() if self.probe.loaded else {}
            source.close()
        self._report(counters)
        return 1 if source.drain_error is not None else 0

    def _report(self, counters: dict[str, int]) -> None:
        self._say(
            f"records={counters.get('records', 0)} bytes={counters.get('bytes', 0)} "
            f"lines={self.lines.lines} partial={self.lines.partial} "
            f"dropped_records={counters.get('drop_records', 0)} "
            f"dropped_bytes={counters.get('drop_bytes', 0)} "
            f"truncated_bytes={counters.get('trunc_bytes', 0)} "
            f"uncapturable_bytes={counters.get('uncapt_bytes', 0)} "
            f"uncapturable_calls={counters.get('uncapt_calls', 0)} "
            f"fault_bytes={counters.get('fault_bytes', 0)}"
        )


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


def kubelet_config(cfg: KubeConfig) -> KubeletConfig:
    base = KubeletConfig.in_cluster() if not cfg.kubelet_url else KubeletConfig(
        url=cfg.kubelet_url, token_path=cfg.token_path, ca_path=cfg.ca_path
    )
    return dataclasses.replace(
        base,
        token_path=cfg.token_path,
        ca_path=cfg.ca_path,
        insecure_skip_verify=cfg.insecure_skip_verify,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
    )


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

    HOUSEKEEPING_S = 0.1
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
        self.client = KubeletClient(kubelet_config(kube))
        self.sinks: list[Sink] = build_sinks(cfg, out if out is not None else sys.stdout.buffer)
        filters = FilterConfig(
            **{f.name: getattr(cfg.filters, f.name) for f in dataclasses.fields(cfg.filters)}
        )
        self.discovery = Discovery(
            kube, filters, self.client, self.probe, self.mount, node_name(kube),
            "/" + (pods_rel or ""),
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
        self.discovery.on_forget = self.enricher.forget
        self.discovery.on_changed = self.enricher.forget  # rebuilt from the new metadata
        self.core_api: Any = None
        self.namespaces: NamespaceLabels | None = None
        if cfg.records.include_namespace_labels or cfg.records.include_node_labels:
            self._connect_apiserver()
        self.discovery.wants_repoll = lambda: self.enricher.holding
        self.telemetry: TelemetryServer | None = None
        if cfg.telemetry.enabled:
            self.telemetry = TelemetryServer(cfg.telemetry, self.snapshot, self.readiness)
        self._attached = False
        self._stop = asyncio.Event()

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
            self.discovery.namespace_labels = self.namespaces.get

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
        async for records in source.batches():
            self._ship(self.lines.process(records))

    async def _housekeeping(self, source: CaptureSource) -> None:
        next_stats = time.monotonic() + self.STATS_EVERY_S
        while not stop_if_drain_failed(source, self._stop):
            await asyncio.sleep(self.HOUSEKEEPING_S)
            self._ship(self.lines.flush_idle())
            self.discovery.refresh_idents()
            self._release()
            flush_suppressed()
            if time.monotonic() >= next_stats:
                next_stats += self.STATS_EVERY_S
                log_counters(log, "stats", self.stats())

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
        n = self.namespaces.stats
        return {
            "namespace_lists": n.lists,
            "namespace_watch_events": n.watch_events,
            "namespace_expired": n.expired,
            "namespace_errors": n.errors,
        }


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


async def run_agent(cfg: Config) -> int:
    return await AgentPipeline(cfg).run()
