"""Shared helpers of the kernel tests: gating, a live probe, the tap CLI, comparisons.

Kernel tests need root, BTF, tracefs and bcc.  Off CI they skip with the
reason when those are missing; with CI=true they fail instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson
import pytest

from agent.capture.events import EV_DATA, Drainer, Record, RingReader, decode
from agent.capture.probe import PodsRoot, Probe
from agent.config import Config
from agent.lines import LineStage
from simnode.containers import Container

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel tests need BTF (/sys/kernel/btf/vmlinux)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "kernel tests need bcc (python3-bpfcc; make deps)"
    return None


def unavailable(reason: str) -> NoReturn:
    """Skip a test that cannot run here; with CI=true, fail it instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def require_kernel() -> None:
    reason = kernel_unavailable_reason()
    if reason is not None:
        unavailable(reason)


class LiveProbe:
    """The real program, loaded and attached once; records collected per cgroup id."""

    def __init__(self, cfg: Config, pods_root: PodsRoot | None = None) -> None:
        self.cfg = cfg
        self.probe = Probe(cfg.capture, pods_root)
        self.probe.load()
        self._blobs: list[bytes] = []
        self._delivered = 0  # bytes of ring records handed over by the drain thread
        self._lock = threading.Lock()
        self.reader = RingReader(self.probe.ring_fd, self.probe.ring_size)
        self.drainer = Drainer(self.reader, self._deliver, max_pending=1 << 40)
        self.drainer.start()
        self.probe.attach()
        self._by_cgroup: dict[int, list[Record]] = defaultdict(list)

    def _deliver(self, blob: bytes) -> None:
        with self._lock:
            self._blobs.append(blob)
            self._delivered += len(blob)

    def sync(self) -> None:
        """Wait until every record reserved so far has been drained, delivered and sorted
        (the drain thread hands a span over after it has released it in the ring)."""
        target = self.reader.producer_pos()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self._lock:
                if self._delivered >= target:
                    break
            time.sleep(0.005)
        with self._lock:
            blobs, self._blobs = self._blobs, []
        for blob in blobs:
            for rec in decode(blob):
                self._by_cgroup[rec[1]].append(rec)

    def records(self, cgroup_id: int) -> list[Record]:
        self.sync()
        return list(self._by_cgroup.get(cgroup_id, []))

    def close(self) -> None:
        self.probe.detach()
        self.drainer.stop()
        self.drainer.join()
        self.reader.close()
        self.probe.close()


def watch(live: LiveProbe, container: Container, idents: bool = True, **flags: bool) -> None:
    if idents:
        live.probe.watch(
            container.cgroup_id, container.stdout_ident, container.stderr_ident, **flags
        )
    else:
        live.probe.watch(container.cgroup_id, None, None, **flags)


def lines_of(records: Iterable[Record], cfg: Config | None = None) -> list[Any]:
    stage = LineStage(cfg or Config())
    return stage.process(list(records)) + stage.flush_all()


def joined_from_lines(lines: Iterable[Any]) -> dict[tuple[int, int], bytes]:
    """Per (pid, stream): the bytes the lines stand for (message + newline unless partial)."""
    out: dict[tuple[int, int], bytearray] = defaultdict(bytearray)
    for _ts, pid, stream, _tag, message, partial in lines:
        out[(pid, stream)] += message if partial else message + b"\n"
    return {k: bytes(v) for k, v in out.items()}


def raw_bytes(records: Iterable[Record]) -> dict[tuple[int, int], bytes]:
    out: dict[tuple[int, int], bytearray] = defaultdict(bytearray)
    for rec in records:
        if rec[4] == EV_DATA:
            out[(rec[2], rec[5])] += rec[8]
    return {k: bytes(v) for k, v in out.items()}


def per_stream(joined: dict[tuple[int, int], bytes]) -> dict[int, list[tuple[int, bytes]]]:
    out: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    for (pid, stream), data in sorted(joined.items()):
        out[stream].append((pid, data))
    return out


@dataclass
class TapRun:
    """A `podtap tap --format json` process and what it printed."""

    proc: subprocess.Popen[bytes]
    stdout: bytes = b""
    stderr: bytes = b""
    objects: list[dict[str, Any]] = field(default_factory=list)

    def joined(self) -> dict[tuple[int, int], str]:
        out: dict[tuple[int, int], list[str]] = defaultdict(list)
        for o in self.objects:
            stream = 1 if o["stream"] == "stdout" else 2
            out[(o["pid"], stream)].append(o["message"] + ("" if o["partial"] else "\n"))
        return {k: "".join(v) for k, v in out.items()}

    def counters(self) -> dict[str, int]:
        for line in self.stderr.decode(errors="replace").splitlines():
            if line.startswith("podtap: records="):
                return {
                    k: int(v) for k, v in (kv.split("=") for kv in line[len("podtap: "):].split())
                }
        raise AssertionError(f"no counters line in tap's stderr:\n{self.stderr.decode()}")


def start_tap(*args: str, env: dict[str, str] | None = None, fmt: str = "json") -> TapRun:
    cmd = [sys.executable, "-m", "agent.cli", "tap", "--format", fmt, *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    run = TapRun(proc)
    # Read stdout concurrently so the tap never blocks on a full pipe.
    run._out_thread = threading.Thread(target=_slurp, args=(proc.stdout, run, "stdout"))  # type: ignore[attr-defined]
    run._out_thread.start()  # type: ignore[attr-defined]
    assert proc.stderr is not None
    err = bytearray()
    deadline = time.monotonic() + 60
    while b"podtap: tapping" not in err:
        chunk = proc.stderr.readline()
        if not chunk or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"tap did not start: {bytes(err).decode(errors='replace')}")
        err += chunk
    run.stderr = bytes(err)
    return run


def _slurp(stream: Any, run: TapRun, attr: str) -> None:
    setattr(run, attr, stream.read())


def stop_tap(run: TapRun, timeout: float = 60, sig: int = signal.SIGINT) -> TapRun:
    run.proc.send_signal(sig)
    assert run.proc.stderr is not None
    rest = run.proc.stderr.read()
    run.proc.wait(timeout)
    run._out_thread.join(timeout)  # type: ignore[attr-defined]
    run.stderr += rest
    assert run.proc.returncode == 0, run.stderr.decode(errors="replace")
    if "text" in list(run.proc.args):  # type: ignore[arg-type]
        return run
    try:
        run.objects = [orjson.loads(line) for line in run.stdout.splitlines()]
    except orjson.JSONDecodeError:
        with open("/tmp/podtap-bad-tap-output.json", "wb") as f:
            f.write(run.stdout)
        raise
    return run
