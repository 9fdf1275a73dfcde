"""`podtap tap`: capture the containers named on the command line and print their lines.

    capture (probe, ring drain) -> lines (per pid/stream) -> text or JSON lines -> stdout

No kubelet, no sinks: what `podtap run` adds is in `agent/pipeline.py`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from agent.capture.events import boot_to_realtime_offset_ns, comm_str
from agent.capture.probe import Probe
from agent.capture.source import CaptureSource
from agent.config import Config
from agent.kube.cgroups import find_cgroup2_mount, init_pid, stream_idents
from agent.kube.model import FileIdent
from agent.lifecycle import install_stop_signals, run_until_stopped, stop_if_drain_failed
from agent.lines import Line, LineStage
from agent.records import encode_tap_line
from agent.sinks.stdout import TapOutput

STREAM_NAMES = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True, slots=True)
class TapTarget:
    """A container to tap: its cgroup v2 directory, and a pid whose fds 1/2 are its streams."""

    cgroup_dir: str
    cgroup_id: int
    ident_pid: int | None = None  # None: the cgroup's init process, once there is one


def cgroup_of_pid(pid: int, mount: str, proc_root: str = "/proc") -> str:
    """The cgroup v2 directory of a process (the `0::/path` line of /proc/<pid>/cgroup)."""
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return os.path.join(mount, line[3:].strip().lstrip("/"))
    except OSError as e:
        raise ValueError(f"cannot read the cgroup of pid {pid}: {e.strerror}") from e
    raise ValueError(f"pid {pid} has no cgroup v2 membership")


def refuse_root(directory: str, mount: str, why: str) -> None:
    if os.path.realpath(directory) == os.path.realpath(mount):
        raise ValueError(f"refusing to tap the root cgroup (every process of the machine): {why}")


def resolve_targets(
    cgroups: list[str], pids: list[int], mount: str | None = None
) -> list[TapTarget]:
    mount = mount or find_cgroup2_mount()
    targets: dict[int, TapTarget] = {}
    for pid in pids:
        directory = cgroup_of_pid(pid, mount)
        refuse_root(directory, mount, f"pid {pid} is in the root cgroup")
        cgid = os.stat(directory).st_ino
        targets.setdefault(cgid, TapTarget(directory, cgid, pid))
    for path in cgroups:
        directory = path if os.path.isabs(path) else os.path.join(mount, path)
        if not os.path.isfile(os.path.join(directory, "cgroup.procs")):
            raise ValueError(f"{path} is not a cgroup v2 directory (under {mount})")
        refuse_root(directory, mount, f"{path} is the root cgroup")
        cgid = os.stat(directory).st_ino
        targets.setdefault(cgid, TapTarget(directory, cgid))
    return list(targets.values())


class TextFormatter:
    """`HH:MM:SS.mmm <pid> <comm> <stream>: <line>` (local time)."""

    def __init__(self, offset_ns: Callable[[], int]) -> None:
        self.offset_ns = offset_ns

    def __call__(self, lines: list[Line]) -> bytes:
        parts = []
        offset = self.offset_ns()
        for ts, pid, stream, tag, message, _partial in lines:
            ns = ts + offset
            clock = time.strftime("%H:%M:%S", time.localtime(ns // 1_000_000_000))
            comm = comm_str(tag[1])  # type: ignore[index]
            millis = ns // 1_000_000 % 1000
            head = f"{clock}.{millis:03d} {pid} {comm} {STREAM_NAMES[stream]}: "
            parts.append(head.encode() + message + b"\n")
        return b"".join(parts)


class JsonFormatter:
    """One JSON object per line (`encode_tap_line`)."""

    def __init__(self, offset_ns: Callable[[], int], invalid_utf8: str = "replace") -> None:
        self.offset_ns = offset_ns
        self.invalid_utf8 = invalid_utf8

    def __call__(self, lines: list[Line]) -> bytes:
        offset = self.offset_ns()
        enc, invalid = encode_tap_line, self.invalid_utf8
        return b"".join(
            [
                enc(ts + offset, stream, pid, tag[1], tag[0], message, partial, invalid)  # type: ignore[index, arg-type]
                + b"\n"
                for ts, pid, stream, tag, message, partial in lines
            ]
        )


class TapPipeline:
    """`podtap tap`: capture the given containers and print their lines."""

    def __init__(
        self,
        cfg: Config,
        targets: list[TapTarget],
        stdout: bool,
        stderr: bool,
        fmt: str,
        out: BinaryIO,
        err: BinaryIO | None = None,
    ) -> None:
        self.cfg = cfg
        self.targets = targets
        self.capture_stdout = stdout
        self.capture_stderr = stderr
        self.out = out
        self.err = err if err is not None else sys.stderr.buffer
        self.probe = Probe(cfg.capture)
        self.lines = LineStage(cfg)
        offset = boot_to_realtime_offset_ns  # read per batch: follows clock steps
        self.format: Callable[[list[Line]], bytes] = (
            JsonFormatter(offset, cfg.records.invalid_utf8)
            if fmt == "json"
            else TextFormatter(offset)
        )
        self._idents: dict[int, tuple[FileIdent, FileIdent] | None] = {}
        self._stop = asyncio.Event()
        self.sink = TapOutput(out)

    def _say(self, text: str) -> None:
        self.err.write(f"podtap: {text}\n".encode())
        self.err.flush()

    def _target_idents(self, target: TapTarget) -> tuple[FileIdent, FileIdent] | None:
        pid = target.ident_pid or init_pid(target.cgroup_dir)
        if pid is None:
            return None
        out, err = stream_idents(pid)
        if out is None or err is None:
            return None
        return out, err

    def _watch_targets(self) -> None:
        """(Re)write the map entry of each target whose stream identities became known."""
        for target in self.targets:
            if self._idents.get(target.cgroup_id) is not None:
                continue
            idents = self._target_idents(target)
            if target.cgroup_id in self._idents and idents is None:
                continue
            self._idents[target.cgroup_id] = idents
            out, err = idents if idents else (None, None)
            self.probe.watch(target.cgroup_id, out, err, self.capture_stdout, self.capture_stderr)

    def _write(self, lines: list[Line]) -> None:
        if not lines or self.sink.broken:
            return
        self.sink.write(self.format(lines))
        if self.sink.broken:
            self._stop.set()

    async def _housekeeping(self, source: CaptureSource) -> None:
        """Idle flushes, and identities of targets that had no process at start."""
        period = min(self.cfg.lines.idle_flush_ms / 2000, 0.5)
        while not stop_if_drain_failed(source, self._stop):
            await asyncio.sleep(period)
            self._write(self.lines.flush_idle())
            self._watch_targets()

    async def _consume(self, source: CaptureSource) -> None:
        async for records in source.batches():
            self._write(self.lines.process(records))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        install_stop_signals(loop, self._stop)
        await loop.run_in_executor(None, self.probe.load)
        source = CaptureSource(self.probe, self.cfg.capture.queue_bytes)
        try:
            self._watch_targets()
            source.start()
            self.probe.attach()
            names = ", ".join(f"{t.cgroup_dir} (id {t.cgroup_id})" for t in self.targets)
            self._say(f"tapping {names}")
            await run_until_stopped(
                source,
                self._stop,
                self._consume(source),
                {"tap-housekeeping": self._housekeeping(source)},
            )
            self._write(self.lines.flush_all())
        finally:
            counters = self.probe.counters() if self.probe.loaded else {}
            source.close()
        self._report(counters)
        return 1 if source.drain_error is not None else 0

    def _report(self, counters: dict[str, int]) -> None:
        self._say(
            f"records={counters.get('records', 0)} bytes={counters.get('bytes', 0)} "
            f"lines={self.lines.lines} partial={self.lines.partial} "
            f"dropped_records={counters.get('drop_records', 0)} "
            f"dropped_bytes={counters.get('drop_bytes', 0)} "
            f"truncated_bytes={counters.get('trunc_bytes', 0)} "
            f"uncapturable_bytes={counters.get('uncapt_bytes', 0)} "
            f"uncapturable_calls={counters.get('uncapt_calls', 0)} "
            f"fault_bytes={counters.get('fault_bytes', 0)}"
        )
