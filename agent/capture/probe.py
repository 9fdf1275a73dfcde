"""Load the BPF program, attach it to the syscall tracepoints, own its maps.

Start-up order has no race window: the program is compiled and loaded, the
containers map is filled by the caller, then the programs are attached.  Every
capture program runs at syscall exit and needs nothing from an earlier hook,
so a write in flight while they are attached is either seen whole or not at
all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.capture.btf import Btf, kernel_offsets
from agent.capture.headers import find_kernel_headers
from agent.capture.host import HostError, ensure_tracefs, tracefs_dir
from agent.config import CaptureConfig
from agent.kube.model import FileIdent

log = logging.getLogger("podtap.capture")

BPF_DIR_ENV = "PODTAP_BPF_DIR"
# (tracepoint, program): exit tracepoints only; the arguments come from pt_regs.
CAPTURE_PROGRAMS = (
    ("syscalls:sys_exit_write", "exit_write"),
    ("syscalls:sys_exit_writev", "exit_writev"),
    ("syscalls:sys_exit_pwritev2", "exit_writev"),
    ("syscalls:sys_exit_splice", "exit_uncapt_arg2"),
    ("syscalls:sys_exit_tee", "exit_uncapt_arg1"),
    ("syscalls:sys_exit_vmsplice", "exit_uncapt_arg0"),
    ("syscalls:sys_exit_sendfile64", "exit_uncapt_arg0"),
    ("syscalls:sys_exit_copy_file_range", "exit_uncapt_arg2"),
    ("syscalls:sys_exit_io_uring_enter", "exit_io_uring"),
)
SOCKET_PROGRAMS = (
    ("syscalls:sys_exit_sendto", "exit_write"),
    ("syscalls:sys_exit_sendmsg", "exit_sendmsg"),
)
PROCESS_EXIT_PROGRAM = ("sched:sched_process_exit", "on_process_exit")
CGROUP_MKDIR_PROGRAM = ("cgroup:cgroup_mkdir", "on_cgroup_mkdir")
PROCESS_EXEC_PROGRAM = ("sched:sched_process_exec", "on_process_exec")
MKDIR_FIELDS = {"root": "TP_MKDIR_ROOT", "level": "TP_MKDIR_LEVEL", "id": "TP_MKDIR_ID",
                "path": "TP_MKDIR_PATH"}
# Where the first three syscall arguments are saved in struct pt_regs (members, + offset).
SYSCALL_ARG_REGS = {
    "x86_64": (("di", 0), ("si", 0), ("dx", 0)),
    "aarch64": (("orig_x0", 0), ("regs", 8), ("regs", 16)),  # x0 holds the return value
}
REQUIRED_TRACEPOINTS = frozenset(
    {
        "syscalls:sys_exit_write",
        "syscalls:sys_exit_writev",
        "sched:sched_process_exit",
        "cgroup:cgroup_mkdir",
        "sched:sched_process_exec",
    }
)


class ProbeError(Exception):
    """The BPF program could not be built, loaded or attached."""


@dataclass(frozen=True, slots=True)
class PodsRoot:
    """The pods' cgroup subtree: writes under it from unknown cgroups are kept."""

    cgroup_id: int
    level: int  # depth below the cgroup v2 root (the root is level 0)


def tracepoint_offsets(tracefs: str, category: str, event: str) -> dict[str, int]:
    """Field name -> offset, from the tracepoint's tracefs `format` file."""
    path = os.path.join(tracefs, "events", category, event, "format")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ProbeError(f"cannot read {path}: {e.strerror}") from e
    fields = {}
    for m in re.finditer(r"field:([^;]*?)\s*(\w+)(?:\[\])?;\s*offset:(\d+);", text):
        fields[m.group(2)] = int(m.group(3))
    return fields


def syscall_arg_offsets(btf: Btf, machine: str | None = None) -> dict[str, int]:
    """OFF_ARG0..2: offsets of the saved syscall arguments in the kernel's struct pt_regs."""
    machine = machine or platform.machine()
    regs = SYSCALL_ARG_REGS.get(machine)
    if regs is None:
        raise ProbeError(f"syscall argument registers of {machine} are not known to podtap")
    return {
        f"OFF_ARG{i}": btf.member_offset("pt_regs", member) + extra
        for i, (member, extra) in enumerate(regs)
    }


def bpf_dir() -> Path:
    env = os.environ.get(BPF_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


def header_constants(path: Path | None = None) -> dict[str, int]:
    """The integer `#define NAME value` constants of bpf/podtap.h."""
    text = (path or bpf_dir() / "podtap.h").read_text()
    return {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"^#define\s+([A-Z][A-Z0-9_]*)\s+(\d+|0x[0-9a-fA-F]+)\b", text, re.M)
    }


CONSTANTS = header_constants()
COUNTER_NAMES: tuple[str, ...] = tuple(
    name.removeprefix("CNT_").lower()
    for name, _ in sorted(
        ((n, v) for n, v in CONSTANTS.items() if n.startswith("CNT_")), key=lambda nv: nv[1]
    )
)


class ContainerValue(ctypes.Structure):
    _fields_ = [
        ("out_ino", ctypes.c_uint64),
        ("err_ino", ctypes.c_uint64),
        ("out_dev", ctypes.c_uint32),
        ("err_dev", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


def container_value(
    stdout: FileIdent | None, stderr: FileIdent | None, capture_stdout: bool, capture_stderr: bool
) -> ContainerValue:
    flags = 0
    if capture_stdout:
        flags |= CONSTANTS["C_CAPTURE_STDOUT"]
    if capture_stderr:
        flags |= CONSTANTS["C_CAPTURE_STDERR"]
    value = ContainerValue()
    if stdout is not None and stderr is not None:
        flags |= CONSTANTS["C_IDENT_KNOWN"]
        value.out_ino, value.out_dev = stdout.ino, stdout.dev
        value.err_ino, value.err_dev = stderr.ino, stderr.dev
    value.flags = flags
    return value


class Probe:
    """The loaded BPF program. `load()`, fill the map with `watch()`, then `attach()`."""

    def __init__(self, cfg: CaptureConfig, pods_root: PodsRoot | None = None) -> None:
        self.cfg = cfg
        self.pods_root = pods_root
        self._bpf: Any = None
        self._attached: list[str] = []

    # -- lifecycle ---------------------------------------------------------

    def cflags(self, offsets: dict[str, int]) -> list[str]:
        cfg = self.cfg
        flags = [
            f"-I{bpf_dir()}",
            f"-DMAX_WRITE={cfg.max_write}",
            f"-DCHUNK={cfg.chunk}",
            f"-DMAX_ITERS={cfg.copy_iterations}",
            f"-DNCPUS={os.cpu_count() or 1}",
            f"-DRINGBUF_PAGES={cfg.ring_bytes // os.sysconf('SC_PAGE_SIZE')}",
            f"-DMAX_CONTAINERS={cfg.max_containers}",
            f"-DSELF_TGID={os.getpid()}",
        ]
        flags += [f"-D{name}={value}" for name, value in sorted(offsets.items())]
        if self.pods_root is not None:
            flags += [
                f"-DPODS_ROOT_ID={self.pods_root.cgroup_id}ULL",
                f"-DPODS_ROOT_LEVEL={self.pods_root.level}",
            ]
            flags += [f"-D{define}={off}" for define, off in self._mkdir_offsets().items()]
        return flags

    def _mkdir_offsets(self) -> dict[str, int]:
        tracefs = tracefs_dir()
        if tracefs is None:
            raise HostError("tracefs is not mounted")
        fields = tracepoint_offsets(tracefs, "cgroup", "cgroup_mkdir")
        missing = [name for name in MKDIR_FIELDS if name not in fields]
        if missing:
            raise ProbeError(f"cgroup:cgroup_mkdir has no field(s) {', '.join(missing)}")
        return {define: fields[name] for name, define in MKDIR_FIELDS.items()}

    def load(self) -> None:
        """Compile and load the program; nothing is attached yet."""
        ensure_tracefs()
        headers = find_kernel_headers(cache_dir=self.cfg.headers_cache_dir)
        os.environ["BCC_KERNEL_SOURCE"] = headers.path
        btf = Btf.load(self.cfg.btf_path)
        offsets = kernel_offsets(btf) | syscall_arg_offsets(btf)
        try:
            from bcc import BPF
        except ImportError as e:
            raise ProbeError("bcc is not importable: install Debian's python3-bpfcc") from e
        src = bpf_dir() / "podtap.c"
        try:
            self._bpf = BPF(src_file=str(src).encode(), cflags=self.cflags(offsets))
            copy_more = self._bpf.load_func(b"copy_more", BPF.TRACEPOINT)
        except Exception as e:  # bcc raises bare Exception on compile/verifier errors
            raise ProbeError(f"loading {src} failed: {e}") from e
        self._bpf[b"tails"][ctypes.c_int(0)] = ctypes.c_int(copy_more.fd)
        log.info("BPF program loaded (headers: %s, %s)", headers.path, headers.source)

    def attach(self) -> None:
        """Attach the cgroup and process-exit hooks, then the capture programs."""
        if self._bpf is None:
            raise ProbeError("attach() before load()")
        pairs: list[tuple[str, str]] = []
        if self.pods_root is not None:
            pairs.append(CGROUP_MKDIR_PROGRAM)
        pairs += [PROCESS_EXEC_PROGRAM, PROCESS_EXIT_PROGRAM]
        pairs += CAPTURE_PROGRAMS
        if self.cfg.socket_syscalls:
            pairs += SOCKET_PROGRAMS
        base = tracefs_dir()
        if base is None:
            raise HostError("tracefs is not mounted")
        for tp, fn in pairs:
            if not os.path.isdir(os.path.join(base, "events", *tp.split(":"))):
                if tp in REQUIRED_TRACEPOINTS:
                    raise ProbeError(f"tracepoint {tp} does not exist on this kernel")
                log.warning("tracepoint %s does not exist: not covered", tp)
                continue
            try:
                self._bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn.encode())
            except Exception as e:
                self.detach()
                raise ProbeError(f"attaching {fn} to {tp} failed: {e}") from e
            self._attached.append(tp)

    def detach(self) -> None:
        for tp in reversed(self._attached):
            try:
                self._bpf.detach_tracepoint(tp=tp.encode())
            except Exception as e:  # detaching is best effort at shutdown
                log.warning("detaching %s failed: %s", tp, e)
        self._attached.clear()

    def close(self) -> None:
        self.detach()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    @property
    def loaded(self) -> bool:
        return self._bpf is not None

    @property
    def attached(self) -> list[str]:
        return list(self._attached)

    # -- maps ----------------------------------------------------------------

    def watch(
        self,
        cgroup_id: int,
        stdout: FileIdent | None = None,
        stderr: FileIdent | None = None,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
    ) -> None:
        """Put a container in the kernel map (with no capture flag it is excluded)."""
        table = self._bpf[b"containers"]
        table[ctypes.c_uint64(cgroup_id)] = container_value(
            stdout, stderr, capture_stdout, capture_stderr
        )

    def unwatch(self, cgroup_id: int) -> None:
        table = self._bpf[b"containers"]
        with contextlib.suppress(KeyError):
            del table[ctypes.c_uint64(cgroup_id)]

    def counters(self) -> dict[str, int]:
        table = self._bpf[b"counters"]
        values = {}
        for idx, name in enumerate(COUNTER_NAMES):
            per_cpu = table[ctypes.c_int(idx)]
            values[name] = sum(int(v) for v in per_cpu)
        return values

    @property
    def ring_fd(self) -> int:
        return int(self._bpf[b"events"].map_fd)

    @property
    def ring_size(self) -> int:
        return int(self._bpf[b"events"].max_entries)
