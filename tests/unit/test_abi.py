"""Tests of agent.capture.abi: the layouts come from bpf/podtap.h, checked against it."""

from __future__ import annotations

import struct

import pytest

from agent.capture import abi


def test_layouts_are_the_headers_structs() -> None:
    assert abi.EVENT_HDR.format == "<QQIIIHBB16s"
    assert abi.EVENT_HDR.size == abi.CONSTANTS["EVENT_HDR_SIZE"]
    assert abi.CONTAINER_VALUE.format == "<QQIIII"
    assert len(abi.COUNTER_NAMES) == abi.CONSTANTS["NCOUNTERS"]
    assert abi.COUNTER_NAMES[abi.CONSTANTS["CNT_DROP_RECORDS"]] == "drop_records"


def test_streams_have_one_definition() -> None:
    from agent import enrich, records
    from agent.sinks import base

    assert (records.STDOUT, records.STDERR) == (abi.STREAM_STDOUT, abi.STREAM_STDERR)
    assert (base.STDOUT, base.STDERR) == (abi.STREAM_STDOUT, abi.STREAM_STDERR)
    assert enrich.STDOUT == abi.STREAM_STDOUT


HEADER = """
#define NAME_LEN 8
struct thing {
    u64 a;   /* first */
    u32 b;
    u16 c;
    u8 d;
    u8 e;
    char name[NAME_LEN];
};
"""


def test_a_struct_is_parsed_field_by_field() -> None:
    layout = abi.struct_layout(HEADER, "thing", abi.header_constants(HEADER))
    assert layout.format == "<QIHBB8s"
    assert layout.size == struct.calcsize("<QIHBB8s") == 24


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("struct thing { u8 a; u64 b; };", "not naturally aligned"),
        ("struct thing { float a; };", "cannot read"),
        ("struct thing { char c; };", "must be an array"),
        ("struct other { u8 a; };", "not in podtap.h"),
    ],
)
def test_a_header_the_agent_cannot_follow_is_an_error(text: str, says: str) -> None:
    with pytest.raises(abi.AbiError, match=says):
        abi.struct_layout(text, "thing", {})
