"""Tests of agent.config: YAML file + PODTAP_<SECTION>_<KEY> variables -> a validated Config.

Every bad input must raise ConfigError whose message names the offending key (or the file).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import (
    AgentConfig,
    CaptureConfig,
    Config,
    ConfigError,
    FiltersConfig,
    KubeConfig,
    LinesConfig,
    RecordsConfig,
    TelemetryConfig,
    config_from_dict,
    load_config,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
SECTIONS: dict[str, type[Any]] = {
    "capture": CaptureConfig,
    "lines": LinesConfig,
    "kube": KubeConfig,
    "filters": FiltersConfig,
    "records": RecordsConfig,
    "telemetry": TelemetryConfig,
    "agent": AgentConfig,
}


def all_fields() -> list[tuple[str, str, Any]]:
    """(section, key, type hint) of every configuration key."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((section, f.name, hints[f.name]))
    return out


FIELDS = all_fields()


def write(tmp_path: Path, text: str, name: str = "podtap.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def config_error(data: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, environ or {})
    return str(info.value)


# --- defaults ------------------------------------------------------------------------------


def test_config_field_table_is_complete() -> None:
    """The tables below walk every section; a new section must be added to SECTIONS."""
    assert {f.name for f in dataclasses.fields(Config)} == set(SECTIONS) | {"sinks"}
    hints = typing.get_type_hints(Config)
    assert {name: hints[name] for name in SECTIONS} == SECTIONS


def test_defaults_validate() -> None:
    cfg = Config()
    cfg.validate()
    for section in SECTIONS:
        getattr(cfg, section).validate()


@pytest.mark.parametrize("path", [None, ""])
def test_no_file_and_no_env_gives_defaults(path: str | None) -> None:
    assert load_config(path, environ={}) == Config()
    assert config_from_dict({}, {}) == Config()


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PODTAP_LINES_MAX_LINE", "77")
    assert load_config(None).lines.max_line == 77
    assert config_from_dict({}).lines.max_line == 77
    assert load_config(None, environ={}).lines.max_line == LinesConfig().max_line


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.capture.chunk = 1  # type: ignore[misc]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "~\n"])
def test_empty_yaml_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text), environ={}) == Config()


@pytest.mark.parametrize("section", list(SECTIONS))
def test_null_section_gives_its_defaults(tmp_path: Path, section: str) -> None:
    cfg = load_config(write(tmp_path, f"{section}:\n"), environ={})
    assert cfg == Config()


# --- YAML files ----------------------------------------------------------------------------

FULL_YAML = """\
capture:
  max_write: 0x400000        # YAML 1.1 hex int
  chunk: 8192
  copy_iterations: 256
  ring_bytes: 33554432
  max_containers: 100
  socket_syscalls: no
  headers_cache_dir: /tmp/headers
  btf_path: /tmp/vmlinux
  queue_bytes: 2097152
lines:
  max_line: 1000
  idle_flush_ms: 250
  max_streams: 17
  max_pending_bytes: 2000
kube:
  kubelet_url: https://10.0.0.1:10250
  token_path: /tmp/token
  ca_path: /tmp/ca.crt
  insecure_skip_verify: true
  timeout_s: 2          # an int for a float
  retries: 0
  node_name: node-7
  poll_interval_s: 0.5
  repoll_min_interval_ms: 50
  cgroup_roots: ["", kubelet.slice]
  pods_cgroup: kubepods.slice
  host_root: /host
  proc_root: /host/proc
  deleted_grace_s: 0
  hold_max_bytes: 0
  hold_timeout_s: 1.5
  agent_pod_selector: "app=log-agent"
  apiserver_url: https://10.0.0.2:6443
  apiserver_ca_path: /tmp/api-ca.crt
  apiserver_insecure_skip_verify: true
  namespace_watch_timeout_s: 60
  namespace_sync_wait_s: 0.5
filters:
  include_namespaces: [shop, "team-*"]
  exclude_namespaces: [kube-system]
  include_pod_labels: "app in (web,api),tier!=db"
  exclude_pod_labels: "!keep"
  stdout: false
  stderr: false
records:
  schema: otel
  dedot_labels: true
  include_annotations: true
  include_namespace_labels: true
  include_node_labels: true
  time_key: ts
  timestamp_key_es: true
  invalid_utf8: base64
telemetry:
  enabled: false
  address: 127.0.0.1
  port: 9000
  sink_failing_s: 30
agent:
  shutdown_grace_s: 3
  log_format: text
"""

FULL = Config(
    capture=CaptureConfig(
        max_write=0x400000,
        chunk=8192,
        copy_iterations=256,
        ring_bytes=32 << 20,
        max_containers=100,
        socket_syscalls=False,
        headers_cache_dir="/tmp/headers",
        btf_path="/tmp/vmlinux",
        queue_bytes=2 << 20,
    ),
    lines=LinesConfig(max_line=1000, idle_flush_ms=250, max_streams=17, max_pending_bytes=2000),
    kube=KubeConfig(
        kubelet_url="https://10.0.0.1:10250",
        token_path="/tmp/token",
        ca_path="/tmp/ca.crt",
        insecure_skip_verify=True,
        timeout_s=2.0,
        retries=0,
        node_name="node-7",
        poll_interval_s=0.5,
        repoll_min_interval_ms=50,
        cgroup_roots=("", "kubelet.slice"),
        pods_cgroup="kubepods.slice",
        host_root="/host",
        proc_root="/host/proc",
        deleted_grace_s=0.0,
        hold_max_bytes=0,
        hold_timeout_s=1.5,
        agent_pod_selector="app=log-agent",
        apiserver_url="https://10.0.0.2:6443",
        apiserver_ca_path="/tmp/api-ca.crt",
        apiserver_insecure_skip_verify=True,
        namespace_watch_timeout_s=60,
        namespace_sync_wait_s=0.5,
    ),
    filters=FiltersConfig(
        include_namespaces=("shop", "team-*"),
        exclude_namespaces=("kube-system",),
        include_pod_labels="app in (web,api),tier!=db",
        exclude_pod_labels="!keep",
        stdout=False,
        stderr=False,
    ),
    records=RecordsConfig(
        schema="otel",
        dedot_labels=True,
        include_annotations=True,
        include_namespace_labels=True,
        include_node_labels=True,
        time_key="ts",
        timestamp_key_es=True,
        invalid_utf8="base64",
    ),
    telemetry=TelemetryConfig(enabled=False, address="127.0.0.1", port=9000, sink_failing_s=30.0),
    agent=AgentConfig(shutdown_grace_s=3.0, log_format="text"),
)


def test_full_yaml_file_sets_every_key(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, FULL_YAML), environ={})
    assert cfg == FULL
    # Every key of every section differs from its default: nothing was silently ignored.
    for section, key, _hint in FIELDS:
        assert getattr(getattr(cfg, section), key) != getattr(getattr(Config(), section), key), (
            f"{section}.{key} kept its default"
        )
    # Types are the annotated ones, not what YAML produced.
    assert isinstance(cfg.kube.timeout_s, float)
    assert isinstance(cfg.kube.cgroup_roots, tuple)
    assert isinstance(cfg.filters.include_namespaces, tuple)


def test_partial_section_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "kube:\n  retries: 7\nlines: {max_line: 9}\n"), environ={})
    assert cfg == dataclasses.replace(
        Config(),
        kube=KubeConfig(retries=7),
        lines=LinesConfig(max_line=9),
    )


def test_optional_bool_accepts_null(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "records:\n  dedot_labels: null\n"), environ={})
    assert cfg.records.dedot_labels is None
    cfg = load_config(write(tmp_path, "records:\n  dedot_labels: false\n"), environ={})
    assert cfg.records.dedot_labels is False


# --- environment overrides -----------------------------------------------------------------


def test_env_overrides_file_and_keeps_other_file_keys(tmp_path: Path) -> None:
    text = "capture:\n  max_write: 8192\n  chunk: 4096\nagent: {log_format: text}\n"
    path = write(tmp_path, text)
    cfg = load_config(path, environ={"PODTAP_CAPTURE_MAX_WRITE": "0x10000"})
    assert cfg.capture.max_write == 0x10000
    assert cfg.capture.chunk == 4096
    assert cfg.agent.log_format == "text"


def test_env_adds_a_section_missing_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "lines:\n  max_line: 5\n")
    cfg = load_config(path, environ={"PODTAP_KUBE_NODE_NAME": "n1", "PODTAP_KUBE_RETRIES": "1"})
    assert cfg.kube == KubeConfig(node_name="n1", retries=1)
    assert cfg.lines.max_line == 5


def test_env_override_into_a_null_yaml_section(tmp_path: Path) -> None:
    path = write(tmp_path, "capture:\n  # max_write: 4096\n")
    cfg = load_config(path, environ={"PODTAP_CAPTURE_MAX_WRITE": "8192"})
    assert cfg.capture.max_write == 8192


def test_env_does_not_change_the_caller_data() -> None:
    data: dict[str, Any] = {"kube": {"retries": 2}}
    cfg = config_from_dict(data, {"PODTAP_KUBE_RETRIES": "5"})
    assert cfg.kube.retries == 5
    assert data == {"kube": {"retries": 2}}


@pytest.mark.parametrize(
    ("dotted", "text", "expected"),
    [
        ("capture.max_write", "4194304", 4194304),
        ("capture.max_write", "0x400000", 0x400000),
        ("capture.max_write", "0X400000", 0x400000),
        ("capture.max_write", "0o20000000", 0o20000000),
        ("capture.max_write", "0b1" + "0" * 22, 1 << 22),
        ("capture.max_write", "4_194_304", 4194304),
        ("capture.chunk", "0x1000", 4096),
        ("kube.retries", "0", 0),
        ("capture.socket_syscalls", "off", False),
        ("kube.insecure_skip_verify", "Yes", True),
        ("filters.stderr", "0", False),
        ("filters.stdout", "ON", True),
        ("kube.timeout_s", "0.25", 0.25),
        ("kube.timeout_s", "3", 3.0),
        ("kube.hold_timeout_s", "1e-3", 0.001),
        ("kube.cgroup_roots", "a, b.slice ,,c", ("a", "b.slice", "c")),
        ("kube.cgroup_roots", "/", ("/",)),
        ("filters.include_namespaces", "shop", ("shop",)),
        ("filters.exclude_namespaces", "", ()),
        ("filters.include_pod_labels", "app=web, tier in (a,b)", "app=web, tier in (a,b)"),
        ("records.dedot_labels", "true", True),
        ("records.dedot_labels", "OFF", False),
        ("records.dedot_labels", "", None),
        ("records.schema", "otel", "otel"),
        ("kube.node_name", "", ""),
        ("kube.kubelet_url", "https://[fd00::1]:10250", "https://[fd00::1]:10250"),
        ("agent.log_format", "text", "text"),
    ],
)
def test_env_override_coercion(dotted: str, text: str, expected: object) -> None:
    section, key = dotted.split(".")
    cfg = config_from_dict({}, {f"PODTAP_{section.upper()}_{key.upper()}": text})
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_env_names_are_case_insensitive_after_the_prefix() -> None:
    assert config_from_dict({}, {"PODTAP_lines_Max_Line": "12"}).lines.max_line == 12


@pytest.mark.parametrize(
    "env",
    [
        {"PODTAP_LOG_LEVEL": "debug"},  # read by the CLI
        {"PODTAP_BPF_DIR": "/x"},  # read by the probe
        {"PODTAP_": "x"},
        {"PODTAP_CAPTUREMAX_WRITE": "1"},  # no section matches: not ours
        {"PODTAPX_CAPTURE_MAX_WRITE": "1"},
        {"podtap_capture_max_write": "1"},  # the prefix is case-sensitive
        {"CAPTURE_MAX_WRITE": "1"},
    ],
)
def test_env_variables_outside_the_sections_are_ignored(env: dict[str, str]) -> None:
    assert config_from_dict({}, env) == Config()


# --- property-based coercion ---------------------------------------------------------------

INT_FORMATS = (str, hex, oct, bin, lambda n: f"{n:_}", lambda n: f" {n} ", lambda n: f"+{n}")


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=4096, max_value=1 << 30),
    st.sampled_from(INT_FORMATS),
    st.booleans(),
)
def test_env_int_in_any_python_literal_form(n: int, fmt: Any, upper: bool) -> None:
    text = fmt(n)
    text = text.upper() if upper else text
    cfg = config_from_dict({}, {"PODTAP_CAPTURE_MAX_WRITE": text})
    assert cfg.capture.max_write == n


BOOL_FIELDS = [(s, f) for s, f, h in FIELDS if h is bool]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["true", "1", "yes", "on", "false", "0", "no", "off"]),
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.sampled_from(BOOL_FIELDS),
)
def test_env_bool_words_in_any_case(word: str, upper: list[bool], field: tuple[str, str]) -> None:
    section, key = field
    text = "".join(c.upper() if u else c for c, u in zip(word, upper, strict=False))
    cfg = config_from_dict({}, {f"PODTAP_{section.upper()}_{key.upper()}": text})
    assert getattr(getattr(cfg, section), key) is (word in ("true", "1", "yes", "on"))


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_env_float_round_trips(x: float) -> None:
    for text in (repr(x), f"{x:e}", f"{x:.17g}"):
        cfg = config_from_dict({}, {"PODTAP_KUBE_POLL_INTERVAL_S": text})
        assert cfg.kube.poll_interval_s == float(text)


NAMES = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="-_.*/"),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(NAMES, min_size=1, max_size=6),
    st.lists(st.sampled_from(["", " ", "  ", "\t"]), min_size=14, max_size=14),
    st.integers(min_value=0, max_value=3),
)
def test_env_comma_lists_for_tuple_fields(items: list[str], pads: list[str], empties: int) -> None:
    parts = [f"{pads[i % 14]}{item}{pads[(i + 7) % 14]}" for i, item in enumerate(items)]
    text = ",".join(parts + [" "] * empties)
    cfg = config_from_dict(
        {},
        {
            "PODTAP_KUBE_CGROUP_ROOTS": text,
            "PODTAP_FILTERS_INCLUDE_NAMESPACES": text,
            "PODTAP_FILTERS_EXCLUDE_NAMESPACES": text,
        },
    )
    assert cfg.kube.cgroup_roots == tuple(items)
    assert cfg.filters.include_namespaces == tuple(items)
    assert cfg.filters.exclude_namespaces == tuple(items)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=10).filter(lambda s: "\0" not in s and _not_an_int(s)))
def test_env_non_integer_text_is_rejected_naming_the_key(text: str) -> None:
    message = config_error({}, {"PODTAP_LINES_MAX_STREAMS": text})
    assert "lines.max_streams" in message


def _not_an_int(s: str) -> bool:
    try:
        int(s, 0)
    except ValueError:
        return True
    return False


SMALL_INTS = st.integers(min_value=1, max_value=1 << 20)


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A random valid configuration as YAML-shaped data."""
    pow2 = st.integers(min_value=8, max_value=16).map(lambda e: 1 << e)
    chunk = draw(pow2)
    return {
        "capture": {
            "max_write": draw(st.integers(min_value=4096, max_value=1 << 30)),
            "chunk": chunk,
            "copy_iterations": draw(st.integers(min_value=16, max_value=768)),
            "ring_bytes": max(PAGE, 2 * chunk) << draw(st.integers(min_value=0, max_value=8)),
            "socket_syscalls": draw(st.booleans()),
        },
        "lines": {"max_line": draw(SMALL_INTS), "idle_flush_ms": draw(SMALL_INTS)},
        "kube": {
            "timeout_s": draw(st.floats(min_value=0.001, max_value=100)),
            "retries": draw(st.integers(min_value=0, max_value=10)),
            "cgroup_roots": draw(st.lists(NAMES, min_size=1, max_size=3)),
            "node_name": draw(NAMES),
            "deleted_grace_s": draw(st.floats(min_value=0, max_value=1000)),
        },
        "filters": {
            "include_namespaces": draw(st.lists(NAMES, max_size=3)),
            "stdout": draw(st.booleans()),
        },
        "records": {
            "schema": draw(st.sampled_from(["fluentbit", "otel"])),
            "dedot_labels": draw(st.none() | st.booleans()),
        },
    }


@settings(max_examples=100, deadline=None)
@given(valid_configs())
def test_yaml_round_trip(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(str(path), environ={})
    for section, values in data.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), (section, key)


# --- unknown keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "env", "key"),
    [
        ({"bogus": 1}, {}, "bogus"),
        ({"capture": {}, "Capture": {}}, {}, "Capture"),
        ({"capture": {"max_writes": 4096}}, {}, "capture.max_writes"),
        ({"kube": {"kubelet": "https://x"}}, {}, "kube.kubelet"),
        ({"records": {"schema": "otel", "typo": 1}}, {}, "records.typo"),
        ({}, {"PODTAP_CAPTURE_BOGUS": "1"}, "capture.bogus"),
        ({}, {"PODTAP_TELEMETRY_URL": "http://x"}, "telemetry.url"),
        ({}, {"PODTAP_KUBE_": "1"}, "kube."),
    ],
)
def test_unknown_key_is_named(data: dict[str, Any], env: dict[str, str], key: str) -> None:
    message = config_error(data, env)
    assert "unknown" in message
    assert message.endswith(key)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_unknown_key_in_every_section(section: str) -> None:
    message = config_error({section: {"no_such_key": 1}})
    assert f"{section}.no_such_key" in message


# --- wrong types ---------------------------------------------------------------------------


def bad_values(hint: Any) -> list[Any]:
    """Values of the wrong type for a field annotated `hint`."""
    origin = typing.get_origin(hint)
    if hint is bool:
        return [1, 0, "maybe", "", 1.0, [True], {"a": True}, None]
    if hint is int:
        return [True, False, "abc", "", "1.5", 1.5, 4096.0, [1], {"a": 1}, None]
    if hint is float:
        return [True, "abc", "", [1.0], {"a": 1}, None]
    if hint is str:
        return [1, True, 1.5, ["a"], {"a": "b"}, None]
    if origin is tuple:
        return [1, True, 1.5, {"a": "b"}, [1], ["a", 2], [["a"]], [None]]
    if origin in (typing.Union, __import__("types").UnionType):  # bool | None
        return [1, 0, "maybe", 1.0, [True], {"a": True}]
    raise AssertionError(f"no bad values for {hint!r}")


TYPE_CASES = [
    pytest.param(section, key, value, id=f"{section}.{key}={value!r}")
    for section, key, hint in FIELDS
    for value in bad_values(hint)
]


@pytest.mark.parametrize(("section", "key", "value"), TYPE_CASES)
def test_wrong_type_is_rejected_naming_the_key(section: str, key: str, value: Any) -> None:
    message = config_error({section: {key: value}})
    assert f"{section}.{key}" in message


@pytest.mark.parametrize(
    ("section", "key", "hint"),
    [(s, k, h) for s, k, h in FIELDS if h in (bool, int, float)],
)
def test_wrong_type_from_env_is_rejected_naming_the_key(section: str, key: str, hint: Any) -> None:
    env = {f"PODTAP_{section.upper()}_{key.upper()}": "not-a-value"}
    message = config_error({}, env)
    assert f"{section}.{key}" in message


@pytest.mark.parametrize("section", list(SECTIONS))
@pytest.mark.parametrize("value", [5, "x", [1], True])
def test_section_that_is_not_a_mapping(section: str, value: Any) -> None:
    message = config_error({section: value})
    assert message.startswith(f"{section} must be a mapping")
    message = config_error({section: value}, {f"PODTAP_{section.upper()}_X": "1"})
    assert section in message


# --- out-of-range values -------------------------------------------------------------------

# (section, key, valid boundary values, invalid values)
RANGE_CASES: list[tuple[str, str, list[Any], list[Any]]] = [
    (
        "capture",
        "chunk",
        [256, 512, 4096, 65536],
        [0, 1, 128, 255, 300, 1000, 4095, 65535, 131072, -256],
    ),
    ("capture", "max_write", [4096, 4097, 1 << 30], [0, -1, 4095, (1 << 30) + 1, 1 << 31]),
    ("capture", "copy_iterations", [16, 768], [15, 769, 0, -1]),
    (
        "capture",
        "ring_bytes",
        [2 * CaptureConfig().chunk, 4 * CaptureConfig().chunk, 1 << 30],
        [0, -PAGE, PAGE // 2, PAGE, CaptureConfig().chunk, PAGE * 3, PAGE + 1, (1 << 30) - 1],
    ),
    ("capture", "max_containers", [1], [0, -1]),
    ("capture", "queue_bytes", [1 << 20], [(1 << 20) - 1, 0]),
    ("lines", "max_line", [1], [0, -1]),
    ("lines", "idle_flush_ms", [1], [0, -5]),
    ("lines", "max_streams", [1], [0]),
    (
        "kube",
        "kubelet_url",
        ["", "https://10.0.0.1:10250", "https://node"],
        ["http://10.0.0.1:10250", "10.0.0.1:10250", "ftp://x", "HTTP://x", " https://x"],
    ),
    ("kube", "timeout_s", [0.001, 1], [0, -1, float("nan")]),
    ("kube", "retries", [0, 5], [-1]),
    ("kube", "poll_interval_s", [0.01], [0, -0.5, float("nan")]),
    ("kube", "repoll_min_interval_ms", [10], [9, 0, -10]),
    ("kube", "deleted_grace_s", [0, 0.5], [-0.001, float("nan")]),
    ("kube", "hold_max_bytes", [0, 1 << 30], [-1]),
    ("kube", "hold_timeout_s", [0.001], [0, -1, float("nan")]),
    ("kube", "cgroup_roots", [[""], ["/"], ["a", "b"]], [[]]),
    ("records", "schema", ["fluentbit", "otel"], ["", "json", "Fluentbit", "OTEL", "gelf"]),
    ("records", "time_key", ["time", "@timestamp", "ts"], [""]),
    ("agent", "log_format", ["json", "text"], ["", "JSON", "logfmt"]),
]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [pytest.param(s, k, v, id=f"{s}.{k}={v!r}") for s, k, good, _bad in RANGE_CASES for v in good],
)
def test_boundary_values_are_accepted(section: str, key: str, value: Any) -> None:
    cfg = config_from_dict({section: {key: value}}, {})
    got = getattr(getattr(cfg, section), key)
    assert got == (tuple(value) if isinstance(value, list) else value)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [pytest.param(s, k, v, id=f"{s}.{k}={v!r}") for s, k, _good, bad in RANGE_CASES for v in bad],
)
def test_out_of_range_is_rejected_naming_the_key(section: str, key: str, value: Any) -> None:
    message = config_error({section: {key: value}})
    assert f"{section}.{key}" in message
    if not isinstance(value, list):  # the same through the environment
        text = repr(value) if isinstance(value, float) else str(value)
        message = config_error({}, {f"PODTAP_{section.upper()}_{key.upper()}": text})
        assert f"{section}.{key}" in message


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(1 << 40), max_value=1 << 40))
def test_chunk_and_ring_bytes_need_powers_of_two(n: int) -> None:
    pow2 = n > 0 and n & (n - 1) == 0
    for key, ok in (
        ("chunk", pow2 and 256 <= n <= 65536),
        ("ring_bytes", pow2 and n >= max(PAGE, 2 * CaptureConfig().chunk)),
    ):
        if ok:
            assert getattr(config_from_dict({"capture": {key: n}}, {}).capture, key) == n
        else:
            assert f"capture.{key}" in config_error({"capture": {key: n}})


@pytest.mark.parametrize(
    ("key", "selector"),
    [
        (key, selector)
        for key in ("include_pod_labels", "exclude_pod_labels")
        for selector in ("a b", "x in ()", "=v", "k in (a", "-bad=1", "k>x", "a,,b", "k=v=w")
    ],
)
def test_bad_label_selector_is_a_config_error(key: str, selector: str) -> None:
    message = config_error({"filters": {key: selector}})
    assert message.startswith("filters")
    assert repr(selector) in message


@pytest.mark.parametrize("key", ["include_pod_labels", "exclude_pod_labels"])
def test_bad_label_selector_names_its_key(key: str) -> None:
    message = config_error({"filters": {key: "a b"}})
    assert f"filters.{key}" in message


@pytest.mark.parametrize("url", ["https://", "https://:10250", "https:///pods"])
def test_kubelet_url_without_host_is_rejected(url: str) -> None:
    assert "kube.kubelet_url" in config_error({"kube": {"kubelet_url": url}})


@pytest.mark.parametrize(
    "records",
    [
        {"time_key": "message"},
        {"time_key": "stream"},
        {"time_key": "partial"},
        {"time_key": "kubernetes"},
        {"time_key": "@timestamp", "timestamp_key_es": True},
    ],
)
def test_time_key_that_records_cannot_use_is_rejected(records: dict[str, Any]) -> None:
    assert "records." in config_error({"records": records})


# --- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("- capture\n- lines\n", id="list"),
        pytest.param("42\n", id="int"),
        pytest.param("just text\n", id="string"),
        pytest.param("true\n", id="true"),
        pytest.param("[]\n", id="empty-list"),
        pytest.param("0\n", id="zero"),
        pytest.param("false\n", id="false"),
        pytest.param("''\n", id="empty-string"),
    ],
)
def test_yaml_document_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert path in str(info.value)
    assert "mapping" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "capture: [unclosed\n",
        "capture:\n  max_write: 1\n bad_indent: 2\n",
        "a: b: c\n",
        "key: 'unterminated\n",
        "\tcapture: {}\n",
        "{{{\n",
    ],
)
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert path in str(info.value)
    assert "YAML" in str(info.value)
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert path in str(info.value)
    assert "No such file" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), environ={})
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "capture: {}\n")
    os.chmod(path, 0)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert path in str(info.value)


def test_errors_in_file_are_reported_after_env_merge(tmp_path: Path) -> None:
    """A bad file value overridden by a good env value is fine; a bad env value is named."""
    path = write(tmp_path, "capture:\n  chunk: 1000\n")
    assert "capture.chunk" in str(pytest.raises(ConfigError, load_config, path, environ={}).value)
    cfg = load_config(path, environ={"PODTAP_CAPTURE_CHUNK": "2048"})
    assert cfg.capture.chunk == 2048
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"PODTAP_CAPTURE_CHUNK": "1024x"})
    assert "capture.chunk" in str(info.value)
