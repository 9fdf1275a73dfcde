"""Build and load the BPF program in a short-lived child process.

bcc compiles bpf/podtap.c with clang/LLVM, which maps ~80 MiB into the process
that imports it and never gives it back.  So the agent spawns a fresh
interpreter (`python -m agent.capture.loader FD`, not a fork of a process that
has already imported things) that compiles and loads the program, then sends
the program and map file descriptors back over a unix socket (SCM_RIGHTS) with
their names, sizes and ids, and exits.  The kernel objects live as long as any
descriptor does: the agent holds them, drives the maps with bpf(2)
(agent/capture/bpfsys.py) and attaches the programs itself.

Protocol (one SOCK_SEQPACKET message each way): the agent sends a JSON
request (`LoadRequest`); the child answers with a JSON reply and the fds, or
with {"error": "..."} (then the agent adds the child's stderr: clang's and the
verifier's messages).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.capture import bpfsys

LOAD_TIMEOUT_S = 600.0  # compiling takes seconds; on a loaded node, much longer
MAX_FDS = 250  # SCM_MAX_FD is 253
REPLY_BYTES = 1 << 20
STDERR_TAIL = 6000
# Where the first three syscall arguments are saved in struct pt_regs (members, + offset).
SYSCALL_ARG_REGS = {
    "x86_64": (("di", 0), ("si", 0), ("dx", 0)),
    "aarch64": (("orig_x0", 0), ("regs", 8), ("regs", 16)),  # x0 holds the return value
}
MKDIR_FIELDS = {"root": "TP_MKDIR_ROOT", "level": "TP_MKDIR_LEVEL", "id": "TP_MKDIR_ID",
                "path": "TP_MKDIR_PATH"}
# bcc map declarations: BPF_TABLE("type", key, leaf, NAME, ...) or BPF_XXX(NAME, ...).
_MAP_DECL = re.compile(r"^\s*BPF_(\w+)\(\s*([^,)]+)(?:,([^;]*))?\)\s*;", re.M)


class LoaderError(Exception):
    """The loader child could not build or load the program."""


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What the child needs: all of it plain data (JSON)."""

    source: str  # bpf/podtap.c
    max_write: int
    chunk: int
    copy_iterations: int
    ring_bytes: int
    max_containers: int
    headers_cache_dir: str
    btf_path: str
    self_tgid: int  # the agent's pid: its own writes are never captured
    programs: list[str]  # functions to load as tracepoint programs
    tracepoints: list[str]  # "category:event" whose ids the agent needs
    pods_root: tuple[int, int] | None = None  # (cgroup id, level)
    defines: dict[str, int] = field(default_factory=dict)  # added or overriding -D defines


@dataclass(frozen=True, slots=True)
class Loaded:
    """What the agent holds: the fds are its own, to close when done."""

    programs: dict[str, int]  # function name -> program fd
    program_ids: dict[str, int]
    maps: dict[str, bpfsys.MapInfo]
    tracepoint_ids: dict[str, int | None]  # None: the tracepoint does not exist here
    headers: str  # which kernel headers bcc compiled against

    def close(self) -> None:
        for fd in {*self.programs.values(), *(m.fd for m in self.maps.values())}:
            os.close(fd)


# -- the agent's side ---------------------------------------------------------------------


def load_in_child(request: LoadRequest, timeout_s: float = LOAD_TIMEOUT_S) -> Loaded:
    """Spawn the loader, send it the request, receive the fds; the child has exited when
    this returns.  A failure raises LoaderError with the child's own messages."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with mine, tempfile.TemporaryFile() as err:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "agent.capture.loader", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                pass_fds=(theirs.fileno(),), env=_child_env(),
            )
        finally:
            theirs.close()  # the child's copy is the only one: its exit is our EOF
        try:
            mine.settimeout(timeout_s)
            mine.sendall(json.dumps(asdict(request)).encode())
            data, fds, _flags, _addr = socket.recv_fds(mine, REPLY_BYTES, MAX_FDS)
        except (TimeoutError, OSError) as e:
            child.kill()
            child.wait()
            raise LoaderError(f"the BPF loader did not answer ({e}){_tail(err)}") from e
        status = child.wait()
        try:
            return _loaded(data, fds, status, err)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise


def _child_env() -> dict[str, str]:
    """The agent's environment, with this package importable from the child."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _tail(err: Any) -> str:
    err.seek(0)
    text: str = err.read().decode("utf-8", "replace").strip()
    if not text:
        return ""
    if len(text) > STDERR_TAIL:
        text = "..." + text[-STDERR_TAIL:]
    return "\n" + text


def _loaded(data: bytes, fds: list[int], status: int, err: Any) -> Loaded:
    if not data:
        raise LoaderError(f"the BPF loader exited with status {status} without an answer"
                          f"{_tail(err)}")
    reply = json.loads(data)
    if "error" in reply:
        raise LoaderError(f"{reply['error']}{_tail(err)}")
    if len(fds) != len(reply["programs"]) + len(reply["maps"]):
        raise LoaderError(f"the BPF loader sent {len(fds)} fds for {reply}")
    programs = {name: fds[i] for i, name in enumerate(reply["programs"])}
    base = len(programs)
    maps = {
        m["name"]: bpfsys.MapInfo(fds[base + i], m["name"], m["type"], m["id"], m["key_size"],
                                  m["value_size"], m["max_entries"])
        for i, m in enumerate(reply["maps"])
    }
    return Loaded(programs, dict(reply["program_ids"]), maps, dict(reply["tracepoint_ids"]),
                  reply["headers"])


# -- the child's side -----------------------------------------------------------------------


def serve(sock: socket.socket) -> int:
    """Answer one request; 0 when the program was loaded and sent."""
    request = LoadRequest(**json.loads(sock.recv(REPLY_BYTES)))
    try:
        reply, fds = load(request)
    except Exception as e:  # every failure goes back as a message, not a hang
        error = f"loading {request.source} failed: {type(e).__name__}: {e}"
        sock.send(json.dumps({"error": error}).encode())
        return 1
    socket.send_fds(sock, [json.dumps(reply).encode()], fds)
    return 0


def load(request: LoadRequest) -> tuple[dict[str, Any], list[int]]:
    """Compile and load with bcc; the reply and the fds to send (programs, then maps)."""
    from agent.capture.btf import Btf, kernel_offsets
    from agent.capture.headers import find_kernel_headers
    from agent.capture.host import ensure_tracefs

    tracefs = ensure_tracefs()
    headers = find_kernel_headers(cache_dir=request.headers_cache_dir)
    os.environ["BCC_KERNEL_SOURCE"] = headers.path
    btf = Btf.load(request.btf_path)
    defines = (kernel_offsets(btf) | syscall_arg_offsets(btf) | exit_defines(tracefs, btf)
               | base_defines(request))
    if request.pods_root is not None:
        defines |= mkdir_offsets(tracefs)
    defines |= request.defines
    from bcc import BPF

    source = Path(request.source)
    bpf = BPF(src_file=str(source).encode(), cflags=cflags(source.parent, defines))
    programs = {name: bpf.load_func(name.encode(), BPF.TRACEPOINT).fd
                for name in dict.fromkeys(["copy_more", *request.programs])}
    bpf[b"tails"][ctypes.c_int(0)] = ctypes.c_int(programs["copy_more"])
    maps = [bpfsys.map_info(bpf[name.encode()].map_fd) for name in map_names(source)]
    reply = {
        "programs": list(programs),
        "program_ids": {name: bpfsys.prog_id(fd) for name, fd in programs.items()},
        "maps": [
            {"name": name, "type": m.type, "id": m.id, "key_size": m.key_size,
             "value_size": m.value_size, "max_entries": m.max_entries}
            for name, m in zip(map_names(source), maps, strict=True)
        ],
        "tracepoint_ids": {tp: tracepoint_id(tracefs, tp) for tp in request.tracepoints},
        "headers": f"{headers.path} ({headers.source})",
    }
    return reply, [*programs.values(), *(m.fd for m in maps)]


def map_names(source: Path) -> list[str]:
    """Every map the program declares (all are sent: a program array is emptied when the
    last user fd of it closes)."""
    names = []
    for m in _MAP_DECL.finditer(source.read_text()):
        first, rest = m.group(2).strip(), (m.group(3) or "").split(",")
        if first.startswith('"'):  # BPF_TABLE("type", key, leaf, name, size)
            names.append(rest[2].strip())
        else:
            names.append(first)
    return names


def base_defines(request: LoadRequest) -> dict[str, int]:
    return {
        "MAX_WRITE": request.max_write,
        "CHUNK": request.chunk,
        "MAX_ITERS": request.copy_iterations,
        "NCPUS": bpfsys.possible_cpus(),
        "RINGBUF_PAGES": request.ring_bytes // os.sysconf("SC_PAGE_SIZE"),
        "MAX_CONTAINERS": request.max_containers,
        "SELF_TGID": request.self_tgid,
        **(
            {"PODS_ROOT_ID": request.pods_root[0], "PODS_ROOT_LEVEL": request.pods_root[1]}
            if request.pods_root is not None
            else {}
        ),
    }


def cflags(include_dir: Path, defines: dict[str, int]) -> list[str]:
    return [f"-I{include_dir}"] + [
        f"-D{name}={value}ULL" if name == "PODS_ROOT_ID" else f"-D{name}={value}"
        for name, value in sorted(defines.items())
    ]


def syscall_arg_offsets(btf: Any, machine: str | None = None) -> dict[str, int]:
    """OFF_ARG0..2: offsets of the saved syscall arguments in the kernel's struct pt_regs."""
    machine = machine or platform.machine()
    regs = SYSCALL_ARG_REGS.get(machine)
    if regs is None:
        raise LoaderError(f"syscall argument registers of {machine} are not known to podtap")
    return {
        f"OFF_ARG{i}": btf.member_offset("pt_regs", member) + extra
        for i, (member, extra) in enumerate(regs)
    }


def exit_defines(tracefs: str, btf: Any, machine: str | None = None) -> dict[str, int]:
    """How the exit program tells a process's end from a thread's: the tracepoint's
    group_dead field (kernels >= 6.16), else signal->live from BTF; and on x86_64 where
    pt_regs.cs is (32-bit programs are counted)."""
    fields = tracepoint_offsets(tracefs, "sched", "sched_process_exit")
    if "group_dead" in fields:
        out = {"TP_EXIT_GROUP_DEAD": fields["group_dead"]}
    else:
        out = {
            "OFF_TASK_SIGNAL": btf.member_offset("task_struct", "signal"),
            "OFF_SIGNAL_LIVE": btf.member_offset("signal_struct", "live"),
        }
    if (machine or platform.machine()) == "x86_64":
        out["OFF_REGS_CS"] = btf.member_offset("pt_regs", "cs")
    return out


def tracepoint_offsets(tracefs: str, category: str, event: str) -> dict[str, int]:
    """Field name -> offset, from the tracepoint's tracefs `format` file."""
    path = os.path.join(tracefs, "events", category, event, "format")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise LoaderError(f"cannot read {path}: {e.strerror}") from e
    fields = {}
    for m in re.finditer(r"field:([^;]*?)\s*(\w+)(?:\[\])?;\s*offset:(\d+);", text):
        fields[m.group(2)] = int(m.group(3))
    return fields


def mkdir_offsets(tracefs: str) -> dict[str, int]:
    fields = tracepoint_offsets(tracefs, "cgroup", "cgroup_mkdir")
    missing = [name for name in MKDIR_FIELDS if name not in fields]
    if missing:
        raise LoaderError(f"cgroup:cgroup_mkdir has no field(s) {', '.join(missing)}")
    return {define: fields[name] for name, define in MKDIR_FIELDS.items()}


def tracepoint_id(tracefs: str, tracepoint: str) -> int | None:
    try:
        return int(Path(tracefs, "events", *tracepoint.split(":"), "id").read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    with socket.socket(fileno=int(argv[1])) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
