"""Typed configuration: one object, built from a YAML file and PODTAP_* variables.

Every section is a frozen dataclass with defaults; `load_config()` validates
types and ranges and raises ConfigError naming the offending key.  Environment
variables override the file: `PODTAP_<SECTION>_<KEY>` (e.g.
`PODTAP_CAPTURE_MAX_WRITE=4194304`, `PODTAP_SINK_KIND=loki`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(Exception):
    """Invalid configuration; the message names the key."""


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    max_write: int = 1 << 20  # bytes of one write() copied; the rest is counted as truncated
    chunk: int = 16384  # bytes per ring-buffer record at most (power of two)
    copy_iterations: int = 512  # copy-loop iterations per BPF program (x33 with tail calls)
    ring_bytes: int = 64 << 20  # ring buffer size (power of two, multiple of the page size)
    max_containers: int = 16384
    socket_syscalls: bool = True  # also capture sendto/sendmsg (stdout may be a socket)
    headers_cache_dir: str = "/var/cache/podtap/kernel-headers"
    btf_path: str = "/sys/kernel/btf/vmlinux"
    queue_bytes: int = 256 << 20  # captured bytes waiting for the pipeline, at most

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
        _require(self.max_containers >= 1, "capture.max_containers", ">= 1")
        _require(self.queue_bytes >= 1 << 20, "capture.queue_bytes", ">= 1 MiB")


@dataclass(frozen=True, slots=True)
class LinesConfig:
    max_line: int = 16384  # longer lines are split into pieces marked partial
    idle_flush_ms: int = 5000  # a partial line is flushed after this long without bytes
    max_streams: int = 65536  # (pid, stream) pairs with a pending partial line

    def validate(self) -> None:
        _require(self.max_line >= 1, "lines.max_line", ">= 1")
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
        from agent.kube.filters import FilterConfig, FilterError, parse_selector

        for key in ("include_pod_labels", "exclude_pod_labels"):
            try:
                parse_selector(getattr(self, key))
            except FilterError as e:
                raise ConfigError(f"filters.{key}: {e}") from e
        try:
            FilterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        except FilterError as e:
            raise ConfigError(f"filters: {e}") from e


@dataclass(frozen=True, slots=True)
class RecordsConfig:
    schema: str = "fluentbit"  # or "otel"
    dedot_labels: bool | None = None  # None = on for Elasticsearch sinks, else off
    include_annotations: bool = False
    include_namespace_labels: bool = False  # needs list/watch on namespaces (API server)
    include_node_labels: bool = False  # needs get on nodes (API server), read at start
    time_key: str = "time"
    timestamp_key_es: bool = False

    def validate(self) -> None:
        _require(self.schema in ("fluentbit", "otel"), "records.schema", "fluentbit or otel")
        _require(bool(self.time_key), "records.time_key", "a non-empty string")
        from agent.records import RecordFormat

        try:
            RecordFormat(
                schema=self.schema,  # type: ignore[arg-type]
                time_key=self.time_key,
                timestamp_key_es=self.timestamp_key_es,
            )
        except ValueError as e:
            raise ConfigError(f"records.time_key: {e}") from e


@dataclass(frozen=True, slots=True)
class SinkConfig:
    kind: str = "stdout"

    def validate(self) -> None:
        _require(self.kind in ("stdout",), "sink.kind", "stdout (the only sink so far)")


@dataclass(frozen=True, slots=True)
class Config:
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    lines: LinesConfig = field(default_factory=LinesConfig)
    kube: KubeConfig = field(default_factory=KubeConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
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
        return {str(k): _coerce(f"{key}.{k}", v, str) for k, v in value.items()}
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


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, value in environ.items():
        if not name.startswith("PODTAP_"):
            continue
        rest = name[len("PODTAP_") :].lower()
        for section in sections:
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1 :]] = value
                break
    return out


def config_from_dict(data: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, values in _env_overrides(dict(os.environ if environ is None else environ)).items():
        if merged.get(section) is None:  # a section with every key commented out
            merged[section] = {}
        target = merged[section]
        if not isinstance(target, dict):
            raise ConfigError(f"{section} must be a mapping")
        target.update(values)
    cfg = _build("", Config, merged)
    assert isinstance(cfg, Config)
    cfg.validate()
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
