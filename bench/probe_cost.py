"""The time podtap's program takes on every write() of the node, measured by the kernel
(run as root; prints figures).

bench/write_cost.py times whole write() calls, which on a shared VM varies by hundreds
of ns between runs: too much to see a few tens of ns. Here the kernel's own BPF
statistics (`kernel.bpf_stats_enabled`: run_time_ns and run_cnt of each program, read
from /proc/self/fdinfo) give the average time of one run of podtap's `sys_exit_write`
program, and of an empty program on the same tracepoint, for a writer that podtap
does not watch (what every other process on the node pays) and one it watches.

    python bench/probe_cost.py [--writes N] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.capture.headers import find_kernel_headers  # noqa: E402
from agent.capture.host import ensure_tracefs  # noqa: E402
from agent.capture.probe import PodsRoot, Probe  # noqa: E402
from agent.config import CaptureConfig  # noqa: E402
from bench.write_cost import Stream, build_writer  # noqa: E402
from simnode.containers import CgroupSandbox  # noqa: E402

STATS = "/proc/sys/kernel/bpf_stats_enabled"
EMPTY_BPF = "int empty(void *ctx) { return 0; }"


def run_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program behind `fd`."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    )
    return int(fields["run_time_ns"]), int(fields["run_cnt"])


def ns_per_run(fd: int, exe: str, stream: Stream, writes: int) -> float:
    t0, n0 = run_stats(fd)
    writer = stream.spawn([exe, str(writes), "/dev/null"])
    writer.wait()
    t1, n1 = run_stats(fd)
    return (t1 - t0) / max(n1 - n0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ensure_tracefs()
    os.environ["BCC_KERNEL_SOURCE"] = find_kernel_headers().path
    from bcc import BPF

    before = Path(STATS).read_text().strip()
    Path(STATS).write_text("1\n")
    box = CgroupSandbox(prefix="podtap-bench")
    streams: list[Stream] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            exe = build_writer(tmp)
            watched = Stream(box.container("watched").path)
            other = Stream(box.container("other").path)
            streams += [watched, other]
            empty = BPF(text=EMPTY_BPF)
            fn = empty.load_func(b"empty", BPF.TRACEPOINT)
            empty.attach_tracepoint(tp=b"syscalls:sys_exit_write", fn_name=b"empty")
            cases: dict[str, list[float]] = {}
            # As `podtap tap` loads it, then as `podtap run` does: with the pods' subtree
            # (a sandbox cgroup here), whose unknown writers are kept, so a writer outside
            # it also pays the subtree check.
            pods = box.container("kubepods").path
            for mode, pods_root in (("tap", None), ("run", PodsRoot(pods.stat().st_ino, 2))):
                probe = Probe(CaptureConfig(ring_bytes=64 << 20), pods_root)
                probe.load()
                probe.watch(watched.cgroup.stat().st_ino)
                probe.attach()
                podtap_fd = probe.program_fd("exit_write")
                for _ in range(args.rounds):  # the cases take turns: drift hits all alike
                    for name, fd, stream in (
                        ("empty program", fn.fd, other),
                        (f"podtap {mode}, unwatched", podtap_fd, other),
                        (f"podtap {mode}, watched", podtap_fd, watched),
                    ):
                        cases.setdefault(name, []).append(
                            ns_per_run(fd, exe, stream, args.writes))
                probe.close()
            empty.cleanup()
    finally:
        for stream in streams:
            stream.close()
        box.cleanup()
        Path(STATS).write_text(before + "\n")
    base = statistics.median(cases["empty program"])
    print(f"ns per run of the sys_exit_write program (kernel BPF stats), median of "
          f"{args.rounds} rounds of {args.writes} write(64 B) calls")
    for name, values in cases.items():
        med = statistics.median(values)
        print(f"  {name:20s} {med:7.1f} ns  (+{med - base:6.1f} ns over the empty program; "
              f"rounds {min(values):.1f}-{max(values):.1f})")
    print("  (a watched write's run includes copying it into the ring buffer; nothing drains "
          "it here, so most are dropped once the ring is full)")


if __name__ == "__main__":
    main()
