"""Where a running agent's CPU goes: its threads' CPU from /proc, and py-spy samples of the
thread holding the GIL, sorted into the stages of the data path.

    with AgentProfile(pid, seconds=10) as profile:
        ...  # the load runs
    profile.result  # {"threads": {...}, "gil_cores": ..., "stages": {...}}

py-spy (`--gil`) samples only the thread that holds the GIL, so its shares are of the
Python work; what runs without the GIL (zlib in the gzip thread, the kernel's side of a
syscall) shows in the threads' CPU instead. A sample goes to the stage of its innermost
frame that belongs to one (a wake-up of the event loop called from the drain thread is
"event loop and wake-ups", not "ring drain").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.tap_throughput import stat_cpu_s

RATE_HZ = 250
# (stage, frame pattern): first pattern that an innermost frame matches, in this order.
STAGES: tuple[tuple[str, str], ...] = (
    ("gzip", r"gzip_bytes \(agent/sinks/http\.py"),
    ("HTTP client (aiohttp)", r"\((?:.*/)?aiohttp/"),
    ("request body", r"Codec\.(?:body|_streams|_bulk\w*) \(agent/sinks/"),
    ("encode records",
     r"\(agent/(?:records\.py|sinks/(?:loki|elasticsearch|otlp|stdout|httpjson))"),
    ("batching, buffers", r"\(agent/sinks/"),
    ("enrich", r"\(agent/enrich\.py"),
    ("lines", r"\(agent/lines\.py"),
    ("decode", r"^decode \(agent/capture/events\.py"),
    ("ring drain", r"\(agent/capture/"),
    ("telemetry", r"\(agent/(?:telemetry|exposition)\.py"),
    ("kubelet discovery", r"\(agent/kube/"),
    ("event loop and wake-ups", r"\((?:.*/)?(?:asyncio/|selectors\.py|threading\.py)"),
)
_COMPILED = tuple((stage, re.compile(pattern)) for stage, pattern in STAGES)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):\d+\)$")


def py_spy() -> str | None:
    """The py-spy next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def stage_of(frames: list[str]) -> str:
    """The stage of a sample: its innermost frame that belongs to one, else "other"."""
    for frame in reversed(frames):
        for stage, pattern in _COMPILED:
            if pattern.search(frame):
                return stage
    return "other"


def stage_shares(raw: str) -> tuple[dict[str, float], int]:
    """py-spy's raw output (one "frame;frame;... count" per line, outermost first) as the
    share of samples per stage, and the number of samples."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if _FRAME.match(f)]
        counts[stage_of(frames)] += int(n)
    total = sum(counts.values())
    return ({s: n / total for s, n in counts.most_common()} if total else {}), total


def thread_names(pid: int, spy: str) -> dict[int, str]:
    """Native thread id -> Python thread name, from `py-spy dump` (the main thread's id is
    the process id: named even when the dump, taken without stopping the process, missed
    it)."""
    out = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"],
                         capture_output=True, text=True, timeout=60).stdout
    names = {int(m.group(1)): m.group(2)
             for m in re.finditer(r'^Thread (\d+) \(\w+\): "([^"]*)"', out, re.M)}
    return {pid: "MainThread", **names}


def threads_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid`, from /proc/<pid>/task/<tid>/stat."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:  # the thread ended
            continue
    return out


class AgentProfile:
    """Profiles `pid` for `seconds` from entering the block (in a thread, so the load can
    run meanwhile); `result` is set once the block is left and the recording is over."""

    def __init__(self, pid: int, seconds: float, delay_s: float = 0.0) -> None:
        self.pid, self.seconds, self.delay_s = pid, seconds, delay_s
        self.result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._record, daemon=True)

    def __enter__(self) -> AgentProfile:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._thread.join()

    def _record(self) -> None:
        spy = py_spy()
        if spy is None:
            self.result = {"error": "py-spy not found (make bench-deps installs it)"}
            return
        time.sleep(self.delay_s)
        try:
            names = thread_names(self.pid, spy)
            with tempfile.TemporaryDirectory() as tmp:
                raw_file = Path(tmp, "raw.txt")
                cpu0, t0 = threads_cpu_s(self.pid), time.monotonic()
                subprocess.run([spy, "record", "--pid", str(self.pid), "--gil",
                                "--rate", str(RATE_HZ), "--duration", str(int(self.seconds)),
                                "--format", "raw", "--nonblocking", "-o", str(raw_file)],
                               capture_output=True, timeout=self.seconds + 120, check=True)
                cpu1, wall = threads_cpu_s(self.pid), time.monotonic() - t0
                shares, samples = stage_shares(raw_file.read_text())
        except (subprocess.SubprocessError, OSError) as e:
            self.result = {"error": f"{type(e).__name__}: {e}"[:500]}
            return
        threads = {names.get(tid, f"thread {tid}"): round((cpu1[tid] - cpu0.get(tid, 0)) / wall, 3)
                   for tid in cpu1}
        gil = samples / (RATE_HZ * self.seconds)
        self.result = {"threads": threads, "gil_cores": round(gil, 3), "samples": samples,
                       "stages": {s: round(share, 3) for s, share in shares.items()}}
