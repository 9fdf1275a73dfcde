"""Added cost of podtap's probe per write() (run as root; prints figures).

A small C writer does N write(1, buf, 64) calls into a pipe drained by `cat`,
and reports ns per call.  Four conditions, same machine, same writer:
  no probe | empty program on sys_exit_write (podtap's only write tracepoint) |
  empty programs on enter+exit (for reference) | podtap, writer unwatched |
  podtap, writer watched (its bytes copied into the ring buffer and consumed by
  `podtap tap --format json > /dev/null`).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.capture.headers import find_kernel_headers  # noqa: E402
from agent.capture.host import ensure_tracefs  # noqa: E402
from simnode.containers import CgroupSandbox  # noqa: E402

WRITES = 1_000_000
RUNS = 5
WRITER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    char buf[64];
    memset(buf, 'x', sizeof buf);
    buf[63] = '\n';
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        if (write(1, buf, sizeof buf) != sizeof buf) return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    FILE *out = fopen(argv[2], "w");
    fprintf(out, "%.1f\n", ns / n);
    fclose(out);
    return 0;
}
"""
EMPTY_BPF = "int empty(void *ctx) { return 0; }"
# The cost writer of the benchmark page and bench/probe_cost.py.
COST_WRITER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
/* cost SIZE SYSCALL(0 write, 1 writev of two halves) CALLS RESULT_FILE */
int main(int argc, char **argv) {
    size_t size = (size_t)atol(argv[1]);
    int vec = atoi(argv[2]);
    long n = atol(argv[3]);
    char *buf = malloc(size);
    memset(buf, 'x', size);
    buf[size - 1] = '\n';
    struct iovec iov[2] = {{buf, size / 2}, {buf + size / 2, size - size / 2}};
    struct timespec a, b;
    /* The writer's own CPU time: not the time it waits for the reader or for a CPU. */
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
    for (long i = 0; i < n; i++) {
        ssize_t w = vec ? writev(1, iov, 2) : write(1, buf, size);
        if (w != (ssize_t)size) return 1;
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
    FILE *out = fopen(argv[4], "w");
    fprintf(out, "%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    fclose(out);
    return 0;
}
"""


def build_writer(tmp: str, source: str = WRITER_C, name: str = "writer") -> str:
    """Compile a C writer (this script's, or COST_WRITER_C) into `tmp`; its path."""
    src, exe = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, name)
    Path(src).write_text(source)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


from simnode.containers import JOIN_AND_EXEC as JOIN  # noqa: E402


class Stream:
    """A container's stdout: one pipe drained by `cat`, shared by its init and writers."""

    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup
        self.cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.init = self.spawn(["sleep", "3600"])

    def spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["/bin/sh", "-c", JOIN, str(self.cgroup / "cgroup.procs"), *argv],
            stdout=self.cat.stdin,
            stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        self.init.kill()
        self.init.wait()
        assert self.cat.stdin is not None
        self.cat.stdin.close()
        self.cat.wait()


def run_writer(exe: str, stream: Stream, tmp: str) -> float:
    """ns per write of one run."""
    result = os.path.join(tmp, "result")
    proc = stream.spawn([exe, str(WRITES), result])
    assert proc.wait() == 0
    return float(Path(result).read_text())


def median_of(exe: str, stream: Stream, tmp: str) -> float:
    return statistics.median(run_writer(exe, stream, tmp) for _ in range(RUNS))


def start_tap(cgroup: Path) -> subprocess.Popen[bytes]:
    tap = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--log-level", "warning", "tap", "--format", "json",
         "--cgroup", str(cgroup)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert tap.stderr is not None
    while b"podtap: tapping" not in tap.stderr.readline():
        if tap.poll() is not None:
            raise SystemExit("tap failed to start")
    return tap


def stop_tap(tap: subprocess.Popen[bytes]) -> str:
    tap.send_signal(2)
    assert tap.stderr is not None
    rest = tap.stderr.read().decode()
    tap.wait(60)
    return rest.strip().splitlines()[-1]


def main() -> None:
    ensure_tracefs()
    os.environ["BCC_KERNEL_SOURCE"] = find_kernel_headers().path
    from bcc import BPF

    box = CgroupSandbox(prefix="podtap-bench")
    streams: list[Stream] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exe = build_writer(tmp)
            watched = Stream(box.container("watched").path)
            idle = Stream(box.container("idle").path)
            streams += [watched, idle]
            time.sleep(0.2)  # the inits have joined their cgroups
            results: dict[str, float] = {}
            results["no probe"] = median_of(exe, watched, tmp)

            empty = BPF(text=EMPTY_BPF)
            empty.attach_tracepoint(tp=b"syscalls:sys_exit_write", fn_name=b"empty")
            results["empty program on sys_exit_write"] = median_of(exe, watched, tmp)
            empty.attach_tracepoint(tp=b"syscalls:sys_enter_write", fn_name=b"empty")
            results["empty programs on sys_enter+exit_write"] = median_of(exe, watched, tmp)
            empty.cleanup()

            tap = start_tap(idle.cgroup)
            results["podtap, writer unwatched"] = median_of(exe, watched, tmp)
            stop_tap(tap)

            tap = start_tap(watched.cgroup)
            results["podtap, writer watched (64-byte lines)"] = median_of(exe, watched, tmp)
            counters = stop_tap(tap)
            results["no probe (again, drift check)"] = median_of(exe, watched, tmp)
    finally:
        for stream in streams:
            stream.close()
        box.cleanup()

    base = results["no probe"]
    cpus = os.cpu_count()
    print(f"write(64 bytes) into a pipe, {WRITES} calls, median of {RUNS} runs, {cpus} CPUs")
    for name, ns in results.items():
        print(f"  {name:42s} {ns:8.1f} ns/write  (+{ns - base:6.1f} ns)")
    print(f"  tap counters of the watched run: {counters}")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"  ({time.time() - t0:.0f} s)")
