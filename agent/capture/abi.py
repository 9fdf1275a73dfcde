"""The contract between the BPF program and the agent: `bpf/podtap.h`, read once.

Like libbpf-tools' `execsnoop.h`, the header is the one definition both sides use: its
integer `#define`s become `CONSTANTS` (and the names below), and its `struct event_hdr`
and `struct container` become `struct.Struct` layouts, parsed from the C declarations and
checked against the header's sizes, so a field added on one side cannot be missed on the
other. This module depends on nothing else of the agent.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

BPF_DIR_ENV = "PODTAP_BPF_DIR"

_C_TYPES = {"u64": "Q", "u32": "I", "u16": "H", "u8": "B", "s64": "q", "s32": "i"}


class AbiError(Exception):
    """bpf/podtap.h does not hold what the agent expects."""


def bpf_dir() -> Path:
    env = os.environ.get(BPF_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


def header_text(path: Path | None = None) -> str:
    return (path or bpf_dir() / "podtap.h").read_text()


def header_constants(text: str) -> dict[str, int]:
    """The integer `#define NAME value` constants."""
    return {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(\d+|0x[0-9a-fA-F]+)\b", text, re.M)
    }


def struct_layout(text: str, name: str, constants: dict[str, int]) -> struct.Struct:
    """The little-endian layout of `struct <name> { ... };` (fixed-width fields and char
    arrays only, as the header keeps them; no implicit padding is allowed)."""
    m = re.search(r"struct\s+" + re.escape(name) + r"\s*\{(.*?)\};", text, re.S)
    if m is None:
        raise AbiError(f"struct {name} is not in podtap.h")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    fmt = "<"
    offset = 0
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        field = re.fullmatch(r"(u64|u32|u16|u8|s64|s32|char)\s+(\w+)(?:\[(\w+)\])?", decl)
        if field is None:
            raise AbiError(f"struct {name}: cannot read the field {decl!r}")
        ctype, fname, count = field.groups()
        if ctype == "char":
            if count is None:
                raise AbiError(f"struct {name}.{fname}: a char field must be an array")
            n = int(count) if count.isdigit() else constants[count]
            fmt += f"{n}s"
            offset += n
            continue
        size = struct.calcsize("<" + _C_TYPES[ctype])
        if offset % size:
            raise AbiError(f"struct {name}.{fname} is not naturally aligned (offset {offset})")
        fmt += _C_TYPES[ctype] * (int(count) if count else 1)
        offset += size * (int(count) if count else 1)
    return struct.Struct(fmt)


TEXT = header_text()
CONSTANTS = header_constants(TEXT)
EVENT_HDR = struct_layout(TEXT, "event_hdr", CONSTANTS)
CONTAINER_VALUE = struct_layout(TEXT, "container", CONSTANTS)
if EVENT_HDR.size != CONSTANTS["EVENT_HDR_SIZE"]:
    raise AbiError(f"struct event_hdr is {EVENT_HDR.size} bytes, EVENT_HDR_SIZE says "
                   f"{CONSTANTS['EVENT_HDR_SIZE']}")
if CONTAINER_VALUE.size % 8:
    raise AbiError(f"struct container is {CONTAINER_VALUE.size} bytes: pad it to 8")

EV_DATA = CONSTANTS["EV_DATA"]
EV_EXIT = CONSTANTS["EV_EXIT"]
EV_CGROUP = CONSTANTS["EV_CGROUP"]
EV_THREAD_EXIT = CONSTANTS["EV_THREAD_EXIT"]
STREAM_STDOUT = CONSTANTS["STREAM_STDOUT"]
STREAM_STDERR = CONSTANTS["STREAM_STDERR"]
F_FD_FALLBACK = CONSTANTS["F_FD_FALLBACK"]
F_TRUNCATED = CONSTANTS["F_TRUNCATED"]
F_CONTINUATION = CONSTANTS["F_CONTINUATION"]
F_UNKNOWN = CONSTANTS["F_UNKNOWN"]
F_LOSS = CONSTANTS["F_LOSS"]
C_CAPTURE_STDOUT = CONSTANTS["C_CAPTURE_STDOUT"]
C_CAPTURE_STDERR = CONSTANTS["C_CAPTURE_STDERR"]
C_IDENT_KNOWN = CONSTANTS["C_IDENT_KNOWN"]
FILTER_SLOTS = CONSTANTS["FILTER_SLOTS"]
COUNTER_NAMES: tuple[str, ...] = tuple(
    name.removeprefix("CNT_").lower()
    for name, _ in sorted(
        ((n, v) for n, v in CONSTANTS.items() if n.startswith("CNT_")), key=lambda nv: nv[1]
    )
)
if len(COUNTER_NAMES) != CONSTANTS["NCOUNTERS"]:
    raise AbiError(f"{len(COUNTER_NAMES)} CNT_ defines but NCOUNTERS is {CONSTANTS['NCOUNTERS']}")
