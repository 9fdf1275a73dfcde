"""What the node must offer for capture, checked one requirement at a time.

Used by `podtap check` (all checks, with remedies; it changes nothing on the
node) and by the probe at start-up (tracefs is mounted if missing; a failed
requirement is a clear error).

What is checked is what the program uses: `HOOKS` is the one list of the
tracepoints the probe attaches, and the kernel version, BPF helpers and map
types are read from the program's source (bpf/podtap.c).
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

from agent.capture.abi import bpf_dir
from agent.capture.headers import DEFAULT_CACHE_DIR, HeadersError, find_kernel_headers

TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
CAP_SYS_ADMIN = 21
CAP_BPF = 39
CAP_PERFMON = 38


class HostError(Exception):
    """A node requirement is not met; the message names the remedy."""


@dataclass(frozen=True, slots=True)
class Hook:
    """A tracepoint the probe attaches a program of bpf/podtap.c to."""

    tracepoint: str  # "category:event"
    program: str  # the function in bpf/podtap.c
    required: bool  # without it podtap cannot capture: the probe refuses to start
    only_if: str = ""  # "": always; "pods_root": podtap run; "sockets": capture.socket_syscalls


# In attach order: the cgroup and process hooks before the capture programs.
HOOKS: tuple[Hook, ...] = (
    Hook("cgroup:cgroup_mkdir", "on_cgroup_mkdir", True, "pods_root"),
    Hook("sched:sched_process_exec", "on_process_exec", True),
    Hook("sched:sched_process_exit", "on_process_exit", True),
    Hook("syscalls:sys_exit_write", "exit_write", True),
    Hook("syscalls:sys_exit_writev", "exit_writev", True),
    Hook("syscalls:sys_exit_pwritev2", "exit_writev", False),
    Hook("syscalls:sys_exit_splice", "exit_uncapt_arg2", False),
    Hook("syscalls:sys_exit_tee", "exit_uncapt_arg1", False),
    Hook("syscalls:sys_exit_vmsplice", "exit_uncapt_arg0", False),
    Hook("syscalls:sys_exit_sendfile64", "exit_uncapt_arg0", False),
    Hook("syscalls:sys_exit_copy_file_range", "exit_uncapt_arg2", False),
    Hook("syscalls:sys_exit_io_uring_enter", "exit_io_uring", False),
    Hook("syscalls:sys_exit_sendto", "exit_write", False, "sockets"),
    Hook("syscalls:sys_exit_sendmsg", "exit_sendmsg", False, "sockets"),
    Hook("syscalls:sys_exit_sendmmsg", "exit_sendmmsg", False, "sockets"),
)

# The first kernel with each BPF helper / map type the program may use (bcc's
# docs/kernel-versions.md). A helper missing here makes `podtap check` fail: add it.
HELPER_SINCE: dict[str, tuple[int, int]] = {
    "bpf_map_lookup_elem": (3, 19),
    "bpf_map_update_elem": (3, 19),
    "bpf_map_delete_elem": (3, 19),
    "bpf_get_smp_processor_id": (4, 1),
    "bpf_tail_call": (4, 2),
    "bpf_get_current_pid_tgid": (4, 2),
    "bpf_get_current_comm": (4, 2),
    "bpf_get_current_task": (4, 8),
    "bpf_get_current_cgroup_id": (4, 18),
    "bpf_probe_read_kernel": (5, 5),
    "bpf_probe_read_kernel_str": (5, 5),
    "bpf_probe_read_user": (5, 5),
    "bpf_probe_read_user_str": (5, 5),
    "bpf_get_current_ancestor_cgroup_id": (5, 6),
    "bpf_ktime_get_boot_ns": (5, 8),
    "bpf_ringbuf_output": (5, 8),
    "bpf_ringbuf_reserve": (5, 8),
    "bpf_ringbuf_submit": (5, 8),
    "bpf_ringbuf_discard": (5, 8),
    "bpf_get_current_task_btf": (5, 11),
    "bpf_task_pt_regs": (5, 15),
}
MAP_TYPE_SINCE: dict[str, tuple[int, int]] = {
    "hash": (3, 19),
    "array": (3, 19),
    "prog_array": (4, 2),
    "percpu_array": (4, 6),
    "lru_hash": (4, 10),
    "ringbuf": (5, 8),
}
# bcc's map methods and declaration macros, as the helpers and map types they compile to.
_BCC_METHODS = {
    "lookup": "bpf_map_lookup_elem",
    "update": "bpf_map_update_elem",
    "insert": "bpf_map_update_elem",
    "delete": "bpf_map_delete_elem",
    "call": "bpf_tail_call",
    "ringbuf_output": "bpf_ringbuf_output",
    "ringbuf_reserve": "bpf_ringbuf_reserve",
    "ringbuf_submit": "bpf_ringbuf_submit",
    "ringbuf_discard": "bpf_ringbuf_discard",
}
_BCC_MAP_MACROS = {
    "BPF_HASH": "hash",
    "BPF_ARRAY": "array",
    "BPF_PERCPU_ARRAY": "percpu_array",
    "BPF_PROG_ARRAY": "prog_array",
    "BPF_RINGBUF_OUTPUT": "ringbuf",
}


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    remedy: str = ""
    warning: bool = False  # passed, but with something the user should know


# --- what the program uses ------------------------------------------------------------------


def bpf_source_dir() -> Path:
    return bpf_dir()


@dataclass(frozen=True, slots=True)
class ProgramNeeds:
    """The programs, BPF helpers and map types a BPF C source uses."""

    programs: frozenset[str]
    helpers: frozenset[str]
    map_types: frozenset[str]

    def unknown(self) -> list[str]:
        return sorted(
            [h for h in self.helpers if h not in HELPER_SINCE]
            + [f"map type {m}" for m in self.map_types if m not in MAP_TYPE_SINCE]
        )

    def min_kernel(self) -> tuple[tuple[int, int], list[str]]:
        """The first kernel with all of it, and what sets that version."""
        since = {h: HELPER_SINCE[h] for h in self.helpers if h in HELPER_SINCE}
        since |= {f"map type {m}": MAP_TYPE_SINCE[m] for m in self.map_types if m in MAP_TYPE_SINCE}
        newest = max(since.values(), default=(0, 0))
        return newest, sorted(name for name, v in since.items() if v == newest)


def _without_comments(source: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", source, flags=re.S)


def program_needs(source: str) -> ProgramNeeds:
    code = _without_comments(source)
    programs = set(re.findall(r"^int\s+(\w+)\s*\(", code, re.M))
    programs |= set(re.findall(r"^EXIT_PROGRAM\((\w+)", code, re.M))
    helpers = set(re.findall(r"\b(bpf_\w+)\s*\(", code))
    helpers |= {_BCC_METHODS[m] for m in re.findall(r"\.(\w+)\s*\(", code) if m in _BCC_METHODS}
    maps = {_BCC_MAP_MACROS[m] for m in re.findall(r"^(BPF_\w+)\s*\(", code, re.M)
            if m in _BCC_MAP_MACROS}
    maps |= set(re.findall(r'^BPF_TABLE\(\s*"(\w+)"', code, re.M))
    return ProgramNeeds(frozenset(programs), frozenset(helpers), frozenset(maps))


def read_program_needs(source: Path | None = None) -> ProgramNeeds:
    path = source or bpf_source_dir() / "podtap.c"
    try:
        return program_needs(path.read_text())
    except OSError as e:
        raise HostError(f"cannot read the BPF program {path}: {e.strerror}") from e


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


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def check_kernel(release: str | None = None, needs: ProgramNeeds | None = None) -> CheckResult:
    """The running kernel against the newest helper or map type the program uses."""
    release = release or platform.release()
    try:
        needs = needs or read_program_needs()
    except HostError as e:
        return CheckResult("kernel version", False, release, str(e))
    unknown = needs.unknown()
    if unknown:
        return CheckResult(
            "kernel version", False, f"{release}; unknown to podtap check: {', '.join(unknown)}",
            "add them to HELPER_SINCE / MAP_TYPE_SINCE in agent/capture/host.py",
        )
    minimum, why = needs.min_kernel()
    ok = kernel_version(release) >= minimum
    detail = f"{release} (the program needs >= {_version_text(minimum)} for {', '.join(why)})"
    remedy = "" if ok else f"podtap needs Linux >= {_version_text(minimum)}"
    return CheckResult("kernel version", ok, detail, remedy)


def check_btf(path: str = VMLINUX_BTF) -> CheckResult:
    ok = os.path.isfile(path)
    return CheckResult(
        "kernel BTF",
        ok,
        path + ("" if ok else " missing"),
        "" if ok else "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def check_bpf_features(
    btf_path: str = VMLINUX_BTF, needs: ProgramNeeds | None = None
) -> CheckResult:
    """Every helper and map type the program uses, in the running kernel (its BTF names
    each one it has in `enum bpf_func_id` / `enum bpf_map_type`, backports included)."""
    name = "BPF helpers and map types"
    try:
        needs = needs or read_program_needs()
        strings = Path(btf_path).read_bytes()
    except (HostError, OSError) as e:
        return CheckResult(name, False, "cannot check", str(e))
    wanted = {f"BPF_FUNC_{h.removeprefix('bpf_')}": h for h in needs.helpers}
    wanted |= {f"BPF_MAP_TYPE_{m.upper()}": f"map type {m}" for m in needs.map_types}
    missing = sorted(
        what for enum, what in wanted.items() if b"\0" + enum.encode() + b"\0" not in strings
    )
    if missing:
        return CheckResult(
            name, False, "missing: " + ", ".join(missing),
            "the kernel cannot load podtap's program: use a newer kernel",
        )
    return CheckResult(name, True, f"all {len(wanted)} present")


def mounted_tracefs(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """A tracefs mount point from the mount table. Looking at the usual paths instead
    would mount it: the kernel automounts tracefs at /sys/kernel/debug/tracing on access."""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    points = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split(" ", 1)[0] == "tracefs" and len(fields) > 4:
            points.append(fields[4])
    for preferred in TRACEFS_PATHS:
        if preferred in points:
            return preferred
    return points[0] if points else None


def check_tracefs(
    mountinfo: str = "/proc/self/mountinfo", filesystems: str = "/proc/filesystems"
) -> CheckResult:
    """Where tracefs is mounted; never mounts it (podtap run does, if it has to)."""
    found = mounted_tracefs(mountinfo)
    if found is not None:
        return CheckResult("tracefs", True, found)
    try:
        known = "tracefs" in Path(filesystems).read_text().split()
    except OSError:
        known = False
    if not known:
        return CheckResult("tracefs", False, "not in this kernel", "use a kernel with tracefs")
    target = TRACEFS_PATHS[0]
    if _effective_caps() & (1 << CAP_SYS_ADMIN):
        return CheckResult(
            "tracefs", True, f"not mounted: podtap run will mount it at {target}", warning=True
        )
    return CheckResult(
        "tracefs", False, "not mounted",
        f"mount the host's {target} into the pod, or run `mount -t tracefs nodev {target}`",
    )


def _tracepoint_exists(tracefs: str, tracepoint: str) -> bool:
    return os.path.isdir(os.path.join(tracefs, "events", *tracepoint.split(":")))


def check_tracepoints(
    tracefs: str | None = None, hooks: tuple[Hook, ...] = HOOKS
) -> CheckResult:
    """The tracepoints the probe attaches: a missing required one fails, a missing optional
    one is a gap in coverage (counted writes it cannot see)."""
    name = "tracepoints"
    base = tracefs or mounted_tracefs()
    if base is None:
        return CheckResult(
            name, True, "not checked: tracefs is not mounted (podtap run checks them)",
            warning=True,
        )
    missing = [h for h in hooks if not _tracepoint_exists(base, h.tracepoint)]
    required = [h.tracepoint for h in missing if h.required]
    optional = [h.tracepoint for h in missing if not h.required]
    if required:
        return CheckResult(
            name, False, "missing: " + ", ".join(required + optional),
            "use a kernel with CONFIG_FTRACE_SYSCALLS=y and the sched and cgroup tracepoints",
        )
    if optional:
        return CheckResult(
            name, True,
            f"{len(hooks) - len(optional)} of {len(hooks)}; not covered: {', '.join(optional)}",
            warning=True,
        )
    return CheckResult(name, True, f"all {len(hooks)} present")


def check_cgroup2() -> CheckResult:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return CheckResult("cgroup v2", True, left.split()[4])
    return CheckResult(
        "cgroup v2", False, "no cgroup2 mount", "boot with cgroup v2 (unified or hybrid)"
    )


def check_headers(cache_dir: str = DEFAULT_CACHE_DIR) -> CheckResult:
    try:
        found = find_kernel_headers(cache_dir=cache_dir, merge=False)
    except (HeadersError, OSError) as e:
        return CheckResult("kernel headers for bcc", False, "none", str(e))
    if found.source == "debian" and not os.path.isdir(found.path):
        return CheckResult(
            "kernel headers for bcc", True,
            f"Debian's headers: podtap run will merge them into {found.path}",
        )
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
    check_bpf_features,
    check_tracefs,
    check_tracepoints,
    check_cgroup2,
    check_bcc,
    check_headers,
)


def run_checks(headers_cache_dir: str = DEFAULT_CACHE_DIR) -> list[CheckResult]:
    """Every check; the headers are looked for where `podtap run` would merge them
    (`capture.headers_cache_dir`)."""
    return [check_headers(headers_cache_dir) if check is check_headers else check()
            for check in CHECKS]
