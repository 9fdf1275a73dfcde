"""The loaded BPF program: attach it to the syscall tracepoints, own its maps.

The program is compiled and loaded by a short-lived child process
(agent/capture/loader.py) so that this process never maps libbcc or LLVM; it
receives the program and map fds and drives the maps with bpf(2)
(agent/capture/bpfsys.py).  Attaching is perf_event_open + PERF_EVENT_IOC_SET_BPF
on each tracepoint, as bcc does it; detaching is closing those perf event fds.

Start-up order has no race window: the program is loaded, the containers map
is filled by the caller, then the programs are attached.  Every capture
program runs at syscall exit and needs nothing from an earlier hook, so a
write in flight while they are attached is either seen whole or not at all.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from agent.capture import bpfsys
from agent.capture.abi import (  # noqa: F401  # re-exported for the probe's users
    BPF_DIR_ENV,
    C_CAPTURE_STDERR,
    C_CAPTURE_STDOUT,
    C_IDENT_KNOWN,
    CONSTANTS,
    CONTAINER_VALUE,
    COUNTER_NAMES,
    FILTER_SLOTS,
    bpf_dir,
)
from agent.capture.host import HOOKS, Hook
from agent.capture.loader import (
    Loaded,
    LoaderError,
    LoadRequest,
    load_in_child,
    tracepoint_offsets,
)
from agent.config import CaptureConfig
from agent.kube.model import FileIdent

__all__ = ["CONSTANTS", "COUNTER_NAMES", "PodsRoot", "Probe", "ProbeError", "tracepoint_offsets"]

log = logging.getLogger("podtap.capture")

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class ProbeError(Exception):
    """The BPF program could not be built, loaded or attached."""


@dataclass(frozen=True, slots=True)
class PodsRoot:
    """The pods' cgroup subtree: writes under it from unknown cgroups are kept."""

    cgroup_id: int
    level: int  # depth below the cgroup v2 root (the root is level 0)


def container_value(
    stdout: FileIdent | None, stderr: FileIdent | None, capture_stdout: bool, capture_stderr: bool
) -> bytes:
    flags = 0
    if capture_stdout:
        flags |= C_CAPTURE_STDOUT
    if capture_stderr:
        flags |= C_CAPTURE_STDERR
    if stdout is None or stderr is None:
        return CONTAINER_VALUE.pack(0, 0, 0, 0, flags, 0)
    flags |= C_IDENT_KNOWN
    return CONTAINER_VALUE.pack(stdout.ino, stderr.ino, stdout.dev, stderr.dev, flags, 0)


class Probe:
    """The loaded BPF program. `load()`, fill the map with `watch()`, then `attach()`."""

    def __init__(
        self,
        cfg: CaptureConfig,
        pods_root: PodsRoot | None = None,
        defines: dict[str, int] | None = None,
        extra_hooks: Sequence[Hook] = (),
    ) -> None:
        """`defines` add to or override the program's -D defines and `extra_hooks` attach
        more programs (for tests of programs not attached by default)."""
        self.cfg = cfg
        self.pods_root = pods_root
        self.defines = dict(defines or {})
        self.hooks = [h for h in (*HOOKS, *extra_hooks) if self._wanted(h)]
        self._loaded: Loaded | None = None
        self._perf_fds: dict[str, int] = {}
        self._filter_slots: dict[int, set[int]] = {}  # watch_filter slot -> cgroup ids

    def _wanted(self, hook: Hook) -> bool:
        if hook.only_if == "pods_root":
            return self.pods_root is not None
        if hook.only_if == "sockets":
            return self.cfg.socket_syscalls
        return True

    # -- lifecycle ---------------------------------------------------------

    def request(self) -> LoadRequest:
        cfg = self.cfg
        return LoadRequest(
            source=str(bpf_dir() / "podtap.c"),
            max_write=cfg.max_write,
            chunk=cfg.chunk,
            copy_iterations=cfg.copy_iterations,
            ring_bytes=cfg.ring_bytes,
            max_containers=cfg.max_containers,
            headers_cache_dir=cfg.headers_cache_dir,
            btf_path=cfg.btf_path,
            self_tgid=os.getpid(),
            programs=sorted({h.program for h in self.hooks}),
            tracepoints=[h.tracepoint for h in self.hooks],
            pods_root=(self.pods_root.cgroup_id, self.pods_root.level)
            if self.pods_root is not None
            else None,
            defines=self.defines,
        )

    def load(self) -> None:
        """Compile and load the program (in a child process); nothing is attached yet."""
        if self._loaded is not None:
            return
        try:
            self._loaded = load_in_child(self.request())
        except LoaderError as e:
            raise ProbeError(str(e)) from e
        log.info("BPF program loaded (headers: %s)", self._loaded.headers)

    def attach(self) -> None:
        """Attach the cgroup and process hooks, then the capture programs."""
        loaded = self._require_loaded("attach()")
        for hook in self.hooks:
            if hook.tracepoint in self._perf_fds:
                continue
            tp_id = loaded.tracepoint_ids.get(hook.tracepoint)
            if tp_id is None:
                if hook.required:
                    self.detach()
                    raise ProbeError(f"tracepoint {hook.tracepoint} does not exist on this kernel")
                log.warning("tracepoint %s does not exist: not covered", hook.tracepoint)
                continue
            try:
                fd = bpfsys.attach_tracepoint(loaded.programs[hook.program], tp_id)
            except OSError as e:
                self.detach()
                raise ProbeError(
                    f"attaching {hook.program} to {hook.tracepoint} failed: {e}"
                ) from e
            self._perf_fds[hook.tracepoint] = fd

    def detach(self) -> None:
        """Close the perf events: the programs stop running at once."""
        for tp in reversed(list(self._perf_fds)):
            os.close(self._perf_fds.pop(tp))

    def close(self) -> None:
        self.detach()
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def attached(self) -> list[str]:
        return list(self._perf_fds)

    def _require_loaded(self, what: str) -> Loaded:
        if self._loaded is None:
            raise ProbeError(f"{what} before load()")
        return self._loaded

    # -- maps ----------------------------------------------------------------

    def map(self, name: str) -> bpfsys.MapInfo:
        """A map of the program (its fd stays owned by the probe)."""
        return self._require_loaded("map()").maps[name]

    def program_fd(self, name: str) -> int:
        return self._require_loaded("program_fd()").programs[name]

    def watch(
        self,
        cgroup_id: int,
        stdout: FileIdent | None = None,
        stderr: FileIdent | None = None,
        capture_stdout: bool = True,
        capture_stderr: bool = True,
    ) -> None:
        """Put a container in the kernel map (with no capture flag it is excluded)."""
        value = container_value(stdout, stderr, capture_stdout, capture_stderr)
        bpfsys.map_update(self.map("containers").fd, _U64.pack(cgroup_id), value)
        self._set_filter(cgroup_id, True)

    def unwatch(self, cgroup_id: int) -> None:
        bpfsys.map_delete(self.map("containers").fd, _U64.pack(cgroup_id))
        self._set_filter(cgroup_id, False)

    def _set_filter(self, cgroup_id: int, present: bool) -> None:
        """Keep the kernel's watch_filter slot of `cgroup_id` set while any cgroup of that
        slot is in the containers map (a set slot only costs a hash lookup)."""
        slot = cgroup_id & (FILTER_SLOTS - 1)
        members = self._filter_slots.setdefault(slot, set())
        was_set = bool(members)
        if present:
            members.add(cgroup_id)
        else:
            members.discard(cgroup_id)
        if bool(members) != was_set:
            value = b"\x01" if members else b"\x00"
            bpfsys.map_update(self.map("watch_filter").fd, _U32.pack(slot), value)
        if not members:
            del self._filter_slots[slot]

    def learned_idents(self, cgroup_id: int) -> tuple[FileIdent, FileIdent] | None:
        """The stream identities the kernel took at the container's first exec (the
        runtime starting its entrypoint), or None when it has not seen one."""
        raw = bpfsys.map_lookup(
            self.map("learned_idents").fd, _U64.pack(cgroup_id), CONTAINER_VALUE.size
        )
        if raw is None:
            return None
        out_ino, err_ino, out_dev, err_dev, flags, _ = CONTAINER_VALUE.unpack(raw)
        if not flags & C_IDENT_KNOWN:
            return None
        return FileIdent(out_dev, out_ino), FileIdent(err_dev, err_ino)

    def counters(self) -> dict[str, int]:
        fd = self.map("counters").fd
        return {
            name: sum(bpfsys.map_lookup_percpu_u64(fd, _U32.pack(idx)))
            for idx, name in enumerate(COUNTER_NAMES)
        }

    @property
    def ring_fd(self) -> int:
        return self.map("events").fd

    @property
    def ring_size(self) -> int:
        return self.map("events").max_entries
