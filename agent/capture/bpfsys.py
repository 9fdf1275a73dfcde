"""The few bpf(2) and perf_event_open(2) calls the agent needs, through ctypes.

The agent drives maps and attaches programs that a short-lived loader process
built (agent/capture/loader.py), so it never maps libbcc or LLVM.  Layouts are
those of the kernel's uapi headers (`union bpf_attr`, `struct bpf_map_info`,
`struct perf_event_attr`); only the leading fields used here are filled, the
rest stays zero, which the kernel requires.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass
from functools import cache

# (bpf, perf_event_open) syscall numbers.
_SYSCALLS = {"x86_64": (321, 298), "aarch64": (280, 241)}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ANY = 0

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = frozenset(
    {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
)

PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)

_ATTR_SIZE = 128  # >= every field used; the kernel checks that the tail is zero
_ELEM = struct.Struct("<IIQQQ")  # map_fd, pad, key, value, flags
_INFO_REQ = struct.Struct("<IIQ")  # bpf_fd, info_len, info
_MAP_INFO = struct.Struct("<IIIIII16s")  # type id key_size value_size max_entries flags name
_PROG_INFO_ID = struct.Struct("<II")  # type, id
_INFO_SIZE = 256


class BpfError(OSError):
    """A bpf(2) or perf_event_open(2) call failed."""


@dataclass(frozen=True, slots=True)
class MapInfo:
    fd: int
    name: str
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@cache
def _syscall_numbers() -> tuple[int, int]:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise BpfError(0, f"bpf syscalls on {platform.machine()} are not known to podtap")
    return numbers


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    libc = _libc()
    ret: int = libc.syscall(
        ctypes.c_long(_syscall_numbers()[0]), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr))
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf({what}): {os.strerror(err)}")
    return ret


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _elem_attr(fd: int, key: ctypes.Array[ctypes.c_char], value: int, flags: int = 0
               ) -> ctypes.Array[ctypes.c_char]:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _ELEM.pack_into(attr, 0, fd, 0, _addr(key), value, flags)
    return attr


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _sys_bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(fd, k, _addr(v), flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete `key`; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _sys_bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, k, 0), "map delete")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value of `key` (value_size bytes: for a per-CPU map, all CPUs' values), or None."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _sys_bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, k, _addr(v)), "map lookup")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def percpu_value_size(value_size: int) -> int:
    """Bytes one CPU's value takes in a per-CPU lookup (rounded up to 8)."""
    return (value_size + 7) & ~7


def map_lookup_percpu_u64(fd: int, key: bytes) -> list[int]:
    """Every possible CPU's u64 value of `key` in a per-CPU map (absent: zeros)."""
    ncpus = possible_cpus()
    raw = map_lookup(fd, key, 8 * ncpus)
    if raw is None:
        return [0] * ncpus
    return list(struct.unpack(f"<{ncpus}Q", raw))


def _obj_info(fd: int, what: str) -> bytes:
    info = ctypes.create_string_buffer(_INFO_SIZE)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _INFO_REQ.pack_into(attr, 0, fd, _INFO_SIZE, _addr(info))
    _sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return info.raw


def map_info(fd: int) -> MapInfo:
    typ, map_id, key_size, value_size, max_entries, _flags, name = _MAP_INFO.unpack_from(
        _obj_info(fd, "map info")
    )
    return MapInfo(
        fd, name.split(b"\0", 1)[0].decode(), typ, map_id, key_size, value_size, max_entries
    )


def prog_id(fd: int) -> int:
    return int(_PROG_INFO_ID.unpack_from(_obj_info(fd, "program info"))[1])


@cache
def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs the kernel may ever bring up: per-CPU map values come in this count."""
    with open(path) as f:
        return parse_cpu_list(f.read())


def parse_cpu_list(text: str) -> int:
    """The highest CPU number + 1 of a kernel CPU list such as "0-3,5"."""
    highest = -1
    for part in text.strip().split(","):
        if part:
            highest = max(highest, int(part.rsplit("-", 1)[-1]))
    return highest + 1


def attach_tracepoint(prog_fd: int, tracepoint_id: int) -> int:
    """Run the program at a tracepoint (on every CPU); returns the perf event fd that keeps
    it attached: closing it (the last copy of it) detaches, as bcc's attach does."""
    attr = ctypes.create_string_buffer(PERF_ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, PERF_TYPE_TRACEPOINT, PERF_ATTR_SIZE, tracepoint_id, 1,
                     PERF_SAMPLE_RAW)
    struct.pack_into("<I", attr, 48, 1)  # wakeup_events
    ret: int = _libc().syscall(
        ctypes.c_long(_syscall_numbers()[1]), attr, ctypes.c_int(-1), ctypes.c_int(0),
        ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC),
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"perf_event_open(tracepoint {tracepoint_id}): {os.strerror(err)}")
    try:
        fcntl.ioctl(ret, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(ret, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(ret)
        raise
    return ret
