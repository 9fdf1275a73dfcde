"""What `podtap tap --format json > /dev/null` sustains (run as root; prints figures).

A C writer in a test container writes 100-byte lines at a paced rate for a few
seconds, either one line per write() or 40 lines per 4 KiB write().  The tap
gets SIGINT when the writer is done, drains what is left and exits.  A rate is
sustained when nothing was dropped and the tap finished within a second of the
writer (no growing backlog).  Then an unpaced burst shows what the ring buffer
absorbs.  Reported: records/s, lines/s, the tap's CPU per million lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.write_cost import Stream  # noqa: E402
from simnode.containers import CgroupSandbox  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINE = 100
SECONDS = 5
RATES_ONE = (50_000, 100_000, 150_000, 200_000, 250_000)
RATES_MANY = (200_000, 300_000, 400_000, 500_000, 600_000)
WRITER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int argc, char **argv) {
    long lines = atol(argv[1]);
    int per_write = atoi(argv[2]);
    int len = atoi(argv[3]);
    double rate = argc > 4 ? atof(argv[4]) : 0; /* lines per second, 0 = as fast as possible */
    char *buf = malloc((size_t)len * per_write);
    double start = now();
    for (long i = 0; i < lines; i += per_write) {
        if (rate > 0) {
            double ahead = start + i / rate - now();
            if (ahead > 0.001) {
                struct timespec d = {0, (long)(ahead * 1e9)};
                nanosleep(&d, 0);
            }
        }
        int n = (lines - i < per_write) ? (int)(lines - i) : per_write;
        for (int k = 0; k < n; k++) {
            char *l = buf + (size_t)k * len;
            memset(l, 'a' + (k % 26), len);
            snprintf(l, len, "line %010ld ", i + k);
            l[strlen(l)] = ' ';
            l[len - 1] = '\n';
        }
        char *p = buf;
        size_t left = (size_t)n * len;
        while (left) {
            ssize_t w = write(1, p, left);
            if (w <= 0) return 1;
            p += w;
            left -= (size_t)w;
        }
    }
    return 0;
}
"""


def build_writer(tmp: str) -> str:
    src, exe = os.path.join(tmp, "burst.c"), os.path.join(tmp, "burst")
    Path(src).write_text(WRITER_C)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


def stat_cpu_s(stat_file: str | Path) -> float:
    """user + system CPU seconds so far of a process or thread, from its /proc stat file."""
    fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a running process so far."""
    return stat_cpu_s(f"/proc/{pid}/stat")


def run_case(
    exe: str, stream: Stream, lines: int, per_write: int, rate: int = 0, ring: int = 0
) -> dict[str, float]:
    ring_args = ["--ring-bytes", str(ring)] if ring else []
    tap = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--log-level", "warning", "tap", "--format", "json",
         "--cgroup", str(stream.cgroup), *ring_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert tap.stderr is not None
    while b"podtap: tapping" not in tap.stderr.readline():
        if tap.poll() is not None:
            raise SystemExit("tap failed to start")
    cpu_before = process_cpu_s(tap.pid)
    t0 = time.monotonic()
    writer = stream.spawn([exe, str(lines), str(per_write), str(LINE), str(rate)])
    assert writer.wait() == 0
    t_writer = time.monotonic() - t0
    tap.send_signal(2)
    rest = tap.stderr.read().decode()
    _, status, usage = os.wait4(tap.pid, 0)
    tap.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - t0
    counters = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest.splitlines()[-1])}
    return {
        "writer_s": t_writer,
        "elapsed_s": elapsed,
        "records": counters["records"],
        "lines": counters["lines"],
        "dropped": counters["dropped_records"],
        "cpu_s": usage.ru_utime + usage.ru_stime - cpu_before,
    }


# (label, lines, lines per write, rate; 0 = unpaced) that the default ring must take.
SIZING_CASES = (
    ("100K lines/s paced, 5 s", 500_000, 1, 100_000),
    ("150K lines/s paced, 5 s", 750_000, 1, 150_000),
    ("burst of 200K lines, unpaced", 200_000, 1, 0),
    ("burst of 1M lines, unpaced", 1_000_000, 1, 0),
)
SIZING_RINGS = tuple(1 << n for n in range(20, 27))  # 1 MiB .. 64 MiB


def ring_sizing(exe: str, stream: Stream) -> None:
    """The smallest ring with zero loss for each case (each size tried twice)."""
    for label, lines, per_write, rate in SIZING_CASES:
        for ring in SIZING_RINGS:
            drops = [run_case(exe, stream, lines, per_write, rate, ring)["dropped"]
                     for _ in range(2)]
            if not any(drops):
                print(f"  ring sizing: {label}: {ring >> 20} MiB is the smallest zero-loss ring")
                break
            print(f"  ring sizing: {label}: {ring >> 20} MiB drops {drops}")


def main() -> None:
    box = CgroupSandbox(prefix="podtap-bench")
    stream = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exe = build_writer(tmp)
            stream = Stream(box.container("burst").path)
            time.sleep(0.2)
            if "--ring-sizing" in sys.argv:
                ring_sizing(exe, stream)
                return
            print(f"podtap tap --format json > /dev/null, {LINE}-byte lines, {os.cpu_count()} CPUs")
            idle = run_case(exe, stream, 10, 1, 10)  # shutdown time of a tap with no backlog
            stop_s = idle["elapsed_s"] - idle["writer_s"]
            print(f"  (a tap with no backlog exits {stop_s:.2f} s after SIGINT)")
            for per_write, rates in ((1, RATES_ONE), (40, RATES_MANY)):
                best = None
                for rate in rates:
                    r = run_case(exe, stream, rate * SECONDS, per_write, rate)
                    lag = r["elapsed_s"] - r["writer_s"] - stop_s
                    ok = r["dropped"] == 0 and lag < 0.5
                    print(f"  {per_write:2d} line(s)/write at {rate:,} lines/s for {SECONDS} s: "
                          f"{'sustained' if ok else 'NOT sustained'} (dropped {r['dropped']}, "
                          f"backlog drained {max(lag, 0):.2f} s after the writer; "
                          f"tap CPU {r['cpu_s'] / r['lines'] * 1e6:.2f} s per million lines)")
                    if not ok:
                        break
                    best = (rate, rate / per_write)
                if best:
                    print(f"  => {per_write} line(s)/write: sustains {best[0]:,} lines/s = "
                          f"{best[1]:,.0f} records/s with zero loss")
            for lines, per_write in ((1_000_000, 1), (2_000_000, 40)):
                r = run_case(exe, stream, lines, per_write)
                loss = "zero loss" if r["dropped"] == 0 else f"{r['dropped']} records DROPPED"
                print(
                    f"  burst, {per_write} line(s)/write: {lines:,} lines written in "
                    f"{r['writer_s']:.2f} s, all processed in {r['elapsed_s']:.2f} s "
                    f"({r['lines'] / r['elapsed_s']:,.0f} lines/s), {loss}"
                )
    finally:
        if stream is not None:
            stream.close()
        box.cleanup()


if __name__ == "__main__":
    main()
