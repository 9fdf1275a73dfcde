"""A minimal container root filesystem: a static busybox and links to the applets tests use.

Debian's `busybox-static` package installs a statically linked `/bin/busybox`; a dynamic
busybox (package `busybox`) would not run in a rootfs without libc, so it is refused.

    rootfs = ensure_rootfs(tmp / "rootfs")   # built once, reused while complete

The build goes to a sibling directory that is renamed into place, so an interrupted build
never leaves a half rootfs that later looks complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Final

APPLETS: Final = ("sh", "echo", "seq", "sleep", "cat", "printf", "head", "yes", "tr")
BUSYBOX_CANDIDATES: Final = ("/bin/busybox", "/usr/bin/busybox")
# Mount points runc would otherwise create inside the rootfs at run time.
EMPTY_DIRS: Final = ("dev", "proc", "sys", "tmp", "etc")
_MARKER: Final = ".podtap-rootfs"
_PT_INTERP: Final = 3


class BusyboxMissingError(RuntimeError):
    """No statically linked busybox on this machine (install Debian's busybox-static)."""


def find_static_busybox() -> Path:
    """The first statically linked busybox among BUSYBOX_CANDIDATES."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and is_static_elf(path):
            return path
    raise BusyboxMissingError(
        f"no static busybox at {', '.join(BUSYBOX_CANDIDATES)}: apt-get install busybox-static"
    )


def is_static_elf(path: Path) -> bool:
    """True for a 64-bit little-endian ELF file without a PT_INTERP (dynamic loader) header."""
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return False
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = (struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum))
    return _PT_INTERP not in types


def ensure_rootfs(directory: Path, busybox: Path | None = None) -> Path:
    """Build the rootfs at `directory` unless a complete one is already there; return it."""
    source = busybox or find_static_busybox()
    stamp = _stamp(source)
    if _is_complete(directory, stamp):
        return directory
    staging = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    _build(staging, source, stamp)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        staging.rename(directory)
    except OSError:  # another process put a rootfs there first
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete(directory, stamp):
            raise
    return directory


def _stamp(busybox: Path) -> str:
    st = busybox.stat()
    return f"{busybox} {st.st_size} {st.st_mtime_ns}\n"


def _is_complete(directory: Path, stamp: str) -> bool:
    marker = directory / _MARKER
    return marker.is_file() and marker.read_text() == stamp


def _build(root: Path, busybox: Path, stamp: str) -> None:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name in EMPTY_DIRS:
        (root / name).mkdir()
    # A copy, never a hard link: a container may write to its rootfs.
    shutil.copy2(busybox, bin_dir / "busybox")
    for applet in APPLETS:
        (bin_dir / applet).symlink_to("busybox")
    (root / _MARKER).write_text(stamp)
