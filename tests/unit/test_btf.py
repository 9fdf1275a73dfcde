"""Tests of the raw BTF reader, on synthetic blobs and on the running kernel's vmlinux BTF."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path
from typing import NamedTuple

import pytest

from agent.capture import btf as btf_mod
from agent.capture.btf import Btf, BtfError, kernel_offsets

VMLINUX = Path("/sys/kernel/btf/vmlinux")


class M(NamedTuple):
    """A struct member for the encoder: bit offset, and bitfield size (kind_flag structs)."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0


class BtfBuilder:
    """Encodes raw BTF; each add_* returns the new type id."""

    def __init__(self, byte_order: str = "<") -> None:
        self._order = byte_order
        self._types: list[bytes] = []
        self._strings = bytearray(b"\0")

    def _str(self, name: str) -> int:
        if not name:
            return 0
        off = len(self._strings)
        self._strings += name.encode() + b"\0"
        return off

    def _u32s(self, *values: int) -> bytes:
        return struct.pack(f"{self._order}{len(values)}I", *values)

    def add(
        self,
        kind: int,
        name: str = "",
        *,
        vlen: int = 0,
        size_or_type: int = 0,
        kind_flag: bool = False,
        trailing: bytes = b"",
    ) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self._types.append(self._u32s(self._str(name), info, size_or_type) + trailing)
        return len(self._types)

    def add_int(self, name: str, size: int, bits: int | None = None) -> int:
        encoding = bits if bits is not None else size * 8
        return self.add(btf_mod.KIND_INT, name, size_or_type=size, trailing=self._u32s(encoding))

    def add_ref(self, kind: int, type_id: int, name: str = "") -> int:
        return self.add(kind, name, size_or_type=type_id)

    def add_struct(
        self,
        name: str,
        size: int,
        members: list[M],
        *,
        union: bool = False,
        kind_flag: bool = False,
    ) -> int:
        trailing = b"".join(
            self._u32s(
                self._str(m.name),
                m.type_id,
                (m.bitfield_size << 24 | m.bit_offset) if kind_flag else m.bit_offset,
            )
            for m in members
        )
        kind = btf_mod.KIND_UNION if union else btf_mod.KIND_STRUCT
        return self.add(
            kind, name, vlen=len(members), size_or_type=size, kind_flag=kind_flag, trailing=trailing
        )

    def add_every_other_kind(self, int_id: int) -> None:
        """One type of each non-struct kind, with non-empty trailing data wherever the kind
        has any, so that a wrong record size desyncs the scan."""
        k = btf_mod
        self.add(k.KIND_PTR, size_or_type=int_id)
        self.add(k.KIND_ARRAY, trailing=self._u32s(int_id, int_id, 4))
        self.add(k.KIND_ENUM, "e", vlen=2, size_or_type=4, trailing=self._u32s(0, 1, 0, 2))
        self.add(k.KIND_FWD, "fwd_struct")
        self.add_ref(k.KIND_TYPEDEF, int_id, "int_t")
        self.add_ref(k.KIND_VOLATILE, int_id)
        self.add_ref(k.KIND_CONST, int_id)
        proto = self.add(
            k.KIND_FUNC_PROTO,
            vlen=2,
            size_or_type=int_id,
            trailing=self._u32s(0, int_id, 0, int_id),
        )
        self.add_ref(k.KIND_RESTRICT, int_id + 1)
        func = self.add(k.KIND_FUNC, "fn", size_or_type=proto)
        var = self.add(k.KIND_VAR, "v", size_or_type=int_id, trailing=self._u32s(1))
        self.add(
            k.KIND_DATASEC,
            ".data",
            vlen=2,
            size_or_type=8,
            trailing=self._u32s(var, 0, 4, var, 4, 4),
        )
        self.add(k.KIND_FLOAT, "double", size_or_type=8)
        self.add(k.KIND_DECL_TAG, "tag", size_or_type=func, trailing=self._u32s(0xFFFFFFFF))
        self.add(k.KIND_TYPE_TAG, "user", size_or_type=int_id)
        self.add(
            k.KIND_ENUM64, "e64", vlen=2, size_or_type=8, trailing=self._u32s(0, 1, 0, 0, 2, 0)
        )

    def build(self, *, type_len_delta: int = 0) -> bytes:
        types = b"".join(self._types)
        header = struct.pack(
            self._order + "HBBIIIII",
            0xEB9F,
            1,
            0,
            24,
            0,
            len(types) + type_len_delta,
            len(types),
            len(self._strings),
        )
        return header + types + bytes(self._strings)


def sample_blob(byte_order: str = "<") -> bytes:
    b = BtfBuilder(byte_order)
    int_id = b.add_int("int", 4)
    ulong = b.add_int("unsigned long", 8)
    uint = b.add_int("unsigned int", 4)
    char = b.add_int("char", 1)
    uint3 = b.add_int("unsigned int", 4, bits=3)  # pre-kind_flag bitfield encoding
    b.add_every_other_kind(int_id)

    inner = b.add_struct("inner", 16, [M("x", int_id, 0), M("y", ulong, 64)])
    inner_t = b.add_ref(btf_mod.KIND_TYPEDEF, inner, "inner_t")
    const_inner_t = b.add_ref(btf_mod.KIND_CONST, inner_t)
    anon_struct = b.add_struct("", 16, [M("deep_a", uint, 0), M("deep_b", ulong, 64)])
    anon_union = b.add_struct("", 16, [M("u_word", ulong, 0), M("", anon_struct, 0)], union=True)
    ulong_t = b.add_ref(btf_mod.KIND_TYPEDEF, ulong, "ulong_t")
    ptr_inner = b.add_ref(btf_mod.KIND_PTR, inner)
    b.add_struct(
        "sample",
        72,
        [
            M("a", int_id, 0),
            M("b", ulong_t, 64),
            M("", anon_union, 128),
            M("inner", inner_t, 256),
            M("cinner", const_inner_t, 384),
            M("ptr_m", ptr_inner, 512),
        ],
    )
    b.add_struct(
        "flags",
        16,
        [M("mode", uint, 0, 3), M("wide", uint, 8, 8), M("plain", ulong, 64)],
        kind_flag=True,
    )
    b.add_struct("old_flags", 8, [M("mode", uint3, 0), M("after", uint, 32)])
    b.add_struct("packed", 2, [M("c", char, 0), M("odd", char, 4)])
    b.add_struct("dup", 4, [M("only_first", int_id, 0)])
    b.add_struct("dup", 16, [M("only_second", ulong, 0), M("z", ulong, 64)])
    return b.build()


@pytest.fixture(scope="module")
def sample() -> Btf:
    return Btf.from_bytes(sample_blob())


@pytest.mark.parametrize(
    ("path", "offset"),
    [
        ("a", 0),
        ("b", 8),
        ("u_word", 16),
        ("deep_a", 16),
        ("deep_b", 24),
        ("inner", 32),
        ("inner.x", 32),
        ("inner.y", 40),
        ("cinner.y", 56),
        ("ptr_m", 64),
    ],
)
def test_member_offsets(sample: Btf, path: str, offset: int) -> None:
    assert sample.member_offset("sample", path) == offset


def test_struct_size(sample: Btf) -> None:
    assert sample.struct_size("sample") == 72
    assert sample.struct_size("inner") == 16


def test_record_after_every_kind_is_found(sample: Btf) -> None:
    assert sample.member_offset("inner", "y") == 8


def test_same_named_structs_prefer_the_one_with_the_member(sample: Btf) -> None:
    assert sample.member_offset("dup", "only_first") == 0
    assert sample.member_offset("dup", "z") == 8


def test_non_bitfield_member_of_kind_flag_struct(sample: Btf) -> None:
    assert sample.member_offset("flags", "plain") == 8


@pytest.mark.parametrize(
    ("struct_name", "path", "message"),
    [
        ("flags", "mode", "bitfield"),
        ("flags", "wide", "bitfield"),
        ("old_flags", "mode", "bitfield"),
        ("packed", "odd", "byte aligned"),
        ("nope", "a", "no struct or union named 'nope'"),
        ("sample", "missing", "no member 'missing'"),
        ("sample", "inner.missing", "no member 'inner.missing'"),
        ("sample", "a.x", "'a' is not a struct or union"),
        ("sample", "ptr_m.x", "'ptr_m' is not a struct or union"),
        ("sample", "inner..x", "malformed member path"),
        ("sample", "", "malformed member path"),
    ],
)
def test_member_errors(sample: Btf, struct_name: str, path: str, message: str) -> None:
    with pytest.raises(BtfError, match=message):
        sample.member_offset(struct_name, path)


def test_unknown_struct_size(sample: Btf) -> None:
    with pytest.raises(BtfError, match="no struct or union named"):
        sample.struct_size("nope")


def test_anonymous_struct_is_not_indexed_by_empty_name(sample: Btf) -> None:
    with pytest.raises(BtfError):
        sample.member_offset("", "deep_a")


def test_big_endian_blob() -> None:
    big = Btf.from_bytes(sample_blob(">"))
    assert big.member_offset("sample", "deep_b") == 24
    assert big.member_offset("sample", "inner.y") == 40


def test_wrong_magic() -> None:
    blob = bytearray(sample_blob())
    blob[0:2] = b"\x7fE"
    with pytest.raises(BtfError, match="magic"):
        Btf.from_bytes(bytes(blob))


def test_wrong_version() -> None:
    blob = bytearray(sample_blob())
    blob[2] = 2
    with pytest.raises(BtfError, match="version"):
        Btf.from_bytes(bytes(blob))


def test_every_truncation_is_a_btf_error() -> None:
    blob = sample_blob()
    for cut in range(len(blob)):
        with pytest.raises(BtfError):
            Btf.from_bytes(blob[:cut])


def test_type_record_running_past_its_section() -> None:
    b = BtfBuilder()
    b.add_struct("s", 4, [M("a", b.add_int("int", 4), 0)])
    with pytest.raises(BtfError, match="type section"):
        Btf.from_bytes(b.build(type_len_delta=-4))


def test_unknown_kind() -> None:
    b = BtfBuilder()
    b.add_int("int", 4)
    b.add(20, "future")
    with pytest.raises(BtfError, match="unknown BTF kind 20"):
        Btf.from_bytes(b.build())


def test_dangling_member_type_id() -> None:
    b = BtfBuilder()
    b.add_struct("s", 8, [M("", 99, 0), M("a", 99, 32)])
    with pytest.raises(BtfError, match="type id 99"):
        Btf.from_bytes(b.build()).member_offset("s", "a")


def test_typedef_cycle() -> None:
    b = BtfBuilder()
    b.add_ref(btf_mod.KIND_TYPEDEF, 2, "a_t")
    b.add_ref(btf_mod.KIND_TYPEDEF, 1, "b_t")
    b.add_struct("s", 8, [M("", 1, 0)])
    with pytest.raises(BtfError, match="too long"):
        Btf.from_bytes(b.build()).member_offset("s", "x")


def _lookups_raise_only_btf_error(blob: bytes) -> None:
    try:
        btf = Btf.from_bytes(blob)
    except BtfError:
        return
    for struct_name, path in [("sample", "deep_b"), ("sample", "inner.y"), ("flags", "mode")]:
        try:
            btf.member_offset(struct_name, path)
            btf.struct_size(struct_name)
        except BtfError:
            pass


def test_garbage_after_valid_header_raises_only_btf_error() -> None:
    rng = random.Random(0)
    for _ in range(300):
        body = rng.randbytes(rng.randrange(1, 400))
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body) - 1, len(body) - 1, 1)
        _lookups_raise_only_btf_error(header + body[:-1] + b"\0")


def test_corrupted_bytes_raise_only_btf_error() -> None:
    blob = sample_blob()
    rng = random.Random(1)
    for pos in range(len(blob)):
        corrupted = bytearray(blob)
        corrupted[pos] = rng.choice([b for b in range(256) if b != blob[pos]])
        _lookups_raise_only_btf_error(bytes(corrupted))


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(sample_blob())
    assert Btf.load(str(path)).member_offset("sample", "b") == 8


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="cannot read BTF"):
        Btf.load(str(tmp_path / "missing"))


def test_kernel_offsets_on_synthetic_kernel() -> None:
    b = BtfBuilder()
    ptr = b.add_ref(btf_mod.KIND_PTR, 0)
    members: dict[str, list[str]] = {}
    for struct_name, member in btf_mod.KERNEL_MEMBERS.values():
        members.setdefault(struct_name, []).append(member)
    # Each member sits one pointer further than the previous one of its struct.
    for struct_name, names in members.items():
        b.add_struct(struct_name, 512, [M(name, ptr, 64 * (i + 1)) for i, name in enumerate(names)])
    expected = {
        define: 8 * (members[struct_name].index(member) + 1)
        for define, (struct_name, member) in btf_mod.KERNEL_MEMBERS.items()
    }
    assert kernel_offsets(Btf.from_bytes(b.build())) == expected


# -- the running kernel ----------------------------------------------------------------------

# define -> (struct, natural alignment of the member's type)
KERNEL_ALIGNMENT = {
    "OFF_TASK_FILES": ("task_struct", 8),
    "OFF_FILES_FDT": ("files_struct", 8),
    "OFF_FDT_MAX_FDS": ("fdtable", 4),
    "OFF_FDT_FD": ("fdtable", 8),
    "OFF_FILE_F_INODE": ("file", 8),
    "OFF_INODE_I_INO": ("inode", 8),
    "OFF_INODE_I_SB": ("inode", 8),
    "OFF_SB_S_DEV": ("super_block", 4),
}


@pytest.fixture(scope="module")
def vmlinux() -> Btf:
    if not VMLINUX.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{VMLINUX} is missing on CI")
        pytest.skip(f"{VMLINUX} is missing (kernel without CONFIG_DEBUG_INFO_BTF)")
    return Btf.load(str(VMLINUX))


def test_vmlinux_kernel_offsets(vmlinux: Btf) -> None:
    offsets = kernel_offsets(vmlinux)
    assert offsets.keys() == KERNEL_ALIGNMENT.keys()
    for define, offset in offsets.items():
        struct_name, alignment = KERNEL_ALIGNMENT[define]
        assert 0 <= offset < vmlinux.struct_size(struct_name), define
        assert offset % alignment == 0, define


def test_vmlinux_stable_facts(vmlinux: Btf) -> None:
    assert vmlinux.member_offset("list_head", "next") == 0
    assert vmlinux.member_offset("list_head", "prev") == 8
    assert vmlinux.struct_size("list_head") == 16
    assert vmlinux.member_offset("hlist_node", "pprev") == 8
