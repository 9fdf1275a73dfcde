"""Test "containers": real cgroup v2 directories with real processes in them.

A container's stdout and stderr are pipes (or a pty) whose read ends are
drained by a runtime-style log reader thread: what that reader gets is the
ground truth a capture is compared with.  Processes join the container's
cgroup before they exec (a tiny wrapper writes its own pid to cgroup.procs),
so even their first byte is written from inside the cgroup.

Everything created is removed: processes are killed by pid, cgroups are
removed leaf-first.
"""

from __future__ import annotations

import contextlib
import os
import pty
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent.kube.cgroups import find_cgroup2_mount
from agent.kube.model import FileIdent

# The join is written by `tee` (fd 3, from outside the cgroup), not by the shell's fd 1:
# a write to fd 1 that ends inside the cgroup would be container output.
JOIN_AND_EXEC = 'echo $$ | tee "$0" > /dev/null && exec "$@"'
# How long killed processes may take to be reaped (a loaded machine); a bound, not a wait.
CLEANUP_TIMEOUT_S = 60.0


def ident_of_fd(fd: int) -> FileIdent:
    st = os.fstat(fd)
    return FileIdent((os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino)


class LogReader(threading.Thread):
    """Drains one read end to EOF, like a container runtime's log reader."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.fd = fd
        self.data = bytearray()

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:  # EIO: the pty's other side closed
                break
            if not chunk:
                break
            self.data += chunk
        os.close(self.fd)


class Container:
    """One cgroup with its stdout/stderr pipes (or one pty for both, or unix stream
    sockets) and their readers."""

    def __init__(self, path: Path, tty: bool = False, sockets: bool = False) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.cgroup_id = path.stat().st_ino
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tty = tty
        if tty:
            master, slave = pty.openpty()
            self._write_fds = (slave, slave)
            self._readers = [LogReader(master, "pty-reader")]
        elif sockets:
            out_r, out_w = (s.detach() for s in socket.socketpair())
            err_r, err_w = (s.detach() for s in socket.socketpair())
            self._write_fds = (out_w, err_w)
            self._readers = [LogReader(out_r, "stdout-reader"), LogReader(err_r, "stderr-reader")]
        else:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            self._write_fds = (out_w, err_w)
            self._readers = [LogReader(out_r, "stdout-reader"), LogReader(err_r, "stderr-reader")]
        for reader in self._readers:
            reader.start()
        self._closed = False

    def output_so_far(self) -> bytes:
        """What the readers got until now, all streams together (for waiting on a line)."""
        return b"".join(bytes(reader.data) for reader in self._readers)

    def wait_output(self, text: bytes, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output_so_far():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not written within {timeout:g} s")
            time.sleep(0.02)

    @property
    def stdout_ident(self) -> FileIdent:
        return ident_of_fd(self._write_fds[0])

    @property
    def stderr_ident(self) -> FileIdent:
        return ident_of_fd(self._write_fds[1])

    def spawn(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside the cgroup, its fds 1/2 on the container's streams."""
        if self._closed:
            raise RuntimeError("container streams are closed")
        proc = subprocess.Popen(
            ["/bin/sh", "-c", JOIN_AND_EXEC, str(self.path / "cgroup.procs"), *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._write_fds[0],
            stderr=self._write_fds[1],
            **kwargs,  # type: ignore[arg-type]
        )
        self.procs.append(proc)
        return proc

    def spawn_unjoined(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """A process on the container's streams that is NOT put in its cgroup (it may join
        by itself, e.g. to test a process that never execs inside the cgroup)."""
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._write_fds[0],
            stderr=self._write_fds[1],
        )
        self.procs.append(proc)
        return proc

    def python(self, code: str) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, "-c", code])

    def start_init(self) -> subprocess.Popen[bytes]:
        """A long-lived first process, as a container's init: its fds 1/2 are the streams."""
        proc = self.spawn(["sleep", "3600"])
        self.wait_joined(proc.pid)
        return proc

    def wait_joined(self, pid: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if str(pid) in (self.path / "cgroup.procs").read_text().split():
                return
            time.sleep(0.005)
        raise TimeoutError(f"pid {pid} did not join {self.path}")

    def wait(self, timeout: float = 60.0) -> None:
        """Wait for every process but the init to exit."""
        for proc in self.procs:
            if proc.args[-2:] == ["sleep", "3600"]:
                continue
            proc.wait(timeout)

    def finish(self, timeout: float = 30.0) -> tuple[bytes, bytes]:
        """Stop every process, close the streams, return what the readers got."""
        self.kill()
        if not self._closed:
            for fd in set(self._write_fds):
                os.close(fd)
            self._closed = True
        for reader in self._readers:
            reader.join(timeout)
        if self.tty:
            return bytes(self._readers[0].data), b""
        return bytes(self._readers[0].data), bytes(self._readers[1].data)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Any process the workload left behind in the cgroup, by pid, until it is empty.
        deadline = time.monotonic() + CLEANUP_TIMEOUT_S
        while pids := [int(p) for p in (self.path / "cgroup.procs").read_text().split()]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} left in {self.path}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)


class CgroupSandbox:
    """A private subtree of the cgroup v2 hierarchy for one test session."""

    def __init__(self, mount: str | None = None, prefix: str = "podtap-test") -> None:
        self.mount = Path(mount or find_cgroup2_mount())
        self.root = self.mount / f"{prefix}-{secrets.token_hex(4)}"
        self.root.mkdir()
        self.containers: list[Container] = []

    def container(
        self, name: str | None = None, tty: bool = False, sockets: bool = False
    ) -> Container:
        c = Container(self.root / (name or f"c-{secrets.token_hex(4)}"), tty=tty, sockets=sockets)
        self.containers.append(c)
        return c

    def cleanup(self) -> None:
        for c in self.containers:
            c.finish()
        remove_tree(self.root)


def remove_tree(path: Path) -> None:
    """rmdir a cgroup subtree leaf-first (cgroupfs directories are removed with rmdir)."""
    if not path.exists():
        return
    for child in sorted(_dirs_below(path), key=lambda p: len(p.parts), reverse=True):
        _rmdir_retry(child)
    _rmdir_retry(path)


def _dirs_below(path: Path) -> Iterator[Path]:
    for entry in path.iterdir():
        if entry.is_dir():
            yield entry
            yield from _dirs_below(entry)


def _rmdir_retry(path: Path) -> None:
    deadline = time.monotonic() + CLEANUP_TIMEOUT_S
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last killed processes are reaped
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
