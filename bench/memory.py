"""Resident memory of `podtap tap` and of the library path (run as root; prints figures).

For each case: VmRSS, and from /proc/<pid>/smaps the part that is the ring
buffer's mapping (the kernel's memory, shared with the BPF program), the part
mapped from libbcc/LLVM/clang, other file-backed pages, and anonymous memory.
The goal (issue 7) is VmRSS - ring <= 48 MiB.

    python bench/memory.py [--tree DIR] [--seconds N] [--rate LINES_PER_S]

--tree runs another checkout of podtap (e.g. `git archive <commit> agent bpf |
tar -x -C DIR`) with this interpreter, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tap_throughput import build_writer  # noqa: E402
from bench.write_cost import Stream  # noqa: E402
from simnode.containers import CgroupSandbox  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
LIBRARY_PATH = """
import sys, time
from agent.capture.events import Drainer, RingReader, decode
from agent.capture.probe import Probe
from agent.config import Config
probe = Probe(Config().capture)
probe.load()
reader = RingReader(probe.ring_fd, probe.ring_size)
drainer = Drainer(reader, lambda blob: decode(blob), 1 << 30)
drainer.start()
probe.attach()
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class Memory:
    rss: int = 0
    ring: int = 0
    bcc: int = 0
    file: int = 0
    anon: int = 0

    def line(self) -> str:
        without = (self.rss - self.ring) / MIB
        return (f"VmRSS {self.rss / MIB:6.1f} MiB | without ring {without:6.1f}"
                f" | ring {self.ring / MIB:5.1f} | libbcc/LLVM {self.bcc / MIB:5.1f}"
                f" | other files {self.file / MIB:5.1f} | anon {self.anon / MIB:5.1f}")


def measure(pid: int) -> Memory:
    """VmRSS and its breakdown by mapping, from /proc/<pid>/smaps."""
    mem = Memory()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            mem.rss = int(line.split()[1]) * 1024
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
        elif head and head[0] in ("Rss:", "Anonymous:"):
            kib = int(head[1]) * 1024
            if head[0] == "Anonymous:":
                mem.anon += kib if "bpf" not in name else 0
            elif "bpf-map" in name or "bpf_ringbuf" in name:
                mem.ring += kib
            elif any(lib in name for lib in ("libbcc", "LLVM", "clang")):
                mem.bcc += kib
            elif name.startswith("/"):
                mem.file += kib
    return mem


def peak(samples: list[Memory]) -> Memory:
    return max(samples, key=lambda m: m.rss - m.ring)


def run_tap(tree: Path, stream: Stream, exe: str, seconds: float, rate: int
            ) -> tuple[Memory, Memory]:
    """(idle, peak while a writer writes `rate` 100-byte lines/s) of `podtap tap`."""
    tap = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--log-level", "warning", "tap", "--format", "json",
         "--cgroup", str(stream.cgroup)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tree,
    )
    assert tap.stderr is not None
    while b"podtap: tapping" not in tap.stderr.readline():
        if tap.poll() is not None:
            raise SystemExit(f"tap failed to start in {tree}")
    try:
        time.sleep(1)
        idle = measure(tap.pid)
        writer = stream.spawn([exe, str(int(rate * seconds)), "1", "100", str(rate)])
        samples = []
        while writer.poll() is None:
            samples.append(measure(tap.pid))
            time.sleep(0.25)
        samples.append(measure(tap.pid))
        return idle, peak(samples)
    finally:
        tap.send_signal(2)
        tap.communicate(timeout=120)


def run_library(tree: Path) -> Memory:
    proc = subprocess.Popen([sys.executable, "-c", LIBRARY_PATH], cwd=tree,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        if proc.stdout.readline() != b"ready\n":
            raise SystemExit(f"the library path failed in {tree}")
        time.sleep(1)
        return measure(proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=int, default=10_000)
    args = parser.parse_args()
    box = CgroupSandbox(prefix="podtap-bench")
    stream = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exe = build_writer(tmp)
            stream = Stream(box.container("mem").path)
            print(f"tree {args.tree}, kernel {os.uname().release}, {os.cpu_count()} CPUs")
            print(f"  library path (probe + ring drain), idle: {run_library(args.tree).line()}")
            idle, busy = run_tap(args.tree, stream, exe, args.seconds, args.rate)
            print(f"  podtap tap, idle:                       {idle.line()}")
            print(f"  podtap tap, {args.rate:,} lines/s (peak):     {busy.line()}")
    finally:
        if stream is not None:
            stream.close()
        box.cleanup()


if __name__ == "__main__":
    main()
