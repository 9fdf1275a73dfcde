"""Typed configuration: one object, built from a YAML file and PODTAP_* variables.

Every section is a frozen dataclass with defaults; `load_config()` validates
types and ranges and raises ConfigError naming the offending key.  Environment
variables override the file: `PODTAP_<SECTION>_<KEY>` (e.g.
`PODTAP_CAPTURE_MAX_WRITE=4194304`, `PODTAP_SINK_KIND=loki`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger("podtap.config")


class ConfigError(Exception):
    """Invalid configuration; the message names the key."""


SINK_KINDS = ("stdout", "elasticsearch", "loki", "otlp", "http")


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    """A string field with a fixed set of values (listed in the JSON Schema as an enum)."""
    return field(default=default, metadata={"enum": choices})


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    max_write: int = 1 << 20  # bytes of one write() copied; the rest is counted as truncated
    chunk: int = 16384  # bytes per ring-buffer record at most (power of two)
    copy_iterations: int = 512  # copy-loop iterations per BPF program (x33 with tail calls)
    ring_bytes: int = 16 << 20  # ring buffer size (power of two): absorbs a 200K-line burst
    max_containers: int = 16384
    socket_syscalls: bool = True  # also capture sendto/sendmsg (stdout may be a socket)
    headers_cache_dir: str = "/var/cache/podtap/kernel-headers"
    btf_path: str = "/sys/kernel/btf/vmlinux"
    queue_bytes: int = 64 << 20  # captured bytes waiting for the pipeline (2 s at 200K lines/s)

    def validate(self) -> None:
        _require(self.chunk >= 256 and _pow2(self.chunk), "capture.chunk", "a power of two >= 256")
        _require(self.chunk <= 65536, "capture.chunk", "at most 65536")
        _require(4096 <= self.max_write <= 1 << 30, "capture.max_write", "in [4096, 1 GiB]")
        _require(16 <= self.copy_iterations <= 768, "capture.copy_iterations", "in [16, 768]")
        page = os.sysconf("SC_PAGE_SIZE")
        _require(
            _pow2(self.ring_bytes) and self.ring_bytes >= page,
            "capture.ring_bytes",
            "a power of two >= the page size",
        )
        _require(self.ring_bytes >= 2 * self.chunk, "capture.ring_bytes",
                 "at least twice capture.chunk (one record, chunk + header, must fit)")
        _require(self.max_containers >= 1, "capture.max_containers", ">= 1")
        _require(self.queue_bytes >= 1 << 20, "capture.queue_bytes", ">= 1 MiB")


@dataclass(frozen=True, slots=True)
class LinesConfig:
    max_line: int = 16384  # longer lines are split into pieces marked partial
    idle_flush_ms: int = 5000  # a partial line is flushed after this long without bytes
    max_streams: int = 65536  # (pid, stream) pairs with a pending partial line
    max_pending_bytes: int = 16 << 20  # bytes of pending partial lines, at most (oldest flushed)

    def validate(self) -> None:
        _require(self.max_line >= 1, "lines.max_line", ">= 1")
        _require(self.max_pending_bytes >= self.max_line, "lines.max_pending_bytes",
                 ">= lines.max_line")
        _require(self.idle_flush_ms >= 1, "lines.idle_flush_ms", ">= 1")
        _require(self.max_streams >= 1, "lines.max_streams", ">= 1")


@dataclass(frozen=True, slots=True)
class KubeConfig:
    kubelet_url: str = ""  # "" = https://$NODE_IP:10250
    token_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    insecure_skip_verify: bool = False
    timeout_s: float = 5.0
    retries: int = 3
    node_name: str = ""  # "" = $NODE_NAME, else the host name
    poll_interval_s: float = 10.0
    repoll_min_interval_ms: int = 200  # the fastest re-poll when an unknown container writes
    cgroup_roots: tuple[str, ...] = ("",)  # parents of kubepods(.slice), relative to the mount
    pods_cgroup: str = ""  # the pods' subtree (relative); "" = kubepods.slice or kubepods
    host_root: str = "/"  # where the host's / is seen (cgroup mount detection)
    proc_root: str = "/proc"  # the host's /proc (hostPID)
    deleted_grace_s: float = 60.0  # metadata of a gone container is kept this long
    hold_max_bytes: int = 16 << 20  # lines of not-yet-known containers kept, at most
    hold_timeout_s: float = 30.0  # then they are dropped (and counted)
    # Pods of podtap agents: their containers are never captured (nor this agent's own).
    agent_pod_selector: str = "app.kubernetes.io/name=podtap"
    # The API server, for what the kubelet cannot give (namespace labels).
    apiserver_url: str = ""  # "" = in-cluster (KUBERNETES_SERVICE_HOST/PORT)
    apiserver_ca_path: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    apiserver_insecure_skip_verify: bool = False
    namespace_watch_timeout_s: int = 300
    namespace_sync_wait_s: float = 2.0  # wait at start for the first namespace list

    def validate(self) -> None:
        if self.kubelet_url:
            from agent.kube.kubelet import KubeletConfig

            try:
                KubeletConfig(url=self.kubelet_url, token_path=None, ca_path=None)
            except ValueError as e:
                raise ConfigError(f"kube.kubelet_url: {e}") from e
        _require(self.timeout_s > 0, "kube.timeout_s", "> 0")
        _require(self.retries >= 0, "kube.retries", ">= 0")
        _require(self.poll_interval_s > 0, "kube.poll_interval_s", "> 0")
        _require(self.repoll_min_interval_ms >= 10, "kube.repoll_min_interval_ms", ">= 10")
        _require(self.deleted_grace_s >= 0, "kube.deleted_grace_s", ">= 0")
        _require(self.hold_max_bytes >= 0, "kube.hold_max_bytes", ">= 0")
        _require(self.hold_timeout_s > 0, "kube.hold_timeout_s", "> 0")
        from agent.kube.filters import FilterError, parse_selector

        try:
            parse_selector(self.agent_pod_selector)
        except FilterError as e:
            raise ConfigError(f"kube.agent_pod_selector: {e}") from e
        _require(bool(self.cgroup_roots), "kube.cgroup_roots", "a non-empty list")
        if self.apiserver_url:
            _require(self.apiserver_url.startswith("https://"), "kube.apiserver_url", "https://…")
        _require(
            1 <= self.namespace_watch_timeout_s <= 3600,
            "kube.namespace_watch_timeout_s",
            "in [1, 3600]",
        )
        _require(self.namespace_sync_wait_s >= 0, "kube.namespace_sync_wait_s", ">= 0")


@dataclass(frozen=True, slots=True)
class FiltersConfig:
    """Which containers and streams are captured (see agent/kube/filters.py)."""

    include_namespaces: tuple[str, ...] = ()
    exclude_namespaces: tuple[str, ...] = ()
    include_pod_labels: str = ""
    exclude_pod_labels: str = ""
    stdout: bool = True
    stderr: bool = True

    def validate(self) -> None:
        from agent.kube.filters import FilterError, Filters, parse_selector

        for key in ("include_pod_labels", "exclude_pod_labels"):
            try:
                parse_selector(getattr(self, key))
            except FilterError as e:
                raise ConfigError(f"filters.{key}: {e}") from e
        try:
            Filters(self)
        except FilterError as e:
            raise ConfigError(f"filters: {e}") from e


@dataclass(frozen=True, slots=True)
class RecordsConfig:
    schema: str = _choice("fluentbit", ("fluentbit", "otel"))
    dedot_labels: bool | None = None  # None = on for Elasticsearch sinks, else off
    include_annotations: bool = False
    include_namespace_labels: bool = False  # needs list/watch on namespaces (API server)
    include_node_labels: bool = False  # needs get on nodes (API server), read at start
    time_key: str = "time"
    timestamp_key_es: bool = False
    # Lines that are not valid UTF-8: "replace" (U+FFFD), "base64" (the exact bytes also in
    # message_base64), "escape" (invalid bytes as \udcXX escapes, decoded back exactly)
    invalid_utf8: str = _choice("replace", ("replace", "base64", "escape"))

    def validate(self) -> None:
        _require(self.schema in ("fluentbit", "otel"), "records.schema", "fluentbit or otel")
        _require(self.invalid_utf8 in ("replace", "base64", "escape"), "records.invalid_utf8",
                 "replace, base64 or escape")
        _require(bool(self.time_key), "records.time_key", "a non-empty string")
        from agent.records import RecordFormat

        try:
            RecordFormat.from_section(self)
        except ValueError as e:
            raise ConfigError(f"records.time_key: {e}") from e


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS of an HTTPS sink. The server certificate is verified unless told otherwise."""

    ca_file: str = ""  # "" = the system's CAs
    cert_file: str = ""  # client certificate (mTLS), with key_file
    key_file: str = ""
    server_name: str = ""  # expected name in the server certificate; "" = the URL's host
    insecure_skip_verify: bool = False  # logs a warning at start

    def validate(self, key: str) -> None:
        _require(
            bool(self.cert_file) == bool(self.key_file),
            f"{key}.cert_file",
            "set together with key_file (mTLS)",
        )


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Credentials of a sink: never inline in the configuration, from files or variables.

    Basic auth: `username` with `password_file` or `password_env`. Bearer: `token_file`
    (re-read when it changes) or `token_env`. Elasticsearch API key: `api_key_file` or
    `api_key_env` (the base64 `id:key` Elasticsearch returns as `encoded`).
    """

    username: str = ""
    password_file: str = ""
    password_env: str = ""
    token_file: str = ""
    token_env: str = ""
    api_key_file: str = ""
    api_key_env: str = ""

    def kinds(self) -> list[str]:
        out = []
        if self.username or self.password_file or self.password_env:
            out.append("basic")
        if self.token_file or self.token_env:
            out.append("bearer")
        if self.api_key_file or self.api_key_env:
            out.append("api_key")
        return out

    def validate(self, key: str) -> None:
        _require(len(self.kinds()) <= 1, key, "one of basic, bearer token or api key")
        if self.password_file or self.password_env:
            _require(bool(self.username), f"{key}.username", "set with a password")
        _require(
            not (self.password_file and self.password_env),
            f"{key}.password_file",
            "set without password_env",
        )
        _require(not (self.token_file and self.token_env), f"{key}.token_file",
                 "set without token_env")
        _require(not (self.api_key_file and self.api_key_env), f"{key}.api_key_file",
                 "set without api_key_env")


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """A batch closes at whichever comes first."""

    max_bytes: int = 1 << 20  # encoded items, before compression
    max_records: int = 10000
    max_age_s: float = 1.0

    def validate(self, key: str) -> None:
        _require(1024 <= self.max_bytes <= 64 << 20, f"{key}.max_bytes", "in [1 KiB, 64 MiB]")
        _require(self.max_records >= 1, f"{key}.max_records", ">= 1")
        _require(_finite(self.max_age_s) and 0.001 <= self.max_age_s <= 300,
                 f"{key}.max_age_s", "in [0.001, 300]")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Backoff between attempts: exponential from `initial_backoff_s`, full jitter, at most
    `max_backoff_s`; a Retry-After from the server is honoured up to `max_retry_after_s`.
    Retryable failures (429, 5xx, no answer) are retried until the buffers overflow."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 300.0

    def validate(self, key: str) -> None:
        _require(_finite(self.initial_backoff_s) and self.initial_backoff_s > 0,
                 f"{key}.initial_backoff_s", "> 0")
        _require(_finite(self.max_backoff_s) and self.max_backoff_s >= self.initial_backoff_s,
                 f"{key}.max_backoff_s", ">= initial_backoff_s")
        _require(_finite(self.max_retry_after_s) and self.max_retry_after_s >= 0,
                 f"{key}.max_retry_after_s", ">= 0")


@dataclass(frozen=True, slots=True)
class BufferConfig:
    """Batches waiting for acknowledgement: memory first, then a disk buffer.

    mode `overflow`: batches go to disk only when memory is full (and on shutdown);
    mode `always`: every batch is written to disk before it is sent (survives SIGKILL).
    `disk_dir` "" turns the disk buffer off: what does not fit in memory is dropped,
    counted. Each sink uses its own subdirectory `<disk_dir>/<sink name>`.
    """

    memory_bytes: int = 32 << 20
    disk_dir: str = ""
    disk_bytes: int = 1 << 30
    mode: str = _choice("overflow", ("overflow", "always"))
    fsync: bool = False  # fsync every disk write (see README: what an OS crash can lose)

    def validate(self, key: str) -> None:
        _require(self.memory_bytes >= 1 << 20, f"{key}.memory_bytes", ">= 1 MiB")
        _require(self.disk_bytes >= 1 << 20, f"{key}.disk_bytes", ">= 1 MiB")
        _require(self.mode in ("overflow", "always"), f"{key}.mode", "overflow or always")
        _require(self.mode == "overflow" or bool(self.disk_dir), f"{key}.disk_dir",
                 "set when mode is always")


@dataclass(frozen=True, slots=True)
class ElasticsearchConfig:
    """`_bulk` into a data stream (`create`, `@timestamp` set) or an index.

    `index` may hold a strftime date pattern of the record's UTC day (`logs-%Y.%m.%d`)
    when `data_stream` is off. `document_id`: a deterministic `_id` per record (a hash
    of container id, time, stream and message) so that a resend does not duplicate.
    """

    index: str = "logs-podtap-default"
    data_stream: bool = True
    document_id: bool = False
    pipeline: str = ""  # an ingest pipeline

    def validate(self, key: str) -> None:
        _require(bool(self.index), f"{key}.index", "a non-empty string")
        name = re.sub(r"%[a-zA-Z%]", "", self.index)  # strftime directives are not the name
        _require(name == name.lower(), f"{key}.index", "lower case")
        if self.data_stream:
            _require("%" not in self.index, f"{key}.index",
                     "without a date pattern when data_stream is on")


LOKI_LABELS = ("namespace", "pod", "container", "stream", "node", "app", "job", "pod_uid",
               "container_id", "image")
LOKI_ALWAYS_SET = ("namespace", "pod", "container", "stream", "node", "pod_uid", "container_id",
                   "job")


@dataclass(frozen=True, slots=True)
class LokiConfig:
    """Loki push. Stream labels come from `labels` (a small set: each value makes streams)
    and the pod labels named in `pod_labels`; the rest of the metadata goes as structured
    metadata (`metadata: structured`), inside the line as JSON (`json`), or nowhere."""

    labels: tuple[str, ...] = ("namespace", "pod", "container", "stream", "node")
    pod_labels: tuple[str, ...] = ()
    metadata: str = _choice("structured", ("structured", "json", "none"))
    tenant: str = ""  # X-Scope-OrgID

    def validate(self, key: str) -> None:
        for i, label in enumerate(self.labels):
            _require(label in LOKI_LABELS, f"{key}.labels[{i}]", f"one of {LOKI_LABELS}")
        _require(
            any(label in LOKI_ALWAYS_SET for label in self.labels),
            f"{key}.labels",
            f"a list with at least one label every container has ({', '.join(LOKI_ALWAYS_SET)})",
        )
        _require(len(self.labels) + len(self.pod_labels) <= 15, f"{key}.labels",
                 "at most 15 labels with pod_labels (Loki's default max_label_names_per_series)")
        _require(self.metadata in ("structured", "json", "none"), f"{key}.metadata",
                 "structured, json or none")


@dataclass(frozen=True, slots=True)
class HttpFormatConfig:
    format: str = _choice("ndjson", ("ndjson", "json_array"))

    def validate(self, key: str) -> None:
        _require(self.format in ("ndjson", "json_array"), f"{key}.format", "ndjson or json_array")


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """One destination. `kind` picks the backend; the HTTP options apply to every kind
    but stdout. `url`: the base URL (Elasticsearch, Loki: `/loki/api/v1/push` is added;
    OTLP: `/v1/logs` is added) or the full URL (http)."""

    kind: str = _choice("stdout", SINK_KINDS)
    url: str = ""
    gzip: bool = True
    gzip_level: int = 3
    timeout_s: float = 30.0
    # Requests out at once: each waits for the backend's answer, so the rate a sink can
    # ship is about max_in_flight batches per round trip (2 held 100K lines/s, not 200K,
    # into a loopback Loki with gzip; 4 held 200K).
    max_in_flight: int = 4
    headers: dict[str, str] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    dead_letter_dir: str = ""  # "" = <buffer.disk_dir>/<name>/dead, or none (counted only)
    dedot_labels: bool | None = None  # None = on for elasticsearch, else records.dedot_labels
    elasticsearch: ElasticsearchConfig = field(default_factory=ElasticsearchConfig)
    loki: LokiConfig = field(default_factory=LokiConfig)
    http: HttpFormatConfig = field(default_factory=HttpFormatConfig)

    def validate(self, key: str = "sink") -> None:
        _require(self.kind in SINK_KINDS, f"{key}.kind", f"one of {', '.join(SINK_KINDS)}")
        if self.kind != "stdout":
            _require(self.url.startswith(("http://", "https://")), f"{key}.url",
                     "an http:// or https:// URL")
            from urllib.parse import urlsplit

            try:
                parts = urlsplit(self.url)
                parts.port  # noqa: B018  # raises for a bad port
            except ValueError as e:
                raise ConfigError(f"{key}.url: {e}") from e
            _require(bool(parts.hostname), f"{key}.url", "a URL with a host")
        _require(0 <= self.gzip_level <= 9, f"{key}.gzip_level", "in [0, 9]")
        _require(_finite(self.timeout_s) and self.timeout_s > 0, f"{key}.timeout_s", "> 0")
        _require(1 <= self.max_in_flight <= 64, f"{key}.max_in_flight", "in [1, 64]")
        for name in self.headers:
            _require(name.lower() not in ("authorization", "content-encoding", "content-length"),
                     f"{key}.headers.{name}", "set by podtap (use auth or gzip)")
        self.tls.validate(f"{key}.tls")
        self.auth.validate(f"{key}.auth")
        self.batch.validate(f"{key}.batch")
        self.retry.validate(f"{key}.retry")
        self.buffer.validate(f"{key}.buffer")
        self.elasticsearch.validate(f"{key}.elasticsearch")
        self.loki.validate(f"{key}.loki")
        self.http.validate(f"{key}.http")


def _default_sinks() -> dict[str, SinkConfig]:
    return {"stdout": SinkConfig()}


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """The agent's own HTTP server: /metrics (Prometheus), /healthz, /readyz."""

    enabled: bool = True
    address: str = "0.0.0.0"
    port: int = 2020
    sink_failing_s: float = 300.0  # /readyz fails when a sink failed this long

    def validate(self) -> None:
        _require(0 <= self.port <= 65535, "telemetry.port", "in [0, 65535] (0: any free port)")
        _require(bool(self.address), "telemetry.address", "an address")
        _require(_finite(self.sink_failing_s) and self.sink_failing_s > 0,
                 "telemetry.sink_failing_s", "> 0")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    shutdown_grace_s: float = 10.0  # SIGTERM: time to deliver what is buffered
    log_format: str = _choice("json", ("json", "text"))  # the agent's own log on stderr

    def validate(self) -> None:
        _require(_finite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0,
                 "agent.shutdown_grace_s", ">= 0")
        _require(self.log_format in ("json", "text"), "agent.log_format", "json or text")


@dataclass(frozen=True, slots=True)
class Config:
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    lines: LinesConfig = field(default_factory=LinesConfig)
    kube: KubeConfig = field(default_factory=KubeConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    sinks: dict[str, SinkConfig] = field(default_factory=_default_sinks)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "sinks":
                getattr(self, f.name).validate()
        _require(bool(self.sinks), "sinks", "at least one sink")
        for name, sink in self.sinks.items():
            _require(bool(_SINK_NAME.fullmatch(name)), f"sinks.{name}",
                     "named with [a-z0-9_-] (at most 63 characters)")
            sink.validate(f"sinks.{name}")
        stdout = [n for n, s in self.sinks.items() if s.kind == "stdout"]
        _require(len(stdout) <= 1, f"sinks.{stdout[-1] if stdout else ''}", "the only stdout sink")


_SINK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def _finite(x: float) -> bool:
    return math.isfinite(x)


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check/convert one value against its annotation (str from the environment too)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(key, value, args[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key} must be a boolean, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        value_hint = typing.get_args(hint)[1]
        return {str(k): _coerce(f"{key}.{k}", v, value_hint) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(key, hint, value)
    return value


def _build(prefix: str, cls: Any, data: Any) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown configuration key {where}{sorted(unknown)[0]}")
    kwargs = {
        name: _coerce(f"{prefix}.{name}" if prefix else name, value, hints[name])
        for name, value in data.items()
    }
    return cls(**kwargs)


# PODTAP_* variables that are not configuration keys (read elsewhere).
NON_CONFIG_VARIABLES = frozenset({"PODTAP_LOG_LEVEL", "PODTAP_BPF_DIR"})


def _env_overrides(
    environ: dict[str, str],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The overrides as nested sections, and which variable set each dotted key."""
    out: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    sections = [f.name for f in dataclasses.fields(Config) if f.name != "sinks"]
    for name, value in environ.items():
        if not name.startswith("PODTAP_") or name in NON_CONFIG_VARIABLES:
            continue
        rest = name[len("PODTAP_") :].lower()
        if rest.startswith("sinks__"):  # PODTAP_SINKS__<NAME>__<KEY>[__<KEY>...]
            path = rest.split("__")[1:]
            if len(path) < 2 or not all(path):
                raise ConfigError(f"{name}: expected PODTAP_SINKS__<NAME>__<KEY>")
            node: dict[str, Any] = out.setdefault("sinks", {})
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
            origins["sinks." + ".".join(path)] = name
            continue
        section = next((sec for sec in sections if rest.startswith(sec + "_")), None)
        if section is None:
            log.warning(
                "environment variable %s matches no configuration section (%s, or "
                "PODTAP_SINKS__<NAME>__<KEY>); ignored",
                name,
                ", ".join(sections),
            )
            continue
        key = rest[len(section) + 1 :]
        out.setdefault(section, {})[key] = value
        origins[f"{section}.{key}"] = name
    return out, origins


def _merge(target: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = dict(target[key])
            _merge(target[key], value)
        else:
            target[key] = value


def _name_the_variable(error: ConfigError, origins: dict[str, str]) -> ConfigError:
    """An error about a value that came from the environment names the variable too."""
    text = str(error)
    for key, variable in origins.items():
        if text.startswith((key + " ", key + ":")) or text.endswith(" " + key):
            return ConfigError(f"{variable} (configuration key {key}): {text}")
    return error


def config_from_dict(data: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    overrides, origins = _env_overrides(dict(os.environ if environ is None else environ))
    for section, values in overrides.items():
        if merged.get(section) is None:  # a section with every key commented out
            merged[section] = {}
        target = merged[section]
        if not isinstance(target, dict):
            raise ConfigError(f"{section} must be a mapping")
        _merge(target, values)
    try:
        cfg = _build("", Config, merged)
        assert isinstance(cfg, Config)
        cfg.validate()
    except ConfigError as e:
        raise _name_the_variable(e, origins) from None
    return cfg


def load_config(path: str | None = None, environ: dict[str, str] | None = None) -> Config:
    data: Any = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
            if data is None:  # an empty file
                data = {}
        except OSError as e:
            raise ConfigError(f"cannot read configuration {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"configuration {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"configuration {path} must be a mapping at the top level")
    return config_from_dict(data, environ)


# --- JSON Schema and the effective configuration ------------------------------------------


def _schema_of(hint: Any, default: Any = dataclasses.MISSING, meta: Any = None) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    out: dict[str, Any]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        out = {"anyOf": [_schema_of(args[0]), {"type": "null"}]}
    elif hint is bool:
        out = {"type": "boolean"}
    elif hint is int:
        out = {"type": "integer"}
    elif hint is float:
        out = {"type": "number"}
    elif hint is str:
        out = {"type": "string"}
        if meta and "enum" in meta:
            out["enum"] = list(meta["enum"])
    elif origin in (list, tuple):
        out = {"type": "array", "items": _schema_of(typing.get_args(hint)[0])}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": _schema_of(typing.get_args(hint)[1])}
    elif dataclasses.is_dataclass(hint):
        out = _dataclass_schema(hint)
    else:
        raise TypeError(f"no JSON Schema for {hint!r}")
    if default is not dataclasses.MISSING and not dataclasses.is_dataclass(default):
        out["default"] = _plain(default)
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _dataclass_schema(cls: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        properties[f.name] = _schema_of(hints[f.name], default, f.metadata)
    doc = (cls.__doc__ or "").strip()
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if doc and not doc.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(doc.split())
    schema["properties"] = properties
    return schema


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the YAML configuration, from the same dataclasses
    that load it. Ranges and cross-field rules are checked by `validate()` only."""
    schema = _dataclass_schema(Config)
    schema.pop("description", None)
    schema["properties"]["sinks"]["propertyNames"] = {"pattern": "^" + _SINK_NAME.pattern + "$"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "podtap configuration",
        **schema,
    }


_MASK = "***"


def _mask_url(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{_MASK}@{host}"))


def effective_config(cfg: Config) -> dict[str, Any]:
    """The configuration as plain data, secrets masked: header values and passwords in
    URLs (credentials themselves are only ever named by file or variable)."""
    data = dataclasses.asdict(cfg)
    for sink in data["sinks"].values():
        sink["url"] = _mask_url(sink["url"])
        sink["headers"] = {name: _MASK for name in sink["headers"]}
    data["kube"]["kubelet_url"] = _mask_url(data["kube"]["kubelet_url"])
    data["kube"]["apiserver_url"] = _mask_url(data["kube"]["apiserver_url"])
    return data
