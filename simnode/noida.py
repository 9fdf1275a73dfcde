"""The noida-db Elasticsearch emulator (PyPI `noida-db`), started and stopped for tests.

`noida-db start` runs in the foreground and is a wrapper that starts the real server
binary as its child. Stopping: SIGINT to that child (the wrapper then exits), then the
data directory is deleted. Everything is bound to 127.0.0.1 on a free port.

It emulates Elasticsearch 8.15: `_bulk`, `_count`, `_refresh`, `_search`, `_cat/indices`
and the official Python client work. It has no data streams (a `create` into
`logs-*-*` makes an index of that name) and answers a malformed bulk request with 200 and a
per-item error where Elasticsearch answers 400 (see simnode/esbulk.py for those).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import TracebackType
from typing import Self

_LAUNCH = "import sys; from noida_db.cli import main; sys.argv[0] = 'noida-db'; sys.exit(main())"


class NoidaUnavailable(RuntimeError):
    """The emulator is not installed or did not start; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class NoidaElasticsearch:
    """One emulator process with a private data directory."""

    def __init__(self, start_timeout_s: float = 120.0, port: int = 0) -> None:
        """`port` 0: a free port chosen at start; else that port (a test may point an
        agent at it before the emulator runs)."""
        self._timeout = start_timeout_s
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._data_dir = ""
        self._log_path = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        if importlib.util.find_spec("noida_db") is None:
            raise NoidaUnavailable("noida-db is not installed (pip install noida-db==0.2.3)")
        self._data_dir = tempfile.mkdtemp(prefix="podtap-noida-")
        fd, self._log_path = tempfile.mkstemp(prefix="podtap-noida-", suffix=".log")
        self.port = self.port or _free_port()
        argv = [sys.executable, "-c", _LAUNCH, "start", "--data-dir", self._data_dir,
                "--only", "elasticsearch", "--elasticsearch-port", str(self.port)]
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NoidaUnavailable(
                    f"noida-db exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as resp:
                    if resp.status == 200 and b'"number"' in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise NoidaUnavailable(
            f"noida-db did not answer on {self.url} within {self._timeout:g}s: "
            f"{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                text = f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return "(no output)"
        # The binary links against a newer glibc symbol version than Debian 12 has and
        # says so on every start; it is harmless, not the reason.
        lines = [ln for ln in text.splitlines() if "GLIBC_" not in ln]
        return " | ".join(lines[-10:]) or "(no output)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            for child in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for child in _children(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                proc.kill()
                proc.wait(timeout=30)
        if self._data_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = ""
        if self._log_path:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)
            self._log_path = ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
