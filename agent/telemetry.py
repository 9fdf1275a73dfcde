"""The agent's own HTTP server: /metrics (Prometheus), /healthz, /readyz.

Metrics are made at scrape time: the pipeline hands over a `snapshot` callable that
returns a `Snapshot` of the counters the stages already keep (plain ints, `SinkStats`),
and `metric_families` turns it into families that `agent.exposition` renders. Nothing
on the data path touches metrics; a scrape costs one snapshot and one text rendering.

The server is a small HTTP/1.1 server on `asyncio.start_server`, not aiohttp.web and
not prometheus_client (together ~3.4 MiB of RSS on every node for three GET routes).
The agent is privileged on every node, so the server bounds what a client can cost:
the request head's size, the time to send it, the time to read the answer, the
number of connections; a bad client gets a status and a closed connection, never an
exception in the agent.

The server runs on the agent's event loop, so /healthz answering is itself the proof
that the loop is not stuck.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate  # already imported by aiohttp's client
from importlib.metadata import PackageNotFoundError, version

from agent.config import TelemetryConfig
from agent.exposition import (
    CONTENT_TYPE,
    Family,
    ProcessMetrics,
    counter,
    gauge,
    render,
)
from agent.sinks.base import LATENCY_BUCKETS_S, SinkStats

log = logging.getLogger("podtap.telemetry")

PREFIX = "podtap_"
STREAMS = ("stdout", "stderr")


@dataclass(slots=True)
class Snapshot:
    """The counters of every stage at one instant, filled by the pipeline.

    `kernel` is `Probe.counters()` as it is (names of bpf/podtap.h without CNT_);
    `dropped_from_hold` maps a reason (`hold_full`, `unresolved`, `excluded`) to the
    lines the enricher dropped from its hold for it.
    """

    kernel: dict[str, int] = field(default_factory=dict)
    lines: int = 0
    partial_lines: int = 0
    records: int = 0
    held_lines: int = 0
    released_lines: int = 0
    dropped_from_hold: dict[str, int] = field(default_factory=dict)
    kubelet_polls: int = 0
    kubelet_errors: int = 0
    containers_watched: int = 0
    containers_excluded: int = 0
    sinks: dict[str, SinkStats] = field(default_factory=dict)


# Kernel counter -> (metric name without prefix and _total, help). Counters the kernel
# gains later and that are not listed here are still exported, as kernel_<name>.
KERNEL_METRICS: dict[str, tuple[str, str]] = {
    "records": ("captured_records", "Data records the probe put in the ring buffer."),
    "bytes": ("captured_bytes", "Bytes written by containers that were captured."),
    "writes": ("captured_writes", "Write calls to a watched stream that returned > 0."),
    "drop_records": ("ringbuf_dropped_records",
                     "Data records lost because the ring buffer was full."),
    "drop_bytes": ("ringbuf_dropped_bytes", "Data bytes lost because the ring buffer was full."),
    "drop_exits": ("ringbuf_dropped_exit_records",
                   "Process-exit records lost because the ring buffer was full."),
    "drop_cgroups": ("ringbuf_dropped_cgroup_records",
                     "Cgroup-creation records lost because the ring buffer was full."),
    "trunc_bytes": ("truncated_bytes",
                    "Bytes beyond the per-write maximum or the copy budget (not captured)."),
    "uncapt_bytes": ("uncapturable_bytes",
                     "Bytes written to a watched stream by splice, sendfile, tee and the like."),
    "uncapt_calls": ("uncapturable_calls",
                     "Calls that wrote to a watched stream in a way that cannot be captured."),
    "fault_bytes": ("fault_bytes",
                    "Bytes the kernel accepted that the probe could not read from user memory."),
    "unknown_records": ("unknown_cgroup_records",
                        "Records of cgroups under the pods' subtree that were not watched yet."),
    "exits": ("exit_records", "Process-exit records put in the ring buffer."),
}

# SinkStats counter field -> (metric name without prefix and _total, help).
SINK_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("records_in", "sink_input_records", "Records put into the sink."),
    ("records_sent", "sink_sent_records", "Records the backend acknowledged."),
    ("bytes_sent", "sink_sent_bytes", "Request body bytes acknowledged, as sent (compressed)."),
    ("batches_sent", "sink_sent_batches", "Batches the backend acknowledged."),
    ("retries", "sink_retries", "Send attempts after the first, of any batch."),
    ("dead_records", "sink_dead_letter_records",
     "Records the backend will never accept, sent to the dead-letter store."),
    ("dropped_records", "sink_dropped_records",
     "Records dropped because the memory and disk buffers were full."),
    ("dropped_bytes", "sink_dropped_bytes",
     "Bytes dropped because the memory and disk buffers were full."),
    ("encode_errors", "sink_encode_errors", "Lines the sink could not encode (skipped)."),
    ("corrupt_batches", "sink_corrupt_batches",
     "Disk-buffer batches that failed their checksum (their records count as dropped)."),
)


def podtap_version() -> str:
    try:
        return version("podtap")
    except PackageNotFoundError:
        return "unknown"


def le_label(bound: float) -> str:
    """A bucket bound as prometheus_client writes it ("0.005", "1.0", "+Inf")."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


LATENCY_LE = tuple(le_label(b) for b in (*LATENCY_BUCKETS_S, float("inf")))


def metric_families(
    snap: Snapshot, build: Mapping[str, str], process: ProcessMetrics | None = None
) -> Iterator[Family]:
    """Every family of one scrape, in the order prometheus_client rendered them."""
    info = gauge(PREFIX + "build_info", "Constant 1, labelled with the agent's build.",
                 labels=tuple(sorted(build)))
    info.add([build[k] for k in sorted(build)], 1)
    yield info
    yield from kernel_metrics(snap.kernel)
    yield from pipeline_metrics(snap)
    yield from sink_metrics(snap.sinks, time.time_ns(), time.monotonic_ns())
    if process is not None:
        # process_* (RSS, CPU seconds, open fds): the agent's own cost is what an
        # operator of a DaemonSet watches first.
        yield from process.families()


def podtap_counter(name: str, doc: str, value: float) -> Family:
    return counter(PREFIX + name, doc, value)


def podtap_gauge(name: str, doc: str, value: float) -> Family:
    return gauge(PREFIX + name, doc, value)


def kernel_metrics(kernel: Mapping[str, int]) -> Iterator[Family]:
    """The probe's counters. They are not split by stream today; per-stream counters
    named `<records|bytes>_<stdout|stderr>` are exported with a `stream` label."""
    per_stream = {f"{base}_{s}" for base in ("records", "bytes") for s in STREAMS}
    for base in ("records", "bytes"):
        if all(f"{base}_{s}" in kernel for s in STREAMS):
            name, doc = KERNEL_METRICS[base]
            family = counter(PREFIX + name, doc, labels=("stream",))
            for s in STREAMS:
                family.add([s], kernel[f"{base}_{s}"])
            yield family
        elif base in kernel:
            yield podtap_counter(*KERNEL_METRICS[base], kernel[base])
    for key, value in kernel.items():
        if key in ("records", "bytes") or key in per_stream:
            continue
        name, doc = KERNEL_METRICS.get(key, (f"kernel_{key}", f"Kernel counter {key}."))
        yield podtap_counter(name, doc, value)


def pipeline_metrics(snap: Snapshot) -> Iterator[Family]:
    yield podtap_counter("lines", "Lines emitted by line reassembly.", snap.lines)
    yield podtap_counter("partial_lines",
                         "Lines emitted incomplete (idle, exit, loss, max length).",
                         snap.partial_lines)
    yield podtap_counter("records", "Lines enriched with pod metadata and encoded.",
                         snap.records)
    yield podtap_counter("hold_lines", "Lines held until their container's metadata was known.",
                         snap.held_lines)
    yield podtap_counter("hold_released_lines", "Held lines released to the sinks.",
                         snap.released_lines)
    dropped = counter(PREFIX + "hold_dropped_lines", "Held lines dropped, by reason.",
                      labels=("reason",))
    for reason, n in sorted(snap.dropped_from_hold.items()):
        dropped.add([reason], n)
    yield dropped
    yield podtap_counter("kubelet_polls", "Kubelet /pods requests.", snap.kubelet_polls)
    yield podtap_counter("kubelet_poll_errors", "Kubelet /pods requests that failed.",
                         snap.kubelet_errors)
    yield podtap_gauge("containers_watched", "Containers in the kernel's watch map.",
                       snap.containers_watched)
    yield podtap_gauge("containers_excluded", "Containers excluded by the filters.",
                       snap.containers_excluded)


def sink_metrics(
    sinks: Mapping[str, SinkStats], wall_ns: int, mono_ns: int
) -> Iterator[Family]:
    names = sorted(sinks)
    for attr, name, doc in SINK_COUNTERS:
        family = counter(PREFIX + name, doc, labels=("sink",))
        for sink in names:
            family.add([sink], getattr(sinks[sink], attr))
        yield family
    failures = counter(
        PREFIX + "sink_failures", "Failed send attempts, by status class (429, 4xx, 5xx, "
        "transport).", labels=("sink", "status_class"),
    )
    for sink in names:
        for status_class, n in sorted(sinks[sink].failures.items()):
            failures.add([sink, status_class], n)
    yield failures
    yield sink_gauge("sink_buffered_memory_bytes", "Bytes of batches waiting in memory.",
                     {s: sinks[s].memory_bytes_now for s in names})
    yield sink_gauge("sink_buffered_disk_bytes", "Bytes of batches waiting in the disk buffer.",
                     {s: sinks[s].disk_bytes_now for s in names})
    yield sink_gauge(
        "sink_oldest_buffered_age_seconds",
        "Age of the oldest batch not acknowledged yet (0: none).",
        {s: age_s(sinks[s].oldest_ns_now, wall_ns) for s in names},
    )
    yield sink_gauge(
        "sink_failing_seconds", "How long deliveries have failed in a row (0: healthy).",
        {s: age_s(sinks[s].failing_since_ns, mono_ns) for s in names},
    )
    yield latency_histogram(sinks, names)


def age_s(since_ns: int, now_ns: int) -> float:
    return max(0, now_ns - since_ns) / 1e9 if since_ns else 0.0


def sink_gauge(name: str, doc: str, values: Mapping[str, float]) -> Family:
    family = gauge(PREFIX + name, doc, labels=("sink",))
    for sink, value in values.items():
        family.add([sink], value)
    return family


def latency_histogram(sinks: Mapping[str, SinkStats], names: list[str]) -> Family:
    """`SinkStats.latency_counts` holds per-bucket counts; Prometheus wants them cumulative."""
    family = Family(
        PREFIX + "sink_send_latency_seconds", "histogram",
        "Time from sending a request to its answer.", ("sink",),
    )
    for sink in names:
        stats = sinks[sink]
        buckets, total = [], 0
        for le, n in zip(LATENCY_LE, stats.latency_counts, strict=True):
            total += n
            buckets.append((le, total))
        family.add_histogram([sink], buckets, stats.latency_sum_s)
    return family


def readiness_reasons(
    *,
    attached: bool,
    kubelet_answered: bool,
    sinks: Mapping[str, SinkStats],
    max_failing_s: float,
    mono_ns: int | None = None,
) -> list[str]:
    """Why the agent is not ready (empty: ready): what a `readiness` callable returns."""
    reasons = []
    if not attached:
        reasons.append("probes not attached")
    if not kubelet_answered:
        reasons.append("kubelet never answered")
    now = time.monotonic_ns() if mono_ns is None else mono_ns
    for name in sorted(sinks):
        failing = age_s(sinks[name].failing_since_ns, now)
        if failing > max_failing_s:
            reasons.append(f"sink {name} failing for {failing:.0f} s")
    return reasons


class TelemetryError(OSError):
    """The server could not start (address in use, address not available)."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one client may cost the agent."""

    max_head_bytes: int = 8192  # request line plus headers; a body of GET is read up to it too
    head_timeout_s: float = 10.0  # from a new connection, or a request's first line, to its end
    idle_timeout_s: float = 75.0  # a kept-alive connection waiting for its next request
    write_timeout_s: float = 10.0  # a client that does not read its answer
    max_connections: int = 64
    linger_s: float = 2.0  # after answering and before closing, what the client still sends is read
    linger_bytes: int = 1 << 20  # and dropped, up to this much


@dataclass(slots=True)
class ServerStats:
    requests: int = 0
    bad_requests: int = 0  # answered 4xx/5xx for the request's form, not its path or method
    timeouts: int = 0
    rejected_connections: int = 0
    connection_errors: int = 0  # reset, broken pipe, or an unexpected error


@dataclass(slots=True)
class Request:
    method: str
    path: str
    http10: bool
    keep_alive: bool


class HttpError(Exception):
    """A request the server answers with `status` and closes the connection after."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
TEXT = "text/plain; charset=utf-8"
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
TARGET = re.compile(rb"/[\x21-\x7e]*")
HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")

def parse_request_line(line: bytes) -> tuple[str, str, bool]:
    """(method, path without the query, HTTP/1.0?) of `GET /path HTTP/1.1`."""
    parts = line.split(b" ")
    if len(parts) != 3 or not TOKEN.fullmatch(parts[0]):
        raise HttpError(400, "malformed request line")
    method, target, ver = parts
    if ver not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505 if HTTP_VERSION.fullmatch(ver) else 400, "unsupported version")
    if not TARGET.fullmatch(target):
        raise HttpError(400, "malformed request target")
    return method.decode(), target.split(b"?", 1)[0].decode(), ver == b"HTTP/1.0"


def parse_headers(lines: list[bytes]) -> dict[str, list[str]]:
    """Header name (lower case) -> its values; a line that is not `name: value` (an
    obsolete folded line included) is a 400."""
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header")
        headers.setdefault(name.decode().lower(), []).append(value.strip(b" \t").decode("latin-1"))
    return headers


def body_length(headers: Mapping[str, list[str]]) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(501, "request bodies with a transfer coding are not supported")
    values = {v.strip() for value in headers.get("content-length", []) for v in value.split(",")}
    if not values:
        return 0
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise HttpError(400, "malformed Content-Length")
    return int(value)


def wants_keep_alive(headers: Mapping[str, list[str]], http10: bool) -> bool:
    tokens = {t.strip().lower() for v in headers.get("connection", []) for t in v.split(",")}
    return "keep-alive" in tokens if http10 else "close" not in tokens


class TelemetryServer:
    """/metrics, /healthz and /readyz on `cfg.address:cfg.port`, on the running loop.

    GET and HEAD; other paths 404, other methods 405. HTTP/1.1 connections are kept
    alive unless the client says `Connection: close` (HTTP/1.0 ones only on
    `Connection: keep-alive`)."""

    def __init__(
        self,
        cfg: TelemetryConfig,
        snapshot: Callable[[], Snapshot],
        readiness: Callable[[], list[str]],
        limits: ServerLimits | None = None,
    ) -> None:
        self.cfg = cfg
        self.snapshot = snapshot
        self.readiness = readiness
        self.limits = limits or ServerLimits()
        self.build = {"version": podtap_version(), "python": platform.python_version()}
        self.process = ProcessMetrics()
        self.stats = ServerStats()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": self.metrics, "/healthz": self.healthz, "/readyz": self.readyz,
        }

    async def start(self) -> None:
        try:
            server = await asyncio.start_server(
                self._serve_connection, self.cfg.address, self.cfg.port,
                limit=self.limits.max_head_bytes,
            )
        except OSError as e:
            raise TelemetryError(
                f"telemetry server cannot listen on {self.cfg.address}:{self.cfg.port}: "
                f"{e.strerror or e}"
            ) from e
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])
        log.info("telemetry listening", extra={"address": self.cfg.address, "port": self.port})

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    def metrics(self) -> tuple[int, str, bytes]:
        # Prometheus asks for OpenMetrics first but accepts this format too: the 0.0.4
        # text is served whatever the Accept header says.
        try:
            return 200, CONTENT_TYPE, render(metric_families(self.snapshot(), self.build,
                                                             self.process))
        except Exception:
            log.exception("metrics scrape failed")
            return 500, TEXT, b"metrics scrape failed\n"

    def healthz(self) -> tuple[int, str, bytes]:
        return 200, TEXT, b"ok\n"

    def readyz(self) -> tuple[int, str, bytes]:
        try:
            reasons = self.readiness()
        except Exception as e:
            log.exception("readiness check failed")
            reasons = [f"readiness check failed: {e}"]
        if reasons:
            return 503, TEXT, "".join(f"{r}\n" for r in reasons).encode()
        return 200, TEXT, b"ok\n"

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._connections) >= self.limits.max_connections or self._server is None:
            self.stats.rejected_connections += 1
            log.warning("telemetry: connection refused, %d connections open",
                        len(self._connections))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve_requests(reader, writer)
        except TimeoutError:
            self.stats.timeouts += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.stats.connection_errors += 1
        except Exception:
            self.stats.connection_errors += 1
            log.exception("telemetry: connection failed")
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        first = True
        while self._server is not None:
            try:
                request = await self._read_request(reader, first)
            except HttpError as e:
                self.stats.bad_requests += 1
                log.debug("telemetry: bad request: %s", e, extra={"status": e.status})
                body = f"{REASONS[e.status]}: {e}\n".encode()
                await self._send(writer, e.status, TEXT, body, send_body=True, keep_alive=False,
                                 http10=False)
                await self._linger(reader, writer)
                return
            if request is None:
                return
            self.stats.requests += 1
            status, ctype, body, extra = self._answer(request)
            await self._send(writer, status, ctype, body, send_body=request.method != "HEAD",
                             keep_alive=request.keep_alive, http10=request.http10, extra=extra)
            if not request.keep_alive:
                await self._linger(reader, writer)
                return
            first = False

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then drop what the client still sends until it closes or for a while.

        Closing a socket with unread bytes in it makes the kernel answer with a reset, and a
        reset can destroy the answer before the client has read it (a client trickling its
        head, or one that pipelined requests after `Connection: close`)."""
        dropped = 0
        try:
            if writer.can_write_eof():
                writer.write_eof()  # ENOTCONN when the client is already gone: nothing to wait for
            async with asyncio.timeout(self.limits.linger_s):
                while dropped <= self.limits.linger_bytes and (chunk := await reader.read(65536)):
                    dropped += len(chunk)
        except (TimeoutError, OSError):
            pass

    def _answer(self, request: Request) -> tuple[int, str, bytes, str]:
        route = self._routes.get(request.path)
        if route is None:
            return 404, TEXT, b"404: Not Found\n", ""
        if request.method not in ("GET", "HEAD"):
            return 405, TEXT, b"405: Method Not Allowed\n", "Allow: GET, HEAD\r\n"
        status, ctype, body = route()
        return status, ctype, body, ""

    async def _read_request(self, reader: asyncio.StreamReader, first: bool) -> Request | None:
        """The next request, None when the client closed (or idled out) between requests."""
        wait_s = self.limits.head_timeout_s if first else self.limits.idle_timeout_s
        size = 0
        try:
            async with asyncio.timeout(wait_s):
                line = await self._read_line(reader, 414)
                while line == b"":  # empty lines before a request are allowed (RFC 9112 2.2)
                    size += 2
                    if size > self.limits.max_head_bytes:
                        raise HttpError(400, "only empty lines")
                    line = await self._read_line(reader, 414)
        except (TimeoutError, asyncio.IncompleteReadError) as e:
            if isinstance(e, TimeoutError) and first:
                raise HttpError(408, "no request in time") from e
            return None
        size += len(line) + 2
        try:
            async with asyncio.timeout(self.limits.head_timeout_s):
                return await self._read_rest(reader, line, size)
        except TimeoutError as e:
            raise HttpError(408, "request head not complete in time") from e

    async def _read_rest(self, reader: asyncio.StreamReader, line: bytes, size: int) -> Request:
        """The headers and body of the request whose first line is `line`."""
        method, path, http10 = parse_request_line(line)
        lines = []
        while (line := await self._read_line(reader, 431)) != b"":
            size += len(line) + 2
            if size > self.limits.max_head_bytes:
                raise HttpError(431, "request head too large")
            lines.append(line)
        headers = parse_headers(lines)
        if not http10 and len(headers.get("host", [])) != 1:
            raise HttpError(400, "HTTP/1.1 request without exactly one Host")
        length = body_length(headers)
        if length > self.limits.max_head_bytes:
            raise HttpError(413, "request body too large")
        if length:
            await reader.readexactly(length)
        return Request(method, path, http10, wants_keep_alive(headers, http10))

    async def _read_line(self, reader: asyncio.StreamReader, too_long: int) -> bytes:
        """One line without its CRLF (or bare LF); longer than the limit is `too_long`."""
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            raise HttpError(too_long, "line too long") from e
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise HttpError(400, "connection closed within a request") from e
            raise
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, *,
        send_body: bool, keep_alive: bool, http10: bool, extra: str = "",
    ) -> None:
        connection = ("" if keep_alive and not http10 else
                      "Connection: keep-alive\r\n" if keep_alive else "Connection: close\r\n")
        head = (f"HTTP/1.1 {status} {REASONS[status]}\r\n"
                f"Date: {formatdate(usegmt=True)}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"{connection}{extra}\r\n")
        writer.write(head.encode() + body if send_body else head.encode())
        async with asyncio.timeout(self.limits.write_timeout_s):
            await writer.drain()
