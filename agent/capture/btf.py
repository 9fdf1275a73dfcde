"""Kernel struct member offsets, read from the running kernel's BTF.

The BPF program gets these offsets as -D defines so that it never depends on struct layouts
from (possibly mismatched) kernel headers. This is a minimal reader of raw BTF as found in
/sys/kernel/btf/vmlinux (format: the kernel's Documentation/bpf/btf.rst): one pass indexes the
type section, and struct members are decoded only when asked for.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

VMLINUX_BTF_PATH: Final = "/sys/kernel/btf/vmlinux"

KIND_INT: Final = 1
KIND_PTR: Final = 2
KIND_ARRAY: Final = 3
KIND_STRUCT: Final = 4
KIND_UNION: Final = 5
KIND_ENUM: Final = 6
KIND_FWD: Final = 7
KIND_TYPEDEF: Final = 8
KIND_VOLATILE: Final = 9
KIND_CONST: Final = 10
KIND_RESTRICT: Final = 11
KIND_FUNC: Final = 12
KIND_FUNC_PROTO: Final = 13
KIND_VAR: Final = 14
KIND_DATASEC: Final = 15
KIND_FLOAT: Final = 16
KIND_DECL_TAG: Final = 17
KIND_TYPE_TAG: Final = 18
KIND_ENUM64: Final = 19

# Bytes of kind-specific data following each struct btf_type: (fixed part, per vlen item).
_TRAILING_SIZE: Final[dict[int, tuple[int, int]]] = {
    KIND_INT: (4, 0),
    KIND_PTR: (0, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FWD: (0, 0),
    KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0),
    KIND_CONST: (0, 0),
    KIND_RESTRICT: (0, 0),
    KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0),
    KIND_TYPE_TAG: (0, 0),
    KIND_ENUM64: (0, 12),
}
_COMPOSITE_KINDS: Final = frozenset({KIND_STRUCT, KIND_UNION})
_MODIFIER_KINDS: Final = frozenset(
    {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}
)

_MAGIC_LE: Final = b"\x9f\xeb"  # 0xeB9F stored little-endian
_MAGIC_BE: Final = b"\xeb\x9f"
_VERSION: Final = 1
_HEADER_FORMAT: Final = "HBBIIIII"  # magic version flags hdr_len type_off type_len str_off str_len
_HEADER_SIZE: Final = 24
_TYPE_SIZE: Final = 12
_MEMBER_SIZE: Final = 12
# Bounds the walk through typedef chains and nested anonymous members, so that a corrupt
# blob with a reference cycle fails cleanly instead of recursing forever.
_MAX_DEPTH: Final = 64

KERNEL_MEMBERS: Final[dict[str, tuple[str, str]]] = {
    "OFF_TASK_FILES": ("task_struct", "files"),
    "OFF_FILES_FDT": ("files_struct", "fdt"),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds"),
    "OFF_FDT_FD": ("fdtable", "fd"),
    "OFF_FILE_F_INODE": ("file", "f_inode"),
    "OFF_INODE_I_INO": ("inode", "i_ino"),
    "OFF_INODE_I_SB": ("inode", "i_sb"),
    "OFF_SB_S_DEV": ("super_block", "s_dev"),
}


class BtfError(Exception):
    """The BTF blob is unreadable or malformed, or lacks the requested type or member."""


@dataclass(frozen=True, slots=True)
class _Type:
    type_id: int
    kind: int
    kind_flag: bool
    vlen: int
    name_off: int
    size_or_type: int  # `size` for INT/ENUM/STRUCT/UNION/DATASEC, else a referenced type id
    pos: int  # position of the struct btf_type in the blob


@dataclass(frozen=True, slots=True)
class _Member:
    name_off: int
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless the parent has kind_flag set and this is a bitfield


@dataclass(frozen=True, slots=True)
class _Layout:
    byte_order: str
    type_start: int
    type_end: int
    str_start: int
    str_end: int


class Btf:
    """Raw BTF, indexed for struct member offset look-ups."""

    def __init__(self, data: bytes, layout: _Layout) -> None:
        """Use load() or from_bytes() rather than calling this directly."""
        self._data = data
        self._layout = layout
        self._u32x3 = struct.Struct(layout.byte_order + "III")
        self._u32 = struct.Struct(layout.byte_order + "I")
        self._type_pos: list[int] = []
        self._composites_by_name: dict[str, list[int]] = {}
        self._scan_types()

    @classmethod
    def load(cls, path: str = VMLINUX_BTF_PATH) -> Btf:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BtfError(f"cannot read BTF from {path}: {e}") from e
        return cls.from_bytes(data)

    @classmethod
    def from_bytes(cls, data: bytes) -> Btf:
        return cls(bytes(data), _parse_header(data))

    def struct_size(self, struct_name: str) -> int:
        """Size in bytes of `struct struct_name` (the first one, if several share the name)."""
        return self._type(self._struct_ids(struct_name)[0]).size_or_type

    def member_offset(self, struct_name: str, member_path: str) -> int:
        """Byte offset of `member_path` ("f_inode", or dotted "a.b" through nested struct members)
        inside `struct struct_name`. Members of anonymous structs/unions are found transparently
        (the offsets add up). Raises BtfError if the struct or member is missing, or the member
        is a bitfield / not byte aligned."""
        parts = member_path.split(".")
        if not all(parts):
            raise BtfError(f"malformed member path {member_path!r}")
        first_error: BtfError | None = None
        # Same-named structs are rare (e.g. driver-local ones); use whichever has the member.
        for struct_id in self._struct_ids(struct_name):
            try:
                return self._resolve_path(struct_id, parts)
            except BtfError as e:
                first_error = first_error or e
        assert first_error is not None  # _struct_ids never returns an empty list
        raise BtfError(f"struct {struct_name}: {first_error}")

    # -- indexing ------------------------------------------------------------------------------

    def _scan_types(self) -> None:
        """Record where each type id starts, and index named structs/unions by name."""
        unpack = self._u32x3.unpack_from
        data, end = self._data, self._layout.type_end
        positions = [-1]  # type id 0 is void and has no record
        pos = self._layout.type_start
        while pos < end:
            if pos + _TYPE_SIZE > end:
                raise BtfError(f"type section truncated at offset {pos}")
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            trailing = _TRAILING_SIZE.get(kind)
            if trailing is None:
                raise BtfError(f"unknown BTF kind {kind} (type id {len(positions)}, offset {pos})")
            if kind in _COMPOSITE_KINDS and name_off:
                self._composites_by_name.setdefault(self._name(name_off), []).append(len(positions))
            positions.append(pos)
            fixed, per_item = trailing
            pos += _TYPE_SIZE + fixed + per_item * (info & 0xFFFF)
        if pos != end:
            raise BtfError("last type record runs past the end of the type section")
        self._type_pos = positions

    # -- type access ---------------------------------------------------------------------------

    def _type(self, type_id: int) -> _Type:
        if not 0 < type_id < len(self._type_pos):
            raise BtfError(f"reference to nonexistent type id {type_id}")
        pos = self._type_pos[type_id]
        name_off, info, size_or_type = self._u32x3.unpack_from(self._data, pos)
        return _Type(
            type_id=type_id,
            kind=(info >> 24) & 0x1F,
            kind_flag=bool(info >> 31),
            vlen=info & 0xFFFF,
            name_off=name_off,
            size_or_type=size_or_type,
            pos=pos,
        )

    def _struct_ids(self, struct_name: str) -> list[int]:
        ids = self._composites_by_name.get(struct_name)
        if not ids:
            raise BtfError(f"no struct or union named {struct_name!r}")
        return ids

    def _strip_modifiers(self, type_id: int) -> _Type:
        """The type behind typedef/const/volatile/restrict/type_tag wrappers."""
        for _ in range(_MAX_DEPTH):
            t = self._type(type_id)
            if t.kind not in _MODIFIER_KINDS:
                return t
            type_id = t.size_or_type
        raise BtfError(f"typedef/modifier chain too long at type id {type_id}")

    def _members(self, composite: _Type) -> Iterator[_Member]:
        unpack = self._u32x3.unpack_from
        first = composite.pos + _TYPE_SIZE
        for pos in range(first, first + composite.vlen * _MEMBER_SIZE, _MEMBER_SIZE):
            name_off, type_id, offset = unpack(self._data, pos)
            if composite.kind_flag:
                yield _Member(name_off, type_id, offset & 0xFFFFFF, offset >> 24)
            else:
                yield _Member(name_off, type_id, offset, 0)

    # -- member look-up ------------------------------------------------------------------------

    def _resolve_path(self, struct_id: int, parts: list[str]) -> int:
        container = self._type(struct_id)
        bit_offset = 0
        member: _Member | None = None
        for i, part in enumerate(parts):
            if member is not None:
                container = self._strip_modifiers(member.type_id)
                if container.kind not in _COMPOSITE_KINDS:
                    raise BtfError(f"{'.'.join(parts[:i])!r} is not a struct or union")
            member = self._find_member(container, _c_string(part), depth=0)
            if member is None:
                raise BtfError(f"no member {'.'.join(parts[: i + 1])!r}")
            bit_offset += member.bit_offset
        assert member is not None  # parts is non-empty
        path = ".".join(parts)
        if self._is_bitfield(member):
            raise BtfError(f"member {path!r} is a bitfield")
        if bit_offset % 8:
            raise BtfError(f"member {path!r} is not byte aligned (bit offset {bit_offset})")
        return bit_offset // 8

    def _find_member(self, container: _Type, name: bytes, depth: int) -> _Member | None:
        """The member called `name`, looking inside anonymous struct/union members too;
        its bit_offset is relative to `container`."""
        if depth > _MAX_DEPTH:
            raise BtfError(f"anonymous members nested too deeply in type id {container.type_id}")
        for member in self._members(container):
            if self._name_equals(member.name_off, name):
                return member
            if member.name_off != 0:
                continue
            inner = self._strip_modifiers(member.type_id)
            if inner.kind not in _COMPOSITE_KINDS:
                continue
            found = self._find_member(inner, name, depth + 1)
            if found is not None:
                return replace(found, bit_offset=member.bit_offset + found.bit_offset)
        return None

    def _is_bitfield(self, member: _Member) -> bool:
        if member.bitfield_size:
            return True
        # Without kind_flag, a bitfield's type is an INT narrower than its storage size.
        member_type = self._strip_modifiers(member.type_id)
        if member_type.kind != KIND_INT:
            return False
        encoding: int = self._u32.unpack_from(self._data, member_type.pos + _TYPE_SIZE)[0]
        nr_bits, int_bit_offset = encoding & 0xFF, (encoding >> 16) & 0xFF
        return int_bit_offset != 0 or nr_bits != member_type.size_or_type * 8

    # -- strings -------------------------------------------------------------------------------

    def _name(self, name_off: int) -> str:
        start = self._layout.str_start + name_off
        end = self._data.find(b"\0", start, self._layout.str_end)
        if end < 0:
            raise BtfError(f"bad string offset {name_off}")
        return self._data[start:end].decode("utf-8", errors="replace")

    def _name_equals(self, name_off: int, c_name: bytes) -> bool:
        """Whether the string at `name_off` is `c_name` (NUL-terminated), without decoding."""
        start = self._layout.str_start + name_off
        end = start + len(c_name)
        return end <= self._layout.str_end and self._data[start:end] == c_name


def _c_string(name: str) -> bytes:
    return name.encode() + b"\0"


def _parse_header(data: bytes) -> _Layout:
    if len(data) < _HEADER_SIZE:
        raise BtfError(f"BTF blob too short ({len(data)} bytes)")
    magic = bytes(data[:2])
    if magic == _MAGIC_LE:
        byte_order = "<"
    elif magic == _MAGIC_BE:
        byte_order = ">"
    else:
        raise BtfError(f"bad BTF magic {magic.hex()} (expected eb9f)")
    _, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        byte_order + _HEADER_FORMAT, data
    )
    if version != _VERSION:
        raise BtfError(f"unsupported BTF version {version}")
    if hdr_len < _HEADER_SIZE:
        raise BtfError(f"BTF header length {hdr_len} is too small")
    layout = _Layout(
        byte_order=byte_order,
        type_start=hdr_len + type_off,
        type_end=hdr_len + type_off + type_len,
        str_start=hdr_len + str_off,
        str_end=hdr_len + str_off + str_len,
    )
    if max(layout.type_end, layout.str_end) > len(data):
        raise BtfError(f"BTF sections extend past the end of the {len(data)}-byte blob")
    # Offset 0 must be the empty name and every name must be NUL-terminated.
    if str_len == 0 or data[layout.str_start] != 0 or data[layout.str_end - 1] != 0:
        raise BtfError("malformed BTF string section")
    return layout


def kernel_offsets(btf: Btf) -> dict[str, int]:
    """The -D defines the BPF program needs (see KERNEL_MEMBERS), as {define: byte offset}."""
    return {
        define: btf.member_offset(struct_name, member)
        for define, (struct_name, member) in KERNEL_MEMBERS.items()
    }
