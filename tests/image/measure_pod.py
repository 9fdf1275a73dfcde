"""Memory and CPU of the image's `podtap run`, run as the chart's pod (tests/image/test_pod.py)
on the simulated node, idle and under load: the figures behind the chart's default `resources`.

    PODTAP_IMAGE=localhost/podtap:dev .venv/bin/python -m tests.image.measure_pod [lines/s] [s]

Prints the process's RSS (anonymous and file-backed) and its container's memory cgroup: usage
and peak, which is what a Kubernetes memory limit counts (including the BPF maps and the ring
buffer, charged to the cgroup that creates them), and the CPU time per second of load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simnode.node import SimContainerSpec, SimNode
from tests.deploy.chart import rendered
from tests.image.podman import PODMAN
from tests.image.test_pod import PodRun, agent_pod_command, free_port, http_status

LINE = "GET /api/item/$j 200 0.004 user-agent=curl/8.0 request_id=abcdef0123456789"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> str:
    keep = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keep:
            out[key] = f"{int(value.split()[0]) / 1024:.0f} MiB"
    return ", ".join(f"{k} {out[k]}" for k in keep)


def memory_cgroup(pid: int) -> str:
    """The container's memory cgroup: v1 (hybrid hosts) or v2."""
    mib = lambda n: f"{int(n) / 1048576:.0f} MiB"  # noqa: E731
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            stat = dict(x.split() for x in (d / "memory.stat").read_text().splitlines())
            return (f"usage {mib((d / 'memory.usage_in_bytes').read_text())}, peak "
                    f"{mib((d / 'memory.max_usage_in_bytes').read_text())}, anon "
                    f"{mib(stat['rss'])}, page cache {mib(stat['cache'])}")
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            d = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            stat = dict(x.split() for x in (d / "memory.stat").read_text().splitlines())
            peak = d / "memory.peak"
            return (f"usage {mib((d / 'memory.current').read_text())}, peak "
                    f"{mib(peak.read_text()) if peak.exists() else '?'}, anon "
                    f"{mib(stat['anon'])}, page cache {mib(stat['file'])}, "
                    f"kernel {mib(stat.get('kernel', 0))}")
    return "no memory cgroup"


def main() -> int:
    image = os.environ.get("PODTAP_IMAGE", "localhost/podtap:dev")
    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    r = rendered("default")
    with SimNode() as node, tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        port = free_port()
        name = f"podtap-measure-{os.getpid()}"
        agent = PodRun(agent_pod_command(r, node, image, tmp, port,
                                         podman_opts=("--name", name)))
        try:
            agent.wait_for(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 240,
                           "/readyz")
            pid = int(subprocess.check_output(
                [*PODMAN, "inspect", "--format", "{{.State.Pid}}", name], text=True))
            time.sleep(5)
            print(f"idle:       {rss(pid)}\n            memory cgroup: {memory_cgroup(pid)}")
            per_tick = max(1, rate // 10)
            script = (f"i=0; while [ $i -lt {seconds * 10} ]; do j=0; while [ $j -lt {per_tick} ];"
                      f' do echo "{LINE}"; j=$((j+1)); done; i=$((i+1)); sleep 0.1; done')
            total = per_tick * seconds * 10
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            node.run_pod("load", "gen-1", [SimContainerSpec("gen", script)])
            agent.wait_for(lambda: len(agent.records) >= total, seconds * 10 + 120, "records")
            wall, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
            print(f"load:       {total} lines in {wall:.1f} s ({total / wall:.0f} lines/s); "
                  f"CPU {cpu / wall * 1000:.0f} millicores")
            print(f"after load: {rss(pid)}\n            memory cgroup: {memory_cgroup(pid)}")
            agent.records.clear()
        finally:
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
