"""Tests of agent.records: JSON records from captured lines and pod metadata."""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.kube.model import ContainerMeta
from agent.lines import Line, LineAssembler
from agent.records import (
    ContainerEncoder,
    RecordFormat,
    encode_tap_line,
    format_rfc3339_ns,
)

NS = 1_000_000_000
T = 1_795_315_894 * NS + 123_456_789  # 2026-11-22T02:51:34.123456789Z
T_TEXT = "2026-11-22T02:51:34.123456789Z"
CID = "0123456789abcdef" * 4

META = ContainerMeta(
    namespace="shop",
    pod_name="web-7d9f-abcde",
    pod_uid="0f1e2d3c-aaaa-bbbb-cccc-123456789abc",
    container_name="app",
    container_id=CID,
    runtime="containerd",
    image="registry.example.com:5000/team/web:1.4.2",
    host="node-3",
    qos_class="burstable",
    labels={"app.kubernetes.io/name": "web", "tier": "front"},
    annotations={"prometheus.io/scrape": "true"},
    owner_kind="ReplicaSet",
    owner_name="web-7d9f",
    namespace_labels={"kubernetes.io/metadata.name": "shop"},
)

FLUENTBIT_KUBERNETES = {
    "pod_name": "web-7d9f-abcde",
    "namespace_name": "shop",
    "pod_id": "0f1e2d3c-aaaa-bbbb-cccc-123456789abc",
    "labels": {"app.kubernetes.io/name": "web", "tier": "front"},
    "ownerReferences": [{"kind": "ReplicaSet", "name": "web-7d9f"}],
    "host": "node-3",
    "container_name": "app",
    "docker_id": CID,
    "container_image": "registry.example.com:5000/team/web:1.4.2",
}

OTEL_METADATA = {
    "k8s.namespace.name": "shop",
    "k8s.pod.name": "web-7d9f-abcde",
    "k8s.pod.uid": "0f1e2d3c-aaaa-bbbb-cccc-123456789abc",
    "k8s.container.name": "app",
    "container.id": CID,
    "container.image.name": "registry.example.com:5000/team/web",
    "container.image.tags": ["1.4.2"],
    "container.runtime": "containerd",
    "k8s.node.name": "node-3",
    "k8s.replicaset.name": "web-7d9f",
    "k8s.pod.label.app.kubernetes.io/name": "web",
    "k8s.pod.label.tier": "front",
}


def line_fields(
    stream: str = "stdout", message: str = "hello", partial: bool = False
) -> dict[str, Any]:
    return {"time": T_TEXT, "stream": stream, "message": message, "partial": partial}


def decode(fmt: RecordFormat, meta: ContainerMeta = META, **line: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"time_ns": T, "stream": 1, "message": b"hello", "partial": False}
    out = ContainerEncoder(meta, fmt).encode(**(args | line))
    assert not out.endswith(b"\n")
    parsed: dict[str, Any] = orjson.loads(out)
    return parsed


# --- schemas -----------------------------------------------------------------------------


def test_fluentbit_record() -> None:
    assert decode(RecordFormat()) == line_fields() | {"kubernetes": FLUENTBIT_KUBERNETES}


def test_fluentbit_key_order_puts_line_fields_first() -> None:
    out = ContainerEncoder(META).encode(T, 1, b"x", False)
    assert list(orjson.loads(out)) == ["time", "stream", "message", "partial", "kubernetes"]


def test_otel_record() -> None:
    assert decode(RecordFormat(schema="otel")) == line_fields() | OTEL_METADATA


@pytest.mark.parametrize("schema", ["fluentbit", "otel"])
@pytest.mark.parametrize(("stream", "name"), [(1, "stdout"), (2, "stderr")])
@pytest.mark.parametrize("partial", [False, True])
def test_stream_and_partial(schema: str, stream: int, name: str, partial: bool) -> None:
    record = decode(RecordFormat(schema=schema), stream=stream, partial=partial)  # type: ignore[arg-type]
    assert (record["stream"], record["partial"]) == (name, partial)


@pytest.mark.parametrize("stream", [0, 3, -1])
def test_bad_stream_rejected(stream: int) -> None:
    with pytest.raises(ValueError, match="stream"):
        ContainerEncoder(META).encode(T, stream, b"x", False)
    with pytest.raises(ValueError, match="stream"):
        encode_tap_line(T, stream, 1, b"sh", 1, b"x", False)


def test_owner_absent() -> None:
    meta = replace(META, owner_kind=None, owner_name=None)
    assert "ownerReferences" not in decode(RecordFormat(), meta)["kubernetes"]
    assert "k8s.replicaset.name" not in decode(RecordFormat(schema="otel"), meta)


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("StatefulSet", "k8s.statefulset.name"),
        ("DaemonSet", "k8s.daemonset.name"),
        ("Job", "k8s.job.name"),
        ("Node", None),  # mirror pods of static pods: the node is already k8s.node.name
    ],
)
def test_otel_owner_kinds(kind: str, key: str | None) -> None:
    record = decode(RecordFormat(schema="otel"), replace(META, owner_kind=kind, owner_name="o"))
    owner_keys = {k for k in record if k.endswith(".name") and k != "k8s.replicaset.name"}
    owner_keys -= {"k8s.namespace.name", "k8s.pod.name", "k8s.container.name"}
    owner_keys -= {"container.image.name", "k8s.node.name"}
    assert owner_keys == ({key} if key else set())
    if key:
        assert record[key] == "o"


def test_empty_labels_left_out_like_fluent_bit() -> None:
    meta = replace(META, labels={})
    assert "labels" not in decode(RecordFormat(), meta)["kubernetes"]
    assert not any(k.startswith("k8s.pod.label.") for k in decode(RecordFormat("otel"), meta))


def test_annotations_are_opt_in() -> None:
    assert "annotations" not in decode(RecordFormat())["kubernetes"]
    with_annotations = decode(RecordFormat(include_annotations=True))["kubernetes"]
    assert with_annotations["annotations"] == {"prometheus.io/scrape": "true"}
    otel = decode(RecordFormat(schema="otel", include_annotations=True))
    assert otel["k8s.pod.annotation.prometheus.io/scrape"] == "true"
    assert "k8s.pod.annotation.prometheus.io/scrape" not in decode(RecordFormat("otel"))


def test_namespace_labels_are_opt_in() -> None:
    assert "kubernetes_namespace" not in decode(RecordFormat())
    record = decode(RecordFormat(include_namespace_labels=True))
    assert record["kubernetes_namespace"] == {
        "name": "shop",
        "labels": {"kubernetes.io/metadata.name": "shop"},
    }
    otel = decode(RecordFormat(schema="otel", include_namespace_labels=True))
    assert otel["k8s.namespace.label.kubernetes.io/metadata.name"] == "shop"


def test_dedot_fluentbit() -> None:
    fmt = RecordFormat(dedot_labels=True, include_annotations=True, include_namespace_labels=True)
    record = decode(fmt)
    assert record["kubernetes"]["labels"] == {"app_kubernetes_io/name": "web", "tier": "front"}
    assert record["kubernetes"]["annotations"] == {"prometheus_io/scrape": "true"}
    assert record["kubernetes_namespace"]["labels"] == {"kubernetes_io/metadata_name": "shop"}
    # Values and the other fields keep their dots.
    assert record["kubernetes"]["container_image"] == META.image


def test_dedot_otel_only_touches_the_label_key_part() -> None:
    record = decode(RecordFormat(schema="otel", dedot_labels=True, include_annotations=True))
    assert record["k8s.pod.label.app_kubernetes_io/name"] == "web"
    assert record["k8s.pod.annotation.prometheus_io/scrape"] == "true"
    assert "k8s.pod.label.app.kubernetes.io/name" not in record


@pytest.mark.parametrize(
    ("image", "name", "tags"),
    [
        ("nginx", "nginx", None),
        ("nginx:1.25", "nginx", ["1.25"]),
        ("docker.io/library/nginx:1.25", "docker.io/library/nginx", ["1.25"]),
        ("localhost:5000/app", "localhost:5000/app", None),
        ("localhost:5000/app:v2", "localhost:5000/app", ["v2"]),
        ("ghcr.io/o/app@sha256:" + "a" * 64, "ghcr.io/o/app", None),
        ("ghcr.io/o/app:v1@sha256:" + "a" * 64, "ghcr.io/o/app", ["v1"]),
    ],
)
def test_otel_image_name_and_tag(image: str, name: str, tags: list[str] | None) -> None:
    record = decode(RecordFormat(schema="otel"), replace(META, image=image))
    assert record["container.image.name"] == name
    assert record.get("container.image.tags") == tags


def test_timestamp_key_es_and_custom_time_key() -> None:
    record = decode(RecordFormat(time_key="ts", timestamp_key_es=True))
    assert record["ts"] == record["@timestamp"] == T_TEXT
    assert "time" not in record
    assert list(record)[:2] == ["ts", "@timestamp"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"schema": "gelf"},
        {"time_key": ""},
        {"time_key": "message"},
        {"time_key": "kubernetes"},
        {"time_key": "@timestamp", "timestamp_key_es": True},
    ],
)
def test_bad_formats_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RecordFormat(**kwargs)


def test_percent_signs_in_metadata_survive_the_templates() -> None:
    meta = replace(META, labels={"%s": "100%", "%%d": "%09d"}, pod_name="p%")
    fmt = RecordFormat(time_key="t%s", timestamp_key_es=True)
    record = decode(fmt, meta, message=b"%s %d %%")
    assert record["kubernetes"]["labels"] == {"%s": "100%", "%%d": "%09d"}
    assert record["kubernetes"]["pod_name"] == "p%"
    assert record["t%s"] == T_TEXT
    assert record["message"] == "%s %d %%"


def test_metadata_is_serialized_once_per_encoder() -> None:
    encoder = ContainerEncoder(META)
    assert orjson.loads(b"{" + encoder.metadata + b"}") == {"kubernetes": FLUENTBIT_KUBERNETES}


def test_metadata_with_awkward_strings() -> None:
    meta = replace(META, pod_name='a"b\\c\n\u2028', labels={"k": "é\x00"})
    record = decode(RecordFormat(), meta)
    assert record["kubernetes"]["pod_name"] == 'a"b\\c\n\u2028'
    assert record["kubernetes"]["labels"] == {"k": "é\x00"}


# --- message escaping --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"", ""),
        (b'quote " backslash \\ slash /', 'quote " backslash \\ slash /'),
        (b"ctl \x00\x01\x1f\x7f \t\r\n\x08\x0c", "ctl \x00\x01\x1f\x7f \t\r\n\x08\x0c"),
        ("unicode é 漢字 🎉 \u2028\u2029".encode(), "unicode é 漢字 🎉 \u2028\u2029"),
        (b"bad \xff\xfe utf8 \xc3", "bad \ufffd\ufffd utf8 \ufffd"),
        (b"surrogate \xed\xa0\x80", "surrogate \ufffd\ufffd\ufffd"),
        (b"overlong \xc0\xaf", "overlong \ufffd\ufffd"),
    ],
)
def test_message_escaping(raw: bytes, text: str) -> None:
    assert decode(RecordFormat(), message=raw)["message"] == text


@given(st.binary(max_size=300))
@example(b"\xff")
@example(b'"}\\')
def test_any_bytes_round_trip(message: bytes) -> None:
    out = ContainerEncoder(META).encode(T, 2, message, False)
    assert orjson.loads(out)["message"] == message.decode("utf-8", "replace")
    tap = encode_tap_line(T, 1, 7, b"sh", 9, message, True)
    assert orjson.loads(tap)["message"] == message.decode("utf-8", "replace")


# --- tap records -------------------------------------------------------------------------


def test_tap_record() -> None:
    out = encode_tap_line(T, 2, 4242, b"nginx\x00\x00\x00\x00", 123456789012, b"oops", True)
    assert list(orjson.loads(out).items()) == [
        ("time", T_TEXT),
        ("stream", "stderr"),
        ("pid", 4242),
        ("comm", "nginx"),
        ("cgroup_id", 123456789012),
        ("message", "oops"),
        ("partial", True),
    ]


@pytest.mark.parametrize(
    ("comm", "text"),
    [(b"sh", "sh"), (b'we"ird\\\x01', 'we"ird\\\x01'), (b"\xff\xfe", "\ufffd\ufffd"), (b"", "")],
)
def test_tap_comm_escaping(comm: bytes, text: str) -> None:
    assert orjson.loads(encode_tap_line(T, 1, 1, comm, 1, b"", False))["comm"] == text


def test_tap_cgroup_id_u64() -> None:
    out = encode_tap_line(T, 1, 1, b"x", 2**64 - 1, b"", False)
    assert orjson.loads(out)["cgroup_id"] == 2**64 - 1


# --- time --------------------------------------------------------------------------------


def reference_time(time_ns: int) -> str:
    seconds, nanos = divmod(time_ns, NS)
    moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def test_time_known_value() -> None:
    assert format_rfc3339_ns(T) == T_TEXT
    assert format_rfc3339_ns(0) == "1970-01-01T00:00:00.000000000Z"


@given(st.integers(min_value=0, max_value=2**64 - 1))
@example(NS - 1)
@example(NS)
@example(1_798_761_599 * NS + NS - 1)  # last nanosecond of 2026
@example(1_798_761_600 * NS)  # first of 2027
@example(951_782_400 * NS)  # 2000-02-29
def test_time_matches_datetime(time_ns: int) -> None:
    assert format_rfc3339_ns(time_ns) == reference_time(time_ns)
    record = orjson.loads(ContainerEncoder(META).encode(time_ns, 1, b"", False))
    assert record["time"] == reference_time(time_ns)


@given(st.lists(st.integers(min_value=-3 * NS, max_value=3 * NS), min_size=2, max_size=20))
def test_time_cache_never_returns_a_stale_second(offsets: list[int]) -> None:
    encoder = ContainerEncoder(META)
    for offset in offsets:  # consecutive lines back and forth across second boundaries
        time_ns = T + offset
        assert orjson.loads(encoder.encode(time_ns, 1, b"", False))["time"] == reference_time(
            time_ns
        )
        assert format_rfc3339_ns(time_ns) == reference_time(time_ns)


def test_time_across_a_boundary_in_order() -> None:
    base = 1_795_315_894 * NS
    texts = [format_rfc3339_ns(base + d) for d in (NS - 1, NS, 2 * NS - 1, NS - 1)]
    assert texts == [
        "2026-11-22T02:51:34.999999999Z",
        "2026-11-22T02:51:35.000000000Z",
        "2026-11-22T02:51:35.999999999Z",
        "2026-11-22T02:51:34.999999999Z",
    ]


def test_time_out_of_rfc3339_range() -> None:
    with pytest.raises(ValueError, match="RFC 3339"):
        format_rfc3339_ns(253_402_300_800 * NS)


@pytest.mark.parametrize("schema", ["fluentbit", "otel"])
@pytest.mark.parametrize("include", [True, False])
def test_node_labels_only_when_asked(schema: str, include: bool) -> None:
    meta = replace(META, node_labels={"topology.kubernetes.io/zone": "z1", "pool": "a"})
    fmt = RecordFormat(schema=schema, include_node_labels=include, dedot_labels=True)  # type: ignore[arg-type]
    record = orjson.loads(ContainerEncoder(meta, fmt).encode(0, 1, b"m", False))
    if schema == "fluentbit":
        got = record["kubernetes"].get("node_labels")
        assert got == ({"topology_kubernetes_io/zone": "z1", "pool": "a"} if include else None)
    else:
        got = {k: v for k, v in record.items() if k.startswith("k8s.node.label.")}
        expected = {"k8s.node.label.topology_kubernetes_io/zone": "z1", "k8s.node.label.pool": "a"}
        assert got == (expected if include else {})


# --- invalid UTF-8: lossless representations (issue 8, 2) -------------------------------


def raw_from_record(obj: dict[str, Any], mode: str) -> bytes:
    """The exact bytes of the line, as a consumer gets them back from a record."""
    if mode == "base64":
        if "message_base64" in obj:
            return base64.b64decode(obj["message_base64"], validate=True)
        return str(obj["message"]).encode("utf-8")
    return str(obj["message"]).encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("mode", ["base64", "escape"])
@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(
        st.one_of(
            st.binary(max_size=12),
            st.sampled_from(["é", "€", "🎉", "\n", "a\\xff", "\udcff"]).map(
                lambda t: t.encode("utf-8", "surrogatepass")
            ),
            st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf"]),
        ),
        max_size=40,
    ).map(b"".join),
    max_line=st.integers(4, 20),
)
def test_raw_bytes_come_back_exactly_through_assembler_and_encoder(
    mode: str, stream: bytes, max_line: int
) -> None:
    asm = LineAssembler(max_line=max_line)
    out: list[Line] = []
    asm.feed(1, 1, T, None, stream, out)
    asm.flush_all(out)
    enc = ContainerEncoder(META, RecordFormat(invalid_utf8=mode))  # type: ignore[arg-type]
    got = bytearray()
    for ts, _pid, s, _tag, message, partial in out:
        obj = json.loads(enc.encode(ts, s, message, partial))  # any JSON parser
        got += raw_from_record(obj, mode) + (b"" if partial else b"\n")
        if mode == "base64":
            assert ("message_base64" in obj) == (not _valid(message))
            assert obj["message"] == message.decode("utf-8", "replace")
    assert bytes(got) == stream


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("mode", ["replace", "base64", "escape"])
def test_valid_lines_are_the_same_in_every_mode(mode: str) -> None:
    message = "plain é 漢字 🎉 \\xff literal".encode()
    rec = ContainerEncoder(META, RecordFormat(invalid_utf8=mode)).encode(T, 1, message, False)  # type: ignore[arg-type]
    assert rec == ContainerEncoder(META).encode(T, 1, message, False)


def test_base64_field_comes_right_after_the_message() -> None:
    enc = ContainerEncoder(META, RecordFormat(invalid_utf8="base64"))
    obj = orjson.loads(enc.encode(T, 2, b"bad \xff", True))
    keys = list(obj)
    assert keys[keys.index("message") + 1] == "message_base64"
    assert obj["message"] == "bad \ufffd" and obj["partial"] is True
    assert base64.b64decode(obj["message_base64"]) == b"bad \xff"


def test_tap_line_can_carry_the_raw_bytes_too() -> None:
    out = encode_tap_line(T, 1, 7, b"sh", 9, b"\xfe\xff", False, invalid_utf8="base64")
    assert base64.b64decode(orjson.loads(out)["message_base64"]) == b"\xfe\xff"
    esc = encode_tap_line(T, 1, 7, b"sh", 9, b"\xfe\xff", False, invalid_utf8="escape")
    assert json.loads(esc)["message"].encode("utf-8", "surrogateescape") == b"\xfe\xff"


def test_unknown_invalid_utf8_mode_rejected() -> None:
    with pytest.raises(ValueError):
        RecordFormat(invalid_utf8="drop")  # type: ignore[arg-type]
