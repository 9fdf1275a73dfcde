"""`podtap run` on a simulated node: CPU per 10K lines/s with enrichment, and the delay
from a container's cgroup creation to its entry in the kernel map (run as root).

CPU: a pod writes 100-byte lines at a paced rate for 10 s (the C writer of
tap_throughput.py, one line per write, then 10 lines per write); the agent's
CPU time over that window is divided by the rate.  Watch delay: 10 containerd
pods started one after another; the agent measures creation -> map entry.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tap_throughput import build_writer, process_cpu_s  # noqa: E402
from simnode.agent import AgentRun  # noqa: E402
from simnode.node import SimContainerSpec, SimNode  # noqa: E402

SECONDS = 10
RATE = 10_000


def cpu_case(node: SimNode, agent: AgentRun, exe: str, per_write: int, n: int) -> str:
    lines = RATE * SECONDS
    before_records = len(agent.records())
    cpu0 = process_cpu_s(agent.proc.pid)
    t0 = time.monotonic()
    pod = node.run_pod(
        "bench", f"paced-{per_write}-{n}",
        [SimContainerSpec("writer", f"exec {exe} {lines} {per_write} 100 {RATE}")],
        driver="systemd",
    )
    pod.wait(SECONDS * 3)
    agent.wait_for(lambda: len(agent.records()) - before_records >= lines, timeout=60,
                   why="every line shipped")
    elapsed = time.monotonic() - t0
    cpu = process_cpu_s(agent.proc.pid) - cpu0
    return (f"  {RATE:,} lines/s for {SECONDS} s, {per_write} line(s)/write: agent CPU "
            f"{cpu:.2f} s over {elapsed:.1f} s = {100 * cpu / elapsed:.1f}% of one core "
            f"per 10K lines/s (enriched, Fluent Bit schema, NDJSON into a pipe)")


def main() -> None:
    with SimNode() as node, tempfile.TemporaryDirectory() as tmp:
        exe = build_writer(tmp)
        agent = AgentRun(node, Path(tmp), kube={"poll_interval_s": 10.0})
        try:
            print(f"podtap run on a simulated node, {os.cpu_count()} CPUs")
            for n, per_write in enumerate((1, 10)):
                print(cpu_case(node, agent, exe, per_write, n))
            for i in range(10):
                node.run_pod("bench", f"delay-{i}",
                             [SimContainerSpec("app", "sleep 0.3; echo started")]).wait()
                time.sleep(0.25)
        finally:
            stats = agent.stop()
    print(f"  cgroup created -> watched in the kernel map, over {10} containerd pods: "
          f"avg {stats['watch_delay_ms_avg']} ms, max {stats['watch_delay_ms_max']} ms")
    print(f"  kernel drops: {stats['kernel_drop_records']}, lines shipped: {stats['records']}")


if __name__ == "__main__":
    main()
