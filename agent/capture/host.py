"""What the node must offer for capture, checked one requirement at a time.

Used by `podtap check` (all checks, with remedies) and by the probe at
start-up (tracefs is mounted if missing; a failed requirement is a clear error).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.capture.headers import HeadersError, find_kernel_headers

TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
TRACEPOINTS = (
    "syscalls/sys_enter_write",
    "syscalls/sys_exit_write",
    "syscalls/sys_enter_writev",
    "syscalls/sys_exit_writev",
    "sched/sched_process_exit",
)
MIN_KERNEL = (5, 8)  # BPF ring buffer
CAP_SYS_ADMIN = 21
CAP_BPF = 39
CAP_PERFMON = 38


class HostError(Exception):
    """A node requirement is not met; the message names the remedy."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    remedy: str = ""


def kernel_version(release: str | None = None) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def tracefs_dir() -> str | None:
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def ensure_tracefs() -> str:
    """Return the tracefs directory, mounting tracefs at /sys/kernel/tracing if needed."""
    found = tracefs_dir()
    if found:
        return found
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    target = TRACEFS_PATHS[0]
    if libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise HostError(
            f"tracefs is not mounted and mounting it at {target} failed ({os.strerror(err)}): "
            f"run `mount -t tracefs nodev {target}` on the node, or mount the host's "
            f"{target} into the pod (hostPath)"
        )
    found = tracefs_dir()
    if not found:
        raise HostError(f"tracefs mounted at {target} but it has no events/ directory")
    return found


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_kernel() -> CheckResult:
    ver = kernel_version()
    ok = ver >= MIN_KERNEL
    return CheckResult(
        "kernel version",
        ok,
        f"{platform.release()}",
        "" if ok else "podtap needs Linux >= 5.8 (BPF ring buffer)",
    )


def check_btf() -> CheckResult:
    ok = os.path.isfile("/sys/kernel/btf/vmlinux")
    return CheckResult(
        "kernel BTF",
        ok,
        "/sys/kernel/btf/vmlinux" + ("" if ok else " missing"),
        "" if ok else "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def check_tracefs() -> CheckResult:
    try:
        path = ensure_tracefs()
    except HostError as e:
        return CheckResult("tracefs", False, "not mounted", str(e))
    return CheckResult("tracefs", True, path)


def check_tracepoints() -> CheckResult:
    base = tracefs_dir()
    if not base:
        return CheckResult("tracepoints", False, "tracefs not mounted", "mount tracefs first")
    missing = [tp for tp in TRACEPOINTS if not os.path.isdir(os.path.join(base, "events", tp))]
    return CheckResult(
        "syscall and sched tracepoints",
        not missing,
        "all present" if not missing else "missing: " + ", ".join(missing),
        "" if not missing else "use a kernel with CONFIG_FTRACE_SYSCALLS=y",
    )


def check_ringbuf() -> CheckResult:
    ok = kernel_version() >= MIN_KERNEL and os.path.isfile("/sys/kernel/btf/vmlinux")
    if ok:
        ok = b"ringbuf" in Path("/sys/kernel/btf/vmlinux").read_bytes()
    return CheckResult(
        "BPF ring buffer",
        ok,
        "supported" if ok else "not found in the kernel's BTF",
        "" if ok else "podtap needs BPF_MAP_TYPE_RINGBUF (Linux >= 5.8)",
    )


def check_cgroup2() -> CheckResult:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return CheckResult("cgroup v2", True, left.split()[4])
    return CheckResult(
        "cgroup v2", False, "no cgroup2 mount", "boot with cgroup v2 (unified or hybrid)"
    )


def check_headers() -> CheckResult:
    try:
        found = find_kernel_headers()
    except (HeadersError, OSError) as e:
        return CheckResult("kernel headers for bcc", False, "none", str(e))
    return CheckResult("kernel headers for bcc", True, f"{found.path} ({found.source})")


def check_bcc() -> CheckResult:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return CheckResult(
            "bcc", False, str(e), "install Debian's python3-bpfcc (make deps)"
        )
    return CheckResult("bcc", True, "importable")


def check_privileges() -> CheckResult:
    caps = _effective_caps()
    has_admin = bool(caps & (1 << CAP_SYS_ADMIN))
    has_bpf = bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON))
    ok = has_admin or (has_bpf and os.geteuid() == 0)
    return CheckResult(
        "privileges",
        ok,
        f"euid={os.geteuid()} CAP_SYS_ADMIN={has_admin} CAP_BPF+CAP_PERFMON={has_bpf}",
        "" if ok else "run as root with CAP_SYS_ADMIN (or CAP_BPF and CAP_PERFMON)",
    )


CHECKS: tuple[Callable[[], CheckResult], ...] = (
    check_kernel,
    check_btf,
    check_privileges,
    check_tracefs,
    check_tracepoints,
    check_ringbuf,
    check_cgroup2,
    check_bcc,
    check_headers,
)


def run_checks() -> list[CheckResult]:
    return [check() for check in CHECKS]
