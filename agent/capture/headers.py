"""Kernel headers for bcc.

bcc compiles the BPF program at start-up and needs a kernel header tree.  In
order of preference: `$BCC_KERNEL_SOURCE` if set, the host's headers for the
running kernel (`/lib/modules/$(uname -r)/build`), else Debian's
`linux-headers-<flavour>` packages, whose `-common` and `-<arch>` halves are
merged into one tree (a tree of symlinks in a cache directory).  The BPF
program takes no struct layout from these headers (offsets come from BTF), so
headers of another kernel version are good enough.

The cache directory is a hostPath that every agent on the node shares (two
during a rolling update, each pid 1 in its own pod): a tree is built under a
unique temporary name in the cache directory and renamed into place, and the
cache is only trusted when root owns it and no one else can write to it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = "/var/cache/podtap/kernel-headers"
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_MERGED_STAMP = ".podtap-merged"


class HeadersError(Exception):
    """No usable kernel headers; the message says what to install or mount."""


@dataclass(frozen=True, slots=True)
class KernelHeaders:
    path: str
    source: str  # "env", "host" or "debian"


def _is_header_tree(path: Path) -> bool:
    return (path / "include" / "linux").is_dir() and (path / "arch").is_dir()


BUNDLED_DIR = "/opt/podtap/kernel-headers"  # Debian's headers in podtap's image (Dockerfile)


def _debian_pairs(usr_src: Path, arch: str) -> list[tuple[str, Path, Path]]:
    """(version, common, arch) directory pairs of Debian's linux-headers packages."""
    pairs = []
    for arch_dir in usr_src.glob(f"linux-headers-*-{arch}"):
        m = re.fullmatch(rf"linux-headers-(.+)-{re.escape(arch)}", arch_dir.name)
        if not m:
            continue
        common = usr_src / f"linux-headers-{m.group(1)}-common"
        if common.is_dir():
            pairs.append((m.group(1), common, arch_dir))
    return sorted(pairs, key=lambda p: _version_key(p[0]), reverse=True)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror `src` into `dst` as directories and symlinks; later trees win."""
    for root, dirs, files in os.walk(src, followlinks=True):
        rel = Path(root).relative_to(src)
        target_dir = dst / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            link = target_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(root) / name)
        # A symlinked directory (Debian's `scripts`) is walked through, not linked.
        dirs[:] = [d for d in dirs if not d.startswith(".")]


def check_trusted_dir(path: Path) -> None:
    """Refuse a directory others could have planted or could change: it must be a real
    directory (not a symlink), owned by root (or by us), not writable by group or others."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise HeadersError(f"kernel header cache {path}: {e.strerror}") from e
    problems = []
    if not stat.S_ISDIR(st.st_mode):
        problems.append("is not a directory" + (" (a symlink)" if stat.S_ISLNK(st.st_mode) else ""))
    if st.st_uid not in (0, os.geteuid()):
        problems.append(f"is owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
    if problems:
        raise HeadersError(
            f"refusing the kernel header cache {path}: it {' and '.join(problems)}; "
            f"make it a directory owned by root with mode 0755 (chown root: {path}; "
            f"chmod go-w {path}) or set capture.headers_cache_dir elsewhere"
        )


def _cache_dir(path: Path) -> Path:
    """The cache directory, created root-only if missing, checked before it is used."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    check_trusted_dir(path)
    return path


def _planned_tree(cache: Path, version: str, arch: str) -> str:
    """Where the merged tree is or will be; the cache is checked if it exists already."""
    if cache.exists():
        check_trusted_dir(cache)
    return str(cache / f"{version}-{arch}")


def _put_aside(tree: Path) -> None:
    """Move a stale tree out of the way under a unique name, then remove it."""
    aside = Path(tempfile.mkdtemp(prefix=f"{tree.name}.stale-", dir=tree.parent))
    with contextlib.suppress(FileNotFoundError):  # another agent moved it first
        os.rename(tree, aside / tree.name)
    shutil.rmtree(aside, ignore_errors=True)


def merge_debian_headers(common: Path, arch_dir: Path, dest: Path) -> Path:
    """Merge a Debian `-common` and `-<arch>` header pair into `dest` (idempotent, safe
    with several agents merging into the same cache at once)."""
    stamp = dest / _MERGED_STAMP
    if stamp.exists():
        check_trusted_dir(dest)
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        _link_tree(common, tmp)
        _link_tree(arch_dir, tmp)
        (tmp / _MERGED_STAMP).write_text(f"{common}\n{arch_dir}\n")
        for _ in range(3):
            try:
                os.rename(tmp, dest)  # atomic; fails if dest exists and is not empty
                return dest
            except OSError:
                if stamp.exists():  # another agent finished first: theirs is complete
                    check_trusted_dir(dest)
                    return dest
                if not dest.exists():
                    raise
                _put_aside(dest)  # a stale, unstamped tree
        raise HeadersError(f"could not put the merged headers at {dest}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_kernel_headers(
    release: str | None = None,
    cache_dir: str = DEFAULT_CACHE_DIR,
    host_root: str = "/",
    merge: bool = True,
) -> KernelHeaders:
    """Find (or build) a header tree for bcc; raise HeadersError with a remedy if none.
    With merge=False nothing is written: Debian headers are reported with the path they
    would be merged to (`podtap check`)."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if _is_header_tree(Path(env)):
            return KernelHeaders(env, "env")
        raise HeadersError(f"BCC_KERNEL_SOURCE={env} is not a kernel header tree (no include/)")
    release = release or platform.release()
    root = Path(host_root)
    for name in ("build", "source"):
        host = root / "lib/modules" / release / name
        if _is_header_tree(host):
            return KernelHeaders(str(host), "host")
    arch = _DEBIAN_ARCH.get(platform.machine(), platform.machine())
    # The host's /usr/src first; then the image's own copy, which a pod that mounts the
    # host's /usr/src (for the host's headers) would otherwise hide.
    pairs = _debian_pairs(root / "usr/src", arch) or _debian_pairs(Path(BUNDLED_DIR), arch)
    if pairs:
        version, common, arch_dir = pairs[0]
        if not merge:
            return KernelHeaders(_planned_tree(Path(cache_dir), version, arch), "debian")
        dest = _cache_dir(Path(cache_dir)) / f"{version}-{arch}"
        return KernelHeaders(str(merge_debian_headers(common, arch_dir, dest)), "debian")
    raise HeadersError(
        f"no kernel headers for bcc: none for the running kernel {release} under "
        f"{root / 'lib/modules'}, and no Debian linux-headers-*-{arch} package. Install the "
        f"host's headers (linux-headers-{release}), or Debian's linux-headers-{arch} in the "
        "image, or mount the host's /lib/modules and /usr/src into the pod"
    )
